"""The load log on the simulated kernel: what each load records, blame and the
critical chain, and the ``loads`` control operation behind kmodctl."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd import record
from kmodd.daemon.loadlog import Histogram, LoadLog, LoadRecord, blame, critical_chain
from kmodd.daemon.requests import Request
from kmodd.daemon.scheduler import Scheduler
from kmodd.kernel.loader import Loader, StepResult
from kmodd.resolution.plan import ModuleStep
from tests.unit.daemon_fakes import GraphResolver, sim_kernel


def rec(module: str, requested: float, ready: float, start: float, end: float, *,
        kind: str = "coldplug", waited: tuple[str, ...] = (), status: str = "loaded"
        ) -> LoadRecord:
    return LoadRecord(module=module, kind=kind, key=f"alias:{module}", status=status,
                      requested_at=requested, planned_at=requested, deps_ready_at=ready,
                      start=start, end=end, waited_for=waited)


# --- pure ----------------------------------------------------------------------------

def test_blame_is_slowest_in_the_kernel_first() -> None:
    rs = [rec("fast", 0, 0, 0, 0.01), rec("slow", 0, 0, 0, 2.0),
          rec("mid", 0, 0.5, 0.5, 0.6, waited=("slow",))]
    assert [r.module for r in blame(rs)] == ["slow", "mid", "fast"]
    mid = blame(rs)[1]
    assert mid.dep_wait == pytest.approx(0.5) and mid.in_kernel == pytest.approx(0.1)


def test_critical_chain_follows_dependencies_then_async_holds() -> None:
    # scsi_mod -> ahci (long: its bus scan is async); sd_mod starts later and
    # returns with ahci (async_synchronize_full); leaf ends early.
    rs = [rec("scsi_mod", 1.0, 1.0, 1.0, 1.2),
          rec("ahci", 1.0, 1.2, 1.21, 6.0, waited=("scsi_mod",)),
          rec("sd_mod", 1.5, 1.5, 1.5, 6.004),
          rec("leaf", 1.0, 1.0, 1.0, 1.05)]
    chain = critical_chain(rs)
    assert [(link.record.module, link.reason) for link in chain] == [
        ("sd_mod", ""), ("ahci", "async"), ("scsi_mod", "dependency")]
    # A load that ended on its own (far from any other) is a chain of one.
    assert [link.record.module for link in critical_chain(rs, "leaf")] == ["leaf"]
    assert critical_chain(rs, "absent") == []


def test_an_end_close_to_another_is_no_async_hold_without_overlap() -> None:
    # b started after a had returned: their ends being close means nothing.
    rs = [rec("a", 0, 0, 0, 1.0), rec("b", 1.001, 1.001, 1.001, 1.005)]
    assert [link.record.module for link in critical_chain(rs, "b")] == ["b"]


def test_histogram_buckets_are_cumulative_and_le() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1", 3), ("+Inf", 4)]
    assert h.count == 4 and h.total == pytest.approx(3.65)


def test_loadlog_counts_by_source_and_stays_bounded() -> None:
    log = LoadLog(max_records=2)
    log.add(rec("a", 0, 0, 0, 0.2))
    log.add(rec("b", 0, 0, 0, 0.2, kind="modalias", status="failed"))
    log.add(rec("c", 0, 0, 0, 0.2, kind="kernel"))
    d = log.to_dict()
    assert [r["module"] for r in d["records"]] == ["b", "c"] and d["dropped"] == 1
    assert d["loads"] == {"coldplug": 1, "kernel request": 1}
    assert d["failures"] == {"hotplug": 1}
    assert d["init_seconds"]["count"] == 2            # failures are not init times
    assert LoadRecord.from_dict(d["records"][0]) == log.records()[0]


# --- on the simulated kernel ---------------------------------------------------------------

class HeldLoader:
    """A real loader whose ``held`` loads stay inside the "syscall" until
    ``release()``: all of them then return together, as loads do that wait in
    async_synchronize_full() for one module's asynchronous probes."""

    def __init__(self, kernel: object, held: tuple[str, ...]) -> None:
        self.inner = Loader(kernel, coming_timeout=5.0)  # type: ignore[arg-type]
        self.held = set(held)
        self.entered = {n: threading.Event() for n in held}
        self.gate = threading.Event()
        self.returned = threading.Event()

    def release(self) -> None:
        self.gate.set()

    def load_step(self, step: ModuleStep) -> StepResult:
        started = time.monotonic()
        if step.name in self.held:
            self.entered[step.name].set()
            assert self.gate.wait(10)
        res = self.inner.load_step(step)
        if step.name == "late":
            assert self.returned.wait(10)   # returns just after the one it waited for
            time.sleep(0.002)
        out = record.replace(res, seconds=time.monotonic() - started)
        if step.name == "b":
            self.returned.set()
        return out


@pytest.fixture
def sched_env(tmp_path: Path) -> Iterator[dict[str, object]]:
    made: list[Scheduler] = []
    yield {"tmp": tmp_path, "made": made}
    for s in made:
        s.shutdown(timeout=10)


GRAPH = {"core": (), "a": ("core",), "b": (), "late": (), "broken": ()}


def test_scheduler_records_every_load_with_its_four_instants(
        sched_env: dict[str, object]) -> None:
    tmp = sched_env["tmp"]
    assert isinstance(tmp, Path)
    kernel = sim_kernel(tmp / "tree", GRAPH, init_delays={"core": 0.15},
                        load_errors={"broken": 19})
    resolver = GraphResolver(tmp / "mods", GRAPH)
    log = LoadLog()
    sched = Scheduler(resolver, Loader(kernel), kernel, max_workers=4, on_load=log.add)
    sched_env["made"].append(sched)  # type: ignore[attr-defined]
    before = time.monotonic()
    futs = [sched.submit(Request("coldplug", "a", "/devices/x", "coldplug")),
            sched.submit(Request("admin", "b", None, "kmodctl uid=0")),
            sched.submit(Request("modalias", "broken"))]
    assert [f.result(10).status for f in futs] == ["loaded", "loaded", "failed"]
    by = {r.module: r for r in log.records()}
    assert set(by) == {"core", "a", "b", "broken"}
    core, a = by["core"], by["a"]
    for r in by.values():
        assert before <= r.requested_at <= r.planned <= r.deps_ready_at <= r.start <= r.end
    assert core.in_kernel >= 0.15 and a.in_kernel < 0.15
    assert a.waited_for == ("core",) and a.deps_ready_at >= core.end
    assert a.dep_wait >= 0.15 and core.role == "dependency" and core.via == ("a",)
    assert a.kind == "coldplug" and a.devpath == "/devices/x"
    assert by["b"].source == "admin" and by["b"].requested_by == "kmodctl uid=0"
    assert by["broken"].failed and by["broken"].errno == 19 and by["broken"].source == "hotplug"
    assert blame(log.records())[0].module == "core"
    chain = critical_chain(log.records(), "a")
    assert [(link.record.module, link.reason) for link in chain] == [
        ("a", ""), ("core", "dependency")]


def test_a_load_returning_with_another_async_one_is_chained_to_it(
        sched_env: dict[str, object]) -> None:
    tmp = sched_env["tmp"]
    assert isinstance(tmp, Path)
    kernel = sim_kernel(tmp / "tree", GRAPH)
    resolver = GraphResolver(tmp / "mods", GRAPH)
    loader = HeldLoader(kernel, ("b", "late"))
    log = LoadLog()
    sched = Scheduler(resolver, loader, kernel, max_workers=4, on_load=log.add)
    sched_env["made"].append(sched)  # type: ignore[attr-defined]
    first = sched.submit(Request("coldplug", "b"))
    assert loader.entered["b"].wait(10)
    time.sleep(0.05)
    second = sched.submit(Request("coldplug", "late"))
    assert loader.entered["late"].wait(10)
    time.sleep(0.05)
    loader.release()
    assert first.result(10).ok and second.result(10).ok
    by = {r.module: r for r in log.records()}
    gap = by["late"].end - by["b"].end       # 2 ms, more on a busy machine
    assert 0 < gap < by["late"].in_kernel
    chain = critical_chain(log.records(), slack=gap + 0.001)
    assert [(link.record.module, link.reason) for link in chain] == [
        ("late", ""), ("b", "async")]
    # Returns further apart than the slack are not taken as one waiting.
    assert len(critical_chain(log.records(), slack=gap / 2)) == 1


# --- through the daemon and kmodctl ---------------------------------------------------------

def test_kmodctl_blame_critical_chain_and_plot_read_the_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import tempfile

    from kmodd.cli import kmodctl
    from tests.unit.test_service import Env, in_thread, stop
    sockdir = Path(tempfile.mkdtemp(prefix="kmodd-ll-", dir="/tmp"))
    try:
        env = Env(tmp_path, sockdir)
        env.kernel.init_delays["core"] = 0.1
        svc = env.service()
        t, rc = in_thread(svc)
        env.notifier.wait_for("READY")
        assert svc.submit(Request("coldplug", "a", "/devices/pci0/a", "coldplug")
                          ).result(10).status == "loaded"
        sock = str(env.sock)
        assert kmodctl.main(["blame", "--json", "--socket", sock]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["module"] for r in rows] == ["core", "a"]
        assert rows[0]["in_kernel"] >= 0.1 and rows[1]["dep_wait"] >= 0.1
        assert kmodctl.main(["blame", "--socket", sock]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:3] == ["In", "kernel", "Dep"]
        assert [ln.split()[2] for ln in lines[1:]] == ["core", "a"]
        assert kmodctl.main(["critical-chain", "--socket", sock]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[3].startswith("coldplug done @")
        tree = [ln for ln in out if "└─" in ln]
        assert tree[0].lstrip().startswith("└─a @")
        assert tree[1].startswith("  └─core @") and "dependency a waited for" in tree[1]
        assert kmodctl.main(["critical-chain", "core", "--json", "--socket", sock]) == 0
        assert [c["module"] for c in json.loads(capsys.readouterr().out)["chain"]] == ["core"]
        assert kmodctl.main(["critical-chain", "nothing", "--socket", sock]) == 1
        capsys.readouterr()
        assert kmodctl.main(["plot", "--socket", sock]) == 0
        svg = capsys.readouterr().out
        assert svg.startswith("<?xml") and 'data-module="core"' in svg
        stop(svc, t, rc)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_critical_chain_text_reads_like_systemd_analyze() -> None:
    from kmodd.cli.ctl_analyze import chain_lines
    rs = [rec("scsi_mod", 1.0, 1.0, 1.0, 1.2),
          rec("ahci", 1.0, 1.2, 1.21, 6.0, waited=("scsi_mod",)),
          rec("sd_mod", 1.5, 1.5, 1.5, 6.004)]
    lines = chain_lines(critical_chain(rs), None, {"coldplug-end": 6.2})
    assert lines[3:] == [
        "coldplug done @6.200s",
        "└─sd_mod @1.500s +4.504s",
        "  └─ahci @1.210s +4.790s (sd_mod returned only once ahci's async probes were done)",
        "    └─scsi_mod @1.000s +200ms (dependency ahci waited for)"]
    lines = chain_lines(critical_chain(rs, "ahci"), "ahci", {})
    assert lines[3:] == ["ahci @1.210s +4.790s",
                         "└─scsi_mod @1.000s +200ms (dependency ahci waited for)"]


def test_a_restarted_daemon_keeps_the_boots_load_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import tempfile

    import kmodd.daemon.loadlog
    from kmodd.daemon.control import Client
    from tests.unit.test_service import Env, in_thread, stop
    sockdir = Path(tempfile.mkdtemp(prefix="kmodd-ll-", dir="/tmp"))
    try:
        env = Env(tmp_path, sockdir)
        svc = env.service()
        t, rc = in_thread(svc)
        env.notifier.wait_for("READY")
        assert svc.submit(Request("admin", "a")).result(10).status == "loaded"
        stop(svc, t, rc)
        assert svc.loads_file.exists()

        def loads() -> dict[str, Any]:
            svc = env.service()
            t, rc = in_thread(svc)
            env.notifier.wait_for("READY")
            with Client(env.sock, timeout=10) as c:
                reply = c.call("loads")
            stop(svc, t, rc)
            return reply

        reply = loads()
        assert [r["module"] for r in reply["records"]] == ["core", "a"]
        assert reply["loads"] == {"admin": 2} and reply["init_seconds"]["count"] == 2
        # Saved again at exit: still there, counted once.
        assert loads()["loads"] == {"admin": 2}
        # Another boot's log means nothing on this one; a corrupt one is ignored.
        monkeypatch.setattr(kmodd.daemon.loadlog, "boot_id", lambda: "another-boot")
        assert loads()["records"] == []
        monkeypatch.undo()
        svc.loads_file.write_text("{not json")
        assert loads()["records"] == []
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
