"""Serving an aiohttp application on "host:port": shared by the CLM REST API and the CARA HTTP endpoint."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, listen: str) -> web.AppRunner:
    """Bind `app` to "host:port" (port 0: any free port, see runner.addresses); `await runner.cleanup()` stops it."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or None, int(port)).start()
    return runner
