"""modules-load.d, /etc/modules and modules_load=: what is listed, and the daemon
loading it through its pool at start."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.daemon.boot_lists import cmdline_modules, conf_files, listed_modules
from kmodd.daemon.control import Client
from kmodd.daemon.service import Service
from kmodd.root import Root
from tests.unit.daemon_fakes import GatedLoader, GraphResolver
from tests.unit.test_service import Env, Notifier, in_thread, stop


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_directories_precedence_masks_and_order(tmp_path: Path) -> None:
    write(tmp_path, "usr/lib/modules-load.d/10-net.conf", "vendor_net\n")
    write(tmp_path, "etc/modules-load.d/10-net.conf", "# mine\n; also a comment\n\n  admin_net  \n")
    write(tmp_path, "usr/lib/modules-load.d/20-masked.conf", "never\n")
    (tmp_path / "etc/modules-load.d/20-masked.conf").symlink_to("/dev/null")
    write(tmp_path, "run/modules-load.d/05-run.conf", "runtime\n")
    write(tmp_path, "usr/local/lib/modules-load.d/30-local.conf", "local\nadmin_net\n")
    write(tmp_path, "usr/lib/modules-load.d/not-conf.txt", "ignored\n")
    (tmp_path / "usr/lib/modules-load.d/40-dir.conf").mkdir()
    root = Root(tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in conf_files(root)] == [
        "run/modules-load.d/05-run.conf", "etc/modules-load.d/10-net.conf",
        "usr/local/lib/modules-load.d/30-local.conf"]
    listed, problems = listed_modules(root, cmdline="", in_initrd=False)
    assert [(m.name, m.where) for m in listed] == [
        ("runtime", "/run/modules-load.d/05-run.conf:1"),
        ("admin_net", "/etc/modules-load.d/10-net.conf:4"),
        ("local", "/usr/local/lib/modules-load.d/30-local.conf:1")]
    assert problems == []


def test_kernel_command_line() -> None:
    line = ('quiet modules_load=a,b modules-load=c rd.modules_load=d "modules_load=e" '
            "x=modules_load=f")
    assert cmdline_modules(line, in_initrd=False) == ["a", "b", "c", "e"]
    assert cmdline_modules(line, in_initrd=True) == ["a", "b", "c", "d", "e"]
    assert cmdline_modules("modules_load= modules_load", in_initrd=False) == []


def test_debian_etc_modules_with_parameters_read_once(tmp_path: Path) -> None:
    write(tmp_path, "etc/modules", "# /etc/modules\nloop max_loop=16   part=1\nfuse\n")
    write(tmp_path, "etc/modules-load.d/50-x.conf", "fuse\nbad name\n")
    write(tmp_path, "proc/cmdline", "ro modules_load=dummy\n")
    root = Root(tmp_path)
    listed, problems = listed_modules(root)
    assert [(m.name, m.options, m.where) for m in listed] == [
        ("dummy", "", "kernel command line"), ("fuse", "", "/etc/modules-load.d/50-x.conf:1"),
        ("loop", "max_loop=16 part=1", "/etc/modules:2")]
    assert [(p.source, "not a module name" in p.message) for p in problems] == [
        ("/etc/modules-load.d/50-x.conf:2", True)]
    # Debian's modules.conf link to ../modules: the same file, read once, as /etc/modules.
    os.unlink(tmp_path / "etc/modules-load.d/50-x.conf")
    (tmp_path / "etc/modules-load.d/modules.conf").symlink_to("../modules")
    listed, _ = listed_modules(root, cmdline="", in_initrd=False)
    assert [(m.name, m.options, m.line) for m in listed] == [
        ("loop", "max_loop=16 part=1", 2), ("fuse", "", 3)]


def test_rd_prefix_only_in_the_initrd(tmp_path: Path) -> None:
    write(tmp_path, "proc/cmdline", "rd.modules_load=early\n")
    assert listed_modules(Root(tmp_path))[0] == []
    write(tmp_path, "etc/initrd-release", "")
    assert [m.name for m in listed_modules(Root(tmp_path))[0]] == ["early"]


# --- the daemon -----------------------------------------------------------------------------

GRAPH = {"core": (), "a": ("core",), "p1": (), "p2": (), "p3": (), "bl": (), "other": ()}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    d = Path(tempfile.mkdtemp(prefix="kmodd-ml-", dir="/tmp"))
    e = Env(tmp_path, d)
    yield e
    shutil.rmtree(d, ignore_errors=True)


def test_listed_modules_load_in_parallel_at_start_never_autocleaned(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    tree = env.tmp / "tree"
    write(tree, "usr/lib/modules-load.d/boot.conf", "a\np1\np2\n# p9\np3\nmissing\nbl\n")
    env.kernel.deps.update({k: tuple(v) for k, v in GRAPH.items()})
    # The barrier only opens if p1, p2, p3 and core are inside their loads at once.
    barrier = threading.Barrier(4, timeout=10)
    loader = GatedLoader(env.kernel, barrier=barrier, barrier_modules={"p1", "p2", "p3", "core"})
    resolvers: list[GraphResolver] = []

    def factory(settings: object) -> GraphResolver:
        resolvers.append(GraphResolver(env.tmp / "mods", GRAPH, blacklist={"bl"}))
        return resolvers[-1]

    notifier = Notifier()
    svc = Service(env.settings(max_workers=6, idle_timeout=0.0), env.kernel, factory,
                  loader=loader, sources=(), coldplug=None, watcher=None, notify=notifier,
                  watchdog_interval=lambda: None)
    caplog.set_level(logging.INFO, logger="kmodd")
    t, rc = in_thread(svc)
    notifier.wait_for("READY")
    # READY=1 came once the listed modules were in (systemd-sysctl relies on that).
    assert {"core", "a", "p1", "p2", "p3"} <= set(env.kernel.loaded())
    assert not barrier.broken
    assert "bl" not in env.kernel.loaded()
    assert env.kernel.load_order.index("core") < env.kernel.load_order.index("a")
    with Client(env.sock, timeout=10) as c:
        why = c.why("p2")
        assert why["kind"] == "modules-load"
        assert why["requested_by"] == "/usr/lib/modules-load.d/boot.conf:3"
        assert c.why("core")["role"] == "dependency"
        loads = c.call("loads")
        assert {r["module"] for r in loads["records"] if r["source"] == "modules-load.d"} == {
            "core", "a", "p1", "p2", "p3"}
        assert "modules-load-end" in loads["marks"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("missing listed in /usr/lib/modules-load.d/boot.conf:6: not found" in m
               for m in messages)
    assert any("bl listed in /usr/lib/modules-load.d/boot.conf:7: blacklisted" in m
               for m in messages)
    # Autoclean never unloads them, and says why.
    report = svc.sweep()
    report = svc.sweep()
    assert report.unloaded == []
    assert report.kept["p1"].startswith("listed in /usr/lib/modules-load.d/boot.conf")
    stop(svc, t, rc)


def test_kmodctl_why_names_the_file_and_line(env: Env,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import kmodctl
    write(env.tmp / "tree", "etc/modules-load.d/x.conf", "\nsolo\n")
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert "solo" in env.kernel.loaded()
    assert kmodctl.main(["why", "solo", "--socket", str(env.sock)]) == 0
    out = capsys.readouterr().out
    assert "listed in:    /etc/modules-load.d/x.conf:2" in out
    # The drop-in's condition: present while this daemon serves the lists.
    assert svc.modules_load_marker.read_text() == f"{os.getpid()}\n"
    stop(svc, t, rc)
    assert not svc.modules_load_marker.exists()


def test_unreadable_lists_are_left_to_systemd_modules_load(
        env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import kmodd.daemon.boot_lists

    def broken(root: Root) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(kmodd.daemon.boot_lists, "listed_modules", broken)
    write(env.tmp / "tree", "etc/modules-load.d/x.conf", "solo\n")
    caplog.set_level(logging.INFO, logger="kmodd")
    svc = env.service()
    t, rc = in_thread(svc)
    assert env.notifier.wait_for("READY")       # the daemon carries on
    # No marker, so the drop-in lets systemd-modules-load do the job.
    assert not svc.modules_load_marker.exists()
    assert any("cannot read modules-load.d" in r.getMessage() for r in caplog.records)
    stop(svc, t, rc)


def test_modules_load_can_be_turned_off(env: Env) -> None:
    write(env.tmp / "tree", "etc/modules-load.d/x.conf", "solo\n")
    svc = env.service(modules_load=False)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert "solo" not in env.kernel.loaded()
    assert not svc.modules_load_marker.exists()     # systemd-modules-load does the work
    stop(svc, t, rc)


def test_ready_waits_for_listed_loads_but_not_forever(
        env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from kmodd.daemon.modules_load import BootLoads
    monkeypatch.setattr(BootLoads, "READY_WAIT", 0.3)
    write(env.tmp / "tree", "etc/modules-load.d/x.conf", "slow\nsolo\n")
    caplog.set_level(logging.INFO, logger="kmodd")
    svc = env.service(gated=("slow",))
    t, rc = in_thread(svc)
    assert env.loader.entered["slow"].wait(10)
    # slow's init is held: READY=1 comes only at the limit, with a warning.
    ready = env.notifier.wait_for("READY")
    assert ready and "slow" not in env.kernel.loaded() and "solo" in env.kernel.loaded()
    assert any("still loading after 0.3s" in r.getMessage() for r in caplog.records)
    env.loader.release()
    with Client(env.sock, timeout=10) as c:
        assert c.settle(10)["settled"]
    assert "slow" in env.kernel.loaded()
    stop(svc, t, rc)
