"""Which IPv4/IPv6 addresses the kernel has on this host (network namespace), by a netlink address dump.

A persistent NETLINK_ROUTE socket and one RTM_GETADDR dump per query: microseconds, and it reflects the kernel,
unlike keepalived notify scripts (FIELD-NOTES).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

NLMSG_DONE = 3
NLMSG_ERROR = 2
RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
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


class VipOwnership:
    """`holds()` answers "does this host (network namespace) hold the floating IP now?" from the kernel."""

    def __init__(self, vip: str, dump: AddressDump | None = None) -> None:
        self.vip = str(ipaddress.ip_address(vip))
        self._dump = dump or AddressDump()

    def holds(self) -> bool:
        return self.vip in self._dump.addresses()

    def close(self) -> None:
        self._dump.close()
