"""The loader and install/remove commands against the simulated kernel, with hand-built plans."""

from __future__ import annotations

import errno as E
import logging
import threading
import time
from pathlib import Path

import pytest

from kmodd.kernel import commands
from kmodd.kernel.direct import format_params, load_plan_direct
from kmodd.kernel.loader import Loader, describe_failure
from kmodd.kernel.sim import SimKernel
from kmodd.resolution.plan import ModuleStep, Plan, Role
from tests.fixtures import real_moddir

ELF = b"\x7fELF\x02\x01\x01" + bytes(9)

# snd_hda_intel's real chain, trimmed: deps listed as modules.dep would.
DEPS = {
    "soundcore": (),
    "snd": ("soundcore",),
    "snd_timer": ("snd", "soundcore"),
    "snd_pcm": ("snd_timer", "snd", "soundcore"),
    "snd_hda_core": ("snd_pcm", "snd_timer", "snd", "soundcore"),
    "snd_hda_intel": ("snd_hda_core", "snd_pcm", "snd_timer", "snd", "soundcore"),
}
ORDER = ["soundcore", "snd", "snd_timer", "snd_pcm", "snd_hda_core", "snd_hda_intel"]


def ko(tmp: Path, name: str) -> str:
    path = tmp / "mods" / f"{name}.ko"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(ELF + name.encode() * 20)
    return str(path)


def step(tmp: Path, name: str, role: Role = Role.DEPENDENCY, **kw: object) -> ModuleStep:
    return ModuleStep(name=name, path=ko(tmp, name), deps=DEPS.get(name, ()), role=role,
                      **kw)  # type: ignore[arg-type]


def hda_plan(tmp: Path, order: list[str] = ORDER, options: str = "") -> Plan:
    steps = [step(tmp, n, Role.TARGET if n == "snd_hda_intel" else Role.DEPENDENCY,
                  options=options if n == "snd_hda_intel" else "") for n in order]
    return Plan(request="snd-hda-intel", targets=("snd_hda_intel",), steps=tuple(steps))


@pytest.fixture
def sim(tmp_path: Path) -> SimKernel:
    return SimKernel(tmp_path / "tree", deps=DEPS,
                     module_params={"snd_hda_intel": {"index": "-1", "model": ""}})


def test_load_plan_in_order_with_options(sim: SimKernel, tmp_path: Path) -> None:
    results = Loader(sim).load_plan(hda_plan(tmp_path, options="index=2 model=auto"))
    assert [r.status for r in results] == ["loaded"] * 6
    assert sim.load_order == ORDER
    assert sim.parameters("snd_hda_intel") == {"index": "2", "model": "auto"}
    assert sim.holders("snd") == ("snd_hda_core", "snd_hda_intel", "snd_pcm", "snd_timer")


def test_live_and_builtin_are_skipped(sim: SimKernel, tmp_path: Path) -> None:
    loader = Loader(sim)
    loader.load_plan(Plan("snd", ("snd",), (step(tmp_path, "soundcore"),
                                            step(tmp_path, "snd", Role.TARGET))))
    n = len(sim.syscalls)
    plan = hda_plan(tmp_path)
    steps = (ModuleStep("crc32c", None, builtin=True), *plan.steps)
    results = loader.load_plan(Plan(plan.request, plan.targets, steps))
    assert [r.status for r in results] == ["builtin", "already", "already", "loaded",
                                           "loaded", "loaded", "loaded"]
    # Live modules are not even tried: no syscall for soundcore and snd.
    assert [s.name for s in sim.syscalls[n:]] == ORDER[2:]


def test_wrong_order_surfaces_as_unknown_symbol(sim: SimKernel, tmp_path: Path) -> None:
    bad = ["soundcore", "snd", "snd_pcm", "snd_timer", "snd_hda_core", "snd_hda_intel"]
    plan = hda_plan(tmp_path, bad)
    results = Loader(sim).load_plan(plan)
    status = {r.name: r.status for r in results}
    assert status["snd_pcm"] == "failed"
    assert status["snd_hda_core"] == "skipped" and status["snd_hda_intel"] == "skipped"
    failed = results[2]
    assert failed.errno == E.ENOENT and "unknown symbol" in (failed.error or "")
    assert not Loader.plan_ok(plan, results)
    assert describe_failure(results, plan) == failed.error


def test_target_init_failure_reported(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", deps=DEPS, load_errors={"snd_hda_intel": E.ENODEV})
    plan = hda_plan(tmp_path)
    results = Loader(sim).load_plan(plan)
    assert results[-1].status == "failed" and results[-1].errno == E.ENODEV
    assert "No such device" in (results[-1].error or "")
    outcome = load_plan_direct(plan, sim)
    assert not outcome.ok and outcome.errno == E.ENODEV


def test_softdep_failure_is_ignored(sim: SimKernel, tmp_path: Path) -> None:
    sim.load_errors["softy"] = E.ENODEV
    steps = (step(tmp_path, "softy", Role.SOFTDEP_PRE),
             step(tmp_path, "soundcore", Role.TARGET))
    plan = Plan("soundcore", ("soundcore",), steps)
    results = Loader(sim).load_plan(plan)
    assert [r.status for r in results] == ["failed", "loaded"]
    assert Loader.plan_ok(plan, results)
    assert describe_failure(results, plan) is None


def test_two_threads_same_module_eexist_is_success(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", init_delays={"soundcore": 0.3})
    loader = Loader(sim)
    s = step(tmp_path, "soundcore", Role.TARGET)
    out: list[str] = []
    threads = [threading.Thread(target=lambda: out.append(loader.load_step(s).status))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == ["already", "loaded"]
    assert sim.load_order == ["soundcore"]


def test_waits_for_coming_module(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", init_delays={"soundcore": 0.4})
    path = ko(tmp_path, "soundcore")
    th = threading.Thread(target=sim.load_module, args=("soundcore", path))
    th.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    res = Loader(sim, coming_timeout=5).load_step(step(tmp_path, "soundcore", Role.TARGET))
    waited = time.monotonic() - t0
    th.join()
    assert res.status == "already"
    assert waited >= 0.2
    # The loader waited in user space: it never issued its own syscall.
    assert len(sim.syscalls) == 1


def test_coming_wait_is_bounded(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", init_delays={"soundcore": 1.0})
    th = threading.Thread(target=sim.load_module, args=("soundcore", ko(tmp_path, "soundcore")))
    th.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    res = Loader(sim, coming_timeout=0.2).load_step(step(tmp_path, "soundcore", Role.TARGET))
    assert time.monotonic() - t0 < 0.8
    th.join()
    assert res.status == "failed" and res.errno == E.EBUSY
    assert "still initialising" in (res.error or "")


def test_enosys_reported_once_and_no_more_syscalls(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    sim = SimKernel(tmp_path / "t", supports_modules=False)
    loader = Loader(sim)
    caplog.set_level(logging.ERROR, logger="kmodd.kernel.loader")
    r1 = loader.load_plan(hda_plan(tmp_path))
    r2 = loader.load_plan(hda_plan(tmp_path))
    assert r1[0].status == "failed" and r1[0].errno == E.ENOSYS
    assert all(r.status == "skipped" and r.errno == E.ENOSYS for r in r1[1:])
    assert r2[0].errno == E.ENOSYS
    assert loader.no_module_support
    assert sim.syscalls == []
    assert len([r for r in caplog.records if "module support" in r.getMessage()]) == 1


def test_enosys_from_syscall_sets_flag(tmp_path: Path) -> None:
    # /proc/modules present but the syscall says ENOSYS: still remembered.
    sim = SimKernel(tmp_path / "t", load_errors={})
    sim._has_modules = False   # syscalls fail, files stay
    loader = Loader(sim)
    res = loader.load_step(step(tmp_path, "soundcore", Role.TARGET))
    assert res.errno == E.ENOSYS and loader.no_module_support and sim.no_module_support
    # finit_module, then init_module as libkmod falls back on ENOSYS; then never again.
    assert [s.call for s in sim.syscalls] == ["finit_module", "init_module"]
    loader.load_step(step(tmp_path, "snd", Role.TARGET))
    assert len(sim.syscalls) == 2


def test_install_command_replaces_load(sim: SimKernel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = ModuleStep("snd", ko(tmp_path, "snd"), options="a=1 b=\"x y\"",
                   install_command=f"printf '%s\\n' $CMDLINE_OPTS \"$MODPROBE_MODULE\" > {out}")
    res = Loader(sim).load_step(s)
    assert res.status == "install-command"
    assert out.read_text().splitlines() == ["a=1", 'b="x y"', "snd"]
    assert sim.syscalls == []
    failing = ModuleStep("snd", None, install_command="exit 3")
    res = Loader(sim).load_step(failing)
    assert res.status == "failed" and "exit status 3" in (res.error or "")
    # Like kmod, a module already in the kernel is not "installed" again.
    Loader(sim).load_step(step(tmp_path, "soundcore", Role.TARGET))
    out.unlink()
    s = ModuleStep("soundcore", None, install_command=f"echo ran > {out}")
    assert Loader(sim).load_step(s).status == "already"
    assert not out.exists()


def test_hostile_request_text_never_reaches_the_shell(sim: SimKernel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pwned = tmp_path / "pwned"
    hostile_name = f"x;touch {pwned}1;`touch {pwned}2`$(touch {pwned}3)"
    hostile_opts = (f"p=$(touch {pwned}4) ;touch {pwned}5 'q=`touch {pwned}6`' "
                    f"r=\"$(touch {pwned}7)\" |touch {pwned}8 &&touch {pwned}9")
    s = ModuleStep(hostile_name, None, options=hostile_opts,
                   install_command=f"printf '%s\\n' $CMDLINE_OPTS > {out}; "
                                   f"printf '%s\\n' \"$MODPROBE_MODULE\" >> {out}")
    res = Loader(sim).load_step(s)
    assert res.status == "install-command", res.error
    assert list(tmp_path.glob("pwned*")) == []
    lines = out.read_text().splitlines()
    assert lines[-1] == hostile_name
    # Every option word arrived as one literal argument, nothing more, nothing less.
    assert lines[:-1] == commands.split_options(hostile_opts)
    # And a remove command, with a hostile name in the environment only.
    res = Loader(sim).unload(hostile_name,
                             remove_command=f"printf '%s' \"$MODPROBE_MODULE\" > {out}")
    assert res.status == "remove-command"
    assert out.read_text() == hostile_name
    assert list(tmp_path.glob("pwned*")) == []


def test_quote_options_keeps_kernel_words() -> None:
    assert commands.split_options(' a=1  b="x y" c ') == ["a=1", 'b="x y"', "c"]
    assert commands.expand("cmd $CMDLINE_OPTS; x \"$CMDLINE_OPTS\"") == \
        'cmd "$@"; x "${CMDLINE_OPTS}"'
    assert format_params(["a=1", "b=x y", 'c="q r"']) == 'a=1 b="x y" c="q r"'


def test_unload_in_use_is_ebusy_with_holders(sim: SimKernel, tmp_path: Path) -> None:
    loader = Loader(sim)
    loader.load_plan(hda_plan(tmp_path))
    res = loader.unload("snd")
    assert res.status == "failed" and res.errno == E.EBUSY
    assert res.error == "snd: in use by: snd_hda_core snd_hda_intel snd_pcm snd_timer"
    n = len(sim.syscalls)
    assert sim.syscalls[n - 1].call != "delete_module"   # refused before the syscall
    assert loader.unload("snd_hda_intel").status == "unloaded"
    assert loader.unload("snd_hda_intel").status == "absent"


def test_unload_refcount_users(sim: SimKernel, tmp_path: Path) -> None:
    loader = Loader(sim)
    loader.load_step(step(tmp_path, "soundcore", Role.TARGET))
    sim.set_users("soundcore", 1)
    res = loader.unload("soundcore")
    assert res.errno == E.EBUSY and "1 reference" in (res.error or "")
    assert loader.unload("soundcore", force=True).status == "unloaded"


def test_unload_recursive_plan(sim: SimKernel, tmp_path: Path) -> None:
    loader = Loader(sim)
    plan = hda_plan(tmp_path)
    loader.load_plan(plan)
    # Something else keeps snd_timer (and so snd, soundcore) busy.
    sim.deps["snd_seq"] = ("snd_timer",)
    loader.load_step(ModuleStep("snd_seq", ko(tmp_path, "snd_seq"), deps=("snd_timer",)))
    results = loader.unload_recursive(plan)
    status = {r.name: r.status for r in results}
    assert results[0].name == "snd_hda_intel"
    assert status == {"snd_hda_intel": "unloaded", "snd_hda_core": "unloaded",
                      "snd_pcm": "unloaded", "snd_timer": "kept", "snd": "kept",
                      "soundcore": "kept"}
    assert set(sim.loaded()) == {"soundcore", "snd", "snd_timer", "snd_seq"}


def test_unload_recursive_by_name_follows_kernel_holders(sim: SimKernel, tmp_path: Path) -> None:
    loader = Loader(sim)
    loader.load_plan(hda_plan(tmp_path))
    results = loader.unload_recursive("snd_hda_intel")
    assert results[0].status == "unloaded"
    assert sim.loaded() == {}
    assert {r.name for r in results if r.status == "unloaded"} == set(ORDER)


def test_unload_recursive_target_busy_stops(sim: SimKernel, tmp_path: Path) -> None:
    loader = Loader(sim)
    plan = hda_plan(tmp_path)
    loader.load_plan(plan)
    sim.set_users("snd_hda_intel", 1)
    results = loader.unload_recursive(plan)
    assert len(results) == 1 and results[0].errno == E.EBUSY
    assert len(sim.loaded()) == 6


def test_unload_builtin_and_remove_command_failure(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", builtin={"unix"})
    loader = Loader(sim)
    res = loader.unload("unix")
    assert res.status == "failed" and "built into the kernel" in (res.error or "")
    res = loader.unload("unix", remove_command="false")
    assert res.status == "failed" and "remove command failed" in (res.error or "")


def test_load_plan_direct_rejects_unresolved(sim: SimKernel) -> None:
    outcome = load_plan_direct(Plan("nosuch", ()), sim)
    assert not outcome.ok and outcome.errno == E.ENOENT and "not found" in outcome.message


# -- kmodctl load/unload's direct path, on a tree of real Debian modules --------------------

TREE_VERSION = "6.1.0-kmodd-test"
TREE_MODULES = ("kernel/sound/soundcore.ko", "kernel/sound/core/snd.ko",
                "kernel/sound/core/snd-timer.ko", "kernel/drivers/block/loop.ko")


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real modules and their indexes, made by the real depmod."""
    import shutil
    import subprocess

    real = real_moddir()
    base = tmp_path_factory.mktemp("tree")
    moddir = base / "lib/modules" / TREE_VERSION
    for rel in TREE_MODULES:
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real / rel, moddir / rel)
    for f in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copy(real / f, moddir / f)
    subprocess.run(["depmod", "-b", str(base), TREE_VERSION], check=True)
    return base


def _sim_for(tree: Path, tmp_path: Path) -> SimKernel:
    from kmodd.kernel.sim import modules_dep_names

    return SimKernel(tmp_path / "sim", deps=modules_dep_names(tree / "lib/modules" /
                                                              TREE_VERSION),
                     module_params={"loop": {"max_loop": "0", "max_part": "0"}})


def test_load_direct_and_unload_direct(real_tree: Path, tmp_path: Path) -> None:
    from kmodd.kernel.direct import load_direct, unload_direct
    from kmodd.root import Root

    sim = _sim_for(real_tree, tmp_path)
    root = Root(modules_base=real_tree)
    kw = {"root": root, "version": TREE_VERSION, "config_paths": [str(tmp_path / "none")],
          "kernel": sim}
    out = load_direct("snd-timer", **kw)  # type: ignore[arg-type]
    assert out.ok and out.message == "snd_timer loaded", out
    assert sim.load_order == ["soundcore", "snd", "snd_timer"]
    assert load_direct("snd_timer", **kw).message == "snd_timer already"  # type: ignore[arg-type]
    busy = unload_direct("snd", **kw)  # type: ignore[arg-type]
    assert not busy.ok and busy.errno == E.EBUSY and busy.message == "snd: in use by: snd_timer"
    done = unload_direct("snd_timer", recursive=True, **kw)  # type: ignore[arg-type]
    assert done.ok and done.message == "unloaded snd_timer snd soundcore"
    assert sim.loaded() == {}
    gone = unload_direct("snd_timer", **kw)  # type: ignore[arg-type]
    assert not gone.ok and gone.message == "snd_timer: not loaded"
    missing = load_direct("nosuch", **kw)  # type: ignore[arg-type]
    assert not missing.ok and "nosuch: module not found in" in missing.message


def test_load_direct_checks_admin_parameters(real_tree: Path, tmp_path: Path) -> None:
    from kmodd.kernel.direct import load_direct
    from kmodd.root import Root

    sim = _sim_for(real_tree, tmp_path)
    kw = {"root": Root(modules_base=real_tree), "version": TREE_VERSION,
          "config_paths": [str(tmp_path / "none")], "kernel": sim}
    bad = load_direct("loop", ["max_loop=4", "bogus=1"], **kw)  # type: ignore[arg-type]
    assert not bad.ok and bad.errno == E.EINVAL
    assert bad.message.startswith("loop: unknown parameter bogus (the module's parameters: ")
    assert "max_loop" in bad.message
    assert sim.syscalls == []
    good = load_direct("loop", ["max_loop=4", "dyndbg=+p"], **kw)  # type: ignore[arg-type]
    assert good.ok
    assert sim.parameters("loop")["max_loop"] == "4"
    assert sim.syscalls[-1].params == "max_loop=4 dyndbg=+p"


def test_load_direct_install_command_with_hostile_parameters(real_tree: Path,
                                                             tmp_path: Path) -> None:
    from kmodd.kernel.direct import load_direct
    from kmodd.root import Root

    out = tmp_path / "args"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "loop.conf").write_text(f"install loop printf '%s|' $CMDLINE_OPTS > {out}\n")
    sim = _sim_for(real_tree, tmp_path)
    hostile = f"max_loop=$(touch {tmp_path}/pwned);touch {tmp_path}/pwned2"
    res = load_direct("loop", [hostile], root=Root(modules_base=real_tree),
                      version=TREE_VERSION, config_paths=[str(conf)], kernel=sim)
    assert res.ok, res
    assert [r.status for r in res.results] == ["install-command"]
    assert not list(tmp_path.glob("pwned*"))
    # One argument, exactly the parameter the kernel would have been given.
    assert out.read_text() == format_params([hostile]) + "|"
    assert sim.syscalls == []


def test_waits_for_going_module_then_loads(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", exit_delays={"soundcore": 0.4})
    loader = Loader(sim, coming_timeout=5)
    s = step(tmp_path, "soundcore", Role.TARGET)
    assert loader.load_step(s).status == "loaded"
    th = threading.Thread(target=loader.unload, args=("soundcore",))
    th.start()
    time.sleep(0.1)
    res = loader.load_step(s)
    th.join()
    # Waited for the removal to finish instead of failing with the kernel's EBUSY.
    assert res.status == "loaded"
    assert [c.call for c in sim.syscalls] == ["finit_module", "delete_module", "finit_module"]


def test_kmodctl_load_unload_cli(real_tree: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import kmodd.kernel.real
    from kmodd.cli.kmodctl import main

    sim = _sim_for(real_tree, tmp_path)
    monkeypatch.setattr(kmodd.kernel.real, "RealKernel", lambda root=None: sim)
    tree = ["-d", str(real_tree), "-S", TREE_VERSION, "-C", str(tmp_path / "none")]
    assert main(["load", *tree, "snd-timer"]) == 0
    assert capsys.readouterr().out == "snd_timer loaded\n"
    assert main(["load", *tree, "--json", "loop", "max_loop=3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    seconds = doc["results"][0].pop("seconds")      # time inside the load syscall
    assert isinstance(seconds, float) and seconds >= 0
    assert doc["ok"] and doc["results"] == [{"name": "loop", "status": "loaded", "error": None,
                                             "errno": None}]
    assert sim.parameters("loop")["max_loop"] == "3"
    assert main(["unload", *tree, "snd"]) == 1
    assert capsys.readouterr().err == "kmodctl unload: snd: in use by: snd_timer\n"
    assert main(["unload", *tree, "-r", "snd_timer"]) == 0
    assert capsys.readouterr().out == "unloaded snd_timer snd soundcore\n"
    assert main(["load", *tree, "loop", "nope=1"]) == 1
    assert "loop: unknown parameter nope" in capsys.readouterr().err
    assert main(["load", *tree, "nosuch"]) == 1
    assert "nosuch: module not found in" in capsys.readouterr().err
    # -q, as the kernel's request helper passes it to modprobe: status only.
    assert main(["load", *tree, "-q", "--", "nosuch"]) == 1
    assert main(["load", *tree, "-q", "--", "snd"]) == 0
    assert main(["unload", *tree, "-q", "snd"]) == 0
    assert capsys.readouterr() == ("", "")
