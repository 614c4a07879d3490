"""The kinds of the network links that exist, in every network namespace, over rtnetlink.

``rmmod dummy`` destroys every dummy interface in every namespace
(rtnl_link_unregister), yet a link holds no reference on its module
(refcount 0).  Autoclean asks this before unloading a module that provides a
link type, so an administrator's and every container's interfaces survive.

Other namespaces are read without entering them (setns needs CAP_SYS_ADMIN,
which kmodd's unit does not keep): each gets a namespace id in ours
(RTM_NEWNSID with NETNSA_PID or NETNSA_FD, as ``ip netns set NAME auto``),
then the link dump asks for that id (IFLA_TARGET_NETNSID,
rtnl_get_net_ns_capable: CAP_NET_ADMIN).  Namespaces are found through every
process (``/proc/PID/task/TID/ns/net``), ``/run/netns`` and nsfs bind mounts
in our mount table.  Any namespace found but not read makes the whole answer
unknown (OSError): autoclean then keeps link-type modules.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from kmodd.record import dataclass, field

_RTM_GETLINK = 18
_RTM_NEWLINK = 16
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFLA_LINKINFO = 18
_IFLA_TARGET_NETNSID = 46
_RTM_NEWNSID = 88
_RTM_GETNSID = 90
_NLM_F_ACK = 0x4
_NETNSA_NSID = 1
_NETNSA_PID = 2
_NETNSA_FD = 3
_RTGENMSG_LEN = 4                 # struct rtgenmsg, aligned
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


def _attr(kind: int, fmt: str, value: int) -> bytes:
    data = struct.pack(fmt, value)
    return _ATTR.pack(_ATTR.size + len(data), kind) + data


class _Rtnl:
    """One rtnetlink socket: requests answered in order, never blocking forever."""

    def __init__(self, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _send(self, msg_type: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(_HDR.pack(_HDR.size + len(body), msg_type, flags, self.seq, 0) + body)
        return self.seq

    def link_kinds(self, nsid: int | None = None) -> set[str]:
        body = bytes(_IFINFO_LEN)
        if nsid is not None:
            body += _attr(_IFLA_TARGET_NETNSID, "=i", nsid)
        self._send(_RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP, body)
        kinds: set[str] = set()
        while True:
            found, done = parse_link_kinds(self.sock.recv(65536))
            kinds |= found
            if done:
                return kinds

    def _one(self, msg_type: int, flags: int, body: bytes) -> tuple[int, bytes]:
        """Send; (errno or 0, payload of the RTM_NEWNSID answer if any)."""
        seq = self._send(msg_type, flags, body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _HDR.unpack_from(data, offset)
                if length < _HDR.size or offset + length > len(data):
                    raise OSError("rtnetlink: truncated message")
                payload = data[offset + _HDR.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload, 0)
                    return -err, b""
                if kind == _RTM_NEWNSID:
                    return 0, payload

    def nsid(self, target: tuple[int, int]) -> int:
        """Our id for the namespace of a pid (NETNSA_PID) or open nsfs fd (NETNSA_FD),
        assigning one first when it has none."""
        how, value = target
        ident = _attr(how, "=I", value)
        for attempt in range(2):
            code, payload = self._one(_RTM_GETNSID, _NLM_F_REQUEST,
                                      bytes(_RTGENMSG_LEN) + ident)
            if code:
                raise OSError(code, f"RTM_GETNSID: {os.strerror(code)}")
            for kind, value_ in _attrs(payload, _RTGENMSG_LEN, len(payload)):
                if kind == _NETNSA_NSID and len(value_) >= 4:
                    nsid = struct.unpack_from("=i", value_)[0]
                    if nsid >= 0:
                        return nsid
            if attempt:
                break
            # None yet: let the kernel pick one (EEXIST: another process just did).
            code, _ = self._one(_RTM_NEWNSID, _NLM_F_REQUEST | _NLM_F_ACK,
                                bytes(_RTGENMSG_LEN) + _attr(_NETNSA_NSID, "=i", -1) + ident)
            if code not in (0, errno.EEXIST):
                raise OSError(code, f"RTM_NEWNSID: {os.strerror(code)}")
        raise OSError(errno.EIO, "rtnetlink: no namespace id assigned")


@dataclass
class NetNamespace:
    """One network namespace and the ways to name it to the kernel."""

    key: tuple[int, int]                                # (st_dev, st_ino) of its nsfs inode
    pids: list[int] = field(default_factory=list)       # processes (threads) inside it
    paths: list[str] = field(default_factory=list)      # bind mounts of it


def namespaces(proc: Path, run_netns: Path) -> tuple[tuple[int, int], list[NetNamespace]]:
    """(our namespace's key, every other network namespace found)."""
    st = os.stat(proc / "self/ns/net")
    own = (st.st_dev, st.st_ino)
    found: dict[tuple[int, int], NetNamespace] = {}

    def add(path: str, pid: int | None) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return               # the process exited meanwhile
        key = (st.st_dev, st.st_ino)
        if key == own:
            return
        ns = found.setdefault(key, NetNamespace(key))
        if pid is not None:
            ns.pids.append(pid)
        else:
            ns.paths.append(path)

    for entry in _listdir(proc):
        if entry.isdigit():
            # Threads can sit in a namespace of their own (setns in a thread).
            for tid in _listdir(proc / entry / "task") or [entry]:
                add(os.fspath(proc / entry / "task" / tid / "ns/net"), int(tid))
    for name in _listdir(run_netns):
        add(os.fspath(run_netns / name), None)
    for path in _nsfs_mounts(proc / "self/mountinfo"):
        add(path, None)
    return own, list(found.values())


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _nsfs_mounts(mountinfo: Path) -> Iterator[str]:
    """Mount points of network namespaces bound somewhere (``ip netns``, container runtimes)."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return
    for line in text.splitlines():
        fields = line.split()
        if " - nsfs " in line and len(fields) > 4 and fields[3].startswith("net:["):
            # Octal escapes (\040 for a space) as the kernel writes mount points.
            yield fields[4].encode().decode("unicode_escape")


def link_kinds(timeout: float = 2.0, *, proc: Path = Path("/proc"),
               run_netns: Path = Path("/run/netns"), all_namespaces: bool = True) -> set[str]:
    """Kinds (``ip -d link``'s type: dummy, bridge, veth...) of every link in our
    network namespace and, with ``all_namespaces``, in every other one found.
    OSError when some namespace could not be read: the answer would be incomplete."""
    rtnl = _Rtnl(timeout)
    try:
        kinds = rtnl.link_kinds()
        if not all_namespaces:
            return kinds
        _own, others = namespaces(proc, run_netns)
        for ns in others:
            kinds |= _kinds_in(rtnl, ns)
        return kinds
    finally:
        rtnl.close()


def _kinds_in(rtnl: _Rtnl, ns: NetNamespace) -> set[str]:
    last: OSError | None = None
    for pid in ns.pids:
        try:
            return rtnl.link_kinds(rtnl.nsid((_NETNSA_PID, pid)))
        except OSError as exc:   # ESRCH: that process exited; try another of its pids
            last = exc
    for path in ns.paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            last = exc
            continue
        try:
            return rtnl.link_kinds(rtnl.nsid((_NETNSA_FD, fd)))
        except OSError as exc:
            last = exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    if last is not None and last.errno == errno.ESRCH and not ns.paths:
        return set()             # every process of it exited: the namespace went with them
    raise OSError(last.errno if last else errno.EIO,
                  f"cannot list the links of network namespace {ns.key[1]}: {last}")
