"""The scheduler on the simulated kernel: limits, dedup, ordering, backoff, runaway."""

from __future__ import annotations

import errno as E
import threading
import time
import types
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, wait
from pathlib import Path

import pytest

from kmodd.daemon.limits import (
    MAX_KMOD_CONCURRENT,
    RUNAWAY_LIMIT,
    clamp_workers,
    default_max_workers,
)
from kmodd.daemon.requests import Outcome, Request
from kmodd.daemon.scheduler import BackoffPolicy, RunawayDetector, Scheduler, plan_edges
from kmodd.kernel.loader import Loader
from kmodd.kernel.sim import SimKernel
from kmodd.resolution.plan import ModuleStep, Plan, Role
from tests.unit.daemon_fakes import FakeClock, GatedLoader, GraphResolver, sim_kernel

GRAPH = {
    "core": (), "a": ("core",), "b": ("core",), "c": ("a",), "t": ("a", "b"),
    "solo": (), "bad": (), "needs_bad": ("bad",), "slow": (), "fast": (),
    "x": ("slow",), "y": ("fast",),
}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, object]]:
    made: list[Scheduler] = []
    yield {"tmp": tmp_path, "made": made}
    for s in made:
        s.shutdown(timeout=10)


def make(env: dict[str, object], *, graph: Mapping[str, tuple[str, ...]] | None = None,
         gated: tuple[str, ...] = (), kernel_kwargs: dict[str, object] | None = None,
         resolver_kwargs: dict[str, object] | None = None, **kwargs: object
         ) -> tuple[Scheduler, SimKernel, GatedLoader, GraphResolver]:
    tmp = env["tmp"]
    assert isinstance(tmp, Path)
    g = graph or GRAPH
    kernel = sim_kernel(tmp / "tree", g, **(kernel_kwargs or {}))
    resolver = GraphResolver(tmp / "mods", g, **(resolver_kwargs or {}))  # type: ignore[arg-type]
    loader = GatedLoader(kernel, gated, **{k: kwargs.pop(k) for k in ("barrier",
                                                                      "barrier_modules")
                                            if k in kwargs})  # type: ignore[arg-type]
    sched = Scheduler(resolver, loader, kernel, **kwargs)  # type: ignore[arg-type]
    made = env["made"]
    assert isinstance(made, list)
    made.append(sched)
    return sched, kernel, loader, resolver


def loads_of(kernel: SimKernel, name: str) -> int:
    return sum(1 for c in kernel.syscalls if c.call == "finit_module" and c.name == name)


def outcome(fut: Future[Outcome]) -> Outcome:
    return fut.result(timeout=10)


# --- pure helpers -------------------------------------------------------------

def test_worker_count_never_above_the_kernel_limit() -> None:
    assert clamp_workers(500) == MAX_KMOD_CONCURRENT == 50
    assert clamp_workers(0) == 1
    assert default_max_workers(1) == 10
    assert default_max_workers(8) == 24
    assert default_max_workers(21) == 50
    assert default_max_workers(128) == 50


def test_backoff_doubles_and_caps() -> None:
    p = BackoffPolicy(initial=5, maximum=60)
    assert [p.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert p.delay(1000) == 60


def test_runaway_detector_flags_and_extends_while_storm_lasts() -> None:
    d = RunawayDetector(limit=3, window=10)
    assert [d.hit("k", t) for t in (0, 1, 2)] == [(False, False)] * 3
    assert d.hit("k", 3) == (True, True)          # 4th within 10 s
    assert d.hit("k", 12) == (True, False)        # still arriving: stays flagged
    assert d.hit("k", 30) == (False, False)       # calm for a window: cleared
    # Arrivals spread out never trip it.
    assert all(not d.hit("slow", t * 5)[0] for t in range(20))


def test_runaway_detector_memory_is_bounded() -> None:
    d = RunawayDetector(limit=2, window=10, max_keys=100)
    for i in range(10_000):
        d.hit(f"key{i}", 0)
    assert len(d._times) <= 100


def test_plan_edges_softdeps_and_hard_deps() -> None:
    plan = Plan("t", ("t",), (
        ModuleStep("pre", "/p", role=Role.SOFTDEP_PRE),
        ModuleStep("dep", "/d", role=Role.DEPENDENCY),
        ModuleStep("t", "/t", deps=("dep",), role=Role.TARGET),
        ModuleStep("post", "/q", role=Role.SOFTDEP_POST),
    ))
    edges = plan_edges(plan)
    assert edges == {"pre": set(), "dep": {"pre"}, "t": {"dep", "pre"}, "post": {"pre", "t"}}


# --- scheduling ----------------------------------------------------------------

def test_loads_dependencies_before_dependents(env: dict[str, object]) -> None:
    sched, kernel, _, _ = make(env, max_workers=8)
    out = outcome(sched.submit(Request("admin", "t")))
    assert out.status == "loaded" and out.modules == ("t",)
    order = kernel.load_order
    assert set(order) == {"core", "a", "b", "t"}
    assert order.index("core") < order.index("a") < order.index("t")
    assert order.index("b") < order.index("t")


def test_thousand_simultaneous_requests_for_one_alias_load_once(env: dict[str, object]
                                                                 ) -> None:
    sched, kernel, loader, resolver = make(env, gated=("solo",), max_workers=8,
                                           resolver_kwargs={"aliases": {"pci:v1d2": ("solo",)}})
    futures: list[Future[Outcome]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def burst() -> None:
        start.wait()
        for i in range(125):
            f = sched.submit(Request("modalias", "pci:v1d2", f"/devices/d{i}", "uevent"))
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.entered["solo"].wait(10)
    assert sched.pending() == 1               # 1000 requests, one pending entry
    loader.release()
    done, not_done = wait(futures, timeout=10)
    assert not not_done and len(done) == 1000
    outs = [f.result() for f in futures]
    assert {o.status for o in outs} == {"loaded"}
    # Each caller gets its own request back.
    assert len({o.request.devpath for o in outs}) == 125
    assert loads_of(kernel, "solo") == 1
    assert resolver.calls == 1


def test_concurrency_never_above_max_workers(env: dict[str, object]) -> None:
    graph = {f"m{i}": () for i in range(16)}
    sched, kernel, loader, _ = make(env, graph=graph, max_workers=4,
                                    kernel_kwargs={"init_delays": dict.fromkeys(graph, 0.01)})
    futures = [sched.submit(Request("modalias", f"m{i}")) for i in range(16)]
    assert all(outcome(f).status == "loaded" for f in futures)
    assert kernel.max_concurrent_seen <= 4
    assert loader.max_active <= 4
    assert sched.max_loading_seen <= 4


def test_independent_modules_load_in_parallel(env: dict[str, object]) -> None:
    # A barrier of 4 only opens if four loads are inside load_step at once.
    barrier = threading.Barrier(4)
    graph = {f"p{i}": () for i in range(4)}
    sched, _, _, _ = make(env, graph=graph, max_workers=4, barrier=barrier,
                          barrier_modules=set(graph))
    futures = [sched.submit(Request("coldplug", f"p{i}")) for i in range(4)]
    assert [outcome(f).status for f in futures] == ["loaded"] * 4
    assert not barrier.broken


def test_a_module_starts_when_its_own_deps_are_live_no_waves(env: dict[str, object]) -> None:
    sched, kernel, loader, resolver = make(env, gated=("slow",), max_workers=4)
    y_done = threading.Event()
    plan = Plan("both", ("x", "y"), (
        ModuleStep("slow", resolver.path("slow"), role=Role.DEPENDENCY),
        ModuleStep("fast", resolver.path("fast"), role=Role.DEPENDENCY),
        ModuleStep("x", resolver.path("x"), deps=("slow",)),
        ModuleStep("y", resolver.path("y"), deps=("fast",)),
    ))
    resolver.plan = lambda request, **kw: plan  # type: ignore[method-assign]
    sched._on_module = lambda step, req, targets, res: (
        y_done.set() if step.name == "y" else None)
    fut = sched.submit(Request("admin", "both"))
    # y goes live while slow (x's dependency) is still held in its init.
    assert y_done.wait(10)
    assert not fut.done() and "x" not in kernel.loaded()
    loader.release()
    assert outcome(fut).status == "loaded"
    assert kernel.load_order.index("slow") < kernel.load_order.index("x")


def test_live_and_builtin_modules_are_skipped(env: dict[str, object]) -> None:
    sched, kernel, loader, resolver = make(
        env, graph={"live": (), "top": ("live", "bi"), "bi": ()},
        kernel_kwargs={"builtin": ("bi",)},
        resolver_kwargs={"builtin": ("bi",)})
    kernel.load_module("live", resolver.path("live"))
    assert outcome(sched.submit(Request("admin", "live"))).status == "present"
    assert outcome(sched.submit(Request("admin", "bi"))).status == "builtin"
    assert outcome(sched.submit(Request("admin", "top"))).status == "loaded"
    assert loader.calls == ["top"]
    assert loads_of(kernel, "live") == 1


def test_unresolved_and_blacklisted(env: dict[str, object]) -> None:
    sched, kernel, _, _ = make(env, resolver_kwargs={
        "aliases": {"usb:v1": ("solo",)}, "blacklist": ("solo",)})
    assert outcome(sched.submit(Request("modalias", "pci:none"))).status == "unresolved"
    # udev semantics for device requests: the blacklist applies to every module...
    assert outcome(sched.submit(Request("modalias", "usb:v1"))).status == "blacklisted"
    assert outcome(sched.submit(Request("coldplug", "solo"))).status == "blacklisted"
    # ...modprobe semantics for the kernel's and administrators' by-name requests.
    assert outcome(sched.submit(Request("kernel", "solo"))).status == "loaded"
    assert loads_of(kernel, "solo") == 1


def test_dependency_failure_fails_dependents_without_trying_them(env: dict[str, object]
                                                                  ) -> None:
    sched, _, loader, _ = make(env, kernel_kwargs={"load_errors": {"bad": E.EIO}})
    out = outcome(sched.submit(Request("admin", "needs_bad")))
    assert out.status == "failed" and out.errno == E.EIO
    assert "bad" in (out.error or "")
    assert "needs_bad" not in loader.calls


def test_failures_back_off_exponentially(env: dict[str, object]) -> None:
    clock = FakeClock()
    sched, kernel, _, _ = make(env, clock=clock, backoff=BackoffPolicy(5, 600),
                               kernel_kwargs={"load_errors": {"bad": E.ENODEV}},
                               resolver_kwargs={"aliases": {"pci:bad": ("bad",)}})
    first = outcome(sched.submit(Request("modalias", "pci:bad", "/devices/a")))
    assert first.status == "failed" and first.errno == E.ENODEV
    # More uevents for the same failing driver: not retried, answered "backoff".
    for dev in ("/devices/b", "/devices/c"):
        again = outcome(sched.submit(Request("modalias", "pci:bad", dev)))
        assert again.status == "backoff" and again.errno == E.ENODEV
    assert loads_of(kernel, "bad") == 1
    clock.advance(5.1)
    assert outcome(sched.submit(Request("modalias", "pci:bad"))).status == "failed"
    assert loads_of(kernel, "bad") == 2
    rec = sched.failures()["bad"]
    assert rec.failures == 2 and rec.retry_at == pytest.approx(clock.now + 10)
    clock.advance(6)      # inside the doubled delay
    assert outcome(sched.submit(Request("kernel", "bad"))).status == "backoff"
    # An administrator asking explicitly means: try now.
    assert outcome(sched.submit(Request("admin", "bad"))).status == "failed"
    assert loads_of(kernel, "bad") == 3
    # A success clears the record.
    kernel.load_errors.clear()
    assert outcome(sched.submit(Request("admin", "bad"))).status == "loaded"
    assert "bad" not in sched.failures()


def test_a_failed_outcome_names_the_module_that_failed(env: dict[str, object]) -> None:
    sched, _, _, _ = make(env, kernel_kwargs={"load_errors": {"bad": E.ENODEV}},
                          resolver_kwargs={"aliases": {"cpu:many": ("solo", "bad")}})
    out = outcome(sched.submit(Request("modalias", "cpu:many")))
    assert out.status == "failed" and out.modules == ("solo", "bad")
    assert out.failed == ("bad",) and out.to_dict()["failed"] == ["bad"]


def test_a_module_in_backoff_holds_back_only_itself_and_its_dependents(
        env: dict[str, object]) -> None:
    # One modalias naming several drivers (a CPU's names a dozen): the one that
    # failed earlier backs off, the others still load, as modprobe -b loads them.
    clock = FakeClock()
    sched, kernel, _, _ = make(env, clock=clock, backoff=BackoffPolicy(5, 600),
                               kernel_kwargs={"load_errors": {"bad": E.ENODEV}},
                               resolver_kwargs={"aliases": {
                                   "acpi:bad": ("bad",),
                                   "cpu:many": ("bad", "solo", "needs_bad", "c")}})
    assert outcome(sched.submit(Request("modalias", "acpi:bad"))).status == "failed"
    many = outcome(sched.submit(Request("modalias", "cpu:many")))
    assert many.status == "loaded"
    assert {"solo", "c", "a", "core"} <= set(kernel.loaded())
    assert loads_of(kernel, "bad") == 1 and loads_of(kernel, "needs_bad") == 0
    # Nothing left to load but the backed-off module: the request backs off.
    assert outcome(sched.submit(Request("modalias", "acpi:bad"))).status == "backoff"


def test_request_storm_is_reported_as_runaway_not_looped_on(env: dict[str, object]) -> None:
    clock = FakeClock()
    sched, _, _, resolver = make(env, clock=clock, runaway_limit=5, runaway_window=10)
    outs = [outcome(sched.submit(Request("kernel", "solo", None, "kernel")))
            for _ in range(8)]
    assert [o.status for o in outs[:5]] == ["loaded"] + ["present"] * 4
    assert [o.status for o in outs[5:]] == ["runaway"] * 3
    assert resolver.calls == 5           # refused requests cost nothing
    # Another device with the same modalias is not part of the storm.
    assert outcome(sched.submit(Request("modalias", "solo", "/devices/other"))).ok
    clock.advance(30)
    assert outcome(sched.submit(Request("kernel", "solo"))).status == "present"


def test_module_reloaded_over_and_over_is_runaway(env: dict[str, object]) -> None:
    clock = FakeClock()
    sched, kernel, _, _ = make(env, clock=clock, runaway_limit=3, runaway_window=60)
    statuses = []
    for i in range(5):
        statuses.append(outcome(sched.submit(Request("modalias", "solo", f"/d{i}"))).status)
        if "solo" in kernel.loaded():
            kernel.unload_module("solo")
    assert statuses == ["loaded", "loaded", "loaded", "runaway", "runaway"]
    assert loads_of(kernel, "solo") == 3


def test_runaway_is_reported_outside_the_scheduler_lock(env: dict[str, object]) -> None:
    """The report writes to the journal: slow work, never under the lock.  While
    it runs, another thread can take the lock (a status request, a worker)."""
    clock = FakeClock()
    reports: list[tuple[str, bool]] = []
    holder: list[Scheduler] = []

    def on_runaway(key: str, request: Request) -> None:
        other = threading.Thread(target=holder[0].snapshot, daemon=True)
        other.start()
        other.join(5)
        reports.append((key, not other.is_alive()))

    sched, kernel, _, _ = make(env, clock=clock, runaway_limit=2, runaway_window=60,
                               on_runaway=on_runaway)
    holder.append(sched)
    # Request storm (refused in submit) ...
    storm = [outcome(sched.submit(Request("kernel", "solo", None, "kernel")))
             for _ in range(3)]
    assert storm[-1].status == "runaway"
    # ... and a module loaded over and over (refused while scheduling a plan).
    statuses = []
    for i in range(3):
        statuses.append(outcome(sched.submit(Request("modalias", "core", f"/d{i}"))).status)
        if "core" in kernel.loaded():
            kernel.unload_module("core")
    assert statuses[-1] == "runaway"
    assert reports == [("solo", True), ("core", True)]


def test_module_requesting_itself_does_not_deadlock(env: dict[str, object]) -> None:
    sched, kernel, loader, _ = make(env)
    inner: list[Outcome] = []
    real = loader.inner.load_step

    def load_step(step: ModuleStep):  # type: ignore[no-untyped-def]
        if step.name == "solo":
            # The module's init calls request_module() for itself: the kernel
            # blocks until the helper answers, so we must not wait on ourselves.
            f = sched.submit(Request("kernel", "solo", None, "kernel"))
            inner.append(f.result(timeout=5))
        return real(step)

    loader.inner.load_step = load_step  # type: ignore[method-assign]
    assert outcome(sched.submit(Request("modalias", "solo"))).status == "loaded"
    assert inner and inner[0].status in ("present", "loaded")
    assert loads_of(kernel, "solo") == 1


def test_bounded_queue_answers_every_request(env: dict[str, object]) -> None:
    graph = {f"q{i}": () for i in range(50)} | {"hold": ()}
    sched, _, loader, _ = make(env, graph=graph, gated=("hold",), max_workers=1,
                               queue_limit=10, max_waiters=3)
    first = sched.submit(Request("admin", "hold"))
    assert loader.entered["hold"].wait(10)
    futures = [sched.submit(Request("modalias", f"q{i}")) for i in range(50)]
    refused = [f.result(timeout=0) for f in futures[9:]]    # queue full: answered at once
    assert {o.status for o in refused} == {"failed"}
    assert {o.errno for o in refused} == {E.EAGAIN}
    joins = [sched.submit(Request("modalias", "q0")) for _ in range(4)]
    assert outcome(joins[-1]).status == "runaway"        # too many identical waiters
    # And a global cap on every future held, whatever the mix of keys.
    sched.max_total_waiters = sched._waiting
    over = sched.submit(Request("modalias", "q1")).result(timeout=0)
    assert over.status == "failed" and over.errno == E.EAGAIN
    loader.release()
    assert outcome(first).status == "loaded"
    assert all(outcome(f).status == "loaded" for f in futures[:9] + joins[:2])
    assert sched.pending() == 0 and sched._waiting == 0


def test_outcome_callback_once_per_distinct_request(env: dict[str, object]) -> None:
    seen: list[Outcome] = []
    sched, _, loader, _ = make(env, gated=("solo",), on_outcome=seen.append)
    futures = [sched.submit(Request("modalias", "solo", f"/d{i}")) for i in range(20)]
    loader.release()
    for f in futures:
        outcome(f)
    assert sched.wait_idle(10)
    assert [o.status for o in seen] == ["loaded"]


def test_shutdown_finishes_inflight_and_refuses_the_rest(env: dict[str, object]) -> None:
    sched, kernel, loader, _ = make(env, gated=("a",), max_workers=2)
    inflight = sched.submit(Request("admin", "a"))      # core, then a (held)
    assert loader.entered["a"].wait(10)
    waiting = sched.submit(Request("admin", "c"))       # c waits for a
    stopper = threading.Thread(target=sched.shutdown, kwargs={"timeout": 10})
    stopper.start()
    # Everything not started is answered without waiting for the held load.
    out_c = outcome(waiting)
    assert out_c.status == "failed" and out_c.errno == E.ESHUTDOWN
    assert not inflight.done()
    late = outcome(sched.submit(Request("admin", "solo")))
    assert late.status == "failed" and late.errno == E.ESHUTDOWN
    loader.release()
    stopper.join(10)
    assert outcome(inflight).status == "loaded"
    assert "a" in kernel.loaded() and "c" not in kernel.loaded()


def test_loader_exception_becomes_failed_outcome(env: dict[str, object]) -> None:
    sched, _, loader, _ = make(env)

    def boom(step: ModuleStep):  # type: ignore[no-untyped-def]
        raise OSError(E.EIO, "disk on fire")

    loader.inner.load_step = boom  # type: ignore[method-assign]
    out = outcome(sched.submit(Request("admin", "solo")))
    assert out.status == "failed" and out.errno == E.EIO
    # The workers survived.
    loader.inner.load_step = Loader(loader.inner.kernel).load_step  # type: ignore[method-assign]
    assert outcome(sched.submit(Request("admin", "fast"))).status == "loaded"


def test_resolver_exception_becomes_failed_outcome(env: dict[str, object]) -> None:
    sched, _, _, resolver = make(env)

    def broken(request: str, **kw: object) -> Plan:
        raise ValueError("index corrupt")

    resolver.plan = broken  # type: ignore[method-assign]
    out = outcome(sched.submit(Request("modalias", "anything")))
    assert out.status == "failed" and "index corrupt" in (out.error or "")


def test_module_whose_init_keeps_requesting_itself_is_reported_once(env: dict[str, object]
                                                                     ) -> None:
    reports: list[str] = []
    sched, kernel, loader, _ = make(env, runaway_limit=10, runaway_window=60,
                                    on_runaway=lambda key, req: reports.append(key))
    inner: list[str] = []
    real = loader.inner.load_step

    def load_step(step: ModuleStep):  # type: ignore[no-untyped-def]
        if step.name == "solo":
            # A buggy init that calls request_module() for itself in a loop.
            for _ in range(100):
                inner.append(sched.submit(Request("kernel", "solo", None, "kernel")
                                          ).result(timeout=5).status)
        return real(step)

    loader.inner.load_step = load_step  # type: ignore[method-assign]
    assert outcome(sched.submit(Request("modalias", "solo"))).status == "loaded"
    # The first answers mirror modprobe for a COMING module; then (the
    # original uevent counted too) the storm is cut off.
    first = inner.index("runaway")
    assert first == 9 and set(inner[:first]) == {"present"}
    assert set(inner[first:]) == {"runaway"}
    assert reports == ["solo"]              # reported once, not per request
    assert loads_of(kernel, "solo") == 1


def test_later_request_joins_a_load_already_inside_the_kernel(
        env: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    import kmodd.kernel.sim as sim_mod
    in_init = threading.Event()
    gate = threading.Event()

    def held_init(seconds: float) -> None:       # the module's init function
        in_init.set()
        assert gate.wait(10)

    sched, kernel, _, _ = make(env, kernel_kwargs={"init_delays": {"slow": 1.0}})
    # Only the simulation's clock: its init "delay" now waits for the gate.
    monkeypatch.setattr(sim_mod, "time", types.SimpleNamespace(sleep=held_init))
    first = sched.submit(Request("modalias", "slow", "/d1"))
    assert in_init.wait(10)
    assert kernel.initstate("slow").value == "coming"
    kernel_view = sched.submit(Request("kernel", "slow"))      # modprobe's COMING rule
    assert outcome(kernel_view).status == "present"
    admin = sched.submit(Request("admin", "slow"))             # shares the real outcome
    other_dev = sched.submit(Request("modalias", "slow", "/d2"))
    # Requests are planned on the pool: open the gate only once every request
    # still pending has joined the load in the kernel, or one could find it
    # finished ("present").
    def all_joined() -> bool:
        with sched._lock:
            return all("slow" in e.needs for e in sched._entries.values())
    deadline = time.monotonic() + 10
    while not all_joined() and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    assert [outcome(f).status for f in (first, admin, other_dev)] == ["loaded"] * 3
    assert loads_of(kernel, "slow") == 1


def test_softdeps_keep_modprobe_order(env: dict[str, object]) -> None:
    graph = {"drv": ("lib",), "lib": (), "pre": (), "post": ()}
    sched, kernel, _, _ = make(env, graph=graph, max_workers=4, resolver_kwargs={
        "softdeps": {"drv": (("pre",), ("post",))}})
    assert outcome(sched.submit(Request("admin", "drv"))).status == "loaded"
    order = kernel.load_order
    assert order.index("pre") < order.index("lib") < order.index("drv") < order.index("post")


def test_one_failure_answers_every_request_that_needed_it(env: dict[str, object]) -> None:
    graph = {"bad": (), "u1": ("bad",), "u2": ("bad",), "ok": ()}
    sched, kernel, loader, _ = make(env, graph=graph, gated=("bad",), max_workers=4,
                                    kernel_kwargs={"load_errors": {"bad": E.EIO}})
    f1 = sched.submit(Request("admin", "u1"))
    assert loader.entered["bad"].wait(10)
    f2 = sched.submit(Request("admin", "u2"))
    f3 = sched.submit(Request("admin", "ok"))
    assert outcome(f3).status == "loaded"          # unrelated work is not held up
    loader.release()
    for f in (f1, f2):
        out = outcome(f)
        assert out.status == "failed" and out.errno == E.EIO and "bad" in (out.error or "")
    assert loads_of(kernel, "bad") == 1 and "u1" not in loader.calls
    assert "u2" not in loader.calls and sched.wait_idle(10)


def test_a_script_asking_in_a_loop_is_not_a_runaway(env: dict[str, object]) -> None:
    # e.g. timing the request helper 50 times: answered, not refused.
    sched, _, _, _ = make(env)
    outs = [outcome(sched.submit(Request("kernel", "solo", None, "kernel")))
            for _ in range(RUNAWAY_LIMIT)]
    assert {o.status for o in outs} == {"loaded", "present"}


@pytest.mark.parametrize("workers", [1, 3])
def test_module_inits_asking_for_modules_never_wait_for_a_free_worker(
        env: dict[str, object], workers: int) -> None:
    # Every worker sits in a module init that calls request_module() for
    # another module (a crypto algorithm, say): the kernel holds those inits
    # until the helper answers, so the loads it asked for (and their
    # dependencies) must not queue behind them.
    graph = {f"m{i}": () for i in range(workers)} | \
        {f"want{i}": ("base",) for i in range(workers)} | {"base": ()}
    sched, kernel, loader, _ = make(env, graph=graph, max_workers=workers)
    all_inside = threading.Barrier(workers, timeout=5)
    inner: dict[str, Outcome] = {}
    real = loader.inner.load_step

    def load_step(step: ModuleStep):  # type: ignore[no-untyped-def]
        if step.name.startswith("m"):
            all_inside.wait()           # every worker is now inside an init
            want = "want" + step.name[1:]
            inner[want] = sched.submit(Request("kernel", want, None, "kernel")).result(5)
        return real(step)

    loader.inner.load_step = load_step  # type: ignore[method-assign]
    outer = [sched.submit(Request("modalias", f"m{i}")) for i in range(workers)]
    assert [outcome(f).status for f in outer] == ["loaded"] * workers
    assert {k: o.status for k, o in inner.items()} == {f"want{i}": "loaded"
                                                      for i in range(workers)}
    assert set(kernel.loaded()) == set(graph)
    assert workers < sched.max_loading_seen <= MAX_KMOD_CONCURRENT
    # The extra threads are gone and the pool is back to its size.
    assert sched.wait_idle(5) and sched._extra_loads == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("kmodd-kernel-")]


def test_a_load_others_wait_for_goes_before_leaves(env: dict[str, object]) -> None:
    # One worker, held: "solo" (nothing waits for it) is queued before "core",
    # which "a" and then "c" wait for.  Once the worker is free, that chain goes
    # first; among loads nobody waits for, the oldest.
    sched, kernel, loader, _ = make(env, graph=GRAPH | {"hold": ()}, gated=("hold",),
                                    max_workers=1)
    held = sched.submit(Request("admin", "hold"))
    assert loader.entered["hold"].wait(10)
    leaf = sched.submit(Request("modalias", "solo"))
    chain = sched.submit(Request("modalias", "c"))
    deadline = time.monotonic() + 10
    while sched.snapshot()["waiting_loads"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    snap = sched.snapshot()     # solo and core ready; a and c waiting
    assert (snap["queued_loads"], snap["waiting_loads"]) == (2, 2)
    loader.release()
    assert [outcome(f).status for f in (held, leaf, chain)] == ["loaded"] * 3
    assert kernel.load_order == ["hold", "core", "a", "solo", "c"]


def test_kernel_request_joining_a_queued_load_does_not_wait_behind_the_init(
        env: dict[str, object]) -> None:
    # A device asked for "want" first, so its load is queued behind the one
    # worker, which sits in m's init; then that init asks the kernel for "want".
    sched, kernel, loader, _ = make(env, graph={"m": (), "want": ()}, max_workers=1)
    inner: list[Outcome] = []
    device: list[Future[Outcome]] = []
    real = loader.inner.load_step

    def load_step(step: ModuleStep):  # type: ignore[no-untyped-def]
        if step.name == "m":
            device.append(sched.submit(Request("modalias", "want")))
            deadline = time.monotonic() + 5
            while sched.snapshot()["queued_loads"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sched.snapshot()["queued_loads"] == 1
            inner.append(sched.submit(Request("kernel", "want", None, "kernel")).result(5))
        return real(step)

    loader.inner.load_step = load_step  # type: ignore[method-assign]
    assert outcome(sched.submit(Request("modalias", "m"))).status == "loaded"
    assert [o.status for o in inner] == ["loaded"]
    assert outcome(device[0]).status == "loaded" and loads_of(kernel, "want") == 1


def test_a_denied_softdep_is_left_out_and_the_module_still_loads(
        env: dict[str, object]) -> None:
    sched, kernel, _, _ = make(env, resolver_kwargs={"softdeps": {"solo": (("fast",), ())}})
    sched.set_deny(lambda name: "denied by test" if name == "fast" else None)
    out = outcome(sched.submit(Request("admin", "solo")))
    assert out.status == "loaded" and out.modules == ("solo",)
    assert loads_of(kernel, "solo") == 1 and loads_of(kernel, "fast") == 0


# --- the kernel's answer before the bookkeeping -----------------------------------

def test_kernel_request_is_answered_before_the_bookkeeping(env: dict[str, object]) -> None:
    # The state record (on_module) of "c" hangs: the kernel's request is
    # answered anyway; an administrator's only once c is recorded; the
    # scheduler is not idle (settle) until the bookkeeping is done.
    recording = threading.Event()
    go_on = threading.Event()
    recorded: list[str] = []

    def on_module(step: ModuleStep, request: Request, targets: tuple[str, ...],
                  result: object) -> None:
        if step.name == "c":
            recording.set()
            assert go_on.wait(10)
        recorded.append(step.name)

    outcomes: list[str] = []
    sched, _, _, _ = make(env, max_workers=4, on_module=on_module,
                               on_outcome=lambda o: outcomes.append(o.request.kind))
    kernel_fut = sched.submit(Request("kernel", "c", None, "kernel"))
    assert recording.wait(10)
    assert outcome(kernel_fut).status == "loaded"      # while c's record is pending
    assert "c" not in recorded and outcomes == []
    assert not sched.idle() and not sched.wait_idle(0.2)
    admin_fut = sched.submit(Request("admin", "c"))    # c is in: present, or joins
    go_on.set()
    assert outcome(admin_fut).ok
    assert sched.wait_idle(10)
    assert recorded[-1] == "c" and set(recorded) == {"core", "a", "c"}
    assert "kernel" in outcomes


def test_admin_request_hears_back_only_once_recorded(env: dict[str, object]) -> None:
    recording = threading.Event()
    go_on = threading.Event()

    def on_module(step: ModuleStep, request: Request, targets: tuple[str, ...],
                  result: object) -> None:
        if step.name == "solo":
            recording.set()
            assert go_on.wait(10)

    sched, _, _, _ = make(env, max_workers=2, on_module=on_module)
    fut = sched.submit(Request("admin", "solo"))
    assert recording.wait(10)
    time.sleep(0.1)
    assert not fut.done()
    go_on.set()
    assert outcome(fut).status == "loaded"


def test_a_chain_loads_on_the_worker_that_loaded_its_dependency(
        env: dict[str, object]) -> None:
    # core -> a -> c: the links follow each other on one worker, without a
    # hand-over to another, and without waiting for each other's bookkeeping
    # (the record of core is only made once c, the end of the chain, is in).
    threads: dict[str, str] = {}
    c_loading = threading.Event()

    def on_module(step: ModuleStep, *_: object) -> None:
        if step.name == "core":
            assert c_loading.wait(10), "c waited for core's bookkeeping"

    sched, _, loader, _ = make(env, max_workers=4, on_module=on_module)
    real = loader.load_step

    def load_step(step: ModuleStep) -> object:
        threads[step.name] = threading.current_thread().name
        if step.name == "c":
            c_loading.set()
        return real(step)

    loader.load_step = load_step  # type: ignore[method-assign]
    assert outcome(sched.submit(Request("kernel", "c", None, "kernel"))).status == "loaded"
    assert sched.wait_idle(10)
    assert set(threads) == {"core", "a", "c"}
    assert len(set(threads.values())) == 1, threads


def test_pending_detail_names_what_keeps_the_scheduler_busy(env: dict[str, object]) -> None:
    """settle's timeout reply and status say which request waits for which load."""
    sched, _, loader, _ = make(env, gated=("slow",), max_workers=4)
    fut = sched.submit(Request("coldplug", "x", devpath="/devices/pci0/x"))
    assert loader.entered["slow"].wait(10)
    detail = sched.pending_detail()
    [req] = detail["requests"]
    assert (req["kind"], req["key"], req["devpath"]) == ("coldplug", "x", "/devices/pci0/x")
    assert req["stage"] == "loading" and req["waiting_for"] == ["slow", "x"]
    assert req["age"] >= 0
    assert detail["loads"] == {"running": ["slow"], "waiting": ["x"]}
    loader.release()
    assert outcome(fut).status == "loaded"
    assert sched.wait_idle(10)
    assert sched.pending_detail() == {"requests": [], "loads": {}, "telling": 0}


def test_pending_detail_is_bounded(env: dict[str, object]) -> None:
    graph = {f"m{i}": () for i in range(8)}
    sched, _, loader, _ = make(env, graph=graph, gated=tuple(graph), max_workers=2)
    futures = [sched.submit(Request("modalias", f"m{i}")) for i in range(8)]
    assert loader.entered["m0"].wait(10) and loader.entered["m1"].wait(10)
    deadline = time.monotonic() + 10
    while len(sched.pending_detail()["loads"].get("ready", [])) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    detail = sched.pending_detail(limit=3)
    assert len(detail["requests"]) == 3
    assert [r["key"] for r in detail["requests"]] == ["m0", "m1", "m2"]    # oldest first
    assert all(len(names) <= 3 for names in detail["loads"].values())
    loader.release()
    assert all(outcome(f).status == "loaded" for f in futures)
