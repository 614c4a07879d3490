"""Learned coldplug order (kmodd.daemon.learned): the policy, the store, and the
daemon on the simulated kernel submitting last boot's longest chains first."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd.daemon.learned import (
    LEARNED_FILE,
    Learned,
    LearnedOrder,
    ModuleTiming,
    learned_order,
    read,
    start_head_start,
    write,
)
from kmodd.daemon.service import Service
from kmodd.daemon.settings import Settings
from kmodd.kernel.sim import SimKernel
from kmodd.resolution.plan import ModuleStep, Plan, Role
from tests.unit.daemon_fakes import GraphResolver, sim_kernel

KERNEL = "6.1.0-test"

# A SCSI-like chain behind one device, quick leaf drivers behind the others.
GRAPH = {"core": (), "mid": ("core",), "hba": ("mid",), "nic": (), "snd": (), "usb": (),
         "wdt": ()}
DEVICES = {  # devpath under sys -> modalias -> module
    "/devices/pci0000:00/0000:00:01.0": ("pci:hba", "hba"),
    "/devices/pci0000:00/0000:00:02.0": ("pci:nic", "nic"),
    "/devices/pci0000:00/0000:00:03.0": ("pci:snd", "snd"),
    "/devices/pci0000:00/0000:00:04.0": ("pci:usb", "usb"),
    "/devices/pci0000:00/0000:00:05.0": ("pci:wdt", "wdt"),
}
ALIASES = {alias: (mod,) for alias, mod in DEVICES.values()}
# Modules no device asks for: only a modules-load.d list loads them.
LIST_ONLY = {"tun": ()}
DELAYS = {"core": 0.05, "mid": 0.05, "hba": 0.3}


# -- the policy ---------------------------------------------------------------------

def timing(init: float, *deps: str) -> ModuleTiming:
    return ModuleTiming(init, deps)


def test_chain_is_the_longest_path_of_inits() -> None:
    learned = Learned(KERNEL, {"core": timing(0.1), "mid": timing(0.2, "core"),
                               "side": timing(1.0), "hba": timing(5.0, "mid", "side"),
                               "nic": timing(0.3)},
                      {"pci:hba": ("/d/1", ("hba",)), "pci:nic": ("/d/2", ("nic",)),
                       "pci:x": ("/d/3", ("unknown",))})
    assert learned.chain("hba") == pytest.approx(6.0)      # side (1.0) beats core+mid (0.3)
    assert learned.weight("pci:hba") == pytest.approx(6.0)
    assert learned.weight("pci:nic") == pytest.approx(0.3)
    assert learned.weight("pci:x") == 0.0 and learned.weight("pci:none") == 0.0
    present = {"/d/1": "pci:hba", "/d/2": "pci:nic", "/d/3": "pci:x"}
    assert learned.first(present.get) == [("/d/1", "pci:hba"), ("/d/2", "pci:nic")]
    # A device gone or now showing another modalias is left to the walk.
    assert learned.first({"/d/1": "pci:other", "/d/2": "pci:nic"}.get) == [("/d/2", "pci:nic")]


def test_cycles_in_bad_data_terminate() -> None:
    learned = Learned(KERNEL, {"a": timing(1.0, "b"), "b": timing(2.0, "a")},
                      {"x": ("/d", ("a",))})
    assert learned.weight("x") == pytest.approx(3.0)


def test_absurdly_deep_chains_stop_at_the_depth_limit() -> None:
    n = 5000
    learned = Learned(KERNEL, {f"m{i}": timing(0.001, f"m{i + 1}") for i in range(n)},
                      {"x": ("/devices/x", ("m0",))})
    assert learned.weight("x") == pytest.approx(0.001 * 64)


def test_other_kernel_or_changed_file_is_ignored(tmp_path: Path) -> None:
    ko = tmp_path / "hba.ko"
    ko.write_bytes(b"\x7fELF one")
    st = ko.stat()
    learned = Learned(KERNEL, {"hba": ModuleTiming(5.0, (), str(ko), st.st_size,
                                                   st.st_mtime_ns),
                               "nic": ModuleTiming(0.2, (), str(tmp_path / "nic.ko"), 1, 1)},
                      {"pci:hba": ("/d/1", ("hba",)), "pci:nic": ("/d/2", ("nic",))})
    path = tmp_path / "learned.json"
    write(path, learned)
    assert path.stat().st_mode & 0o777 == 0o644
    back = read(path, KERNEL)
    assert set(back.modules) == {"hba"}          # nic.ko does not exist: dropped
    assert back.weight("pci:hba") == 5.0 and back.weight("pci:nic") == 0.0
    assert read(path, "6.2.0-other").modules == {}
    ko.write_bytes(b"\x7fELF rebuilt, longer")
    assert read(path, KERNEL).modules == {}


@pytest.mark.parametrize("content", [
    b"", b"{", b"[]", b'{"format": 99}', b'{"format": 1, "kernel": 3, "modules": {}, '
    b'"devices": {}}', b'{"format": 1, "kernel": "6.1.0-test", "modules": {"a": '
    b'{"init": -1}}, "devices": {}}', b'{"format": 1, "kernel": "6.1.0-test", "modules": '
    b'{}, "devices": {"x": {"devpath": 1, "targets": []}}}', b"\xff\xfe",
    b"[" * 100000 + b"]" * 100000,
])
def test_damaged_file_is_ignored_with_a_warning(tmp_path: Path, content: bytes,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "learned.json"
    path.write_bytes(content)
    learned = read(path, KERNEL)
    assert learned.modules == {} and learned.devices == {}
    assert "ignoring the learned coldplug order" in caplog.text
    order = LearnedOrder(path, KERNEL, tmp_path / "sys")
    assert order.first() == []


def test_notes_merge_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "learned.json"
    old = Learned(KERNEL, {"old": timing(2.0)}, {"pci:old": ("/d/9", ("old",))})
    write(path, old)
    order = LearnedOrder(path, KERNEL, tmp_path / "sys")
    order.note_plan(Plan("pci:hba", ("hba",), (
        ModuleStep("core", None, role=Role.DEPENDENCY),
        ModuleStep("hba", None, deps=("core",)))), kind="coldplug", key="pci:hba",
        devpath="/d/1")
    order.note_plan(Plan("dummy", ("dummy",), (ModuleStep("dummy", None),)),
                    kind="kernel", key="dummy", devpath=None)
    order.note("core", None, (), 0.1)
    order.note("hba", None, ("core",), 1.5)
    order.note("dummy", None, (), 0.01)
    order.note("nolog", None, (), None)
    order.save()
    data = json.loads(path.read_text())
    assert data["kernel"] == KERNEL
    assert set(data["modules"]) == {"old", "core", "hba", "dummy"}
    assert data["devices"] == {"pci:hba": {"devpath": "/d/1", "targets": ["hba"]},
                               "pci:old": {"devpath": "/d/9", "targets": ["old"]}}
    assert read(path, KERNEL).weight("pci:hba") == pytest.approx(1.6)


def test_only_devices_under_sys_devices_are_read(tmp_path: Path) -> None:
    sys_dir = tmp_path / "sys"
    for rel in ("devices/pci0/a", "etc"):
        (sys_dir / rel).mkdir(parents=True)
        (sys_dir / rel / "modalias").write_text("pci:x\n")
    order = LearnedOrder(tmp_path / "learned.json", KERNEL, sys_dir)
    write(order.path, Learned(KERNEL, {"m": timing(1.0)},
                              {"pci:x": ("/devices/pci0/a", ("m",))}))
    assert order.first() == [("/devices/pci0/a", "pci:x")]
    for bad in ("/etc", "/devices/../etc", "devices/pci0/a"):
        write(order.path, Learned(KERNEL, {"m": timing(1.0)}, {"pci:x": (bad, ("m",))}))
        assert order.first() == [], bad


def test_nothing_loaded_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    write(path, Learned(KERNEL, {"a": timing(1.0)}, {"x": ("/d", ("a",))}))
    before = path.read_bytes()
    LearnedOrder(path, KERNEL, tmp_path).save()
    assert path.read_bytes() == before


def test_unwritable_state_directory_is_only_a_warning(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    order = LearnedOrder(blocker / "sub" / "learned.json", KERNEL, tmp_path)
    order.note("a", None, (), 1.0)
    order.save()
    assert "cannot save the learned coldplug order" in caplog.text


# -- the daemon on the simulated kernel ------------------------------------------------

class RecordingResolver(GraphResolver):
    """Remembers the order requests reached the (single) resolver thread: the
    order coldplug submitted them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[str] = []

    def plan(self, request: str, **kwargs: Any) -> Any:
        self.requests.append(request)
        return super().plan(request, **kwargs)


class Tree:
    def __init__(self, base: Path, sockdir: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.sock = sockdir / "control"
        for devpath, (alias, _) in DEVICES.items():
            d = self.root / "sys" / devpath.lstrip("/")
            d.mkdir(parents=True)
            (d / "modalias").write_text(alias + "\n")
        self.resolver = RecordingResolver(base / "mods", {**GRAPH, **LIST_ONLY},
                                          aliases=ALIASES)

    @property
    def learned_file(self) -> Path:
        return self.root / "var/lib/kmodd" / LEARNED_FILE

    def settings(self, kernel_version: str = KERNEL, state_dir: Path | None = None,
                 deny: tuple[str, ...] = (), modules_load: bool = False) -> Settings:
        state = (state_dir or self.base) / "run/state.json"
        return Settings(max_workers=1, autoclean_interval=0, socket=str(self.sock),
                        state_file=str(state), root=str(self.root),
                        coldplug=True, modules_load=modules_load, version=kernel_version,
                        deny=deny)

    def boot(self, kernel_version: str = KERNEL, *, head_start: bool = False,
             preloaded: bool = False, deny: tuple[str, ...] = (),
             listed: tuple[str, ...] = ()) -> SimKernel:
        """One daemon run over a fresh simulated kernel with one worker;
        ``submitted`` is coldplug's order of requests; with ``head_start`` the
        daemon starts as its entry point does (``early``: the head start);
        ``preloaded``: every module is in before the daemon starts (at boot,
        udev loads drivers until kmodd is ready); ``deny``: leaf modules the
        deny list refuses; ``listed``: modules-load.d lists these (and the
        daemon loads the lists)."""
        self.resolver.requests = []
        kdir = Path(tempfile.mkdtemp(dir=self.base, prefix="kernel-"))
        kernel = sim_kernel(kdir, {**GRAPH, **LIST_ONLY}, init_delays=DELAYS)
        lists = self.root / "etc/modules-load.d"
        text = "".join(f"{m}\n" for m in listed)
        if listed and not ((lists / "t.conf").exists() and (lists / "t.conf").read_text() == text):
            lists.mkdir(parents=True, exist_ok=True)
            (lists / "t.conf").write_text(text)       # (a rewrite would change the stamp)
        if preloaded:
            for module in ("core", "mid", *(m for m in GRAPH if m not in ("core", "mid"))):
                kernel.load_module(module, self.resolver.path(module))
        settings = self.settings(kernel_version, kdir, deny, modules_load=bool(listed))
        order = learned_order(settings)      # shared, as the entry point does
        self.early = start_head_start(settings, kernel, order)[0] if head_start else None
        svc = Service(settings, kernel, lambda s: self.resolver, sources=(), watcher=None,
                      notify=lambda **f: True, watchdog_interval=lambda: None,
                      early=self.early, learned=order)
        rc: list[int] = []
        t = threading.Thread(target=lambda: rc.append(svc.run()), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while svc.coldplug_state != "done" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.coldplug_state == "done"
        svc.request_stop()
        t.join(15)
        assert rc == [0]
        # The save runs in a thread of its own after coldplug.
        while not self.learned_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(kernel.load_order) == sorted(set(GRAPH) - set(deny) | set(listed))
        self.loads = svc.loadlog.records()
        self.records = list(svc.state.records().values())
        self.submitted = [r for r in self.resolver.requests if r.startswith("pci:")]
        assert sorted(self.submitted) == sorted(ALIASES)
        return kernel


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    d = Path(tempfile.mkdtemp(prefix="kmodd-learn-", dir="/tmp"))
    yield Tree(tmp_path, d)
    shutil.rmtree(d, ignore_errors=True)


def seed(tree: Tree, heaviest: str, kernel: str = KERNEL) -> None:
    """A learned file claiming ``heaviest``'s device has the longest chain."""
    modules: dict[str, Any] = {}
    devices = {}
    for devpath, (alias, mod) in DEVICES.items():
        modules[mod] = ModuleTiming(9.0 if mod == heaviest else 0.01, GRAPH[mod],
                                    tree.resolver.path(mod),
                                    *_identity(tree.resolver.path(mod)))
        devices[alias] = (devpath, (mod,))
    write(tree.learned_file, Learned(kernel, modules, devices))


def _identity(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def test_the_daemon_learns_and_starts_the_longest_chain_first(tree: Tree) -> None:
    tree.boot()
    data = read(tree.learned_file, KERNEL)
    # The simulated inits sleep their delays (more on a loaded machine).
    assert sum(DELAYS.values()) <= data.weight("pci:hba") < sum(DELAYS.values()) + 5.0
    assert data.weight("pci:hba") > max(data.weight(a) for a, m in DEVICES.values()
                                        if m != "hba")
    second = tree.boot()
    assert tree.submitted[0] == "pci:hba"
    # With one worker the chain's first two loads go before every leaf driver
    # (hba itself then queues behind the leaves already ready: the scheduler's
    # business, not the submit order's).
    assert second.load_order[:2] == ["core", "mid"]


@pytest.mark.parametrize("heaviest", ["wdt", "nic", "usb"])
def test_coldplug_follows_the_learned_order(tree: Tree, heaviest: str) -> None:
    seed(tree, heaviest)
    tree.boot()
    assert tree.submitted[0] == f"pci:{heaviest}"


def test_learned_order_of_another_kernel_or_module_file_is_ignored(tree: Tree) -> None:
    seed(tree, "wdt", kernel="5.10.0-other")
    tree.boot()                                  # (this boot rewrites the file)
    walk_first = tree.submitted[0]
    heaviest = "nic" if walk_first != "pci:nic" else "usb"
    seed(tree, heaviest, kernel="5.10.0-other")
    tree.boot()
    assert tree.submitted[0] == walk_first
    seed(tree, heaviest)
    Path(tree.resolver.path(heaviest)).write_bytes(b"\x7fELF rebuilt module, other size")
    tree.boot()
    # Its timing is gone: its device waits for the walk, after the four whose
    # timings still hold.
    assert tree.submitted[-1] == f"pci:{heaviest}"
