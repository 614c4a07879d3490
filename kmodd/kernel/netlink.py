"""The kinds of the network links that exist, over rtnetlink.

``rmmod dummy`` destroys every dummy interface, yet a link holds no reference
on its module (refcount 0).  Autoclean asks this before unloading a module
that provides a link type, so an administrator's interfaces survive.
"""

from __future__ import annotations

import socket
import struct

_RTM_GETLINK = 18
_RTM_NEWLINK = 16
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFLA_LINKINFO = 18
_IFLA_INFO_KIND = 1
_NLA_TYPE_MASK = 0x3FFF          # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_HDR = struct.Struct("=IHHII")    # struct nlmsghdr
_IFINFO_LEN = 16                  # struct ifinfomsg
_ATTR = struct.Struct("=HH")      # struct rtattr


def _attrs(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    while start + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < _ATTR.size or start + length > end:
            break
        out.append((kind & _NLA_TYPE_MASK, data[start + _ATTR.size:start + length]))
        start += (length + 3) & ~3
    return out


def parse_link_kinds(data: bytes) -> tuple[set[str], bool]:
    """(kinds found in these RTM_NEWLINK messages, whether the dump is complete)."""
    kinds: set[str] = set()
    offset = 0
    while offset + _HDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size or offset + length > len(data):
            raise OSError("rtnetlink: truncated message")
        if msg_type == _NLMSG_DONE:
            return kinds, True
        if msg_type == _NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, offset + _HDR.size)
            raise OSError(-err, "rtnetlink link dump failed")
        if msg_type == _RTM_NEWLINK:
            body = offset + _HDR.size + _IFINFO_LEN
            for kind, payload in _attrs(data, body, offset + length):
                if kind != _IFLA_LINKINFO:
                    continue
                for inner, value in _attrs(payload, 0, len(payload)):
                    if inner == _IFLA_INFO_KIND:
                        kinds.add(value.split(b"\0", 1)[0].decode("ascii", "replace"))
        offset += (length + 3) & ~3
    return kinds, False


def link_kinds(timeout: float = 2.0) -> set[str]:
    """Kinds (``ip -d link``'s type: dummy, bridge, veth...) of every link in this netns."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        request = _HDR.pack(_HDR.size + _IFINFO_LEN, _RTM_GETLINK,
                            _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + bytes(_IFINFO_LEN)
        sock.send(request)
        kinds: set[str] = set()
        while True:
            found, done = parse_link_kinds(sock.recv(65536))
            kinds |= found
            if done:
                return kinds
