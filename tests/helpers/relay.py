"""A TCP relay in front of a real server (database node, NATS server) that tests take down and bring back."""

from __future__ import annotations

import asyncio

__all__ = ["Relay"]


class Relay:
    """A node in front of the real one: relays TCP to it, and can go down (connections cut, new ones refused) and
    come back on the same address."""

    def __init__(self, target: str, port: int = 0) -> None:
        """``port``: where to listen (0: any free port, chosen at the first start and kept)."""
        self._host, _, target_port = target.rpartition(":")
        self._port = int(target_port)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = port
        self.accepted = 0

    @property
    def node(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass  # the other side went away: so does this one
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
