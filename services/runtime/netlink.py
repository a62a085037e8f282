"""Which IPv4/IPv6 addresses the kernel has on this host (network namespace), by a netlink address dump.

A persistent NETLINK_ROUTE socket and one RTM_GETADDR dump per query: microseconds, and it reflects the kernel,
unlike keepalived notify scripts (FIELD-NOTES). `AddressChanges` waits for the kernel's own announcement that an
address came or went (the RTMGRP_*_IFADDR multicast groups), so a waiting process wakes when the VIP moves instead
of polling for it: on a shared host every wake-up of an idle Python process costs a few hundred microseconds of CPU
(docs/PERFORMANCE-HISTORY.md, session 14).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct

log = logging.getLogger("hapki.runtime.netlink")

NLMSG_DONE = 3
NLMSG_ERROR = 2
RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


class AddressDump:
    """Reads the set of local addresses through one persistent netlink socket."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def addresses(self) -> set[str]:
        self._seq += 1
        request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                                 self._seq, os.getpid()) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        self._sock.send(request)
        found: set[str] = set()
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return found
                if seq == self._seq:
                    if kind == NLMSG_DONE:
                        return found
                    if kind == NLMSG_ERROR:
                        raise OSError("netlink address dump failed")
                    found |= _parse_addr(data[offset + _NLMSGHDR.size : offset + length])
                offset += (length + 3) & ~3


def _parse_addr(payload: bytes) -> set[str]:
    family = payload[0]
    result: set[str] = set()
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        value = payload[offset + _RTATTR.size : offset + length]
        if kind in (IFA_ADDRESS, IFA_LOCAL):
            if family == socket.AF_INET and len(value) == 4:
                result.add(str(ipaddress.IPv4Address(value)))
            elif family == socket.AF_INET6 and len(value) == 16:
                result.add(str(ipaddress.IPv6Address(value)))
        offset += (length + 3) & ~3
    return result


class AddressChanges:
    """The kernel's announcements that an address was added or removed, as an awaitable "something changed".

    An announcement only wakes the waiter; what the addresses are is read with a dump (`AddressDump`). The socket
    joins the groups when constructed, so a change after that is never missed: announcements wait in its buffer
    until the first `wait`. Announcements the kernel had to drop (the buffer overflowed: ENOBUFS) count as a change.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        self._sock.setblocking(False)
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait(self, timeout: float) -> bool:
        """True when an address changed since the last True (at once if that already happened); False after
        `timeout` seconds without a change."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._drain)
        if not self._changed.is_set():
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result instead of raising when its
            # task is cancelled just as the event is set (a VIP that moves as the service stops), and the loop
            # around it would never stop.
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                return False
        self._changed.clear()
        return True

    def _drain(self) -> None:
        while True:
            try:
                if not self._sock.recv(65536):
                    return
            except BlockingIOError:
                return
            except OSError as exc:
                # ENOBUFS: the kernel dropped announcements; whatever they said, the next dump reads the truth.
                if exc.errno != errno.ENOBUFS:
                    log.warning("netlink address announcements: %s; reading the addresses again", exc)
                self._changed.set()
                return
            self._changed.set()

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class VipOwnership:
    """`holds()` answers "does this host (network namespace) hold the floating IP now?" from the kernel.

    With `announced=True`, `changed(timeout)` also waits until the kernel announces an address change (the VIP
    moving in or out): a caller that reads `holds()` after each `changed()` sees every move at once without
    polling. The announcements are subscribed to before the first `holds()`, so none falls between the two.
    """

    def __init__(self, vip: str, dump: AddressDump | None = None, *, announced: bool = False) -> None:
        self.vip = str(ipaddress.ip_address(vip))
        self._changes = AddressChanges() if announced else None
        self._dump = dump or AddressDump()

    def holds(self) -> bool:
        return self.vip in self._dump.addresses()

    async def changed(self, timeout: float) -> bool:
        """True once the kernel announced an address change, False after `timeout` s (always, without
        announcements: then this is a plain sleep)."""
        if self._changes is None:
            await asyncio.sleep(timeout)
            return False
        return await self._changes.wait(timeout)

    def close(self) -> None:
        if self._changes is not None:
            self._changes.close()
        self._dump.close()
