"""Bounded worker pool: dedup, dependency order, backoff, runaway detection.

Every request (uevent, coldplug, kernel request_module(), administrator)
goes through :meth:`Scheduler.submit` and gets a Future that always
completes with an :class:`Outcome`.  Work is split in two kinds of jobs:

* *resolve* jobs turn a request into a :class:`~kmodd.resolution.plan.Plan`; one
  resolver thread runs them (they are pure Python: more threads would only
  share the interpreter lock);
* *load* jobs load one module, keyed by name: one load per module however
  many requests want it, started as soon as that module's own dependencies
  are live (no waves).  A fixed set of ``max_workers`` threads runs them, so
  no more than that many modules are ever being loaded at once (except for
  loads a kernel request_module() waits on while every worker is busy: they
  get a thread of their own, up to the kernel's limit, since the busy
  workers may be inside the very inits that asked), and loads sitting in a
  slow module init never hold up the resolution of the next requests.

All bookkeeping lives under one lock; the slow parts (resolution, sysfs
reads, the load syscall) run outside it.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from kmodd.daemon.interfaces import KernelState, Planner, StepLoader
from kmodd.daemon.limits import (
    MAX_KMOD_CONCURRENT,
    RUNAWAY_LIMIT,
    RUNAWAY_WINDOW,
    clamp_workers,
    default_max_workers,
)
from kmodd.daemon.loadlog import LoadRecord
from kmodd.daemon.requests import OUTCOME_STATUSES, Outcome, OutcomeStatus, Request, RequestKind
from kmodd.kernel.early import EarlyLoads
from kmodd.kernel.loader import StepResult, StepStatus
from kmodd.kernel.protocol import InitState
from kmodd.record import dataclass, field, replace
from kmodd.resolution.plan import ModuleStep, Plan, Role

LOG = logging.getLogger(__name__)


# --- pure policies -------------------------------------------------------------

@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 5.0
    maximum: float = 600.0

    def delay(self, failures: int) -> float:
        """Exponential: initial, 2*initial, 4*initial ... capped at maximum."""
        if failures <= 0:
            return 0.0
        return float(min(self.maximum, self.initial * (2 ** min(failures - 1, 30))))


@dataclass(frozen=True)
class FailureRecord:
    failures: int
    error: str | None
    errno: int | None
    retry_at: float


def record_failure(previous: FailureRecord | None, error: str | None, errno: int | None,
                   now: float, policy: BackoffPolicy) -> FailureRecord:
    failures = (previous.failures if previous else 0) + 1
    return FailureRecord(failures, error, errno, now + policy.delay(failures))


class RunawayDetector:
    """Counts arrivals per key in a sliding window; past ``limit`` the key is
    flagged for ``window`` seconds, extended for as long as arrivals continue.

    Memory is bounded: at most ``max_keys`` keys are tracked (least recently
    seen dropped first) and each keeps at most ``limit + 1`` timestamps.
    """

    def __init__(self, limit: int = RUNAWAY_LIMIT, window: float = RUNAWAY_WINDOW,
                 max_keys: int = 4096) -> None:
        self.limit = max(1, limit)
        self.window = window
        self.max_keys = max_keys
        self._times: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._flagged: OrderedDict[Hashable, float] = OrderedDict()

    def hit(self, key: Hashable, now: float) -> tuple[bool, bool]:
        """Record one arrival; returns (runaway, newly_flagged)."""
        until = self._flagged.get(key)
        if until is not None:
            if now < until:
                self._flagged[key] = now + self.window
                self._flagged.move_to_end(key)
                return True, False
            del self._flagged[key]
        times = self._times.get(key)
        if times is None:
            times = deque(maxlen=self.limit + 1)
            self._times[key] = times
            if len(self._times) > self.max_keys:
                self._times.popitem(last=False)
        else:
            self._times.move_to_end(key)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) > self.limit:
            times.clear()
            self._flagged[key] = now + self.window
            if len(self._flagged) > self.max_keys:
                self._flagged.popitem(last=False)
            return True, True
        return False, False

    def flagged(self, now: float) -> list[Hashable]:
        return [k for k, until in self._flagged.items() if until > now]


def plan_edges(plan: Plan) -> dict[str, set[str]]:
    """For each step, the steps of this plan it must wait for.

    Hard dependencies come from ``ModuleStep.deps``; softdep ``pre`` modules
    go before every non-pre step after them and ``post`` modules after the
    targets before them, which is the order modprobe would load them in.
    Only earlier steps are ever waited on, so the graph is acyclic.
    """
    edges: dict[str, set[str]] = {}
    seen: list[ModuleStep] = []
    for step in plan.steps:
        earlier = {s.name for s in seen}
        wait = {d for d in step.deps if d in earlier}
        if step.role != Role.SOFTDEP_PRE:
            wait |= {s.name for s in seen if s.role == Role.SOFTDEP_PRE}
        if step.role == Role.SOFTDEP_POST:
            wait |= {s.name for s in seen if s.role == Role.TARGET}
        wait.discard(step.name)
        edges[step.name] = wait
        seen.append(step)
    return edges


def summarize(request: Request, plan: Plan, results: dict[str, StepResult]) -> Outcome:
    """One request's outcome from the results of its plan's steps."""
    targets = plan.targets
    failures = [r for r in results.values() if r.status.is_failure]
    if failures:
        # The target's own error says most; a dependency's explains a skip.
        first = next((r for r in failures if r.status == StepStatus.FAILED), failures[0])
        culprits = tuple(r.name for r in failures
                         if r.status == StepStatus.FAILED) or (first.name,)
        return Outcome(request, OutcomeStatus.FAILED, targets,
                       first.error or f"{first.name}: failed", first.errno, culprits)
    target_status = [results[t].status for t in targets if t in results]
    if any(s in (StepStatus.LOADED, StepStatus.INSTALL_COMMAND) for s in target_status):
        return Outcome(request, OutcomeStatus.LOADED, targets)
    if target_status and all(s is StepStatus.BUILTIN for s in target_status):
        return Outcome(request, OutcomeStatus.BUILTIN, targets)
    if any(r.status == StepStatus.LOADED for r in results.values()):
        return Outcome(request, OutcomeStatus.LOADED, targets)
    return Outcome(request, OutcomeStatus.PRESENT, targets)


# --- the scheduler -------------------------------------------------------------

@dataclass(eq=False)
class _Entry:
    """One distinct pending request and every caller waiting for it."""

    dkey: tuple[str, str, str]
    request: Request
    waiters: list[tuple[Request, Future[Outcome]]]
    plan: Plan | None = None
    needs: set[str] = field(default_factory=set)
    results: dict[str, StepResult] = field(default_factory=dict)
    done: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    refused: frozenset[str] = frozenset()     # steps the deny policy keeps out


@dataclass(eq=False)
class _Task:
    """One module to load, shared by every request that needs it."""

    step: ModuleStep
    request: Request
    targets: tuple[str, ...]
    waiting_on: set[str]
    dependents: list[_Task] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    state: str = "waiting"          # waiting | ready | running | done
    own_thread: bool = False        # loaded past max_workers for a kernel request
    requested_at: float = 0.0       # monotonic, for the load log
    planned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    waited_for: tuple[str, ...] = ()


ModuleCallback = Callable[[ModuleStep, Request, tuple[str, ...], StepResult], None]


@dataclass(eq=False)
class _Delivery:
    """What a change under the lock has to tell, told once the lock is released:
    the scheduler's rule is slow work (callbacks, the journal) outside it."""

    answers: list[tuple[Future[Outcome], Outcome]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    modules: list[tuple[ModuleStep, Request, tuple[str, ...], StepResult]] = \
        field(default_factory=list)
    runaways: list[tuple[str, Request]] = field(default_factory=list)


class Scheduler:
    def __init__(self, resolver: Planner, loader: StepLoader, kernel: KernelState, *,
                 max_workers: int | None = None, queue_limit: int = 16384,
                 max_waiters: int = 4096, backoff: BackoffPolicy | None = None,
                 runaway_limit: int = RUNAWAY_LIMIT, runaway_window: float = RUNAWAY_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 on_module: ModuleCallback | None = None,
                 on_plan: Callable[[Request, Plan], None] | None = None,
                 on_runaway: Callable[[str, Request], None] | None = None,
                 on_idle: Callable[[], None] | None = None,
                 on_load: Callable[[LoadRecord], None] | None = None,
                 early: EarlyLoads | None = None) -> None:
        self._resolver = resolver
        self._early = early
        self._on_load = on_load
        self._deny: Callable[[str], str | None] | None = None
        self._loader = loader
        self._kernel = kernel
        self.max_workers = clamp_workers(max_workers or default_max_workers())
        self.queue_limit = queue_limit
        self.max_waiters = max_waiters
        self.max_total_waiters = max(queue_limit, 65536)
        self._waiting = 0               # futures held in pending entries
        self.backoff = backoff or BackoffPolicy()
        self._clock = clock
        self._on_outcome = on_outcome
        self._on_module = on_module
        self._on_plan = on_plan
        self._on_runaway = on_runaway
        self._on_idle = on_idle
        self._runaway = RunawayDetector(runaway_limit, runaway_window)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)           # idle waiters
        self._loads_wake = threading.Condition(self._lock)     # load workers
        self._resolves_wake = threading.Condition(self._lock)  # the resolver
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._resolve_q: deque[_Entry] = deque()
        self._ready: deque[_Task] = deque()
        self._tasks: dict[str, _Task] = {}
        self._failures: OrderedDict[str, FailureRecord] = OrderedDict()
        self._stopping = False
        self._exit = False
        self.loading = 0                # workers inside load_step
        self._telling = 0               # loads whose bookkeeping is not done yet
        # While _run_load completes a load: loads made ready, no worker woken yet.
        self._held: list[_Task] | None = None
        self._extra_loads = 0           # of which on threads of their own (kernel requests)
        self.max_loading_seen = 0
        self.counts: dict[str, int] = dict.fromkeys(OUTCOME_STATUSES, 0)
        self.submitted = 0
        self._threads = [threading.Thread(target=self._worker, args=(False,),
                                          name=f"kmodd-worker-{i}", daemon=True)
                         for i in range(self.max_workers)]
        self._threads.append(threading.Thread(target=self._worker, args=(True,),
                                              name="kmodd-resolver", daemon=True))
        for t in self._threads:
            t.start()

    # --- public ------------------------------------------------------------

    def set_resolver(self, resolver: Planner) -> None:
        """New configuration/indexes (SIGHUP, inotify); in-flight plans keep the old one."""
        with self._lock:
            self._resolver = resolver
            # A new config may fix what failed: give failing modules a fresh chance.
            self._failures.clear()

    def set_deny(self, reason: Callable[[str], str | None] | None) -> None:
        """The deny policy: ``reason(module)`` says why a module is refused, or None."""
        with self._lock:
            self._deny = reason

    def reconfigure(self, *, backoff: BackoffPolicy, runaway_limit: int, runaway_window: float,
                    queue_limit: int) -> None:
        """Settings a reload may change while running (not the worker count)."""
        with self._lock:
            self.backoff = backoff
            self._runaway.limit = max(1, runaway_limit)
            self._runaway.window = runaway_window
            self.queue_limit = queue_limit
            self.max_total_waiters = max(queue_limit, 65536)

    def submit(self, request: Request) -> Future[Outcome]:
        fut: Future[Outcome] = Future()
        fut.set_running_or_notify_cancel()    # callers cannot cancel: every Future completes
        immediate: Outcome | None = None
        runaway_key: str | None = None
        with self._lock:
            self.submitted += 1
            dkey = _dedup_key(request)
            entry = self._entries.get(dkey)
            if self._stopping:
                immediate = Outcome(request, OutcomeStatus.FAILED, (), "kmodd is stopping",
                                    errno_mod.ESHUTDOWN)
            elif self._waiting >= self.max_total_waiters:
                # Memory stays bounded whatever the burst; the caller is told.
                immediate = Outcome(request, OutcomeStatus.FAILED, (),
                                    f"too many requests waiting ({self._waiting})",
                                    errno_mod.EAGAIN)
            elif entry is not None and len(entry.waiters) < self.max_waiters:
                # Identical request already pending: share its outcome, costs nothing.
                entry.waiters.append((request, fut))
                self._waiting += 1
                return fut
            elif entry is not None:
                immediate = Outcome(request, OutcomeStatus.RUNAWAY, (),
                                    f"more than {self.max_waiters} identical requests pending")
            else:
                if request.kind is not RequestKind.ADMIN:
                    runaway, newly = self._runaway.hit(
                        ("request", request.key, request.devpath or ""), self._clock())
                    if runaway:
                        immediate = Outcome(
                            request, OutcomeStatus.RUNAWAY, (),
                            f"more than {self._runaway.limit} requests for {request.key!r} "
                            f"within {self._runaway.window:g}s")
                        if newly:
                            runaway_key = request.key
                if immediate is None and len(self._entries) >= self.queue_limit:
                    immediate = Outcome(request, OutcomeStatus.FAILED, (),
                                        f"request queue full ({self.queue_limit} pending)",
                                        errno_mod.EAGAIN)
                if immediate is None:
                    entry = _Entry(dkey, request, [(request, fut)])
                    self._entries[dkey] = entry
                    self._waiting += 1
                    self._resolve_q.append(entry)
                    self._resolves_wake.notify()
                    return fut
            if immediate is not None:
                self.counts[immediate.status] = self.counts.get(immediate.status, 0) + 1
        assert immediate is not None
        if runaway_key is not None and self._on_runaway is not None:
            self._safe(self._on_runaway, runaway_key, request)
        if self._on_outcome is not None:
            self._safe(self._on_outcome, immediate)
        fut.set_result(immediate)
        return fut

    def pending(self) -> int:
        """Distinct requests not yet answered."""
        with self._lock:
            return len(self._entries)

    def idle(self) -> bool:
        with self._lock:
            return self._idle_locked()

    def pending_detail(self, limit: int = 32) -> dict[str, Any]:
        """What keeps the scheduler from idle, for ``settle`` and ``status``:
        the oldest pending requests (kind, key, age, the modules each still
        waits for), the loads by state, and the loads whose bookkeeping is
        not done yet.  At most ``limit`` of each, so a reply stays small."""
        now = time.monotonic()
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.submitted_at)[:limit]
            requests = [{"kind": str(e.request.kind), "key": e.request.key,
                         "devpath": e.request.devpath,
                         "age": round(now - e.submitted_at, 1),
                         "stage": "resolving" if e.plan is None else "loading",
                         "waiting_for": sorted(e.needs)} for e in entries]
            loads: dict[str, list[str]] = {}
            for name, task in self._tasks.items():
                names = loads.setdefault(task.state, [])
                if len(names) < limit:
                    names.append(name)
            return {"requests": requests, "loads": loads, "telling": self._telling}

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._idle_locked():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def busy_modules(self) -> set[str]:
        """Modules a pending request involves, live or not: autoclean keeps off them."""
        with self._lock:
            names = set(self._tasks)
            for entry in self._entries.values():
                if entry.plan is not None:
                    names.update(s.name for s in entry.plan.steps)
            return names

    def failures(self) -> dict[str, FailureRecord]:
        with self._lock:
            return dict(self._failures)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"pending": len(self._entries), "loading": self.loading,
                    "queued_loads": len(self._ready),
                    "waiting_loads": sum(1 for t in self._tasks.values()
                                         if t.state == "waiting"),
                    "max_workers": self.max_workers, "submitted": self.submitted,
                    "outcomes": dict(self.counts), "backoff": len(self._failures),
                    "runaway": [list(k) if isinstance(k, tuple) else k
                                for k in self._runaway.flagged(self._clock())]}

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting; answer everything not started with a failure; let the
        loads already inside the kernel finish.  True when every worker exited."""
        self.begin_shutdown()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        return not any(t.is_alive() for t in self._threads)

    def begin_shutdown(self) -> None:
        """The non-blocking half of :meth:`shutdown`: from now on every new
        request is refused (ESHUTDOWN) and nothing new starts."""
        tell = _Delivery()
        with self._lock:
            if self._exit:
                return
            self._stopping = True
            while self._resolve_q:
                entry = self._resolve_q.popleft()
                out = Outcome(entry.request, OutcomeStatus.FAILED, (), "kmodd is stopping",
                              errno_mod.ESHUTDOWN)
                self._finish_entry_locked(entry, out, tell)
            self._ready.clear()
            for task in list(self._tasks.values()):
                if task.state in ("waiting", "ready") and task.step.name in self._tasks:
                    self._complete_task_locked(
                        task, StepResult(task.step.name, StepStatus.SKIPPED,
                                         "kmodd is stopping", errno_mod.ESHUTDOWN), tell)
            self._exit = True
            self._cond.notify_all()
            self._loads_wake.notify_all()
            self._resolves_wake.notify_all()
        tell.modules.clear()     # loads never started: nothing to log per module
        self._deliver(tell)

    # --- workers -----------------------------------------------------------

    def _worker(self, resolver: bool) -> None:
        queue: deque[_Entry] | deque[_Task] = self._resolve_q if resolver else self._ready
        wake = self._resolves_wake if resolver else self._loads_wake
        while True:
            with self._lock:
                while not queue and not self._exit:
                    wake.wait()
                if not queue:
                    return
                job = queue.popleft() if resolver else self._pop_ready_locked()
                if isinstance(job, _Task):
                    self._start_load_locked(job)
            self._run_job(job)

    def _pop_ready_locked(self) -> _Task:
        """The next load: the one with the longest chain of loads waiting on
        it (list scheduling by critical path), the oldest among equals.

        A dependency that others wait for must not queue behind leaf modules
        while the workers are busy: the chain behind it (a SCSI transport,
        then the host adapter whose bus scan every later init waits for)
        decides when coldplug ends.
        """
        best = self._next_ready_index_locked()
        task = self._ready[best]
        del self._ready[best]
        return task

    def _next_ready_index_locked(self) -> int:
        """Where in the ready queue the load :meth:`_pop_ready_locked` takes is."""
        ready = self._ready
        if len(ready) == 1 or not any(t.dependents for t in ready):
            return 0
        heights: dict[int, int] = {}

        def waiting_chain(task: _Task) -> int:
            got = heights.get(id(task))
            if got is None:
                got = heights[id(task)] = max(
                    (1 + waiting_chain(d) for d in task.dependents if d.state == "waiting"),
                    default=0)
            return got

        return max(range(len(ready)), key=lambda i: (waiting_chain(ready[i]), -i))

    def _make_ready_locked(self, task: _Task) -> None:
        """Queue a load whose dependencies are live.

        A module whose init calls request_module() keeps its worker inside
        the kernel until the request is answered; if every worker is in
        such an init, a load the kernel asked for could never start.  So a
        load a kernel request waits for, with no worker free to take it
        soon, gets a thread of its own, up to the kernel's own limit of
        concurrent helpers.
        """
        task.state = "ready"
        if task.ready_at is None:
            task.ready_at = time.monotonic()
        free = self.max_workers - (self.loading - self._extra_loads) - len(self._ready)
        wanted_by_kernel = task.request.kind is RequestKind.KERNEL or any(
            e.request.kind is RequestKind.KERNEL for e in task.entries)
        if free <= 0 and wanted_by_kernel and self.loading < MAX_KMOD_CONCURRENT:
            self._start_load_locked(task)
            task.own_thread = True
            self._extra_loads += 1
            threading.Thread(target=self._run_job, args=(task,),
                             name=f"kmodd-kernel-{task.step.name}", daemon=True).start()
            return
        self._ready.append(task)
        if self._held is not None:
            self._held.append(task)         # _run_load may take it itself
        else:
            self._loads_wake.notify()

    def _start_load_locked(self, task: _Task) -> None:
        task.state = "running"
        self.loading += 1
        self.max_loading_seen = max(self.max_loading_seen, self.loading)

    def _run_job(self, job: _Task | _Entry) -> None:
        try:
            if isinstance(job, _Task):
                self._run_load(job)
            else:
                self._run_resolve(job)
        except Exception:       # a bug here must not kill a worker
            LOG.exception("scheduler worker error")
        finally:
            with self._cond:
                self._cond.notify_all()
                now_idle = self._idle_locked()
            if now_idle and self._on_idle is not None:
                self._safe(self._on_idle)

    def _run_resolve(self, entry: _Entry) -> None:
        request = entry.request
        resolver = self._resolver
        tell = _Delivery()
        try:
            plan = resolver.plan(request.key, extra_options=request.options,
                                 blacklist_all=request.blacklist_all)
        except Exception as exc:
            out = Outcome(request, OutcomeStatus.FAILED, (),
                          f"cannot resolve {request.key!r}: {exc}")
            with self._lock:
                self._finish_entry_locked(entry, out, tell)
            self._deliver(tell)
            return
        if not plan.resolved:
            # The resolver names what its blacklist dropped (Plan.blacklisted),
            # so what is neither resolved nor dropped is unknown.
            status = OutcomeStatus.BLACKLISTED if plan.blacklisted \
                else OutcomeStatus.UNRESOLVED
            with self._lock:
                self._finish_entry_locked(entry, Outcome(request, status, ()), tell)
            self._deliver(tell)
            return
        # sysfs reads outside the lock: which steps the kernel already has.
        in_kernel: dict[str, StepResult] = {}
        deny = self._deny
        if deny is not None:
            from kmodd.daemon.deny import refusals
            refused = refusals(plan, deny)
            entry.refused = frozenset(refused)
            in_kernel.update({n: StepResult(n, StepStatus(r.status), r.error, r.errno)
                              for n, r in refused.items()})
        # Only a plan that runs whole: one the deny list cuts short is nobody's
        # to remember (kmodd.daemon.learned never inserts it early).
        if self._on_plan is not None and not entry.refused:
            self._safe(self._on_plan, request, plan)
        for step in plan.steps:
            if step.name in entry.refused:
                continue
            if step.builtin:
                in_kernel[step.name] = StepResult(step.name, StepStatus.BUILTIN)
                continue
            if self._early is not None and self._early.holds(step.name):
                continue            # the loader takes the head start's result
            try:
                state = self._kernel.initstate(step.name)
            except Exception:
                continue
            if state == InitState.BUILTIN:
                in_kernel[step.name] = StepResult(step.name, StepStatus.BUILTIN)
            elif state in (InitState.LIVE, InitState.COMING):
                # COMING counts as loaded, as for modprobe (module_is_inkernel).
                in_kernel[step.name] = StepResult(step.name, StepStatus.ALREADY)
        with self._lock:
            entry.plan = plan
            entry.results.update(in_kernel)
            if self._stopping:
                stopping = Outcome(request, OutcomeStatus.FAILED, plan.targets,
                                   "kmodd is stopping", errno_mod.ESHUTDOWN)
                self._finish_entry_locked(entry, stopping, tell)
            else:
                self._schedule_locked(entry, plan, in_kernel, tell)
        self._deliver(tell)

    def _schedule_locked(self, entry: _Entry, plan: Plan, in_kernel: dict[str, StepResult],
                         tell: _Delivery) -> None:
        request = entry.request
        now = self._clock()
        # A module our own worker is loading reads as COMING in sysfs; every
        # request but the kernel's joins that load and shares its outcome.
        todo = [s for s in plan.steps if s.name not in entry.refused
                and (s.name not in in_kernel or (request.kind is not RequestKind.KERNEL
                                                 and s.name in self._tasks))]
        for step in todo:
            entry.results.pop(step.name, None)
        edges = plan_edges(plan)
        # An administrator asking again means retry now.
        if request.kind is not RequestKind.ADMIN:
            kept = self._hold_back_locked(entry, plan, todo, edges, now, tell)
            if kept is None:
                return
            todo = kept
        for step in todo:
            task = self._tasks.get(step.name)
            if task is None:
                waits = {d for d in edges.get(step.name, ()) if d in self._tasks}
                task = _Task(step, request, plan.targets, waits,
                             requested_at=entry.submitted_at, waited_for=tuple(sorted(waits)))
                self._tasks[step.name] = task
                for dep in waits:
                    self._tasks[dep].dependents.append(task)
                if not waits:
                    self._make_ready_locked(task)
            elif task.state == "running" and request.kind is RequestKind.KERNEL:
                # Already in the kernel's hands: answer like modprobe does for a
                # COMING module.  Joining would deadlock a module whose init
                # asks for itself (the kernel waits for this very reply).
                entry.results[step.name] = StepResult(step.name, StepStatus.ALREADY)
                continue
            task.entries.append(entry)
            entry.needs.add(step.name)
            if request.kind is RequestKind.KERNEL and task.state == "ready" \
                    and task.request is not request:
                self._ready.remove(task)        # queued behind others: maybe expedite
                self._make_ready_locked(task)
        if not entry.needs:
            self._finish_entry_locked(entry, summarize(request, plan, entry.results), tell)

    def _hold_back_locked(self, entry: _Entry, plan: Plan, todo: list[ModuleStep],
                          edges: dict[str, set[str]], now: float,
                          tell: _Delivery) -> list[ModuleStep] | None:
        """Backoff and runaway: the steps still to load, or None when they
        decided the request (and finished it)."""
        request = entry.request
        # A module backing off holds back only itself and what needs it: the
        # plan's other modules (a CPU modalias names a dozen) still load.
        held: dict[str, StepResult] = {}
        for step in todo:
            rec = self._failures.get(step.name)
            if rec is not None and rec.retry_at > now and step.name not in self._tasks:
                held[step.name] = StepResult(
                    step.name, StepStatus.BACKOFF,
                    f"{step.name} failed {rec.failures} time(s), "
                    f"next retry in {rec.retry_at - now:.0f}s: {rec.error}", rec.errno)
            elif any(d in held for d in edges.get(step.name, ())):
                blocker = next(d for d in edges[step.name] if d in held)
                held[step.name] = StepResult(step.name, StepStatus.BACKOFF,
                                             held[blocker].error, held[blocker].errno)
        if held:
            entry.results.update(held)
            todo = [s for s in todo if s.name not in held]
            if not any(s.role is Role.TARGET for s in todo):
                first = next(iter(held.values()))
                out = Outcome(request, OutcomeStatus.BACKOFF, plan.targets, first.error,
                              first.errno)
                self._finish_entry_locked(entry, out, tell)
                return None
        for step in todo:
            if step.name in self._tasks:
                continue
            runaway, newly = self._runaway.hit(("module", step.name), now)
            if runaway:
                out = Outcome(request, OutcomeStatus.RUNAWAY, plan.targets,
                              f"{step.name} loaded more than {self._runaway.limit} times "
                              f"within {self._runaway.window:g}s")
                if newly:
                    tell.runaways.append((step.name, request))
                self._finish_entry_locked(entry, out, tell)
                return None
        return todo

    def _run_load(self, task: _Task) -> None:
        """Load ``task``, then, on this same worker, the next link of its chain.

        A chain (llc, stp, bridge) runs on one thread: no hand-over to
        another worker between its links.  The bookkeeping of every link
        (load log, journal line, state record, outcome callbacks) comes after
        the answers a kernel request waits for (see :meth:`_deliver`), and
        before the scheduler counts as idle, so ``settle`` still means
        "recorded".
        """
        done: list[tuple[_Task, StepResult, float, float, _Delivery]] = []
        current: _Task | None = task
        try:
            while current is not None:
                step = current.step
                result: StepResult
                picked = time.monotonic()
                try:
                    result = self._loader.load_step(step)
                except Exception as exc:
                    err = getattr(exc, "errno", None)
                    result = StepResult(step.name, StepStatus.FAILED, f"{step.name}: {exc}",
                                        err if isinstance(err, int) else None)
                returned = time.monotonic()
                tell = _Delivery()
                with self._lock:
                    self._telling += 1
                    done.append((current, result, picked, returned, tell))
                    self.loading -= 1
                    if current.own_thread:
                        self._extra_loads -= 1
                    now = self._clock()
                    if result.status == StepStatus.FAILED:
                        self._failures[step.name] = record_failure(
                            self._failures.get(step.name), result.error, result.errno, now,
                            self.backoff)
                        self._failures.move_to_end(step.name)
                        while len(self._failures) > 4096:
                            self._failures.popitem(last=False)
                    elif result.status != StepStatus.SKIPPED:
                        self._failures.pop(step.name, None)
                    self._held = []
                    try:
                        self._complete_task_locked(current, result, tell)
                    except BaseException:
                        held, self._held = self._held, None
                        for _ in held:
                            self._loads_wake.notify()
                        raise
                    held, self._held = self._held, None
                    current = self._next_link_locked(current, held)
                # The kernel is blocked until its helper hears back.
                self._answer_kernel(tell)
        finally:
            for finished, result, picked, returned, tell in done:
                try:
                    self._bookkeep(finished, result, picked, returned, tell)
                finally:
                    with self._lock:
                        self._telling -= 1

    def _next_link_locked(self, task: _Task, held: list[_Task]) -> _Task | None:
        """The load this worker goes on with, without handing it to another
        thread: the next link of a chain (llc, stp, bridge), when the completion
        of ``task`` made it ready (``held``: queued without waking a worker)
        and it is the load any worker would take next (:meth:`_pop_ready_locked`).

        Only a pool worker keeps going (a thread of its own for a kernel
        request ends with its load); the other loads made ready get the
        workers they would have had.
        """
        queued = [t for t in held if t.state == "ready"]
        mine: _Task | None = None
        if queued and not task.own_thread and not self._exit:
            # Only the next link of this chain: other loads keep their own
            # worker, and this chain's bookkeeping waits for its end alone.
            best = self._ready[self._next_ready_index_locked()]
            if best in queued:
                self._ready.remove(best)
                self._start_load_locked(best)
                queued.remove(best)
                mine = best
        for _ in queued:
            self._loads_wake.notify()
        return mine

    def _bookkeep(self, task: _Task, result: StepResult, picked: float, returned: float,
                  tell: _Delivery) -> None:
        step = task.step
        if self._on_load is not None and result.status in (StepStatus.LOADED, StepStatus.FAILED,
                                                            StepStatus.INSTALL_COMMAND):
            self._safe(self._on_load, self._load_record(task, result, picked, returned))
        # The owner (state record) hears of this step before the callers that
        # are not the kernel, so for them "loaded" implies "recorded".
        if self._on_module is not None:
            self._safe(self._on_module, step, task.request, task.targets, result)
        tell.modules = [m for m in tell.modules if m[0] is not step]
        self._deliver(tell)

    @staticmethod
    def _load_record(task: _Task, result: StepResult, picked: float,
                     returned: float) -> LoadRecord:
        # The loader times the syscall itself (StepResult.seconds); it returns
        # right after it, so the syscall ended when load_step returned.
        seconds = result.seconds
        end = returned
        start = max(picked, end - seconds) if isinstance(seconds, float) else picked
        req = task.request
        ready = task.ready_at if task.ready_at is not None else picked
        requested = min(task.requested_at or task.planned_at, task.planned_at)
        planned = task.planned_at
        if result.started is not None and result.started < picked and seconds is not None:
            # Loaded by the head start before this request existed
            # (kmodd.kernel.early): the syscall's own times, nothing waited.
            start, end = result.started, result.started + seconds
            requested, planned, ready = min(requested, start), min(planned, start), \
                min(ready, start)
        return LoadRecord(
            module=task.step.name, kind=req.kind, key=req.key, status=result.status,
            requested_at=requested,
            planned_at=planned, deps_ready_at=ready,
            start=start, end=end, requested_by=req.requested_by, devpath=req.devpath,
            role=str(task.step.role), via=task.targets, waited_for=task.waited_for,
            error=result.error, errno=result.errno)

    # --- bookkeeping (lock held) ------------------------------------------------

    def _complete_task_locked(self, task: _Task, result: StepResult,
                              tell: _Delivery) -> None:
        stack: list[tuple[_Task, StepResult]] = [(task, result)]
        while stack:
            current, res = stack.pop()
            name = current.step.name
            if self._tasks.get(name) is not current:
                continue
            del self._tasks[name]
            current.state = "done"
            tell.modules.append((current.step, current.request, current.targets, res))
            failed = res.status.is_failure
            for dependent in current.dependents:
                dep_name = dependent.step.name
                if self._tasks.get(dep_name) is not dependent:
                    continue        # already done (a sibling dependency failed first)
                if failed:
                    if dependent.state != "running":
                        if dependent.state == "ready":
                            self._ready.remove(dependent)
                        why = res.error if res.status == StepStatus.SKIPPED and res.error else \
                            f"dependency {name} failed"
                        stack.append((dependent, StepResult(dep_name, StepStatus.SKIPPED, why,
                                                             res.errno)))
                else:
                    dependent.waiting_on.discard(name)
                    if not dependent.waiting_on and dependent.state == "waiting":
                        self._make_ready_locked(dependent)
            for entry in current.entries:
                if entry.done:
                    continue
                entry.results[name] = res
                entry.needs.discard(name)
                # A failure decides the request at once; no need to wait for
                # other modules of its plan still in flight.
                if (failed or not entry.needs) and entry.plan is not None:
                    self._finish_entry_locked(entry, summarize(entry.request, entry.plan,
                                                               entry.results), tell)

    def _finish_entry_locked(self, entry: _Entry, outcome: Outcome,
                             tell: _Delivery) -> None:
        if entry.done:
            return
        entry.done = True
        if self._entries.get(entry.dkey) is entry:
            del self._entries[entry.dkey]
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        tell.outcomes.append(outcome)
        self._waiting -= len(entry.waiters)
        for req, fut in entry.waiters:
            tell.answers.append(
                (fut, outcome if req is entry.request else replace(outcome, request=req)))
        entry.waiters = []
        self._cond.notify_all()

    def _idle_locked(self) -> bool:
        # Nothing pending, and no load's bookkeeping still to do.
        return not self._entries and not self._tasks and not self._telling

    @staticmethod
    def _answer_kernel(tell: _Delivery) -> None:
        """Answer the kernel's requests of ``tell`` now, ahead of the bookkeeping.

        request_module() blocks the process that asked until its helper
        exits; what the load log, the journal line and the state record
        need can wait the few milliseconds after it (kmod's modprobe, too,
        is done when init_module() returns)."""
        rest = []
        for fut, outcome in tell.answers:
            if outcome.request.kind is RequestKind.KERNEL:
                if not fut.done():
                    fut.set_result(outcome)
            else:
                rest.append((fut, outcome))
        tell.answers = rest

    def _deliver(self, tell: _Delivery) -> None:
        """Outside the lock: the kernel's answers, the callbacks, then the other answers."""
        self._answer_kernel(tell)
        if self._on_runaway is not None:
            for key, request in tell.runaways:
                self._safe(self._on_runaway, key, request)
        # Callbacks first: a caller that has its answer knows the monitors
        # were told, in the order the answers were given.
        if self._on_module is not None:
            for step, request, targets, res in tell.modules:
                self._safe(self._on_module, step, request, targets, res)
        if self._on_outcome is not None:
            for outcome in tell.outcomes:
                self._safe(self._on_outcome, outcome)
        for fut, outcome in tell.answers:
            if not fut.done():
                fut.set_result(outcome)

    @staticmethod
    def _safe(fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            LOG.exception("scheduler callback failed")


def _dedup_key(request: Request) -> tuple[str, str, str]:
    return (request.kind.dedup_kind, request.key, request.options)
