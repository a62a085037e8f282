"""A NATS connection as one bus user that collects the server's permission errors (integration and lab tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
from nats.aio.client import Client


class BusSession:
    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    async def violation(self, what: str, timeout: float = 3.0) -> str:
        """Wait for the server's permissions violation that names `what`."""
        await self.nc.flush()
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for err in self.errors:
                if "permissions violation" in err.lower() and what.lower() in err.lower():
                    return err
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {what!r}; errors: {self.errors}")


@contextlib.asynccontextmanager
async def bus_session(connect_kwargs: dict[str, Any]) -> AsyncIterator[BusSession]:
    """Connected with `connect_kwargs` (servers, user, password, tls, inbox_prefix), closed afterwards."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(**connect_kwargs, error_cb=on_error, allow_reconnect=False, connect_timeout=5)
    try:
        yield BusSession(nc, errors)
    finally:
        await nc.close()


async def plaintext_refused(host: str, port: int, user: str, password: str) -> dict[str, Any]:
    """Speak plaintext NATS by hand (a client library would refuse on its own); return the server's INFO.

    A server that requires TLS answers a plaintext CONNECT with no PONG, only an error or a closed connection.
    """
    import json

    reader, writer = await asyncio.open_connection(host, port)
    try:
        info: dict[str, Any] = json.loads((await asyncio.wait_for(reader.readline(), 5)).decode().removeprefix("INFO "))
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        writer.write(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        assert b"PONG" not in answer, answer
    finally:
        writer.close()
    return info
