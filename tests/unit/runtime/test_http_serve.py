"""hapki.runtime.http.serve on a real socket: connections that arrive while the service is busy wait in the kernel's
accept queue instead of being dropped (the reverse proxy in front gives a connect 1 s before it fails it)."""

from __future__ import annotations

import select
import socket
import time

from aiohttp import web

from hapki.runtime.http import BACKLOG, serve

BURST = 600  # more than aiohttp's default backlog (128) queues, fewer than ours
WAIT = 0.5  # s; a dropped SYN is sent again after 1 s, so a connect that completes within this was queued


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _connect_burst(host: str, port: int, count: int, wait: float) -> tuple[int, list[socket.socket]]:
    """Start ``count`` non-blocking connects at once; how many completed within ``wait`` seconds."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        socks.append(s)
    poller, pending = select.poll(), {}
    for s in socks:
        poller.register(s, select.POLLOUT)
        pending[s.fileno()] = s
    connected, deadline = 0, time.monotonic() + wait
    while pending and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            s = pending.pop(fd)
            poller.unregister(fd)
            connected += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return connected, socks


async def test_a_burst_of_connections_to_a_busy_service_is_queued_not_dropped() -> None:
    assert BACKLOG > BURST
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = await serve(app, "127.0.0.1:0")
    host, port = runner.addresses[0][:2]
    try:
        # The event loop does not run while this burst connects (as when it is busy with other work): only the
        # kernel's accept queue holds the connections until the service accepts them.
        connected, socks = _connect_burst(host, port, BURST, WAIT)
        for s in socks:
            s.close()
        assert connected == BURST, f"{BURST - connected} of {BURST} connects were dropped by a full accept queue"
    finally:
        await runner.cleanup()
