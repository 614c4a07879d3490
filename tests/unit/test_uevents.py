"""Hotplug uevents and the coldplug walk, without a kernel: fake devices,
a fake /sys tree, and a submit() that plays the scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kmodd.daemon.requests import Outcome, Request
from kmodd.daemon.uevents import (
    MAX_MODALIAS,
    NetlinkMonitor,
    UeventSource,
    check_modalias,
    coldplug,
    parse_uevent,
    walk_modaliases,
)
from kmodd.root import Root


class FakeDevice:
    """What pyudev hands out: ``action`` and a ``properties`` mapping."""

    def __init__(self, action: str | None, **props: Any) -> None:
        self.action = action
        self.properties = props


class ExplodingDevice:
    @property
    def action(self) -> str:
        return "add"

    @property
    def properties(self) -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


class FakeMonitor:
    """A socketpair-backed monitor: readable while devices are queued."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self.queue: deque[Any] = deque()
        self.closed = False

    def push(self, *items: Any) -> None:
        for item in items:
            self.queue.append(item)
            self._w.send(b"x")

    def fileno(self) -> int:
        return self._r.fileno()

    def poll(self, timeout: float | None = None) -> Any:
        try:
            self._r.recv(1)
        except BlockingIOError:
            return None
        item = self.queue.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []

    def submit(self, request: Request) -> Future[Outcome]:
        self.requests.append(request)
        future: Future[Outcome] = Future()
        future.set_result(Outcome(request, "loaded", ("mod",)))
        return future


PCI = "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"


def test_add_with_modalias_becomes_a_request() -> None:
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    future = source.handle(FakeDevice("add", MODALIAS=PCI, SUBSYSTEM="pci",
                                      DEVPATH="/devices/pci0000:00/0000:00:03.0"))
    assert future is not None and future.result().status == "loaded"
    assert rec.requests == [Request(kind="modalias", key=PCI,
                                    devpath="/devices/pci0000:00/0000:00:03.0",
                                    requested_by="uevent")]


@pytest.mark.parametrize("action", ["bind", "change", "remove", "unbind", "move", "online", None])
def test_other_actions_are_ignored(action: str | None) -> None:
    # A bind follows a load; acting on it would undo autoclean.
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    assert source.handle(FakeDevice(action, MODALIAS=PCI, DEVPATH="/devices/x")) is None
    assert rec.requests == []
    assert source.stats.ignored == 1


def test_add_without_modalias_is_ignored() -> None:
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    assert source.handle(FakeDevice("add", DEVPATH="/devices/virtual/net/lo")) is None
    assert rec.requests == [] and source.stats.ignored == 1


@pytest.mark.parametrize("modalias,accepted", [
    (PCI, True),
    ("dmi:bvnSeaBIOS:bvr1.16.2:svnQEMU:pnStandardPC(i440FX+PIIX,1996):", True),
    # Shell metacharacters are harmless (never reach a shell): passed as is.
    ("platform:$(reboot);`id`|&", True),
    ("", False),
    ("x" * (MAX_MODALIAS + 1), False),
    ("pci:v0000\x00\x01", False),
    ("pci:v0000 rm -rf /", False),
    ("pci:\nMODALIAS=usb:v1", False),
    ("pci:v\u00e9", False),
    ("nocolon", False),
])
def test_hostile_modalias(modalias: str, accepted: bool, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    with caplog.at_level(logging.WARNING, logger="kmodd"):
        source.handle(FakeDevice("add", MODALIAS=modalias, DEVPATH="/devices/x"))
    assert (check_modalias(modalias) is None) is accepted
    if accepted:
        assert [r.key for r in rec.requests] == [modalias]
    else:
        assert rec.requests == []
        assert source.stats.rejected == 1
        assert "bad MODALIAS" in caplog.text
        # The log line is bounded whatever the input's size.
        assert max(len(r.getMessage()) for r in caplog.records) < 300


def test_a_trailing_newline_in_modalias_is_the_kernels_own_and_dropped() -> None:
    # hdaudio codecs: "MODALIAS=hdaudio:v1AF40022r00100101a01\n" in the uevent.
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    source.handle(FakeDevice("add", MODALIAS="hdaudio:v1AF40022r00100101a01\n",
                             DEVPATH="/devices/pci0000:00/0000:00:06.0/hdaudioC2D0"))
    assert [r.key for r in rec.requests] == ["hdaudio:v1AF40022r00100101a01"]
    # Only one, and only at the end.
    for bad in ("hdaudio:v1\n\n", "hdaudio:\nv1"):
        source.handle(FakeDevice("add", MODALIAS=bad, DEVPATH="/devices/x"))
    assert len(rec.requests) == 1 and source.stats.rejected == 2


def test_bad_devpath_is_dropped_not_fatal() -> None:
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    source.handle(FakeDevice("add", MODALIAS=PCI, DEVPATH="relative\n/evil"))
    assert rec.requests[0].devpath is None


def test_on_readable_drains_and_survives_garbage() -> None:
    rec = Recorder()
    monitor = FakeMonitor()
    source = UeventSource(rec.submit, Root(), monitor=monitor)
    monitor.push(FakeDevice("add", MODALIAS="usb:v1D6Bp0002d0601dc09dsc00dp00ic09isc00ip00in00",
                            DEVPATH="/devices/usb1"),
                 FakeDevice("bind", MODALIAS=PCI, DEVPATH="/devices/p"),
                 ExplodingDevice(),
                 ValueError("libudev could not parse"),
                 FakeDevice("add", MODALIAS="x" * 100_000, DEVPATH="/devices/q"),
                 FakeDevice("add", MODALIAS=PCI, DEVPATH="/devices/p"))
    sel = selectors.DefaultSelector()
    sel.register(source.fileno(), selectors.EVENT_READ)
    assert sel.select(0)
    source.on_readable()
    assert not sel.select(0)   # everything drained in one call
    assert [r.key for r in rec.requests] == [
        "usb:v1D6Bp0002d0601dc09dsc00dp00ic09isc00ip00in00", PCI]
    assert source.stats.received == 5
    assert source.stats.rejected == 3
    source.close()
    assert monitor.closed
    source.on_readable()   # harmless after close
    sel.close()


def test_submit_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(request: Request) -> Future[Outcome]:
        raise RuntimeError("shutting down")

    source = UeventSource(refuse, Root(), monitor=FakeMonitor())
    with caplog.at_level(logging.ERROR, logger="kmodd"):
        assert source.handle(FakeDevice("add", MODALIAS=PCI, DEVPATH="/devices/p")) is None
    assert "cannot queue" in caplog.text


def test_real_monitor_is_kernel_only_and_nonblocking() -> None:
    """The default pyudev monitor: a forged uevent sent by a process (netlink
    port != 0) to the kernel's multicast group is dropped by libudev."""
    rec = Recorder()
    source = UeventSource(rec.submit, Root())
    try:
        sel = selectors.DefaultSelector()
        sel.register(source.fileno(), selectors.EVENT_READ)
        forger = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # KOBJECT_UEVENT
        forger.bind((0, 0))
        forged = (b"add@/devices/forged\0ACTION=add\0DEVPATH=/devices/forged\0"
                  b"SUBSYSTEM=pci\0MODALIAS=pci:v0000DEADd0000BEEF\0SEQNUM=1\0")
        try:
            forger.sendto(forged, (0, 1))
            sent = True
        except PermissionError:
            sent = False   # without CAP_NET_ADMIN nobody can forge at all
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if sel.select(0.1):
                source.on_readable()   # must return promptly, not block
        forger.close()
        sel.close()
        assert not [r for r in rec.requests if r.key == "pci:v0000DEADd0000BEEF"]
        if sent:
            assert source.stats.submitted == 0 or all(
                r.key != "pci:v0000DEADd0000BEEF" for r in rec.requests)
    finally:
        source.close()


# -- coldplug -----------------------------------------------------------------

def make_device(sys_dir: Path, devpath: str, modalias: str | bytes | None,
                driver: bool = False) -> Path:
    d = sys_dir / devpath.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "uevent").write_text("")
    (d / "power").mkdir(exist_ok=True)
    (d / "power" / "control").write_text("auto\n")
    if modalias is not None:
        data = modalias if isinstance(modalias, bytes) else (modalias + "\n").encode()
        (d / "modalias").write_bytes(data)
    if driver:
        (d / "driver").symlink_to(sys_dir / "bus")
    return d


@pytest.fixture
def sysroot(tmp_path: Path) -> Root:
    sys_dir = tmp_path / "sys"
    (sys_dir / "bus" / "pci" / "drivers").mkdir(parents=True)
    make_device(sys_dir, "/devices/pci0000:00/0000:00:01.0", "pci:v00008086d00007000")
    make_device(sys_dir, "/devices/pci0000:00/0000:00:1d.7", "pci:v00008086d000024CDbc0Csc03i20")
    # Same hardware twice: one request.
    make_device(sys_dir, "/devices/pci0000:00/0000:00:03.0", PCI)
    make_device(sys_dir, "/devices/pci0000:00/0000:00:04.0", PCI)
    make_device(sys_dir, "/devices/platform/serial8250", "platform:serial8250", driver=True)
    make_device(sys_dir, "/devices/virtual/net/lo", None)
    # A junk attribute and a symlink loop: never followed.
    make_device(sys_dir, "/devices/platform/junk", b"\xff\xfe\x00binary\n")
    bad = sys_dir / "devices" / "pci0000:00" / "0000:00:03.0"
    (bad / "subsystem").symlink_to(sys_dir / "bus" / "pci")
    (bad / "loop").symlink_to(sys_dir / "devices")
    return Root(base=tmp_path)


class HotplugKernel:
    """submit(): answers from a worker thread; loading the EHCI driver makes
    the USB root hub appear, and the hub driver makes a USB device appear."""

    EHCI = "pci:v00008086d000024CDbc0Csc03i20"
    HUB = "usb:v1D6Bp0002d0601dc09dsc00dp00ic09isc00ip00in00"
    MOUSE = "usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip02in00"

    def __init__(self, root: Root) -> None:
        self.root = root
        self.pool = ThreadPoolExecutor(4)
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def submit(self, request: Request) -> Future[Outcome]:
        with self.lock:
            self.requests.append(request)
        return self.pool.submit(self._load, request)

    def _load(self, request: Request) -> Outcome:
        time.sleep(0.01)
        sys_dir = self.root.sys
        if request.key == self.EHCI:
            make_device(sys_dir, "/devices/pci0000:00/0000:00:1d.7/usb1", self.HUB)
            return Outcome(request, "loaded", ("ehci_pci", "ehci_hcd"))
        if request.key == self.HUB:
            make_device(sys_dir, "/devices/pci0000:00/0000:00:1d.7/usb1/1-1", self.MOUSE)
            return Outcome(request, "builtin", ("usbcore",))
        if request.key == self.MOUSE:
            return Outcome(request, "loaded", ("usbhid",))
        if request.key.startswith("platform:"):
            return Outcome(request, "present", ("8250",))
        return Outcome(request, "loaded", (request.key.split(":")[0] + "_drv",))


def test_walk_yields_devpaths_relative_to_sys(sysroot: Root) -> None:
    found = dict((m, d) for d, m in walk_modaliases(sysroot.sys))
    assert found["platform:serial8250"] == "/devices/platform/serial8250"
    assert found["pci:v00008086d00007000"] == "/devices/pci0000:00/0000:00:01.0"
    assert len(list(walk_modaliases(sysroot.sys))) == 6   # loop link not followed


def test_coldplug_iterates_until_no_new_devices(sysroot: Root) -> None:
    kernel = HotplugKernel(sysroot)
    queued: list[int] = []
    result = coldplug(sysroot, kernel.submit, settle_timeout=10, on_queued=queued.append)
    keys = [r.key for r in kernel.requests]
    # The junk modalias is rejected, the duplicate asked once, bound devices
    # asked too (udev's 80-drivers.rules does not skip them either).
    assert sorted(keys[:4]) == sorted(["pci:v00008086d00007000", HotplugKernel.EHCI, PCI,
                                       "platform:serial8250"])
    # Round 2 finds the root hub the EHCI load created; its (builtin) driver
    # creates a USB device, found in round 3; round 4 finds nothing new.
    assert keys[4:] == [HotplugKernel.HUB, HotplugKernel.MOUSE]
    assert result.iterations == 4
    assert all(r.kind == "coldplug" and r.requested_by == "coldplug" for r in kernel.requests)
    assert next(r for r in kernel.requests if r.key == HotplugKernel.EHCI).devpath == \
        "/devices/pci0000:00/0000:00:1d.7"
    assert queued == [4]
    assert result.rejected == 1
    assert not result.timed_out
    assert "ehci_pci" in result.loaded
    kernel.pool.shutdown()


def test_coldplug_follows_a_chain_of_loads(sysroot: Root) -> None:
    kernel = HotplugKernel(sysroot)
    result = coldplug(sysroot, kernel.submit, settle_timeout=10)
    keys = [r.key for r in kernel.requests]
    assert keys.index(HotplugKernel.EHCI) < keys.index(HotplugKernel.HUB) < \
        keys.index(HotplugKernel.MOUSE)
    assert result.iterations == 4   # 4 pci/platform, hub, mouse, then nothing new
    assert "usbhid" in result.loaded
    assert result.submitted == len(keys) == 6
    kernel.pool.shutdown()


def test_coldplug_stops_when_a_walk_finds_nothing_new(sysroot: Root) -> None:
    calls: list[Request] = []

    def present(request: Request) -> Future[Outcome]:
        calls.append(request)
        future: Future[Outcome] = Future()
        future.set_result(Outcome(request, "present", ("x",)))
        return future

    result = coldplug(sysroot, present, settle_timeout=5)
    assert result.iterations == 2
    assert len(calls) == 4


def test_coldplug_gives_up_at_the_timeout(sysroot: Root) -> None:
    def never(request: Request) -> Future[Outcome]:
        return Future()

    start = time.monotonic()
    result = coldplug(sysroot, never, settle_timeout=0.3)
    assert result.timed_out
    assert 0.3 <= time.monotonic() - start < 3


def test_coldplug_shares_seen_set_for_a_rewalk(sysroot: Root) -> None:
    rec = Recorder()
    seen: set[str] = set()
    coldplug(sysroot, rec.submit, seen=seen)
    first = len(rec.requests)
    make_device(sysroot.sys, "/devices/pci0000:00/0000:00:05.0", "pci:v00001AF4d00001005")
    coldplug(sysroot, rec.submit, seen=seen)
    assert [r.key for r in rec.requests[first:]] == ["pci:v00001AF4d00001005"]


def test_walk_of_this_machines_sys_terminates() -> None:
    if not Path("/sys/devices").is_dir():
        raise AssertionError("this test needs /sys (it only reads it)")
    start = time.monotonic()
    items = list(walk_modaliases(Path("/sys")))
    elapsed = time.monotonic() - start
    assert all(devpath.startswith("/devices/") for devpath, _ in items)
    assert elapsed < 5.0


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)


def test_source_fileno_is_the_monitor_socket() -> None:
    monitor = FakeMonitor()
    source = UeventSource(Recorder().submit, Root(), monitor=monitor)
    assert source.fileno() == monitor.fileno()
    assert os.get_blocking(source.fileno()) is False
    source.close()


# -- kmodd's own netlink reader (no libudev) -------------------------------------------

KERNEL_ADD = (b"add@/devices/pci0000:00/0000:00:05.0\0ACTION=add\0"
              b"DEVPATH=/devices/pci0000:00/0000:00:05.0\0SUBSYSTEM=pci\0"
              b"MODALIAS=" + PCI.encode() + b"\0SEQNUM=1234\0")


def test_parse_accepts_only_what_libudev_accepts() -> None:
    event = parse_uevent(KERNEL_ADD, 0, 1, 0)
    assert event is not None and event.action == "add"
    assert event.properties["MODALIAS"] == PCI
    assert event.properties["DEVPATH"] == "/devices/pci0000:00/0000:00:05.0"
    assert parse_uevent(KERNEL_ADD, 4242, 1, 0) is None          # sent by a process
    assert parse_uevent(KERNEL_ADD, 0, 1, 1000) is None          # not uid 0
    assert parse_uevent(KERNEL_ADD, 0, 1, None) is None          # no credentials
    assert parse_uevent(KERNEL_ADD, 0, 2, 0) is None             # udevd's group
    assert parse_uevent(KERNEL_ADD, 0, 1, 0, truncated=True) is None
    assert parse_uevent(b"libudev\0" + KERNEL_ADD, 0, 1, 0) is None
    assert parse_uevent(b"add-no-devpath\0" + KERNEL_ADD.split(b"\0", 1)[1], 0, 1, 0) is None
    assert parse_uevent(b"x@/y", 0, 1, 0) is None                 # too short


def test_parse_keeps_binary_garbage_for_the_modalias_check() -> None:
    data = b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0MODALIAS=pci:\xff\xfe\0PAD=" + \
        b"x" * 32 + b"\0"
    event = parse_uevent(data, 0, 1, 0)
    assert event is not None
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), monitor=FakeMonitor())
    assert source.handle(event) is None and source.stats.rejected == 1
    assert rec.requests == []


def test_netlink_backend_rejects_forged_uevents() -> None:
    rec = Recorder()
    source = UeventSource(rec.submit, Root(), backend="netlink")
    assert isinstance(source._monitor, NetlinkMonitor)
    try:
        sel = selectors.DefaultSelector()
        sel.register(source.fileno(), selectors.EVENT_READ)
        forger = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)
        forger.bind((0, 0))
        with contextlib.suppress(PermissionError):   # without CAP_NET_ADMIN, nobody can
            forger.sendto(KERNEL_ADD.replace(b"0000100E", b"0000BEEF"), (0, 1))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if sel.select(0.1):
                source.on_readable()
        forger.close()
        sel.close()
        assert not [r for r in rec.requests if "BEEF" in r.key]
    finally:
        source.close()


def test_falls_back_to_netlink_without_libudev(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyudev

    def no_libudev() -> None:
        raise ImportError("No library named udev")

    monkeypatch.setattr(pyudev, "Context", no_libudev)
    source = UeventSource(Recorder().submit, Root())
    try:
        assert isinstance(source._monitor, NetlinkMonitor)
    finally:
        source.close()


def test_coldplug_names_the_requests_it_still_waits_for(
        sysroot: Root, caplog: pytest.LogCaptureFixture) -> None:
    """A stuck load is named in the journal while coldplug waits, and when it gives up."""
    def answer_all_but_pci(request: Request) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        if request.key != PCI:
            future.set_result(Outcome(request, "present", ("x",)))
        return future

    with caplog.at_level(logging.INFO, logger="kmodd"):
        result = coldplug(sysroot, answer_all_but_pci, settle_timeout=0.5, report_every=0.1)
    assert result.timed_out
    lines = [r.getMessage() for r in caplog.records if "coldplug" in r.getMessage()]
    waiting = [m for m in lines if "still waiting" in m]
    assert waiting and all("1 request(s) unanswered" in m and PCI in m for m in waiting)
    assert not any("serial8250" in m for m in waiting)      # answered ones are not named
    assert all(r.levelno == logging.INFO for r in caplog.records
               if "still waiting" in r.getMessage())
    [gave_up] = [r for r in caplog.records if "gave up waiting" in r.getMessage()]
    assert PCI in gave_up.getMessage() and gave_up.levelno == logging.WARNING


def test_coldplug_answered_in_time_logs_no_waiting(
        sysroot: Root, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="kmodd"):
        coldplug(sysroot, rec.submit, report_every=0.05)
    assert not [r for r in caplog.records if "unanswered" in r.getMessage()]
