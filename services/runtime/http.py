"""Serving an aiohttp application on "host:port": shared by the CLM REST API and the CARA HTTP endpoint."""

from __future__ import annotations

from aiohttp import web

# Connections the kernel queues for the service until it accepts them (aiohttp's default is 128; the kernel caps it
# at net.core.somaxconn, 4096). A busy event loop accepts late: with 128, a burst of clients behind the reverse
# proxy overflowed the queue, their SYNs were dropped, and the proxy's 1 s connect timeout failed them.
BACKLOG = 1024


async def serve(app: web.Application, listen: str) -> web.AppRunner:
    """Bind `app` to "host:port" (port 0: any free port, see runner.addresses); `await runner.cleanup()` stops it."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or None, int(port), backlog=BACKLOG).start()
    return runner
