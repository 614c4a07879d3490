"""Hotplug and coldplug: the device sources of load requests.

Hotplug (``UeventSource``) listens to the kernel's own uevents through
pyudev's netlink monitor on the *kernel* group -- there may be no udevd at
all -- and asks for a ``modalias`` load on each ``add`` that carries
``MODALIAS``.  ``bind``, ``change`` and the rest are ignored: a ``bind``
follows a successful load, and acting on it would reload a module autoclean
has just removed.  Only messages from the kernel are accepted: libudev
(systemd's sd-device monitor, under pyudev) drops multicast messages whose
netlink sender port is not 0 (the kernel) and messages whose
``SCM_CREDENTIALS`` uid is not 0, so another process cannot forge a
hotplug event.

Coldplug (``coldplug``) loads drivers for the devices that were present
before the daemon started.  Instead of ``udevadm trigger`` (which makes the
kernel re-send an event for every device and every listener re-process
it), it reads the ``modalias`` attribute files under ``/sys/devices``
directly, submits each distinct modalias once, waits for the outcomes and
walks again while loads keep creating devices (a PCI host controller's
driver registers a USB root hub, which has a modalias of its own).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from kmodd.daemon.requests import Outcome, OutcomeStatus, Request, RequestKind, Submit
from kmodd.journal import log
from kmodd.record import dataclass, field
from kmodd.root import Root

LOG = logging.getLogger(__name__)

# The kernel builds a uevent in a 2048-byte buffer (UEVENT_BUFFER_SIZE), so
# no honest MODALIAS is longer; sysfs modalias files obey the same bound
# in practice.  Anything longer is a forgery or a bug.
MAX_MODALIAS = 2048
MAX_DEVPATH = 4096
# udevd's own choice: bursts of thousands of events (a disk array, a
# docking station) must not overflow the socket while loads are queued.
RECEIVE_BUFFER = 128 * 1024 * 1024
# Events handled per on_readable() call before yielding to other sources.
DRAIN_BATCH = 512
# Directories that never contain devices but exist under every device.
_SKIP_DIRS = frozenset({"power"})


def check_modalias(value: object) -> str | None:
    """Why ``value`` is not an acceptable modalias, or None when it is.

    A modalias is matched with fnmatch against modules.alias and never
    reaches a shell, but it is logged and stored, so it must be printable
    ASCII without spaces or control characters (the kernel's own modalias
    writers guarantee this; DMI strings are filtered by the kernel).
    """
    if not isinstance(value, str):
        return "not text"
    if not value:
        return "empty"
    if len(value) > MAX_MODALIAS:
        return f"{len(value)} bytes long (limit {MAX_MODALIAS})"
    if not value.isascii() or not value.isprintable() or " " in value:
        return "contains spaces, control or non-ASCII characters"
    if ":" not in value:
        return "no bus prefix (BUS:...)"
    return None


def _clean_devpath(value: object) -> str | None:
    if (isinstance(value, str) and value.startswith("/") and len(value) <= MAX_DEVPATH
            and value.isprintable() and "\n" not in value):
        return value
    return None


def _shown(value: object, limit: int = 80) -> str:
    """A safe, short rendering of untrusted text for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Limiter:
    """Logs the first few rejections, then one in a thousand: a flood of bad
    events must not become a flood of journal lines."""

    def __init__(self, first: int = 20, every: int = 1000) -> None:
        self.count = 0
        self.first = first
        self.every = every

    def allow(self) -> bool:
        self.count += 1
        return self.count <= self.first or self.count % self.every == 0


NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1                 # the kernel's uevents; udevd re-broadcasts on group 2
SO_RCVBUFFORCE = 33


class KernelUevent:
    """One kernel uevent as the native reader parsed it (pyudev-like attributes)."""

    __slots__ = ("action", "properties")

    def __init__(self, action: str | None, properties: dict[str, str]) -> None:
        self.action = action
        self.properties = properties


def parse_uevent(data: bytes, sender_pid: int, groups: int, uid: int | None,
                 truncated: bool = False) -> KernelUevent | None:
    """A kernel uevent from a netlink datagram, or None when it is not one.

    The same checks libudev makes (sd-device's device_monitor_receive_device):
    sent to the kernel group by netlink port 0 (the kernel itself; every
    process has a non-zero port), sender uid 0 in SCM_CREDENTIALS, not
    truncated, not a libudev-format message, an ``ACTION@/DEVPATH`` header.
    """
    if truncated or len(data) < 32 or sender_pid != 0 or groups != KERNEL_GROUP or uid != 0:
        return None
    if data.startswith(b"libudev\0"):
        return None
    header, sep, rest = data.partition(b"\0")
    if not sep or b"@/" not in header or not rest:
        return None
    props: dict[str, str] = {}
    for item in rest.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq and key:
            # Undecodable bytes survive as surrogates, which check_modalias refuses.
            props[key.decode("ascii", "surrogateescape")] = value.decode("utf-8",
                                                                         "surrogateescape")
    return KernelUevent(props.get("ACTION"), props)


class NetlinkMonitor:
    """A kernel-uevent reader on a plain netlink socket: no libudev needed.

    The default reader (``uevent_reader = netlink``), and the fallback when
    pyudev or libudev is unavailable; it costs no imports (pyudev: ~20 ms
    on the host, 0.8 s under emulation, against the time to READY).
    """

    def __init__(self, receive_buffer: int = RECEIVE_BUFFER) -> None:
        import socket

        self._socket = socket
        sock = socket.socket(socket.AF_NETLINK,
                             socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             NETLINK_KOBJECT_UEVENT)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind((0, KERNEL_GROUP))
        self.sock = sock
        self._cmsg_space = socket.CMSG_SPACE(12)   # struct ucred

    def fileno(self) -> int:
        return self.sock.fileno()

    def poll(self, timeout: float | None = 0) -> KernelUevent | None:
        """The next acceptable uevent queued, or None; never blocks."""
        socket = self._socket
        for _ in range(64):   # skip a few rejected messages, then yield
            try:
                data, ancdata, flags, address = self.sock.recvmsg(16384, self._cmsg_space)
            except (BlockingIOError, InterruptedError):
                return None
            uid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                        and len(payload) >= 12:
                    uid = int.from_bytes(payload[4:8], "little")
            pid, groups = address if isinstance(address, tuple) else (-1, 0)
            event = parse_uevent(data, pid, groups, uid, bool(flags & socket.MSG_TRUNC))
            if event is not None:
                return event
        return None

    def close(self) -> None:
        self.sock.close()


def _open_monitor(receive_buffer: int, backend: str = "netlink") -> Any:
    if backend == "netlink":
        return NetlinkMonitor(receive_buffer)
    try:
        import pyudev  # deferred: ~20 ms of imports, only the daemon needs it

        context = pyudev.Context()   # loads libudev.so.1
        monitor = pyudev.Monitor.from_netlink(context, source="kernel")
    except (ImportError, OSError) as exc:   # no pyudev, or no libudev
        log(LOG, logging.WARNING, "pyudev unavailable (%s): reading uevents directly", exc)
        return NetlinkMonitor(receive_buffer)
    try:
        monitor.set_receive_buffer_size(receive_buffer)  # SO_RCVBUFFORCE (CAP_NET_ADMIN)
    except (OSError, ValueError):
        import socket

        # Without CAP_NET_ADMIN: SO_RCVBUF, capped by net.core.rmem_max.
        sock = socket.socket(fileno=os.dup(monitor.fileno()))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        except OSError:
            pass
        finally:
            sock.close()
    monitor.start()  # binds and sets O_NONBLOCK
    return monitor


@dataclass
class UeventStats:
    received: int = 0
    submitted: int = 0
    ignored: int = 0
    rejected: int = 0


class UeventSource:
    """Event-loop source turning kernel ``add`` uevents with MODALIAS into requests.

    ``monitor`` is anything with ``fileno()`` and ``poll(timeout)`` returning
    pyudev-like devices (``action``, ``properties``) or None; by default
    kmodd's own netlink reader (``backend="netlink"``, the settings'
    default), or pyudev's kernel-netlink monitor with ``backend="pyudev"``.
    ``root`` is kept for symmetry with coldplug (device paths are relative
    to its ``/sys``).
    """

    # The service raises udev's hand-over flag only while a source like this
    # one is open (kmodd.root.UDEV_HANDOVER).
    udev_handover = True

    def __init__(self, submit: Submit, root: Root | None = None, *, monitor: Any = None,
                 receive_buffer: int = RECEIVE_BUFFER, backend: str = "netlink") -> None:
        self.submit = submit
        self.root = root if root is not None else Root()
        self.stats = UeventStats()
        self._limiter = _Limiter()
        self._monitor = (monitor if monitor is not None
                         else _open_monitor(receive_buffer, backend))
        self._closed = False

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def on_readable(self) -> None:
        """Handle the events queued on the socket, at most DRAIN_BATCH, never blocking."""
        for _ in range(DRAIN_BATCH):
            if self._closed:
                return
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:
                # ENOBUFS: the kernel dropped events because we were slow.
                # Nothing to re-read; devices added meanwhile are picked up
                # by the next coldplug walk (kmodctl reload).
                log(LOG, logging.WARNING, "uevent socket error: %s", exc, errno=exc.errno)
                return
            except Exception as exc:  # a message pyudev/libudev could not decode
                self._reject("undecodable uevent", exc)
                continue
            if device is None:
                # No more (or a message libudev dropped, e.g. a forged one);
                # the loop calls us again if the socket is still readable.
                return
            self.handle(device)

    def handle(self, device: Any) -> Future[Outcome] | None:
        """Turn one received device event into a request; never raises."""
        self.stats.received += 1
        try:
            action = device.action
            if action != "add":
                self.stats.ignored += 1
                return None
            props = device.properties
            modalias = props.get("MODALIAS")
            if modalias is None:
                self.stats.ignored += 1
                return None
            devpath = _clean_devpath(props.get("DEVPATH"))
        except Exception as exc:  # hostile or undecodable properties
            self._reject("unreadable uevent", exc)
            return None
        if isinstance(modalias, str) and modalias.endswith("\n"):
            # The HD-audio bus formats its uevent's MODALIAS with the newline of
            # its sysfs file (snd_hdac_codec_modalias); udev's kmod builtin still
            # matches it ('*' matches the newline), so one trailing newline goes.
            modalias = modalias[:-1]
        problem = check_modalias(modalias)
        if problem is not None:
            self.stats.rejected += 1
            if self._limiter.allow():
                log(LOG, logging.WARNING, "ignoring uevent with bad MODALIAS %s: %s",
                    _shown(modalias), problem, devpath=devpath, requested_by="uevent")
            return None
        request = Request(kind=RequestKind.MODALIAS, key=modalias, devpath=devpath,
                          requested_by="uevent")
        try:
            future = self.submit(request)
        except Exception as exc:
            log(LOG, logging.ERROR, "cannot queue %s: %s", modalias, exc,
                modalias=modalias, devpath=devpath, requested_by="uevent")
            return None
        self.stats.submitted += 1
        return future

    def _reject(self, what: str, exc: BaseException) -> None:
        self.stats.rejected += 1
        if self._limiter.allow():
            log(LOG, logging.WARNING, "%s: %s", what, _shown(str(exc)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # pyudev monitors close their socket when garbage collected; drop
        # our reference and close a plain socket-like monitor explicitly.
        closer = getattr(self._monitor, "close", None)
        if callable(closer):
            with contextlib.suppress(Exception):
                closer()
        self._monitor = _ClosedMonitor()


class _ClosedMonitor:
    def fileno(self) -> int:
        return -1

    def poll(self, timeout: float | None = None) -> None:
        return None


# -- coldplug ----------------------------------------------------------------

def walk_modaliases(sys_dir: Path) -> Iterator[tuple[str, str]]:
    """``(devpath, modalias)`` for every device under ``sys_dir/devices``.

    ``devpath`` is relative to ``sys_dir`` ("/devices/pci0000:00/..."), as
    in a uevent's DEVPATH.  Symbolic links (``subsystem``, ``driver``,
    ``port`` and the like) are never followed, so the walk cannot loop;
    unreadable files (a device removed under our feet, ENODEV) are skipped.
    Invalid modaliases are yielded too; the caller decides.
    """
    top = os.fspath(sys_dir)
    stack = [os.path.join(top, "devices")]
    prefix_len = len(top)
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        has_modalias = False
        with entries:
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name not in _SKIP_DIRS:
                            stack.append(entry.path)
                    elif name == "modalias" and entry.is_file(follow_symlinks=False):
                        has_modalias = True
                except OSError:
                    continue
        if has_modalias:
            try:
                with open(os.path.join(directory, "modalias"), "rb") as handle:
                    raw = handle.read(MAX_MODALIAS + 2)
            except OSError:
                continue
            text = raw.rstrip(b"\n").decode("ascii", "replace")
            if text:
                yield directory[prefix_len:], text


@dataclass
class ColdplugResult:
    iterations: int = 0              # walks of /sys/devices
    devices: int = 0                 # devices with a modalias at the last walk
    submitted: int = 0               # distinct modaliases asked for
    rejected: int = 0                # modalias files with unacceptable contents
    outcomes: list[Outcome] = field(default_factory=list)
    timed_out: bool = False          # settle_timeout passed with loads still pending
    elapsed: float = 0.0

    @property
    def loaded(self) -> list[str]:
        """Modules loaded by coldplug, in completion order, without repeats."""
        seen: dict[str, None] = {}
        for outcome in self.outcomes:
            if outcome.status is OutcomeStatus.LOADED:
                for name in outcome.modules:
                    seen.setdefault(name, None)
        return list(seen)


def _submit_found(found: Iterable[tuple[str, str, bool]], asked: set[str], submit: Submit,
                  result: ColdplugResult, limiter: _Limiter) -> list[Future[Outcome]]:
    """Submit each modalias of one walk not asked for before; ``result.devices``
    counts the walked devices (not the ``first`` ones submitted ahead)."""
    futures: list[Future[Outcome]] = []
    devices = 0
    for devpath, modalias, walked in found:
        devices += walked
        if modalias in asked:
            continue
        asked.add(modalias)
        problem = check_modalias(modalias)
        if problem is not None:
            result.rejected += 1
            if limiter.allow():
                log(LOG, logging.WARNING, "ignoring bad modalias %s: %s",
                    _shown(modalias), problem, devpath=devpath, requested_by="coldplug")
            continue
        request = Request(kind=RequestKind.COLDPLUG, key=modalias, devpath=devpath,
                          requested_by="coldplug")
        try:
            futures.append(submit(request))
        except Exception as exc:
            log(LOG, logging.ERROR, "cannot queue %s: %s", modalias, exc,
                modalias=modalias, devpath=devpath, requested_by="coldplug")
            continue
        result.submitted += 1
    result.devices = devices
    return futures


def _collect(futures: list[Future[Outcome]], deadline: float, result: ColdplugResult, *,
             asked_for: dict[Future[Outcome], Request], start: float,
             report_every: float) -> bool:
    """Wait for one walk's outcomes into ``result``; False when the deadline came first.
    Every ``report_every`` seconds of waiting, and at the deadline, the requests
    still unanswered are logged (``asked_for``: the request behind each future)."""
    pending = set(futures)
    report_at = time.monotonic() + report_every
    while pending:
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            _log_waiting(pending, asked_for, now - start, timed_out=True)
            return False
        if now >= report_at:
            _log_waiting(pending, asked_for, now - start, timed_out=False)
            report_at = now + report_every
        done, pending = wait(pending, timeout=min(remaining, report_at - now),
                             return_when=FIRST_COMPLETED)
        for future in done:
            try:
                result.outcomes.append(future.result())
            except Exception as exc:
                log(LOG, logging.ERROR, "coldplug request failed: %s", exc)
    return True


def coldplug(root: Root, submit: Submit, *, settle_timeout: float = 120.0,
             max_iterations: int = 16, report_every: float = 30.0,
             on_queued: Callable[[int], None] | None = None,
             seen: set[str] | None = None,
             first: Iterable[tuple[str, str]] = ()) -> ColdplugResult:
    """Load drivers for the devices already present; blocks until done or timed out.

    Each iteration walks ``/sys/devices``, submits every modalias not asked
    for before (kind "coldplug"), and waits for those outcomes; the walk is
    repeated until it finds nothing new.  (Devices a driver creates
    asynchronously after its load returned, e.g. USB devices behind a new
    root hub, also arrive as hotplug uevents: the uevent source is open
    before coldplug starts, so nothing falls between the two.)  ``on_queued(n)`` is called once,
    right after the first walk's requests are queued: the daemon reports
    READY then.  ``seen`` lets the caller share the set of modaliases
    already handled (a later ``kmodctl reload`` walks again without
    re-asking).  ``first`` lists ``(devpath, modalias)`` pairs submitted
    before the first walk, in that order (the learned order,
    kmodd.daemon.learned).  Runs in a thread of its own: it waits on futures;
    every ``report_every`` seconds of waiting, the journal hears which
    requests it still waits for (a stuck load is named, not just slow).
    """
    start = time.monotonic()
    deadline = start + settle_timeout
    result = ColdplugResult()
    asked = seen if seen is not None else set()
    limiter = _Limiter()
    # Which request each future answers: the ones still unanswered are named.
    asked_for: dict[Future[Outcome], Request] = {}

    def noted(request: Request) -> Future[Outcome]:
        fut = submit(request)
        asked_for[fut] = request
        return fut

    while result.iterations < max_iterations:
        result.iterations += 1
        found: Iterable[tuple[str, str, bool]] = (
            (d, m, True) for d, m in walk_modaliases(root.sys))
        if result.iterations == 1:
            found = itertools.chain(((d, m, False) for d, m in first), found)
        asked_for.clear()
        futures = _submit_found(found, asked, noted, result, limiter)
        if result.iterations == 1 and on_queued is not None:
            on_queued(len(futures))
        if not futures:
            break
        if not _collect(futures, deadline, result, asked_for=asked_for, start=start,
                        report_every=report_every):
            result.timed_out = True
            break
    result.elapsed = time.monotonic() - start
    return result


def _log_waiting(pending: Iterable[Future[Outcome]], asked_for: dict[Future[Outcome], Request],
                 elapsed: float, *, timed_out: bool) -> None:
    """Name the requests coldplug still waits for (at most a dozen of them)."""
    keys = sorted(f"{r.key} ({r.devpath})" if r.devpath else r.key
                  for r in (asked_for[f] for f in pending if f in asked_for))
    shown = ", ".join(_shown(k, 160) for k in keys[:12])
    more = f" and {len(keys) - 12} more" if len(keys) > 12 else ""
    # Slow is routine under emulation (INFO); giving up is not (WARNING).
    log(LOG, logging.WARNING if timed_out else logging.INFO,
        "coldplug %s after %.0fs; %d request(s) unanswered: %s%s",
        "gave up waiting" if timed_out else "still waiting", elapsed, len(keys), shown, more,
        requested_by="coldplug")
