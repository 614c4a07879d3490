"""The daemon object end to end on the simulated kernel: control ops, signals,
READY/STATUS/watchdog, coldplug and settle, state across a restart, autoclean."""

from __future__ import annotations

import errno as E
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from kmodd.daemon.control import Client
from kmodd.daemon.requests import Outcome, Request
from kmodd.daemon.service import Service
from kmodd.daemon.settings import Settings, SettingsSource
from kmodd.kernel.loader import StepResult
from kmodd.kernel.sim import SimKernel
from tests.unit.daemon_fakes import GatedLoader, GraphResolver, sim_kernel

GRAPH = {"core": (), "a": ("core",), "slow": (), "solo": (), "foreign": (), "nic": ()}
ALIASES = {"pci:v8086d100E": ("nic",), "cpu:feature": ("solo", "slow", "a")}


class Notifier:
    """Records sd_notify fields; tests wait on what they expect."""

    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []
        self.cond = threading.Condition()

    def __call__(self, **fields: object) -> bool:
        with self.cond:
            self.messages.append(fields)
            self.cond.notify_all()
        return True

    def wait_for(self, key: str, timeout: float = 10) -> dict[str, object]:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(key in m for m in self.messages), timeout)
            assert ok, f"no {key} in {self.messages}"
            return next(m for m in self.messages if key in m)


class Env:
    def __init__(self, tmp: Path, sockdir: Path) -> None:
        self.tmp = tmp
        self.sock = sockdir / "control"
        self.kernel: SimKernel = sim_kernel(tmp / "tree", GRAPH)
        self.resolvers: list[GraphResolver] = []
        self.factory_event = threading.Event()
        self.factory_error: Exception | None = None

    def factory(self, settings: Settings) -> GraphResolver:
        if self.factory_error is not None:
            raise self.factory_error
        r = GraphResolver(self.tmp / "mods", GRAPH, aliases=ALIASES)
        self.resolvers.append(r)
        if len(self.resolvers) > 1:
            self.factory_event.set()
        return r

    def settings(self, **kw: Any) -> Settings:
        base: dict[str, Any] = {
            "max_workers": 4, "autoclean_interval": 0, "socket": str(self.sock),
            "state_file": str(self.tmp / "run/state.json"), "root": str(self.tmp / "tree"),
            "coldplug": False, "version": "6.1.0-test"}
        base.update(kw)
        return Settings(**base)

    def service(self, *, gated: tuple[str, ...] = (), coldplug: Any = None,
                sources: Any = (), notify: Notifier | None = None,
                watchdog: float | None = None, **settings: Any) -> Service:
        self.loader = GatedLoader(self.kernel, gated)
        self.notifier = notify or Notifier()
        return Service(self.settings(**settings), self.kernel, self.factory,
                       loader=self.loader, sources=sources, coldplug=coldplug, watcher=None,
                       notify=self.notifier, watchdog_interval=lambda: watchdog)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    d = Path(tempfile.mkdtemp(prefix="kmodd-svc-", dir="/tmp"))
    yield Env(tmp_path, d)
    shutil.rmtree(d, ignore_errors=True)


def in_thread(svc: Service) -> tuple[threading.Thread, list[int]]:
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(svc.run()), daemon=True)
    t.start()
    return t, rc


def stop(svc: Service, t: threading.Thread, rc: list[int]) -> None:
    svc.request_stop()
    t.join(15)
    assert not t.is_alive() and rc == [0]


def test_control_operations_end_to_end(env: Env) -> None:
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    env.kernel.load_module("foreign", env.resolvers[0].path("foreign"))
    with Client(env.sock, timeout=10) as c:
        mon = Client(env.sock, timeout=10)
        events = mon.stream("monitor")
        assert next(events)["monitoring"] is True
        reply = c.load("a")
        assert reply["ok"] and reply["status"] == "loaded"
        assert reply["outcome"]["modules"] == ["a"]
        event = next(events)
        assert event["event"] == "outcome" and event["status"] == "loaded"
        assert event["request"]["key"] == "a" and event["request"]["kind"] == "admin"
        mon.close()

        mods = {m["name"]: m for m in c.list_modules()["modules"]}
        assert mods["a"]["loaded_by_kmodd"] and mods["core"]["loaded_by_kmodd"]
        assert mods["a"]["why"]["requested_by"].startswith("kmodctl uid=0")
        assert mods["core"]["why"]["role"] == "dependency"
        assert mods["core"]["why"]["via"] == ["a"]
        assert mods["foreign"]["loaded_by_kmodd"] is False and mods["foreign"]["why"] is None

        why = c.why("a")
        assert why["loaded_by_kmodd"] and why["kind"] == "admin" and why["state"] == "live"
        assert c.why("foreign")["loaded_by_kmodd"] is False
        assert c.why("nothing")["state"] == "absent"

        status = c.status()
        assert status["ready"] and status["settled"] and status["coldplug"] == "disabled"
        assert status["loaded_by_kmodd"] == 2 and status["outcomes"]["loaded"] == 1
        assert status["workers"] == 4
        assert c.settle(5) == {"ok": True, "settled": True}

        unload = c.unload("a")
        assert unload["status"] == "unloaded" and "a" not in env.kernel.loaded()
        assert c.why("a")["loaded_by_kmodd"] is False

        assert c.reload()["reloads"] == 1 and len(env.resolvers) == 2
        bad = c.request({"op": "load", "name": "--force"})
        assert bad["ok"] is False and "module name" in bad["error"]
    stop(svc, t, rc)
    saved = json.loads(Path(svc.settings.state_file).read_text())
    assert [m["name"] for m in saved["modules"]] == ["core"]


def test_sigterm_finishes_inflight_loads_saves_state_and_exits_0(env: Env) -> None:
    closed = threading.Event()

    class FakeSource:
        udev_handover = False

        def __init__(self, submit: Callable[[Request], Future[Outcome]]) -> None:
            self.a, self.b = socket.socketpair()

        def fileno(self) -> int:
            return self.a.fileno()

        def on_readable(self) -> None:
            self.a.recv(100)

        def close(self) -> None:
            closed.set()
            self.a.close()
            self.b.close()

    svc = env.service(gated=("slow",), sources=[FakeSource])
    results: dict[str, Any] = {}

    def driver() -> None:
        try:
            env.notifier.wait_for("READY")
            results["inflight"] = svc.submit(Request("kernel", "slow", None, "kernel"))
            assert env.loader.entered["slow"].wait(10)
            os.kill(os.getpid(), signal.SIGTERM)
            env.notifier.wait_for("STOPPING")
            assert closed.wait(10)           # sources closed first: no new requests
            results["late"] = svc.submit(Request("modalias", "solo")).result(10)
            results["inflight_done_before_release"] = results["inflight"].done()
        finally:
            env.loader.release()

    helper = threading.Thread(target=driver)
    helper.start()
    rc = svc.run()          # main thread: real signal handlers
    helper.join(10)
    assert rc == 0
    assert results["inflight_done_before_release"] is False
    assert results["inflight"].result(0).status == "loaded"
    assert results["late"].status == "failed" and results["late"].errno == E.ESHUTDOWN
    saved = json.loads(Path(svc.settings.state_file).read_text())
    assert [m["name"] for m in saved["modules"]] == ["slow"]
    assert not env.sock.exists()
    assert signal.getsignal(signal.SIGTERM) is not None   # handlers restored


def test_sighup_reloads_configuration(env: Env, tmp_path: Path) -> None:
    conf = tmp_path / "kmodd.conf"
    conf.write_text("idle_timeout = 10\n")
    flags = {"config_file": str(conf), "socket": str(env.sock), "root": str(tmp_path / "tree"),
             "state_file": str(tmp_path / "state.json"), "coldplug": False,
             "autoclean_interval": 0.0, "max_workers": 2}
    source = SettingsSource(flags)
    settings = source.load()
    notifier = Notifier()
    svc = Service(settings, env.kernel, env.factory, loader=GatedLoader(env.kernel),
                  sources=(), coldplug=None, watcher=None, notify=notifier,
                  watchdog_interval=lambda: None, settings_source=source)

    def driver() -> None:
        notifier.wait_for("READY")
        conf.write_text("idle_timeout = 99\nnever_unload = ['nic']\nrunaway_limit = 7\n")
        os.kill(os.getpid(), signal.SIGHUP)
        assert env.factory_event.wait(10)
        svc.request_stop()

    helper = threading.Thread(target=driver)
    helper.start()
    assert svc.run() == 0
    helper.join(10)
    assert svc.reloads == 1
    assert svc.autoclean.policy.idle_timeout == 99
    assert svc.autoclean.policy.never_unload == frozenset({"nic"})
    assert svc.scheduler._runaway.limit == 7
    assert svc.scheduler._resolver is env.resolvers[-1]


def test_restart_remembers_what_kmodd_loaded(env: Env) -> None:
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    for name in ("a", "solo"):
        assert svc.submit(Request("modalias", name, f"/devices/{name}", "uevent")
                          ).result(10).status == "loaded"
    stop(svc, t, rc)
    env.kernel.unload_module("solo")         # someone removed it while kmodd was down
    leftover = Path(svc.settings.state_file).with_name(".state.x1y2z3")
    leftover.write_text("{half a save")      # the first daemon was SIGKILLed mid-save
    svc2 = env.service()
    t2, rc2 = in_thread(svc2)
    env.notifier.wait_for("READY")
    assert not leftover.exists()
    with Client(env.sock, timeout=10) as c:
        why = c.why("a")
        assert why["loaded_by_kmodd"] and why["devpath"] == "/devices/a"
        assert why["requested_by"] == "uevent"
        assert c.why("solo")["loaded_by_kmodd"] is False
        assert c.status()["loaded_by_kmodd"] == 2      # a and its dependency core
    stop(svc2, t2, rc2)


def test_ready_after_coldplug_is_queued_and_settle_waits_for_it(env: Env) -> None:
    queued = threading.Event()

    def coldplug(submit: Callable[[Request], Future[Outcome]],
                 on_queued: Callable[[int], None]) -> None:
        fut = submit(Request("coldplug", "pci:v8086d100E", "/devices/pci0/0000:00:03.0",
                             "coldplug"))
        queued.set()
        on_queued(1)
        fut.result(10)

    svc = env.service(gated=("nic",), coldplug=coldplug)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert queued.is_set() and svc.coldplug_state == "running"
    with Client(env.sock, timeout=10) as c:
        assert c.settle(0)["settled"] is False
        timed_out = c.settle(0.05)                          # times out, answered
        assert timed_out["settled"] is False and timed_out["coldplug"] == "running"
        # ... naming what it still waits for.
        [req] = timed_out["waiting"]["requests"]
        assert (req["kind"], req["key"]) == ("coldplug", "pci:v8086d100E")
        assert "nic" in req["waiting_for"]
        assert timed_out["waiting"]["loads"]["running"] == ["nic"]
        assert [r["key"] for r in c.status()["waiting"]["requests"]] == ["pci:v8086d100E"]
        waiter = Client(env.sock, timeout=10)
        waiter.send({"op": "settle", "timeout": 30})
        env.loader.release()
        assert waiter.receive() == {"ok": True, "settled": True}
        waiter.close()
        assert c.status()["coldplug"] == "done"
        assert c.why("nic")["kind"] == "coldplug"
    stop(svc, t, rc)


def test_broken_source_and_bad_input_do_not_take_it_down(env: Env) -> None:
    fired = threading.Event()

    class Broken:
        udev_handover = False

        def __init__(self, submit: Callable[[Request], Future[Outcome]]) -> None:
            self.a, self.b = socket.socketpair()
            self.b.send(b"x")

        def fileno(self) -> int:
            return self.a.fileno()

        def on_readable(self) -> None:
            self.a.recv(10)
            fired.set()
            raise ValueError("garbled uevent")

        def close(self) -> None:
            self.a.close()
            self.b.close()

    def cannot_start(submit: Callable[[Request], Future[Outcome]]) -> Any:
        raise OSError(E.EACCES, "netlink refused")

    svc = env.service(sources=[Broken, cannot_start])
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert fired.wait(10)
    with Client(env.sock, timeout=10) as c:
        assert c.request({"op": "load", "name": 12})["ok"] is False
        assert c.request({"op": "settle", "timeout": "soon"})["ok"] is False
        assert c.status()["sources"] == ["Broken"]
    stop(svc, t, rc)


def test_unreadable_module_tree_then_reload_fixes_it(env: Env) -> None:
    env.factory_error = RuntimeError("modules.dep.bin: bad magic")
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    out = svc.submit(Request("kernel", "solo")).result(10)
    assert out.status == "failed" and "bad magic" in (out.error or "")
    with Client(env.sock, timeout=10) as c:
        failed = c.request({"op": "reload"})
        assert failed["ok"] is False and "bad magic" in failed["error"]
        env.factory_error = None
        assert c.reload()["ok"]
    assert svc.submit(Request("admin", "solo")).result(10).status == "loaded"
    stop(svc, t, rc)


def test_watchdog_pings_and_status_line(env: Env) -> None:
    svc = env.service(watchdog=0.2)
    t, rc = in_thread(svc)
    ready = env.notifier.wait_for("READY")
    assert "loaded by kmodd" in str(ready["STATUS"])
    env.notifier.wait_for("WATCHDOG")
    stop(svc, t, rc)


def test_ready_and_status_a_busy_manager_missed_are_sent_at_the_next_tick(env: Env) -> None:
    """notify never waits (a full notify socket); what it could not send then is
    sent at the next status tick, and nothing of the loop waits meanwhile."""
    class Busy(Notifier):
        full = True

        def __call__(self, **fields: object) -> bool:
            if self.full:
                return False
            return super().__call__(**fields)

    notifier = Busy()
    svc = env.service(notify=notifier)
    try:
        svc.start()
        assert svc.ready and notifier.messages == []
        svc._send_status()                      # still full: nothing lost, nothing sent
        notifier.full = False
        svc._send_status()
        [ready] = notifier.messages
        assert ready["READY"] == 1 and "loaded by kmodd" in str(ready["STATUS"])
        svc._send_status()                      # sent once, and the same status not again
        assert len(notifier.messages) == 1
    finally:
        svc._cleanup()


def test_autoclean_timer_unloads_idle_modules_it_loaded(env: Env) -> None:
    unloaded = threading.Event()
    svc = env.service(autoclean_interval=0.05, idle_timeout=0.0)
    inner_unload = env.loader.unload

    def unload(name: str, **kw: Any) -> StepResult:
        res = inner_unload(name, **kw)
        if name == "core":
            unloaded.set()
        return res

    env.loader.unload = unload  # type: ignore[method-assign]
    real_load = env.loader.inner.load_step

    def load_and_bind(step: Any) -> StepResult:
        res = real_load(step)
        if step.name == "nic":
            # Bound while still in flight, so no sweep can see it unbound.
            env.kernel.bind_device("nic", "e1000", "0000:00:03.0")
        return res

    env.loader.inner.load_step = load_and_bind  # type: ignore[method-assign]
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    env.kernel.load_module("foreign", env.resolvers[0].path("foreign"))
    assert svc.submit(Request("admin", "a")).result(10).status == "loaded"
    assert svc.submit(Request("admin", "nic")).result(10).status == "loaded"
    assert unloaded.wait(10)           # a went, then its dependency core followed
    stop(svc, t, rc)
    assert set(env.kernel.loaded()) == {"foreign", "nic"}


# --- the real wiring: kmodd main() on a depmod-built tree and the simulated kernel --------

def test_kmodd_main_coldplugs_serves_kmodctl_and_stops_on_sigterm(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import daemon, kmodctl
    from tests.fixtures import VERSION, FakeModule, build_tree

    tree = tmp_path / "tree"
    build_tree(tree, [
        FakeModule("fakelib", exports=["fakelib_fn"]),
        FakeModule("fakenet", aliases=["pci:v00008086d0000100Esv*sd*bc*sc*i*"],
                   uses=["fakelib_fn"]),
        FakeModule("fakeidle", aliases=["fs-fakeidle"]),
    ])
    dev = tree / "sys/devices/pci0000:00/0000:00:03.0"
    dev.mkdir(parents=True)
    (dev / "modalias").write_text("pci:v00008086d0000100Esv00008086sd00001000bc02sc00i00\n")
    sock = tree / "run/kmodd/control"
    args = ["--root", str(tree), "--kernel", f"sim:{tree}", "-S", VERSION,
            "--autoclean-interval", "0", "--max-workers", "3", "--no-journal"]
    results: dict[str, Any] = {}

    def ctl(*argv: str) -> tuple[int, str]:
        rc = kmodctl.main([*argv, "--socket", str(sock)])
        return rc, capsys.readouterr().out

    def driver() -> None:
        try:
            for _ in range(500):                 # the socket appears once kmodd runs
                if Client.try_connect(sock, timeout=1) is not None:
                    break
                threading.Event().wait(0.02)
            results["settle"] = ctl("settle", "--timeout", "30")
            results["status"] = ctl("status", "--json")
            results["why"] = ctl("why", "fakelib", "--json")
            with Client(sock, timeout=10) as c:
                results["load"] = c.load("fs-fakeidle", kind="kernel", requested_by="kernel")
                # A kernel request is answered before it is recorded.
                c.settle(timeout=10)
            results["list"] = ctl("list", "--json")
            results["human"] = ctl("list")
            results["reload"] = ctl("reload")
            # kmodctl load/unload go through the running daemon, which keeps its record
            results["unload"] = ctl("unload", "fakeidle")
            results["list_after_unload"] = ctl("list", "--json")
            results["admin_load"] = ctl("load", "fakeidle")
            results["admin_why"] = ctl("why", "fakeidle", "--json")
            results["bad_param"] = ctl("load", "fakeidle", "nosuchparam=1")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    kmodd_log = logging.getLogger("kmodd")
    saved = (list(kmodd_log.handlers), kmodd_log.propagate, kmodd_log.level)
    helper = threading.Thread(target=driver)
    helper.start()
    try:
        rc = daemon.main(args)
    finally:
        helper.join(30)
        # main() set up the daemon's own logging; give the other tests theirs back.
        kmodd_log.handlers[:] = saved[0]
        kmodd_log.propagate, kmodd_log.level = saved[1], saved[2]
    assert rc == 0
    assert results["settle"][0] == 0
    status = json.loads(results["status"][1])
    assert status["coldplug"] == "done" and status["settled"] is True
    assert status["loaded_by_kmodd"] == 2
    why = json.loads(results["why"][1])
    assert why["loaded_by_kmodd"] and why["kind"] == "coldplug" and why["role"] == "dependency"
    assert why["devpath"].endswith("0000:00:03.0") and why["via"] == ["fakenet"]
    assert results["load"]["status"] == "loaded"
    listed = {m["name"]: m for m in json.loads(results["list"][1])}
    assert set(listed) == {"fakelib", "fakenet", "fakeidle"}
    assert all(m["loaded_by_kmodd"] for m in listed.values())
    assert "fakenet" in results["human"][1] and "coldplug" in results["human"][1]
    assert results["reload"][0] == 0
    assert results["unload"][0] == 0 and "through kmodd" in results["unload"][1]
    after = {m["name"]: m for m in json.loads(results["list_after_unload"][1])}
    assert "fakeidle" not in after
    assert results["admin_load"][0] == 0 and "through kmodd" in results["admin_load"][1]
    admin_why = json.loads(results["admin_why"][1])
    assert admin_why["kind"] == "admin" and admin_why["requested_by"].startswith("kmodctl")
    assert results["bad_param"][0] == 1       # the daemon refuses unknown parameters
    state = json.loads((tree / "run/kmodd/state.json").read_text())
    assert {m["name"] for m in state["modules"]} == {"fakelib", "fakenet", "fakeidle"}


def test_kmodctl_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import kmodctl
    assert kmodctl.main(["status", "--socket", str(tmp_path / "none")]) == 1
    assert "kmodd is not running" in capsys.readouterr().err
    assert kmodctl.main(["settle", "--socket", str(tmp_path / "none")]) == 1


def test_kmodctl_monitor_why_and_status_output(env: Env,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import kmodctl
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    sock = str(env.sock)
    mon_rc: list[int] = []
    # Watch for the monitor's subscription instead of sleeping.
    mon = threading.Thread(target=lambda: mon_rc.append(
        kmodctl.main(["monitor", "-n", "2", "--json", "--socket", sock])))
    mon.start()
    for _ in range(500):
        if svc.reporter.monitors:
            break
        threading.Event().wait(0.01)
    assert svc.reporter.monitors
    assert svc.submit(Request("modalias", "pci:v8086d100E", "/devices/pci0/nic0",
                              "uevent")).result(10).status == "loaded"
    assert svc.submit(Request("modalias", "pci:nothing")).result(10).status == "unresolved"
    mon.join(10)
    assert mon_rc == [0]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(e["status"], e["request"]["key"]) for e in lines] == [
        ("loaded", "pci:v8086d100E"), ("unresolved", "pci:nothing")]
    assert kmodctl.main(["why", "nic", "--socket", sock]) == 0
    out = capsys.readouterr().out
    assert "loaded by kmodd" in out and "/devices/pci0/nic0" in out and "uevent" in out
    assert kmodctl.main(["status", "--socket", sock]) == 0
    out = capsys.readouterr().out
    assert "loaded by kmodd: 1" in out and "settled: yes" in out
    assert kmodctl.main(["settle", "--timeout", "0", "--socket", sock]) == 0
    stop(svc, t, rc)


def test_second_daemon_on_the_same_socket_refuses_and_touches_nothing(env: Env) -> None:
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert svc.submit(Request("admin", "solo")).result(10).status == "loaded"
    svc.saver.save_now()
    before = Path(svc.settings.state_file).read_bytes()
    in_progress = Path(svc.settings.state_file).with_name(".state.abc123")
    in_progress.write_text("{")              # as if the first daemon were saving right now
    second = env.service()
    with pytest.raises(RuntimeError, match="already listening"):
        second.run()
    assert Path(svc.settings.state_file).read_bytes() == before
    assert in_progress.exists()
    with Client(env.sock, timeout=10) as c:          # the first one still serves
        assert c.status()["loaded_by_kmodd"] == 1
    stop(svc, t, rc)


def test_module_tree_change_reloads_the_resolver(env: Env) -> None:
    class FakeWatcher:
        def __init__(self, on_change: Callable[[], None]) -> None:
            self.on_change = on_change
            self.a, self.b = socket.socketpair()

        def fileno(self) -> int:
            return self.a.fileno()

        def on_readable(self) -> None:
            self.a.recv(100)
            self.on_change()       # a depmod run: several changes in one burst
            self.on_change()

        def close(self) -> None:
            self.a.close()
            self.b.close()

    watchers: list[FakeWatcher] = []

    def factory(on_change: Callable[[], None]) -> FakeWatcher:
        watchers.append(FakeWatcher(on_change))
        return watchers[-1]

    env.loader = GatedLoader(env.kernel)
    notifier = Notifier()
    svc = Service(env.settings(), env.kernel, env.factory, loader=env.loader, sources=(),
                  coldplug=None, watcher=factory, notify=notifier,
                  watchdog_interval=lambda: None)
    t, rc = in_thread(svc)
    notifier.wait_for("READY")
    watchers[0].b.send(b"x")
    assert env.factory_event.wait(10)
    stop(svc, t, rc)
    assert svc.reloads == 1 and svc.scheduler._resolver is env.resolvers[-1]


def test_each_failure_is_logged_once_at_a_fitting_level(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.kernel.load_errors.update({"nic": E.ENODEV, "solo": E.EINVAL})
    svc = env.service(backoff_initial=0.0)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    with caplog.at_level(logging.DEBUG, logger="kmodd"):
        for dev in ("/d1", "/d2"):
            assert svc.submit(Request("modalias", "pci:v8086d100E", dev)).result(10).errno \
                == E.ENODEV
            assert svc.submit(Request("kernel", "solo", dev)).result(10).errno == E.EINVAL
    stop(svc, t, rc)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("cannot load")]
    assert [lvl for lvl, msg in lines if msg.startswith("cannot load nic")] == \
        [logging.INFO, logging.DEBUG]             # no device for it: routine, then quiet
    assert [lvl for lvl, msg in lines if msg.startswith("cannot load solo")] == \
        [logging.WARNING, logging.DEBUG]


def test_autoclean_leaves_modules_with_a_remove_command_alone(env: Env) -> None:
    svc = env.service()
    env.resolvers[0].removes["sol[o]"] = "/sbin/custom-teardown"
    env.kernel.load_module("solo", env.resolvers[0].path("solo"))
    res = svc._autoclean_unload("solo")
    assert res.status == "failed" and "remove command" in (res.error or "")
    assert "solo" in env.kernel.loaded()
    svc.scheduler.shutdown(timeout=5)


def test_a_peer_cannot_pile_up_settle_or_monitor_requests(env: Env) -> None:
    from kmodd.daemon.operations import MAX_SETTLE_PER_PEER
    svc = env.service(gated=("slow",))
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    held = svc.submit(Request("admin", "slow"))        # keeps the daemon unsettled
    assert env.loader.entered["slow"].wait(10)
    with Client(env.sock, timeout=10) as c:
        for _ in range(3):
            assert c.request({"op": "monitor"})["monitoring"] is True
        for i in range(MAX_SETTLE_PER_PEER + 1):
            c.send({"op": "settle", "timeout": 1e9, "id": i})
        refused = c.receive()
        assert refused["id"] == MAX_SETTLE_PER_PEER and refused["code"] == "EAGAIN"
        env.loader.release()
        replies = [c.receive() for _ in range(MAX_SETTLE_PER_PEER + 1)]
        settles = [r for r in replies if "settled" in r]
        assert len(settles) == MAX_SETTLE_PER_PEER and all(r["settled"] for r in settles)
    assert held.result(10).status == "loaded"
    stop(svc, t, rc)
    assert len(svc.reporter.monitors) == 0


def test_each_inserted_module_is_logged_with_its_own_module_field(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # journalctl MODULE=core must find the dependency loaded for "a" too.
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    with caplog.at_level(logging.INFO, logger="kmodd"):
        assert svc.submit(Request("kernel", "a", None, "kernel")).result(10).status == "loaded"
        # The kernel hears back first; the journal lines follow before idle.
        assert svc.scheduler.wait_idle(10)
    stop(svc, t, rc)
    records = [r for r in caplog.records if r.getMessage().startswith("loaded ")]
    loaded = {getattr(r, "MODULE", None): r.getMessage().split(" in ")[0] for r in records}
    assert loaded == {"core": "loaded core for a", "a": "loaded a for a"}
    # The time inside the load syscall, in the message and as a field.
    for r in records:
        usec = int(r.DURATION_USEC)
        assert usec >= 0 and r.getMessage().endswith(f" in {usec / 1000:.0f} ms")


def test_every_failing_module_of_a_request_is_logged_under_its_own_name(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # A CPU modalias names several drivers: the request is decided by the first
    # failure, yet a later failure and the loads that succeed are each logged.
    env.kernel.load_errors.update({"solo": E.ENODEV, "slow": E.ENODEV, "core": E.ENODEV})
    env.kernel.init_delays["slow"] = 0.3
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    with caplog.at_level(logging.DEBUG, logger="kmodd"):
        out = svc.submit(Request("coldplug", "cpu:feature", "/devices/system/cpu")).result(10)
        assert out.status == "failed"
        svc.submit(Request("admin", "solo")).result(10)   # the queue has drained
        deadline = time.monotonic() + 10
        while "slow" not in {getattr(r, "MODULE", "") for r in caplog.records} \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    stop(svc, t, rc)
    verdicts = {(getattr(r, "MODULE", None), r.getMessage().split(":")[0])
                for r in caplog.records if r.levelno >= logging.INFO}
    # "a" needs "core", which failed: a's own line says it was not loaded.
    assert {("solo", "cannot load solo"), ("slow", "cannot load slow"),
            ("core", "cannot load core"), ("a", "cannot load a")} <= verdicts


class UeventLike:
    """A source that, like kmodd.daemon.uevents.UeventSource, hears uevents."""

    udev_handover = True

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def on_readable(self) -> None:
        os.read(self.r, 100)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def test_ready_comes_before_the_walk_and_the_udev_handover_after_it(env: Env) -> None:
    """READY=1 once requests are served (the boot waits for it, as for udevd);
    udev is told to stand back only once the walk has queued every device, and
    the flag is gone when kmodd stops."""
    flag = env.tmp / "tree/run/kmodd/udev-handover"
    walk_may_end = threading.Event()
    seen_when_walking: list[bool] = []

    def coldplug(submit: Any, on_queued: Callable[[int], None]) -> None:
        assert walk_may_end.wait(10)
        seen_when_walking.append(flag.exists())
        on_queued(0)
        return None

    svc = env.service(sources=[lambda submit: UeventLike()], coldplug=coldplug)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert svc.coldplug_state == "running" and not flag.exists()
    walk_may_end.set()
    deadline = time.monotonic() + 10
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen_when_walking == [False]
    assert flag.exists()
    stop(svc, t, rc)
    assert not flag.exists()


def test_no_udev_handover_without_a_uevent_source(env: Env) -> None:
    svc = env.service(sources=())
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert not (env.tmp / "tree/run/kmodd/udev-handover").exists()
    stop(svc, t, rc)


def test_udev_handover_flag_removed_when_the_loop_dies(env: Env) -> None:
    """run()'s finally (_cleanup) drops the flag even without a graceful stop."""
    svc = env.service(sources=[lambda submit: UeventLike()])
    flag = env.tmp / "tree/run/kmodd/udev-handover"
    svc.start()
    assert svc.ready and flag.exists()
    svc._cleanup()
    assert not flag.exists()


def test_kernel_requests_through_kmodctl_stay_kernel_requests(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """kmodd-request's direct path (kmodctl load --kernel-request) reaches the
    daemon as a kernel request; a name no module can have is refused as one."""
    from kmodd.cli.ctl_load import load_via_daemon

    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    try:
        assert load_via_daemon(Client(env.sock, timeout=10), "solo", [], kernel=True).ok
        with Client(env.sock, timeout=10) as c:
            # The kernel hears back before the load is recorded; settled, it is.
            c.settle(timeout=10)
            why = c.why("solo")
            assert (why["kind"], why["requested_by"]) == ("kernel", "kernel")
            with caplog.at_level(logging.WARNING, logger="kmodd"):
                reply = c.load("x y;id", kind="kernel")
            assert not reply["ok"] and reply["code"] == "EINVAL"
            assert "kernel request refused" in reply["error"]
        refused = [r for r in caplog.records if "kernel request refused" in r.getMessage()]
        assert len(refused) == 1 and getattr(refused[0], "REQUESTED_BY", None) == "kernel"
    finally:
        stop(svc, t, rc)


def test_non_root_readers_see_no_options_and_no_requester_pid_or_uid(env: Env) -> None:
    """Finding 9: a uid 65534 peer monitors, lists and asks why; root loads with a
    secret option.  Root's monitor sees everything, the other peer none of it."""
    os.chmod(env.sock.parent, 0o755)
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:           # child: become nobody, monitor one outcome, then read
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with Client(env.sock, timeout=20) as mon:
                events = mon.stream("monitor")
                next(events)
                event = next(events)
            with Client(env.sock, timeout=20) as c:
                listed = c.list_modules()
                why = c.why("a")
            os.write(w, json.dumps([event, listed, why]).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with Client(env.sock, timeout=10) as root_mon, Client(env.sock, timeout=10) as c:
            events = root_mon.stream("monitor")
            next(events)
            for _ in range(1000):          # the child's monitor is subscribed too
                if len(svc.reporter.monitors) == 2:
                    break
                time.sleep(0.01)
            assert len(svc.reporter.monitors) == 2
            reply = c.request({"op": "load", "name": "a", "options": "password=hunter2",
                               "kind": "kernel"})
            assert reply["status"] == "loaded"
            seen_by_root = next(events)
            assert seen_by_root["request"]["options"] == "password=hunter2"
            assert f"pid={os.getpid()}" in seen_by_root["request"]["requested_by"]
            assert "uid=0" in c.why("a")["requested_by"]
        with os.fdopen(r, "rb") as pipe:
            data = pipe.read()
    finally:
        os.waitpid(pid, 0)
    event, listed, why = json.loads(data)
    for text in (json.dumps(event), json.dumps(listed), json.dumps(why)):
        assert "hunter2" not in text
        assert "uid=" not in text and "pid=" not in text
    assert event["status"] == "loaded" and event["request"]["key"] == "a"
    assert event["request"]["options"] is None
    assert event["request"]["requested_by"] == "kmodctl"
    assert why["loaded_by_kmodd"] is True and why["requested_by"] == "kmodctl"
    stop(svc, t, rc)


def test_redaction_of_quoted_parameters_in_errors() -> None:
    from kmodd.daemon.report import redact_error, redact_outcome
    from kmodd.kernel.errors import load_message
    msg = load_message(E.EINVAL, "foo", params="password='x y' debug=1")
    assert "password" in msg
    assert "password" not in (redact_error(msg) or "")
    assert "invalid module parameter" in (redact_error(msg) or "")
    event = {"request": {"kind": "admin", "key": "foo", "options": "k=v",
                         "requested_by": "kmodctl uid=0 pid=7"}, "error": msg}
    public = redact_outcome(event)
    assert public["request"] == {"kind": "admin", "key": "foo", "options": None,
                                 "requested_by": "kmodctl"}
    assert event["request"]["options"] == "k=v"      # the root copy is untouched


def test_stopping_answers_a_settle_that_has_no_timeout(env: Env) -> None:
    # A settle without a timeout has no timer: the stop must still answer it
    # (and stop), not fail on the missing timer and leave the loop running.
    walk_done = threading.Event()

    def coldplug(submit: Any, on_queued: Callable[[int], None]) -> None:
        on_queued(0)
        walk_done.wait(30)                        # coldplug running: not settled

    svc = env.service(coldplug=coldplug)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    try:
        with Client(env.sock, timeout=10) as c:
            c.send({"op": "settle", "id": 1})
            c.send({"op": "ping", "id": 2})
            assert c.receive()["id"] == 2             # the settle is waiting
            svc.request_stop()
            reply = c.receive()
            assert reply["id"] == 1 and reply["settled"] is False
        t.join(15)
        assert not t.is_alive() and rc == [0]
    finally:
        walk_done.set()



def test_why_does_not_call_a_module_absent_when_its_state_cannot_be_read(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")

    def unreadable(name: str) -> Any:
        raise OSError(E.EACCES, "Permission denied")

    env.kernel.initstate = unreadable  # type: ignore[method-assign]
    with Client(env.sock, timeout=10) as c:
        why = c.why("a")
    assert why["ok"] and why["state"] == "unknown"
    assert "Permission denied" in why["state_error"]
    from kmodd.cli.ctl_daemon import _why
    with Client(env.sock, timeout=10) as c:
        assert _why(c, "a", False) == 0
    shown = capsys.readouterr().out
    assert "a: state unknown" in shown and "not loaded" not in shown
    stop(svc, t, rc)


def test_the_daemons_lines_keep_their_logger_name(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # The name starts every stderr line ("kmodd.daemon.service: INFO: loaded
    # ..."); tools parse it (tests/vm/test_analyze_vm.py does).
    svc = env.service()
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    with caplog.at_level(logging.DEBUG, logger="kmodd"):
        assert svc.submit(Request("admin", "a")).result(10).status == "loaded"
        assert svc.submit(Request("admin", "nothing-such")).result(10).status == "unresolved"
    names = {r.name for r in caplog.records
             if r.getMessage().startswith(("loaded a for", "loaded core for", "nothing-such"))}
    assert names == {"kmodd.daemon.service"}
    stop(svc, t, rc)


@pytest.mark.parametrize("reader", ["netlink", "pyudev"])
def test_the_uevent_source_reads_with_the_configured_reader(
        env: Env, monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    import kmodd.daemon.uevents as uevents

    made: list[str] = []

    class Recorder:
        def __init__(self, submit: Any, root: Any, *, backend: str) -> None:
            made.append(backend)

    monkeypatch.setattr(uevents, "UeventSource", Recorder)
    svc = env.service(uevent_reader=reader)
    factories = svc._default_sources()
    factories[0](lambda request: None)
    assert made == [reader]


def test_kmodctl_settle_timeout_names_what_is_still_pending(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import kmodctl
    svc = env.service(gated=("nic",))
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    try:
        fut = svc.submit(Request("modalias", "pci:v8086d100E", "/devices/pci0/0000:00:03.0"))
        assert env.loader.entered["nic"].wait(10)
        assert kmodctl.main(["settle", "--timeout", "0.05", "--socket", str(env.sock)]) == 1
        err = capsys.readouterr().err
        assert "timed out after 0.05s (1 pending" in err
        assert "modalias pci:v8086d100E: loading for " in err and "waiting for nic" in err
        assert "loads running: nic" in err
        env.loader.release()
        assert fut.result(10).status == "loaded"
    finally:
        env.loader.release()
        stop(svc, t, rc)
