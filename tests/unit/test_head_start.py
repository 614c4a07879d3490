"""The head start (kmodd.kernel.early, Learned.head_start): last boot's coldplug
modules inserted before the daemon has started, and taken over by its loader."""

from __future__ import annotations

import errno as E
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kmodd.daemon.learned import (
    LISTED,
    Learned,
    LearnedOrder,
    ModuleTiming,
    config_stamp,
    module_params,
    read,
    start_head_start,
    write,
)
from kmodd.kernel.early import EarlyLoads, EarlyModule
from kmodd.kernel.loader import Loader, StepStatus
from kmodd.kernel.protocol import KernelError
from kmodd.record import replace
from kmodd.resolution.plan import ModuleStep, Role
from tests.unit.daemon_fakes import sim_kernel
from tests.unit.test_learned import DEVICES, GRAPH, KERNEL, Tree, tree  # noqa: F401


class FakeKernel:
    """Records inserts; ``gates`` hold a module's insert until set; ``fail`` maps
    a module to the errno its insert raises."""

    def __init__(self, gates: dict[str, threading.Event] | None = None,
                 fail: dict[str, int] | None = None, present: set[str] | None = None) -> None:
        self.inserted: list[str] = []
        self.entered: dict[str, threading.Event] = {}
        self.gates = gates or {}
        self.fail = fail or {}
        self.present = set(present or ())
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def load_module(self, name: str, path: str, params: str = "") -> bool:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.entered.setdefault(name, threading.Event()).set()
        try:
            gate = self.gates.get(name)
            if gate is not None:
                assert gate.wait(10)
            if name in self.fail:
                raise KernelError(self.fail[name], f"{name}: failed", name)
            with self._lock:
                if name in self.present:
                    return False
                self.present.add(name)
                self.inserted.append(name)
            return True
        finally:
            with self._lock:
                self.active -= 1


def mod(name: str, *deps: str, options: str = "") -> EarlyModule:
    return EarlyModule(name, f"/m/{name}.ko", options, deps)


# -- EarlyLoads ----------------------------------------------------------------------

def test_dependencies_first_and_independent_chains_in_parallel() -> None:
    gate = threading.Event()
    kernel = FakeKernel(gates={"slow": gate})
    early = EarlyLoads(kernel, [mod("slow"), mod("core"), mod("mid", "core"),
                                mod("hba", "mid"), mod("nic")], workers=2).start()  # type: ignore[arg-type]
    # "slow" holds one worker; the other does the whole chain and the leaf meanwhile.
    deadline = time.monotonic() + 10
    while len(kernel.inserted) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kernel.inserted == ["core", "mid", "hba", "nic"]
    gate.set()
    assert early.wait(10)
    assert kernel.inserted[-1] == "slow" and kernel.max_active == 2


def test_a_failed_dependency_leaves_its_dependents_to_the_daemon() -> None:
    kernel = FakeKernel(fail={"core": E.ENOEXEC})
    early = EarlyLoads(kernel, [mod("core"), mod("mid", "core"), mod("nic")],  # type: ignore[arg-type]
                       workers=1).start()
    assert early.wait(10)
    assert kernel.inserted == ["nic"]
    failed = early.take("core")
    assert failed is not None and failed.error is not None and failed.error.errno == E.ENOEXEC
    assert early.take("mid") is None           # never tried: the daemon loads it
    assert early.take("core") is None          # given out once


def test_take_waits_for_a_running_insert_and_claims_a_pending_one() -> None:
    gate = threading.Event()
    kernel = FakeKernel(gates={"a": gate})
    early = EarlyLoads(kernel, [mod("a"), mod("b", "a"), mod("c")], workers=1).start()  # type: ignore[arg-type]
    assert kernel.entered.setdefault("a", threading.Event()).wait(10)
    # Pending and not started: the daemon's loader takes it over at once.
    assert early.take("c") is None
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(early.take("a")))
    waiter.start()
    time.sleep(0.1)
    assert not got                              # still in the syscall
    gate.set()
    waiter.join(10)
    result = got[0]
    assert result is not None and result.inserted and result.seconds >= 0.1  # type: ignore[attr-defined]
    assert early.wait(10)
    assert kernel.inserted == ["a", "b"]        # "c" was left to the daemon
    assert early.untaken() == ["b"]


def test_no_module_support_stops_the_head_start() -> None:
    kernel = FakeKernel(fail={"a": E.ENOSYS})
    early = EarlyLoads(kernel, [mod("a"), mod("b"), mod("c")], workers=1).start()  # type: ignore[arg-type]
    assert early.wait(10)
    assert kernel.inserted == []


def test_the_loader_takes_the_early_result_instead_of_its_own_syscall(tmp_path: Path) -> None:
    kernel = sim_kernel(tmp_path / "k", {"core": (), "nic": ()})
    path = str(tmp_path / "core.ko")
    Path(path).write_bytes(b"\x7fELFcore")
    early = EarlyLoads(kernel, [EarlyModule("core", path, "debug=1")]).start()
    assert early.wait(10)
    loader = Loader(kernel, early=early)
    result = loader.load_step(ModuleStep("core", path, "debug=1", role=Role.TARGET))
    # LOADED (ours), not ALREADY, with the early syscall's own times.
    assert result.status is StepStatus.LOADED
    assert result.started is not None and result.started < time.monotonic()
    assert kernel.load_order == ["core"]
    again = loader.load_step(ModuleStep("core", path, "debug=1", role=Role.TARGET))
    assert again.status is StepStatus.ALREADY


# -- Learned.head_start ----------------------------------------------------------------

def learned(**extra: ModuleTiming) -> Learned:
    modules = {"core": ModuleTiming(0.1, (), "/m/core.ko", options=""),
               "mid": ModuleTiming(0.1, ("core",), "/m/mid.ko", options="x=1"),
               "hba": ModuleTiming(5.0, ("mid",), "/m/hba.ko", options=""),
               "nic": ModuleTiming(0.5, (), "/m/nic.ko", options=""),
               **extra}
    devices = {"pci:hba": ("/devices/p/1", ("hba",)), "pci:nic": ("/devices/p/2", ("nic",))}
    return Learned(KERNEL, modules, devices, stamp="s")


def test_heaviest_device_first_dependencies_before_targets() -> None:
    present = {"/devices/p/1": "pci:hba", "/devices/p/2": "pci:nic"}
    got = learned().head_start(present.get, lambda name: False)
    assert [m.name for m in got] == ["core", "mid", "hba", "nic"]
    assert got[1] == EarlyModule("mid", "/m/mid.ko", "x=1", ("core",))


def test_only_devices_still_there_and_modules_not_yet_present() -> None:
    # nic's device now reads another modalias; core is already in (initramfs).
    present = {"/devices/p/1": "pci:hba", "/devices/p/2": "pci:e1000"}
    got = learned().head_start(present.get, lambda name: name == "core")
    assert [m.name for m in got] == ["mid", "hba"]


def test_chains_with_unknown_options_modules_or_softdeps_are_left_out() -> None:
    present = {"/devices/p/1": "pci:hba", "/devices/p/2": "pci:nic"}
    data = learned(mid=ModuleTiming(0.1, ("core",), "/m/mid.ko", options=None))
    assert [m.name for m in data.head_start(present.get, lambda n: False)] == ["nic"]
    data = learned()
    del data.modules["core"]                 # neither known nor present
    assert [m.name for m in data.head_start(present.get, lambda n: False)] == ["nic"]
    data = learned()
    data.soft.add("pci:hba")
    assert [m.name for m in data.head_start(present.get, lambda n: False)] == ["nic"]


def test_the_coldplug_order_comes_from_the_head_start_s_read(tmp_path: Path) -> None:
    """One read of learned.json at start: the coldplug's first() takes what the
    head start read; a later first() reads the file again."""
    sys_dir = tmp_path / "sys"
    (sys_dir / "devices/p/1").mkdir(parents=True)
    (sys_dir / "devices/p/1/modalias").write_text("pci:hba\n")
    path = tmp_path / "l.json"
    write(path, learned())
    order = LearnedOrder(path, KERNEL, sys_dir, stamp=lambda: "s")
    assert [m.name for m in order.head_start()] == ["core", "mid", "hba"]
    path.unlink()
    assert order.first() == [("/devices/p/1", "pci:hba")]
    assert order.first() == []


def test_the_file_keeps_options_stamp_and_softdep_marks(tmp_path: Path) -> None:
    data = learned()
    data.soft.add("pci:nic")
    write(tmp_path / "l.json", data)
    back = read(tmp_path / "l.json", KERNEL)
    assert back.stamp == "s" and back.soft == {"pci:nic"}
    assert back.modules["mid"].options == "x=1"


def test_a_changed_configuration_forgets_the_options_it_did_not_see(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    write(path, learned())
    order = LearnedOrder(path, KERNEL, tmp_path / "sys", stamp=lambda: "new")
    order.note("nic", "/m/nic.ko", (), 0.2, options="y=2")
    merged = order.merged()
    assert merged.stamp == "new"
    assert merged.modules["nic"].options == "y=2"          # resolved under "new"
    assert merged.modules["hba"].options is None           # resolved under "s"


def test_plans_are_learned_whoever_loads_their_modules(tmp_path: Path) -> None:
    """udev loaded the drivers before kmodd was ready: the plans still teach the
    next head start; builtin steps need nothing, an install command is never
    inserted early, a softdep leaves the device to the daemon."""
    from kmodd.resolution.plan import Plan
    order = LearnedOrder(tmp_path / "l.json", KERNEL, tmp_path / "sys", stamp=lambda: "s")

    def plan(key: str, *steps: ModuleStep) -> Plan:
        return Plan(key, tuple(s.name for s in steps if s.role is Role.TARGET), steps)

    order.note_plan(plan("pci:hba", ModuleStep("core", "/m/core.ko", role=Role.DEPENDENCY),
                         ModuleStep("hba", "/m/hba.ko", "x=1", deps=("core",)),
                         ModuleStep("crc", None, builtin=True)),
                    kind="coldplug", key="pci:hba", devpath="/devices/p/1")
    order.note_plan(plan("pci:fw", ModuleStep("fw", "/m/fw.ko", install_command="/bin/true")),
                    kind="coldplug", key="pci:fw", devpath="/devices/p/2")
    order.note_plan(plan("pci:snd", ModuleStep("codec", "/m/codec.ko", role=Role.SOFTDEP_PRE),
                         ModuleStep("snd", "/m/snd.ko")),
                    kind="modalias", key="pci:snd", devpath="/devices/p/3")
    order.note_plan(plan("fs-vfat", ModuleStep("vfat", "/m/vfat.ko")),
                    kind="kernel", key="fs-vfat", devpath=None)
    order.save()
    data = read(tmp_path / "l.json", KERNEL)
    assert data.devices == {"pci:hba": ("/devices/p/1", ("hba",)),
                            "pci:fw": ("/devices/p/2", ("fw",)),
                            "pci:snd": ("/devices/p/3", ("snd",))}
    assert data.soft == {"pci:snd"} and "vfat" not in data.modules
    assert data.modules["hba"] == ModuleTiming(0.0, ("core",), "/m/hba.ko", options="x=1")
    assert data.modules["fw"].path is None
    present = {"/devices/p/1": "pci:hba", "/devices/p/2": "pci:fw", "/devices/p/3": "pci:snd"}
    got = data.head_start(present.get, lambda name: False)
    assert [m.name for m in got] == ["core", "hba"]
    # A later boot that times hba keeps the timing; one that only plans it
    # again keeps the timing it had.
    order.note("hba", "/m/hba.ko", ("core",), 2.5, options="x=1")
    order.save()
    again = LearnedOrder(tmp_path / "l.json", KERNEL, tmp_path / "sys", stamp=lambda: "s")
    again.note_plan(plan("pci:hba", ModuleStep("hba", "/m/hba.ko", "x=1", deps=("core",))),
                    kind="coldplug", key="pci:hba", devpath="/devices/p/1")
    again.save()
    assert read(tmp_path / "l.json", KERNEL).modules["hba"].init == 2.5


def test_listed_modules_go_first_when_still_listed() -> None:
    """modules-load.d entries whose plan is known go in before the devices
    (READY=1 waits for them); an entry no longer listed, or whose plan had a
    softdep, is left to the daemon."""
    data = learned(tun=ModuleTiming(0.1, (), "/m/tun.ko", options=""),
                   nbd=ModuleTiming(0.9, ("core",), "/m/nbd.ko", options="nbds_max=4"))
    data.devices[LISTED + "tun"] = ("", ("tun",))
    data.devices[LISTED + "nbd"] = ("", ("nbd",))
    present = {"/devices/p/1": "pci:hba", "/devices/p/2": "pci:nic"}
    got = data.head_start(present.get, lambda name: False, listed=["nbd", "tun"])
    assert [m.name for m in got] == ["core", "nbd", "tun", "mid", "hba", "nic"]
    assert got[1] == EarlyModule("nbd", "/m/nbd.ko", "nbds_max=4", ("core",))
    got = data.head_start(present.get, lambda name: False, listed=["tun"])
    assert [m.name for m in got][:1] == ["tun"] and "nbd" not in {m.name for m in got}
    data.soft.add(LISTED + "tun")
    assert "tun" not in {m.name for m in data.head_start(present.get, lambda n: False,
                                                         listed=["tun"])}
    # Never a coldplug device: no modalias to read, nothing submitted before the walk.
    assert all(not key.startswith(LISTED) for _, key in data.first(present.get))


def test_a_changed_boot_list_changes_the_stamp(tree: Tree) -> None:  # noqa: F811
    settings = tree.settings()
    stamp = config_stamp(settings, KERNEL)
    lists = tree.root / "etc/modules-load.d"
    lists.mkdir(parents=True)
    (lists / "a.conf").write_text("tun\n")
    with_list = config_stamp(settings, KERNEL)
    assert with_list != stamp and "etc/modules-load.d/a.conf" in with_list
    (tree.root / "etc/modules").write_text("nbd nbds_max=4\n")       # options live here
    assert config_stamp(settings, KERNEL) != with_list


# -- the daemon: learn at one boot, head start at the next ---------------------------------

def test_what_udev_loaded_before_kmodd_was_ready_goes_in_early_next_boot(
        tree: Tree) -> None:  # noqa: F811
    tree.boot(preloaded=True)
    assert tree.loads == []                  # kmodd inserted nothing itself ...
    data = read(tree.learned_file, KERNEL)
    assert set(data.devices) == {alias for alias, _ in DEVICES.values()}  # ... yet learned
    kernel = tree.boot(head_start=True)
    assert tree.early is not None and tree.early.names == set(GRAPH)
    assert kernel.load_order.index("core") < kernel.load_order.index("hba")
    assert {r.module for r in tree.loads if r.status == "loaded"} == set(GRAPH)
    # Timed now: the order of the boot after puts the longest chain first.
    assert read(tree.learned_file, KERNEL).weight("pci:hba") > 0.0


def test_the_boot_list_goes_in_before_the_service_next_boot(tree: Tree) -> None:  # noqa: F811
    """A module only modules-load.d asks for: learned from the daemon's boot
    list load, inserted first at the next start, and still the list's load in
    the load log (kmodctl why names the file and line)."""
    tree.boot(listed=("tun",))
    data = read(tree.learned_file, KERNEL)
    assert data.devices[LISTED + "tun"] == ("", ("tun",))
    kernel = tree.boot(head_start=True, listed=("tun",))
    assert tree.early is not None and "tun" in tree.early.names
    assert kernel.load_order[0] == "tun"            # one worker: the list first
    tun = {r.module: r for r in tree.loads}["tun"]
    assert tun.status == "loaded" and tun.kind == "modules-load"
    assert tun.requested_by == "/etc/modules-load.d/t.conf:1"
    assert tree.early.untaken() == []


def test_what_the_deny_list_refuses_is_not_learned(tree: Tree) -> None:  # noqa: F811
    tree.boot(preloaded=False, deny=("nic",))
    devices = read(tree.learned_file, KERNEL).devices
    assert "pci:nic" not in devices and "pci:hba" in devices

def test_the_next_boot_inserts_before_the_service_and_attributes_every_load(
        tree: Tree) -> None:  # noqa: F811
    tree.boot()
    data = read(tree.learned_file, KERNEL)
    assert data.stamp and all(t.options == "" for t in data.modules.values())
    kernel = tree.boot(head_start=True)
    early = tree.early
    assert early is not None and early.names == set(GRAPH)
    # Every module went in exactly once: the service's loader took the
    # head start's results instead of inserting again.
    assert sorted(kernel.load_order) == sorted(GRAPH)
    assert kernel.load_order.index("core") < kernel.load_order.index("mid") < \
        kernel.load_order.index("hba")
    assert early.untaken() == []
    # ... and reported them as its own loads, for their devices.
    by_module = {r.module: r for r in tree.loads}
    assert set(by_module) == set(GRAPH)
    for devpath, (alias, module) in DEVICES.items():
        assert by_module[module].status == "loaded"
        assert by_module[module].key == alias and by_module[module].devpath == devpath
    records = {r.name: r for r in tree.records}
    assert records["hba"].devpath == "/devices/pci0000:00/0000:00:01.0"


def test_no_head_start_when_the_configuration_changed_or_it_is_off(tree: Tree) -> None:  # noqa: F811
    tree.boot()
    settings = tree.settings()
    kernel = sim_kernel(tree.base / "k2", GRAPH)
    assert start_head_start(replace(settings, head_start=False), kernel) == (None, "off")
    conf = tree.root / "etc/modprobe.d"
    conf.mkdir(parents=True)
    (conf / "local.conf").write_text("options nic debug=1\n")
    early, why = start_head_start(settings, kernel)
    assert early is None and why.startswith("the configuration changed"), why
    (conf / "local.conf").unlink()
    conf.rmdir()
    early, _ = start_head_start(settings, kernel)
    assert early is not None and early.wait(10) and sorted(kernel.load_order) == sorted(GRAPH)


@pytest.mark.parametrize("content", [b"{}", b"not json", b'{"format": 1, "kernel": 3}'])
def test_a_damaged_file_means_no_head_start(tree: Tree, content: bytes) -> None:  # noqa: F811
    tree.learned_file.parent.mkdir(parents=True, exist_ok=True)
    tree.learned_file.write_bytes(content)
    early, why = start_head_start(tree.settings(), sim_kernel(tree.base / "k3", GRAPH))
    assert early is None and why, why


def test_the_stamp_names_files_relative_to_the_root(tree: Tree) -> None:  # noqa: F811
    # The same tree under another root (a benchmark's, a chroot's) is the same
    # configuration; a file's size or mtime is not.
    conf = tree.root / "etc/modprobe.d"
    conf.mkdir(parents=True)
    (conf / "a.conf").write_text("options nic x=1\n")
    stamp = config_stamp(tree.settings(), KERNEL)
    assert str(tree.root) not in stamp and "etc/modprobe.d/a.conf" in stamp
    os.utime(conf / "a.conf", ns=(0, 12345))
    assert config_stamp(tree.settings(), KERNEL) != stamp


def test_command_line_words_count_only_for_their_own_module(tree: Tree) -> None:  # noqa: F811
    cmdline = tree.root / "proc/cmdline"
    cmdline.parent.mkdir(parents=True)
    cmdline.write_text("root=/dev/vda quiet other.mailbox=/run/1\n")
    tree.boot()
    settings = tree.settings()
    # A boot loader's word or another module's parameter changes nothing ...
    cmdline.write_text("root=/dev/vda other.mailbox=/run/2 BOOT_IMAGE=/vmlinuz\n")
    early, _ = start_head_start(settings, sim_kernel(tree.base / "k4", GRAPH))
    assert early is not None and early.names == set(GRAPH)
    # ... a parameter of a module loaded early takes that module (and what
    # needs it: the whole chain) out of the head start: kmod adds it to the options ...
    cmdline.write_text("root=/dev/vda mid.debug=1\n")
    early, _ = start_head_start(settings, sim_kernel(tree.base / "k5", GRAPH))
    assert early is not None and early.names == set(GRAPH) - {"core", "mid", "hba"}
    # ... and modprobe.blacklist= stops it whole.
    cmdline.write_text("root=/dev/vda modprobe.blacklist=nic\n")
    assert start_head_start(settings, sim_kernel(tree.base / "k6", GRAPH))[0] is None


def test_module_params_reads_words_as_kmod_does() -> None:
    assert module_params("quiet snd-hda-intel.model=auto snd_hda_intel.x=1 a.b "
                         "modprobe.blacklist=e1000 BOOT_IMAGE=/v root=UUID=1.2") == {
        "snd_hda_intel": "snd-hda-intel.model=auto snd_hda_intel.x=1", "a": "a.b",
        "modprobe": "modprobe.blacklist=e1000"}


def test_the_summary_tells_what_the_head_start_did() -> None:
    kernel = FakeKernel(fail={"b": E.ENOEXEC}, present={"c"})
    early = EarlyLoads(kernel, [mod("a"), mod("b"), mod("c")], workers=1).start()  # type: ignore[arg-type]
    assert early.wait(10)
    assert early.summary().startswith("1 inserted, 1 already there, 1 failed; syscalls from +")


def test_the_journal_says_why_there_is_no_head_start(tree: Tree) -> None:  # noqa: F811
    settings = tree.settings()
    kernel = sim_kernel(tree.base / "k7", GRAPH)
    assert start_head_start(settings, kernel) == (None, "nothing learned for this kernel yet")
    tree.boot()
    sysmod = tree.root / "sys/module"         # every module already in
    for module in GRAPH:
        (sysmod / module).mkdir(parents=True, exist_ok=True)
    early, why = start_head_start(settings, kernel)
    assert early is None and why.startswith("nothing to insert: 5 device(s) known"), why


# -- the entry point's path to the first insert --------------------------------------------

# Imported after the head start's first insert, not before (docs/performance.md,
# "Head start"): logging with what it pulls in (about 13 ms of the host's start),
# typing, and what only the simulated kernel or the service use.
NOT_BEFORE_FIRST_INSERT = ("logging", "traceback", "tokenize", "linecache", "textwrap",
                           "typing", "shlex", "argparse", "kmodd.daemon.service",
                           "kmodd.journal", "kmodd.resolution.plan")
# kmodd's own modules on that path; a new one there is a choice to make here.
KMODD_BEFORE_FIRST_INSERT = {
    "kmodd", "kmodd.cli", "kmodd.cli.daemon", "kmodd.daemon", "kmodd.daemon.settings",
    "kmodd.daemon.limits", "kmodd.daemon.learned", "kmodd.daemon.boot_lists",
    "kmodd.record", "kmodd.root",
    "kmodd.resolution", "kmodd.resolution.names", "kmodd.kernel", "kmodd.kernel.protocol",
    "kmodd.kernel.errors", "kmodd.kernel.real", "kmodd.kernel.sim", "kmodd.kernel.early",
    "kmodd.modfile"}

# The entry point in a fresh interpreter; sys.modules is written out when a
# module file the head start inserts is opened (the syscall's own open).  The
# main thread goes on importing meanwhile, as it should: to see only what the
# path to the insert imported, its next import waits until the snapshot.
FIRST_INSERT_HARNESS = r"""
import os, sys, threading
out, paths = sys.argv[1], set(sys.argv[2].split(os.pathsep))
del sys.argv[1:3]
sys.path.insert(0, os.environ["KMODD_TEST_SOURCE"])
main_thread = threading.get_ident()
taken = threading.Event()
first = threading.Lock()

def write(text):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, text.encode())
    os.close(fd)

def hook(event, args):
    if taken.is_set():
        return
    if event == "open" and args[0] in paths:
        # Several head-start threads open their files at once: the first
        # writes and exits, the others wait for that (O_TRUNC would race).
        if not first.acquire(blocking=False):
            threading.Event().wait()
        write("\n".join(sorted(sys.modules)))
        taken.set()
        os._exit(0)
    if event == "import" and threading.get_ident() == main_thread:
        if args[0] == "kmodd.daemon.service":
            write("no head start")
            os._exit(3)
        if any(t.name.startswith("kmodd-early") for t in threading.enumerate()):
            taken.wait(30)

sys.addaudithook(hook)
from kmodd.cli.daemon import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_entry_point_imports_little_before_the_first_insert(tree: Tree) -> None:  # noqa: F811
    tree.boot()
    learned = json.loads(tree.learned_file.read_text())
    paths = {m["path"] for m in learned["modules"].values()}
    out = tree.base / "modules.txt"
    env = {**os.environ, "KMODD_TEST_SOURCE": str(Path(__file__).resolve().parents[2])}
    env.pop("NOTIFY_SOCKET", None)
    res = subprocess.run(
        [sys.executable, "-c", FIRST_INSERT_HARNESS, str(out), os.pathsep.join(sorted(paths)),
         "--kernel", f"sim:{tree.base / 'k-entry'}", "--root", str(tree.root), "-S", KERNEL,
         "--socket", str(tree.sock), "--state-file", str(tree.base / "run/state.json"),
         "--no-modules-load", "--no-journal", "--autoclean-interval", "0"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.exists(), f"rc {res.returncode}:\n{res.stderr[-3000:]}"
    assert out.read_text() != "no head start", res.stderr[-3000:]
    modules = set(out.read_text().split("\n"))
    assert {"kmodd.cli.daemon", "kmodd.daemon.learned", "kmodd.kernel.early"} <= modules
    early = sorted(m for m in modules for n in NOT_BEFORE_FIRST_INSERT
                   if m == n or m.startswith(n + "."))
    assert not early, f"imported before the head start's first insert: {early}"
    kmodd = {m for m in modules if m == "kmodd" or m.startswith("kmodd.")}
    assert kmodd <= KMODD_BEFORE_FIRST_INSERT, sorted(kmodd - KMODD_BEFORE_FIRST_INSERT)
