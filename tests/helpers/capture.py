"""Watch TCP payload on the loopback interface, to show what a link between local servers carries on the wire.

`LoopbackCapture(address, port)` reads every IPv4 TCP segment to or from ``address:port`` on ``lo`` through an
AF_PACKET socket (root only) in a thread, and keeps per direction: the byte count, the first bytes, and whether any
of the `needles` crossed (searched across segment boundaries). The kernel's drop counter is read at the end, so a
test can tell "not seen" from "not captured". Nothing is stored beyond that: a state transfer is hundreds of MB.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_PACKET_OUTGOING = 4  # lo shows every frame twice, once outgoing and once incoming: keep the incoming copy
_ETH_HEADER = 14
_HEAD_BYTES = 64
_SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by the socket module


@dataclass
class Flow:
    """One direction of the captured connection(s)."""

    bytes: int = 0
    head: bytearray = field(default_factory=bytearray)  # the first payload bytes (one connection's start)
    found: set[bytes] = field(default_factory=set)  # needles seen in the payload
    _tail: bytes = b""


class LoopbackCapture:
    """TCP payload to and from ``address:port`` on ``lo`` while the context is open (see the module doc)."""

    def __init__(self, address: str, port: int, needles: list[bytes]) -> None:
        self.address, self.port, self.needles = socket.inet_aton(address), port, needles
        self.flows: dict[str, Flow] = {"to": Flow(), "from": Flow()}  # to / from address:port
        self.drops = 0
        self._stop = threading.Event()
        self._keep = max(len(n) for n in needles) - 1
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        # 256 MiB of buffer: loopback moves a state transfer faster than Python reads it in bursts.
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 256 << 20)
        self._sock.bind(("lo", 0))
        self._thread = threading.Thread(target=self._run, name="loopback-capture", daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        _packets, self.drops = struct.unpack("II", self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
        self._sock.close()

    @property
    def total(self) -> int:
        return sum(f.bytes for f in self.flows.values())

    def _run(self) -> None:
        while not self._stop.is_set() or select.select([self._sock], [], [], 0)[0]:
            if not select.select([self._sock], [], [], 0.2)[0]:
                continue
            frame, addr = self._sock.recvfrom(1 << 17)
            if addr[2] != _PACKET_OUTGOING:
                self._segment(frame)

    def _segment(self, frame: bytes) -> None:
        if frame[12:14] != b"\x08\x00":
            return
        ip = frame[_ETH_HEADER:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_TCP:
            return
        total = struct.unpack("!H", ip[2:4])[0]
        src, dst = ip[12:16], ip[16:20]
        tcp = ip[ihl:total]
        sport, dport = struct.unpack("!HH", tcp[:4])
        if (dst, dport) == (self.address, self.port):
            flow = self.flows["to"]
        elif (src, sport) == (self.address, self.port):
            flow = self.flows["from"]
        else:
            return
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload:
            return
        flow.bytes += len(payload)
        if len(flow.head) < _HEAD_BYTES:
            flow.head += payload[: _HEAD_BYTES - len(flow.head)]
        window = flow._tail + payload
        flow.found.update(n for n in self.needles if n in window)
        flow._tail = window[-self._keep:] if self._keep else b""
