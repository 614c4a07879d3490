"""The daemon: wires request sources -> scheduler -> loader, on one event loop.

One thread runs :class:`EventLoop` (selectors): the control socket, the
request sources (uevents, the kernel-request FIFO, inotify), timers
(autoclean, watchdog, STATUS=) and callbacks posted by the worker threads.
The loader runs on the scheduler's workers; coldplug waits on futures in a
thread of its own.  Every handler catches and logs: bad input never takes
the daemon down.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import re
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kmodd.daemon.autoclean import Autoclean, AutocleanPolicy, SweepReport
from kmodd.daemon.control import Connection, ControlServer, error_reply
from kmodd.daemon.deny import DenyPolicy, deny_file
from kmodd.daemon.interfaces import (
    ColdplugFn,
    ColdplugReport,
    ModuleLoader,
    Readable,
    Resolver,
    Source,
    SourceFactory,
    WatcherFactory,
)
from kmodd.daemon.loadlog import LoadLog
from kmodd.daemon.modules_load import ListedModule, ListProblem
from kmodd.daemon.requests import Outcome, OutcomeStatus, Request, RequestKind, Submit
from kmodd.daemon.scheduler import BackoffPolicy, Scheduler
from kmodd.daemon.settings import Settings, SettingsError, SettingsSource
from kmodd.daemon.state import ModuleRecord, StateStore
from kmodd.kernel.loader import StepResult, StepStatus
from kmodd.kernel.protocol import InitState, Kernel
from kmodd.resolution.names import modname_normalize
from kmodd.resolution.plan import ModuleStep, Plan

LOG = logging.getLogger(__name__)


ResolverFactory = Callable[[Settings], Resolver]
ListedFn = Callable[[], "tuple[list[ListedModule], list[ListProblem]]"]

# READY=1 waits for the modules-load.d loads (units ordered after
# systemd-modules-load.service, systemd-sysctl for one, expect them), but
# never longer than this: systemd would time the start out.
MODULES_LOAD_READY_WAIT = 60.0
MODULES_LOAD_MARKER = "modules-load.served"


def slog(logger: logging.Logger, level: int, msg: str, *args: object, **fields: Any) -> None:
    """Structured log line (journal fields MODULE=, DEVPATH=...), never raising."""
    try:
        from kmodd.journal import log as sd_log
        sd_log(logger, level, msg, *args, **fields)
    except ImportError:
        logger.log(level, msg, *args)
    except Exception:
        with contextlib.suppress(Exception):
            logger.log(level, msg, *args)


def _sd_notify(**fields: object) -> bool:
    try:
        from kmodd.daemon.systemd import notify
    except ImportError:
        return False
    try:
        return bool(notify(**fields))
    except Exception:
        return False


def _sd_watchdog_interval() -> float | None:
    try:
        from kmodd.daemon.systemd import watchdog_interval
    except ImportError:
        return None
    try:
        return watchdog_interval()
    except Exception:
        return None


# --- event loop ----------------------------------------------------------------

class _Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """selectors + timers + a self-pipe for callbacks from other threads.

    ``call_soon_threadsafe`` takes no lock (deque.append is atomic), so it is
    safe from a signal handler too.

    Each turn: the *priority* readers (the kernel's uevents and request FIFO,
    inotify) first, all of them; then the other ready handlers and the work
    deferred with :meth:`call_soon` (control peers), in a rotating order and
    only until ``turn_budget`` seconds are spent -- what is left waits for the
    next turn, which begins with a fresh look at the priority readers; then
    timers and the callbacks of other threads.  So the kernel never waits
    behind more than one budget of control traffic, and no peer is always
    last (the same idea as sd-event's per-source priorities).
    """

    TURN_BUDGET = 0.005
    # When the budget ran out (control traffic saturates the loop), the next
    # wait serves only the priority readers for as long as the budgeted work
    # took: control gets at most half of the loop thread, and the scheduler's
    # threads get the interpreter lock in between.
    REST_SHARE = 1.0

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._wakeup_pending = False
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._handlers: dict[int, tuple[Callable[[], None] | None,
                                        Callable[[], None] | None]] = {}
        self._priority: set[int] = set()
        self._deferred: deque[tuple[Callable[[], None], object]] = deque()
        # Fairness: ready work is served least recently served group first
        # (a group: the uid of a control peer, else the fd itself), so a
        # user with many connections gets one share, not one per connection.
        self._groups: dict[int, object] = {}
        self._served: dict[object, int] = {}
        self._ticks = itertools.count(1)
        self._turn = 0
        self.turn_budget = self.TURN_BUDGET
        self.rest_share = self.REST_SHARE
        self._rest_until = 0.0
        self.selector.register(self._rsock, selectors.EVENT_READ, None)
        # Non-priority fds live in a selector of their own (epoll nests),
        # watched from the main one except while the loop rests.
        self._normal = selectors.DefaultSelector()
        self._normal_watched = False
        self._watch_normal(True)
        self.stopped = False
        self.thread: threading.Thread | None = None

    # registration ------------------------------------------------------------
    def _update(self, fileobj: Any, reader: Callable[[], None] | None,
                writer: Callable[[], None] | None) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        events = (selectors.EVENT_READ if reader else 0) | \
            (selectors.EVENT_WRITE if writer else 0)
        known = fd in self._handlers
        if not events:
            if known:
                self._selector_of(fd).unregister(fd)
                del self._handlers[fd]
            self._priority.discard(fd)
            self._groups.pop(fd, None)
            return
        self._handlers[fd] = (reader, writer)
        if known:
            self._selector_of(fd).modify(fd, events)
        else:
            self._selector_of(fd).register(fd, events)

    def _selector_of(self, fd: int) -> selectors.BaseSelector:
        return self.selector if fd in self._priority else self._normal

    def _watch_normal(self, on: bool) -> None:
        if on != self._normal_watched:
            if on:
                self.selector.register(self._normal.fileno(), selectors.EVENT_READ, None)
            else:
                self.selector.unregister(self._normal.fileno())
            self._normal_watched = on

    def add_reader(self, fileobj: Any, callback: Callable[[], None], *,
                   priority: bool = False, group: object = None) -> None:
        """Call ``callback`` when readable; ``priority`` readers go first every turn.

        Others share the turn's budget by ``group`` (default: the fd alone).
        """
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        reader, writer = self._handlers.get(fd, (None, None))
        if (fd in self._priority) != priority and (reader or writer):
            self._update(fd, None, None)         # moves to the other selector
        if priority:
            self._priority.add(fd)
        else:
            self._priority.discard(fd)
        self._update(fd, callback, writer)
        if group is not None:
            self._groups[fd] = group

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching for input (a writer stays registered)."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        _, writer = self._handlers.get(fd, (None, None))
        self._update(fd, None, writer)

    def set_writer(self, fileobj: Any, callback: Callable[[], None] | None) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        reader, _ = self._handlers.get(fd, (None, None))
        self._update(fd, reader, callback)

    def remove(self, fileobj: Any) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._handlers:
            self._selector_of(fd).unregister(fd)
            del self._handlers[fd]
        self._priority.discard(fd)
        self._groups.pop(fd, None)

    # callbacks and timers ------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        self._calls.append((fn, args))
        # One wake-up byte per batch: the loop clears the flag before taking
        # the batch, so a call appended after that always sends its own.
        if not self._wakeup_pending:
            self._wakeup_pending = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wsock.send(b"\0")

    def call_soon(self, fn: Callable[[], None], *, group: object = None) -> None:
        """From the loop thread: run ``fn`` in a coming turn, within the turn budget
        and the share of ``group`` (see :meth:`add_reader`)."""
        self._deferred.append((fn, group if group is not None else fn))

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + max(0.0, delay), fn)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        if len(self._timers) > 1024:
            # Cancelled far-future timers (settle timeouts) would pile up.
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
        return timer

    def call_every(self, interval: float, fn: Callable[[], None]) -> _Timer:
        """Repeat ``fn`` every ``interval`` seconds; cancel the returned handle to stop."""
        handle = _Timer(0.0, fn)

        def tick() -> None:
            if handle.cancelled:
                return
            self._guard(fn)
            if not handle.cancelled:
                self.call_later(interval, tick)

        self.call_later(interval, tick)
        return handle

    @staticmethod
    def _guard(fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            LOG.exception("event loop callback failed")

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = max_wait
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            until = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        resting = self._rest_until - time.monotonic()
        if resting > 0:
            timeout = resting if timeout is None else min(timeout, resting)
        elif self._deferred:
            timeout = 0.0
        if self._calls:
            timeout = 0.0
        self._watch_normal(resting <= 0)
        normal = False
        for key, mask in self.selector.select(timeout):
            if key.fileobj is self._rsock:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._rsock.recv(4096):
                        pass
            elif key.fd in self._priority:
                self._dispatch(key.fd, mask)
            else:
                normal = True            # the nested selector of the others
        if resting <= 0:
            ready = [(key.fd, mask) for key, mask in self._normal.select(0)] if normal else []
            self._run_budgeted(ready)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guard(timer.callback)
        self._wakeup_pending = False
        for _ in range(len(self._calls)):
            fn, args = self._calls.popleft()
            self._guard(fn, *args)

    def _dispatch(self, fd: int, mask: int) -> None:
        reader, writer = self._handlers.get(fd, (None, None))
        if mask & selectors.EVENT_WRITE and writer is not None:
            self._guard(writer)
        # The write handler may have closed and unregistered the fd.
        reader, _ = self._handlers.get(fd, (None, None))
        if mask & selectors.EVENT_READ and reader is not None:
            self._guard(reader)

    def _run_budgeted(self, ready: list[tuple[int, int]]) -> None:
        if not ready and not self._deferred:
            return
        deferred = list(self._deferred)
        self._deferred.clear()
        # (group, own key, fd and mask | None, deferred index | -1)
        work: list[tuple[object, object, tuple[int, int] | None, int]] = [
            (self._groups.get(fd, ("fd", fd)), ("fd", fd), (fd, mask), -1) for fd, mask in ready]
        work += [(group, fn, None, i) for i, (fn, group) in enumerate(deferred)]
        # Round robin: groups least recently served first, one item of each
        # in turn; inside a group, its least recently served item first.
        queues: dict[object, deque[tuple[object, object, tuple[int, int] | None, int]]] = {}
        for item in sorted(work, key=lambda w: self._served.get(w[1], 0)):
            queues.setdefault(item[0], deque()).append(item)
        order = sorted(queues, key=lambda g: self._served.get(g, 0))
        sequence = []
        while order:
            order = [g for g in order if queues[g]]
            sequence += [queues[g].popleft() for g in order]
        self._turn += 1
        left: list[int] = []
        began = time.monotonic()
        deadline = began + self.turn_budget
        for done, (group, key, event, index) in enumerate(sequence):
            if done and time.monotonic() > deadline:
                # Left for the next turn: ready fds are reported again
                # (level-triggered), deferred calls stay queued.  Saturated:
                # rest as long as this took (priority readers still served).
                now = time.monotonic()
                self._rest_until = now + (now - began) * self.rest_share
                left = sorted(i for _, _, e, i in sequence[done:] if e is None)
                break
            tick = next(self._ticks)
            self._served[group] = self._served[key] = tick
            if event is None:
                self._guard(deferred[index][0])
            else:
                self._dispatch(*event)
        # Unserved deferred calls keep their order, ahead of any added since.
        self._deferred.extendleft(deferred[i] for i in reversed(left))
        if len(self._served) > 4096:
            self._served.clear()

    def run(self, until: Callable[[], bool]) -> None:
        self.thread = threading.current_thread()
        while not until():
            self.run_once()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.selector.close()
        with contextlib.suppress(Exception):
            self._normal.close()
        self._rsock.close()
        self._wsock.close()


# --- the service -----------------------------------------------------------------

class _BrokenResolver:
    """Stands in while the module tree cannot be read, so requests fail clearly
    instead of the daemon exiting; a reload (SIGHUP, inotify) replaces it."""

    def __init__(self, error: str) -> None:
        self.error = error

    def plan(self, request: str, *, extra_options: str = "",
             blacklist_all: bool = False) -> Plan:
        raise RuntimeError(self.error)

    def remove_command(self, module: str) -> str | None:
        return None

    def blacklisted(self, module: str) -> bool:
        return False


_DEFAULT: Any = object()
MAX_SETTLE_PER_PEER = 16


class Service:
    """The daemon object.  ``run()`` blocks until SIGTERM/SIGINT or :meth:`request_stop`.

    Every collaborator is injectable so unit tests run without netlink,
    FIFOs, inotify or systemd: ``sources`` (factories taking ``submit``),
    ``coldplug`` (``fn(submit, on_queued)``, blocking, run in a thread),
    ``watcher`` (factory taking ``on_change``).  Left at their defaults,
    the real ones from kmodd.daemon.uevents / kmodd.daemon.kernelreq / kmodd.daemon.watch are used.
    """

    def __init__(self, settings: Settings, kernel: Kernel, resolver_factory: ResolverFactory,
                 *, loader: ModuleLoader | None = None,
                 sources: Sequence[SourceFactory] | None = _DEFAULT,
                 coldplug: ColdplugFn | None = _DEFAULT,
                 watcher: WatcherFactory | None = _DEFAULT,
                 modules_load: ListedFn | None = _DEFAULT,
                 settings_source: SettingsSource | None = None,
                 notify: Callable[..., bool] = _sd_notify,
                 watchdog_interval: Callable[[], float | None] = _sd_watchdog_interval,
                 peercred: Callable[[socket.socket], Any] | None = None,
                 install_signals: bool = True) -> None:
        self.settings = settings
        self.kernel = kernel
        self.resolver_factory = resolver_factory
        self.settings_source = settings_source
        self.notify = notify
        self.watchdog_interval = watchdog_interval
        self.install_signals = install_signals
        self.loop = EventLoop()
        self.started_at = time.time()
        self.state = StateStore(Path(settings.state_file))
        self.loadlog = LoadLog()
        if loader is None:
            from kmodd.kernel.loader import Loader
            loader = Loader(kernel)
        self.loader = loader
        self.resolver: Resolver = self._make_resolver(settings)
        self.scheduler = Scheduler(
            self.resolver, self.loader, kernel, max_workers=settings.max_workers,
            queue_limit=settings.queue_limit,
            backoff=BackoffPolicy(settings.backoff_initial, settings.backoff_max),
            runaway_limit=settings.runaway_limit, runaway_window=settings.runaway_window,
            on_outcome=self._on_outcome, on_module=self._on_module,
            on_runaway=self._on_runaway, on_idle=self._on_idle, on_load=self.loadlog.add)
        self.deny = self._make_deny(settings)
        self.scheduler.set_deny(self.deny.reason)
        self.autoclean = Autoclean(kernel, self.state, self._autoclean_unload,
                                   self._autoclean_policy(settings),
                                   busy=self.scheduler.busy_modules,
                                   sys_dir=settings.root_obj.sys)
        kwargs: dict[str, Any] = {}
        if peercred is not None:
            kwargs["peercred"] = peercred
        self.control = ControlServer(settings.socket, self.loop, self._handle, **kwargs)
        self._source_factories = self._default_sources() if sources is _DEFAULT \
            else list(sources or ())
        self._coldplug_fn = self._default_coldplug() if coldplug is _DEFAULT else coldplug
        self._watcher_factory = self._default_watcher() if watcher is _DEFAULT else watcher
        self._listed_fn = self._default_modules_load() if modules_load is _DEFAULT \
            else modules_load
        self._listed_pending = 0
        self._ready_wanted = False
        self.sources: list[Source] = []
        self.watcher: Readable | None = None
        self.monitors: set[Connection] = set()
        self._settle_waiters: list[tuple[Connection, dict[str, Any], Any]] = []
        self.coldplug_state = "disabled"      # disabled | running | done
        self.coldplug_result: ColdplugReport | None = None
        self.ready = False
        self.reloads = 0
        self.last_reload_error: str | None = None
        self.last_sweep: SweepReport | None = None
        self._started = False
        self._stopping = False
        self._stopped = False
        self._handover_raised = False
        self._exit_code = 0
        self._state_dirty = False
        self._save_timer: Any = None
        self._saver: threading.Thread | None = None
        self._save_wanted = threading.Event()
        self._autoclean_timer: Any = None
        self._reload_timer: Any = None
        self._last_status = ""
        self._logged_failures: dict[str, str | None] = {}
        self._log_lock = threading.Lock()

    # --- construction helpers ---------------------------------------------------

    def _make_resolver(self, settings: Settings) -> Resolver:
        try:
            return self.resolver_factory(settings)
        except Exception as exc:
            slog(LOG, logging.ERROR, "cannot read the module tree or configuration: %s", exc)
            return _BrokenResolver(f"module tree unavailable: {exc}")

    @staticmethod
    def _make_deny(settings: Settings) -> DenyPolicy:
        policy = DenyPolicy(settings.deny, deny_file(settings.root_obj), settings.config_file)
        if policy.error is not None:
            slog(LOG, logging.ERROR, "deny list: %s; only the deny setting applies",
                 policy.error)
        return policy

    @staticmethod
    def _autoclean_policy(settings: Settings) -> AutocleanPolicy:
        return AutocleanPolicy(settings.idle_timeout, frozenset(settings.never_unload))

    def _default_sources(self) -> list[SourceFactory]:
        root = self.settings.root_obj
        fifo = self.settings.request_fifo

        def uevents(submit: Submit) -> Source:
            from kmodd.daemon.uevents import UeventSource
            return UeventSource(submit, root)

        def kernel_requests(submit: Submit) -> Source:
            from kmodd.daemon.kernelreq import KernelRequestSource
            return KernelRequestSource(submit, fifo)

        return [uevents, kernel_requests]

    def _default_coldplug(self) -> ColdplugFn | None:
        if not self.settings.coldplug:
            return None
        root = self.settings.root_obj

        def run(submit: Submit, on_queued: Callable[[int], None]) -> ColdplugReport:
            from kmodd.daemon.uevents import coldplug
            return coldplug(root, submit, on_queued=on_queued)

        return run

    def _default_modules_load(self) -> ListedFn | None:
        if not self.settings.modules_load:
            return None
        root = self.settings.root_obj

        def read() -> tuple[list[ListedModule], list[ListProblem]]:
            from kmodd.daemon.modules_load import listed_modules
            return listed_modules(root)

        return read

    def _default_watcher(self) -> WatcherFactory | None:
        root = self.settings.root_obj
        version = self.settings.version

        def make(on_change: Callable[[], None]) -> Readable:
            from kmodd.daemon.watch import PathWatcher, default_watch_paths
            from kmodd.root import running_kernel_version
            moddir = root.modules_dir(version or running_kernel_version(root))
            paths = default_watch_paths(root, moddir)
            if self.settings.modprobe_config:
                paths += [Path(p) for p in self.settings.modprobe_config]
            return PathWatcher(paths, on_change)

        return make

    # --- entry points -------------------------------------------------------------

    def submit(self, request: Request) -> Future[Outcome]:
        """The one entry point for every source (thread-safe)."""
        return self.scheduler.submit(request)

    def request_stop(self) -> None:
        """Thread- and signal-safe: begin a graceful stop."""
        self.loop.call_soon_threadsafe(self._begin_stop)

    def request_reload(self) -> None:
        self.loop.call_soon_threadsafe(self._reload_logged)

    def start(self) -> None:
        """Everything up to READY=1 (called by ``run``; separate for tests)."""
        try:
            live = list(self.kernel.modules())
        except Exception as exc:
            slog(LOG, logging.WARNING, "cannot list loaded modules: %s", exc)
            live = None
        self.state.load(live, self._instance)
        self.control.start()       # fails if another kmodd listens: touch nothing then
        self._started = True
        # The only daemon now: what a killed one left behind can go.
        self.state.remove_leftovers()
        try:
            restored = self.loadlog.restore(self.loads_file)
            if restored:
                slog(LOG, logging.INFO, "load log: %d load(s) of this boot from %s", restored,
                     self.loads_file)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            slog(LOG, logging.WARNING, "ignoring the load log %s: %s", self.loads_file, exc)
        for factory in self._source_factories:
            try:
                src = factory(self.submit)
            except Exception as exc:
                slog(LOG, logging.ERROR, "request source unavailable: %s", exc)
                continue
            self.sources.append(src)
            # The kernel waits on these: never behind control traffic.
            self.loop.add_reader(src, self._guarded_reader(src), priority=True)
        if self._watcher_factory is not None:
            try:
                self.watcher = self._watcher_factory(self._on_tree_change)
                self.loop.add_reader(self.watcher, self._guarded_reader(self.watcher),
                                     priority=True)
            except Exception as exc:
                slog(LOG, logging.WARNING, "not watching module indexes/modprobe.d: %s", exc)
        if self.settings.autoclean_interval > 0:
            self._autoclean_timer = self.loop.call_every(self.settings.autoclean_interval,
                                                         self._sweep_logged)
        wd = self.watchdog_interval()
        if wd:
            # Ping from the loop itself: a wedged loop stops the pings.
            self.loop.call_every(max(0.05, wd / 2), self._ping_watchdog)
        self.loop.call_every(2.0, self._send_status)
        self._start_modules_load()
        if self._coldplug_fn is not None:
            self.coldplug_state = "running"
            self.loadlog.mark("coldplug-start")
            threading.Thread(target=self._coldplug_thread, name="kmodd-coldplug",
                             daemon=True).start()
        else:
            self.coldplug_state = "disabled"
            self._set_ready()

    def _takes_over_from_udev(self) -> bool:
        # Only a daemon that hears uevents itself may tell udev to stand back.
        return any(src.udev_handover for src in self.sources)

    def _raise_handover_flag(self) -> None:
        if not self._takes_over_from_udev():
            return
        flag = self.settings.root_obj.udev_handover
        try:
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.touch()
            self._handover_raised = True
        except OSError as exc:
            slog(LOG, logging.WARNING, "cannot create %s (udev keeps loading drivers): %s",
                 flag, exc.strerror or exc)

    def _drop_handover_flag(self) -> None:
        # First thing on the way out: udev loads drivers again before kmodd
        # stops listening, an overlap rather than a gap.
        if not self._handover_raised:
            return
        self._handover_raised = False
        try:
            self.settings.root_obj.udev_handover.unlink(missing_ok=True)
        except OSError as exc:
            slog(LOG, logging.WARNING, "cannot remove %s: %s",
                 self.settings.root_obj.udev_handover, exc.strerror or exc)

    def _start_modules_load(self) -> None:
        """Submit what modules-load.d, /etc/modules and the kernel command line
        list, all at once: the pool loads dependencies first and independent
        modules in parallel, where systemd-modules-load goes one by one."""
        if self._listed_fn is None:
            return
        try:
            listed, problems = self._listed_fn()
        except Exception as exc:
            # No marker: systemd-modules-load.service (kmodd-takeover's
            # drop-in) then loads the lists itself.
            slog(LOG, logging.ERROR, "cannot read modules-load.d: %s; leaving the lists "
                 "to systemd-modules-load", exc)
            return
        self._mark_modules_load_served(True)
        for problem in problems:
            slog(LOG, logging.WARNING, "modules-load.d: %s: %s", problem.source,
                 problem.message)
        if not listed:
            return
        slog(LOG, logging.INFO, "loading %d module(s) listed for boot: %s", len(listed),
             " ".join(m.name for m in listed))
        self.loadlog.mark("modules-load-start")
        self._listed_pending = len(listed)
        self.loop.call_later(MODULES_LOAD_READY_WAIT, self._listed_waited_enough)
        for m in listed:
            future = self.submit(Request(RequestKind.MODULES_LOAD, m.name, None, m.where,
                                         m.options))
            future.add_done_callback(
                lambda f: self.loop.call_soon_threadsafe(self._listed_done))

    @property
    def loads_file(self) -> Path:
        """The load log, saved at exit for the next daemon of this boot."""
        return Path(self.settings.state_file).parent / "loads.json"

    def _save_loads(self) -> None:
        try:
            self.loadlog.save(self.loads_file)
        except OSError as exc:
            slog(LOG, logging.WARNING, "cannot save the load log to %s: %s", self.loads_file,
                 exc)

    @property
    def modules_load_marker(self) -> Path:
        """Present while this daemon serves modules-load.d: the drop-in for
        systemd-modules-load.service makes it do nothing then."""
        return Path(self.settings.state_file).parent / MODULES_LOAD_MARKER

    def _mark_modules_load_served(self, on: bool) -> None:
        try:
            if on:
                self.modules_load_marker.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self.modules_load_marker.write_text(f"{os.getpid()}\n")
            else:
                self.modules_load_marker.unlink(missing_ok=True)
        except OSError as exc:
            slog(LOG, logging.WARNING, "cannot %s %s: %s", "create" if on else "remove",
                 self.modules_load_marker, exc)

    def _listed_done(self) -> None:
        if self._listed_pending <= 0:
            return
        self._listed_pending -= 1
        if self._listed_pending == 0:
            self.loadlog.mark("modules-load-end")
            if self._ready_wanted:
                self._set_ready()

    def _listed_waited_enough(self) -> None:
        if self._listed_pending > 0:
            slog(LOG, logging.WARNING, "modules listed for boot still loading after %gs; "
                 "ready anyway", MODULES_LOAD_READY_WAIT)
            self._listed_pending = 0
            if self._ready_wanted:
                self._set_ready()

    def _ping_watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def _set_ready(self) -> None:
        # READY=1 once coldplug's first walk is queued: later units may rely on
        # the daemon taking requests; `kmodctl settle` tells when loads are done.
        if self.ready:
            return
        if self._listed_pending > 0:
            self._ready_wanted = True       # once the listed modules are in
            return
        self.ready = True
        # Uevents are heard and coldplug is queued: udev may stand back.
        self._raise_handover_flag()
        self.notify(READY=1, STATUS=self._status_line(), MAINPID=os.getpid())
        slog(LOG, logging.INFO, "kmodd ready: %d workers, socket %s",
             self.scheduler.max_workers, self.settings.socket)

    def run(self) -> int:
        """Start, serve until told to stop, stop gracefully; the exit status."""
        old: dict[signal.Signals, Any] = {}
        in_main = threading.current_thread() is threading.main_thread()
        if self.install_signals and in_main:
            for sig, handler in ((signal.SIGTERM, lambda *_: self.request_stop()),
                                 (signal.SIGINT, lambda *_: self.request_stop()),
                                 (signal.SIGHUP, lambda *_: self.request_reload())):
                old[sig] = signal.signal(sig, handler)
        try:
            self.start()
            self.loop.run(until=lambda: self._stopped)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._cleanup()
        return self._exit_code

    # --- stopping ------------------------------------------------------------------

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._drop_handover_flag()
        self.control.stop_accepting()
        # Sources first: pending kernel requests are answered "retry" and
        # the helper loads for itself, so nothing the kernel waits on is lost.
        for src in self.sources:
            self.loop.remove(src)
            with contextlib.suppress(Exception):
                src.close()
        self.sources = []
        if self.watcher is not None:
            self.loop.remove(self.watcher)
            with contextlib.suppress(Exception):
                self.watcher.close()
            self.watcher = None
        # Then refuse everything new (a control peer already connected, the
        # coldplug thread) and drop what has not started.
        self.scheduler.begin_shutdown()
        slog(LOG, logging.INFO, "stopping: finishing loads in flight")
        self.notify(STOPPING=1, STATUS="stopping: finishing loads in flight")

        def drain() -> None:
            try:
                if not self.scheduler.shutdown(timeout=120.0):
                    slog(LOG, logging.WARNING, "some loads were still running at exit")
            finally:
                self.loop.call_soon_threadsafe(self._finish_stop)

        threading.Thread(target=drain, name="kmodd-drain", daemon=True).start()

    def _finish_stop(self) -> None:
        self._save_state()
        self._save_loads()
        for conn, msg, timer in self._settle_waiters:
            timer.cancel()
            conn.reply(msg, {"ok": True, "settled": False, "reason": "kmodd is stopping"})
        self._settle_waiters = []
        self._stopped = True

    def _cleanup(self) -> None:
        self._drop_handover_flag()
        if self._listed_fn is not None and self._started:
            self._mark_modules_load_served(False)
        if not self._stopped:          # start() failed or the loop crashed
            with contextlib.suppress(Exception):
                self.scheduler.shutdown(timeout=30.0)
            if self._started:
                with contextlib.suppress(Exception):
                    self._save_state()
                with contextlib.suppress(Exception):
                    self._save_loads()
            for src in self.sources:
                with contextlib.suppress(Exception):
                    src.close()
        with contextlib.suppress(Exception):
            self.control.close()
        self.loop.close()

    # --- sources, reload ---------------------------------------------------------------

    def _guarded_reader(self, src: Readable) -> Callable[[], None]:
        def read() -> None:
            try:
                src.on_readable()
            except Exception:
                LOG.exception("request source %s failed", type(src).__name__)
        return read

    def _coldplug_thread(self) -> None:
        assert self._coldplug_fn is not None
        result: ColdplugReport | None = None
        try:
            result = self._coldplug_fn(
                self.submit, lambda n: self.loop.call_soon_threadsafe(self._set_ready))
        except Exception as exc:
            slog(LOG, logging.ERROR, "coldplug failed: %s", exc)
        self.loop.call_soon_threadsafe(self._coldplug_finished, result)

    def _coldplug_finished(self, result: ColdplugReport | None) -> None:
        self.coldplug_state = "done"
        self.loadlog.mark("coldplug-end")
        self._set_ready()
        self.coldplug_result = result
        loaded = result.loaded if result is not None else None
        slog(LOG, logging.INFO, "coldplug done%s",
             f": loaded {' '.join(loaded)}" if loaded else "")
        self._check_settle()

    def _on_tree_change(self) -> None:
        # depmod renames a dozen files: reload once the burst is over.
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        self._reload_timer = self.loop.call_later(0.2, self._reload_logged)

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except Exception as exc:
            slog(LOG, logging.ERROR, "reload failed, keeping the previous configuration: %s",
                 exc)

    def reload(self) -> dict[str, Any]:
        """Re-read kmodd.conf (flags still win) and the module indexes/modprobe.d."""
        self._reload_timer = None
        settings = self.settings
        if self.settings_source is not None:
            try:
                settings = self.settings_source.load()
            except SettingsError as exc:
                self.last_reload_error = str(exc)
                raise
        try:
            resolver = self.resolver_factory(settings)
        except Exception as exc:
            self.last_reload_error = str(exc)
            raise
        self.settings = settings
        self.resolver = resolver
        self.scheduler.set_resolver(resolver)
        self.deny = self._make_deny(settings)
        self.scheduler.set_deny(self.deny.reason)
        self.scheduler.reconfigure(
            backoff=BackoffPolicy(settings.backoff_initial, settings.backoff_max),
            runaway_limit=settings.runaway_limit, runaway_window=settings.runaway_window,
            queue_limit=settings.queue_limit)
        if settings.max_workers != self.scheduler.max_workers:
            slog(LOG, logging.INFO, "max_workers changes take effect at the next start")
        self.autoclean.policy = self._autoclean_policy(settings)
        if self._autoclean_timer is not None:
            self._autoclean_timer.cancel()
            self._autoclean_timer = None
        if settings.autoclean_interval > 0:
            self._autoclean_timer = self.loop.call_every(settings.autoclean_interval,
                                                         self._sweep_logged)
        self.reloads += 1
        self.last_reload_error = None
        slog(LOG, logging.INFO, "configuration and module indexes reloaded")
        return {"reloads": self.reloads}

    # --- scheduler callbacks (worker threads) ---------------------------------------------

    def _on_module(self, step: ModuleStep, request: Request, targets: tuple[str, ...],
                   result: StepResult) -> None:
        # One line per module, under its own MODULE=: journalctl MODULE=snd_pcm
        # finds the dependency too, and each module of a request that names
        # several (a CPU modalias) gets its own verdict.
        fields: dict[str, Any] = {
            "module": step.name, "devpath": request.devpath,
            "requested_by": request.requested_by or request.kind,
            "modalias": request.key if request.kind.is_device else None}
        seconds = result.seconds
        usec = None if seconds is None else int(seconds * 1e6)
        fields["duration_usec"] = usec
        if result.status.is_failure:    # skipped: a dependency failed
            self._log_module_failure(step.name, request, result.error or result.status,
                                     result.errno, fields)
            return
        if result.status is not StepStatus.LOADED:
            return
        with self._log_lock:
            self._logged_failures.pop(step.name, None)
        slog(LOG, logging.INFO, "loaded %s for %s%s", step.name, request.key,
             f" in {usec / 1000:.0f} ms" if usec is not None else "", **fields)
        self.state.record(ModuleRecord(
            name=step.name, loaded_at=time.time(), kind=request.kind, key=request.key,
            devpath=request.devpath, requested_by=request.requested_by,
            role=str(step.role), via=targets,
            instance=self._instance(step.name)))
        self.loop.call_soon_threadsafe(self._mark_dirty)

    def _instance(self, name: str) -> str | None:
        try:
            return self.kernel.instance(name)
        except Exception:
            return None

    def _on_outcome(self, outcome: Outcome) -> None:
        self._log_outcome(outcome)
        self.loop.call_soon_threadsafe(self._broadcast, outcome)

    def _on_runaway(self, key: str, request: Request) -> None:
        slog(LOG, logging.WARNING,
             "runaway: requests for %s keep arriving; refusing them until they calm down",
             key, module=key, requested_by=request.requested_by, devpath=request.devpath)

    def _on_idle(self) -> None:
        self.loop.call_soon_threadsafe(self._check_settle)

    def _log_module_failure(self, what: str, req: Request, error: str, errno_: int | None,
                            fields: dict[str, Any]) -> None:
        # Each failure once: the same error again (backoff expired, a second
        # device) goes to debug.
        with self._log_lock:
            repeat = self._logged_failures.get(what, "") == error
            self._logged_failures[what] = error
            if len(self._logged_failures) > 4096:
                self._logged_failures.pop(next(iter(self._logged_failures)))
        # A driver probed for a device it does not drive answers ENODEV:
        # routine for hotplug and coldplug (udev logs it at debug too).
        routine = errno_ in (errno.ENODEV, errno.ENXIO) and req.kind.is_device
        level = logging.DEBUG if repeat else logging.INFO if routine else logging.WARNING
        slog(LOG, level, "cannot load %s: %s", what, error, **{**fields, "errno": errno_})

    def _log_outcome(self, outcome: Outcome) -> None:
        req = outcome.request
        fields: dict[str, Any] = {
            "module": " ".join(outcome.modules) or None, "devpath": req.devpath,
            "errno": outcome.errno, "requested_by": req.requested_by or req.kind}
        if req.kind.is_device:
            fields["modalias"] = req.key
        status = outcome.status
        if status is OutcomeStatus.LOADED:
            # Each module was logged as it went in (_on_module).
            slog(LOG, logging.DEBUG, "%s: loaded %s", req.key, " ".join(outcome.modules),
                 **fields)
        elif status == "failed" and (outcome.error or "").startswith("refused: "):
            self._log_module_failure(" ".join(outcome.failed) or req.key, req,
                                     outcome.error or "refused", outcome.errno, fields)
        elif status == "failed" and outcome.failed:
            # Each failing module was logged as it failed (_on_module).
            slog(LOG, logging.DEBUG, "%s: failed (%s)", req.key, outcome.error, **fields)
        elif status == "failed":
            self._log_module_failure(" ".join(outcome.modules) or req.key, req,
                                     outcome.error or "failed", outcome.errno, fields)
        elif status == "runaway":
            slog(LOG, logging.DEBUG, "runaway request %s refused", req.key, **fields)
        elif req.kind is RequestKind.MODULES_LOAD and status in ("unresolved", "blacklisted"):
            # systemd-modules-load: "Failed to find module" is an error; a
            # blacklisted one is only noted ("is deny-listed (by kmod)").
            what = "not found" if status == "unresolved" else "blacklisted, not loaded"
            slog(LOG, logging.ERROR if status == "unresolved" else logging.INFO,
                 "module %s listed in %s: %s", req.key, req.requested_by, what, **fields)
        else:
            slog(LOG, logging.DEBUG, "%s: %s%s", req.key, status,
                 f" ({outcome.error})" if outcome.error else "", **fields)

    # --- loop-thread handlers --------------------------------------------------------------

    def _mark_dirty(self) -> None:
        self._state_dirty = True
        if self._save_timer is None:
            # Coalesce the writes of a coldplug burst into one.
            self._save_timer = self.loop.call_later(0.5, self._save_in_background)

    def _save_in_background(self) -> None:
        # fsync must not hold up uevent intake: a writer thread does it.
        self._save_timer = None
        self._state_dirty = False
        if self._saver is None:
            self._saver = threading.Thread(target=self._saver_thread, name="kmodd-state",
                                           daemon=True)
            self._saver.start()
        self._save_wanted.set()

    def _saver_thread(self) -> None:
        while True:
            self._save_wanted.wait()
            self._save_wanted.clear()
            try:
                self.state.save()
            except OSError as exc:
                slog(LOG, logging.ERROR, "cannot save state to %s: %s", self.state.path, exc)

    def _save_state(self) -> None:
        if self._save_timer is not None:
            self._save_timer.cancel()
        self._save_timer = None
        self._state_dirty = False
        try:
            self.state.save()
        except OSError as exc:
            slog(LOG, logging.ERROR, "cannot save state to %s: %s", self.state.path, exc)

    def _broadcast(self, outcome: Outcome) -> None:
        if self.monitors:
            event = {"event": "outcome", "time": time.time(), **outcome.to_dict()}
            public: dict[str, Any] | None = None
            for conn in list(self.monitors):
                if conn.cred.is_root:
                    conn.send(event)
                else:
                    if public is None:
                        public = redact_outcome(event)
                    conn.send(public)
        self._check_settle()

    def settled(self) -> bool:
        return self.coldplug_state != "running" and self.scheduler.idle()

    def _check_settle(self) -> None:
        if not self._settle_waiters or not self.settled():
            return
        waiters, self._settle_waiters = self._settle_waiters, []
        for conn, msg, timer in waiters:
            if timer is not None:
                timer.cancel()
            conn.reply(msg, {"ok": True, "settled": True})

    def _sweep_logged(self) -> None:
        try:
            self.sweep()
        except Exception:
            LOG.exception("autoclean sweep failed")

    def sweep(self) -> SweepReport:
        report = self.autoclean.sweep()
        self.last_sweep = report
        for name in report.unloaded:
            slog(LOG, logging.INFO, "autoclean: unloaded %s (unused)", name, module=name)
        for name, why in report.failed.items():
            slog(LOG, logging.INFO, "autoclean: could not unload %s: %s", name, why,
                 module=name)
        if report.unloaded or report.forgotten:
            self._save_state()
        elif report.kept:
            self._mark_dirty()       # idle times survive a restart too
        return report

    def _autoclean_unload(self, name: str) -> StepResult:
        if self.resolver.remove_command(name) is not None:
            # An administrator's remove command may take its time and do
            # anything; autoclean runs on the event loop and stays out of it.
            return StepResult(name, StepStatus.FAILED,
                              "has a modprobe.d remove command; left alone")
        return self.loader_unload(name)

    def loader_unload(self, name: str, *, force: bool = False) -> StepResult:
        return self.loader.unload(name, remove_command=self.resolver.remove_command(name),
                                  force=force)

    def _send_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notify(STATUS=line)

    def _status_line(self) -> str:
        snap = self.scheduler.snapshot()
        counts = snap["outcomes"]
        parts = [f"{len(self.state)} loaded by kmodd",
                 f"{snap['loading']} loading", f"{snap['pending']} pending",
                 f"{counts.get('failed', 0)} failed"]
        if self.coldplug_state == "running":
            parts.append("coldplug running")
        if self._stopping:
            parts.insert(0, "stopping")
        return ", ".join(parts)

    # --- control requests ------------------------------------------------------------------

    def _handle(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        op = msg["op"]
        if op == "ping":
            return {"ok": True}
        if op == "status":
            return self.status()
        if op == "list":
            return {"ok": True, "modules": self.list_modules(private=conn.cred.is_root)}
        if op == "why":
            return self.why(_name_arg(msg, "module"), private=conn.cred.is_root)
        if op == "loads":
            return {"ok": True, **self.loadlog.to_dict()}
        if op == "monitor":
            if not conn.monitoring:
                self.monitors.add(conn)
                conn.monitoring = True
                conn.on_close.append(self.monitors.discard)
            return {"ok": True, "monitoring": True}
        if op == "settle":
            return self._settle(conn, msg)
        if op == "load":
            return self._control_load(conn, msg)
        if op == "unload":
            return self._control_unload(conn, msg)
        if op in ("deny", "allow"):
            return self.set_denied(_name_arg(msg, "module"), op == "deny")
        if op == "reload":
            try:
                return {"ok": True, **self.reload()}
            except Exception as exc:
                return error_reply(f"reload failed, previous configuration kept: {exc}",
                                   "EIO")
        return error_reply(f"unknown op {op!r}", "ENOSYS")

    def status(self) -> dict[str, Any]:
        snap = self.scheduler.snapshot()
        from kmodd import __version__ as kmodd_version
        return {
            "ok": True, "pid": os.getpid(), "version": kmodd_version,
            "uptime": round(time.time() - self.started_at, 3),
            "ready": self.ready, "stopping": self._stopping,
            "coldplug": self.coldplug_state, "settled": self.settled(),
            "kernel_version": self._kernel_version(),
            "workers": snap["max_workers"], "loading": snap["loading"],
            "pending": snap["pending"], "queued_loads": snap["queued_loads"],
            "waiting_loads": snap["waiting_loads"], "submitted": snap["submitted"],
            "outcomes": snap["outcomes"], "backoff": snap["backoff"],
            "runaway": snap["runaway"], "loaded_by_kmodd": len(self.state),
            "deny": self.deny.denied(),
            "autoclean": {"interval": self.settings.autoclean_interval,
                          "idle_timeout": self.settings.idle_timeout,
                          "never_unload": list(self.settings.never_unload),
                          "sweeps": self.autoclean.sweeps,
                          "unloaded": self.autoclean.unloaded_total},
            "reloads": self.reloads, "last_reload_error": self.last_reload_error,
            "sources": [type(s).__name__ for s in self.sources],
            "monitors": len(self.monitors), "socket": self.settings.socket,
        }

    def _kernel_version(self) -> str | None:
        if self.settings.version:
            return self.settings.version
        try:
            from kmodd.root import running_kernel_version
            return running_kernel_version(self.settings.root_obj)
        except Exception:
            return None

    def list_modules(self, *, private: bool = True) -> list[dict[str, Any]]:
        """Every loaded module; ``private=False`` (non-root peers) hides who asked."""
        records = self.state.records()
        try:
            table = self.kernel.modules()
        except Exception as exc:
            raise RuntimeError(f"cannot read the module list: {exc}") from None
        out = []
        for name in sorted(table):
            mod = table[name]
            rec = records.get(name)
            out.append({
                "name": name, "state": mod.state.lower(), "refcount": mod.refcount,
                "holders": list(mod.holders), "size": mod.size, "permanent": mod.permanent,
                "loaded_by_kmodd": rec is not None,
                "why": _why_dict(rec, private) if rec else None,
                "loaded_at": rec.loaded_at if rec else None,
                "idle_since": rec.idle_since if rec else None})
        return out

    def why(self, module: str, *, private: bool = True) -> dict[str, Any]:
        name = modname_normalize(module)
        rec = self.state.get(name)
        try:
            state = self.kernel.initstate(name)
        except Exception:
            state = InitState.ABSENT
        out: dict[str, Any] = {"ok": True, "module": name, "state": state.value,
                               "loaded_by_kmodd": rec is not None}
        if rec is not None:
            out.update(_why_dict(rec, private))
            out["loaded_at"] = rec.loaded_at
            out["idle_since"] = rec.idle_since
        if self.last_sweep is not None and name in self.last_sweep.kept:
            out["autoclean"] = self.last_sweep.kept[name]     # why it is still loaded
        present = state in (InitState.LIVE, InitState.COMING)
        denied = self.deny.reason(name)
        if denied is not None:
            out["denied"] = denied
        if self.resolver.blacklisted(name):
            out["blacklisted"] = True
        if present and (denied is not None or out.get("blacklisted")):
            what = "denied" if denied is not None else "blacklisted in modprobe.d"
            out["warning"] = f"{name} is {what}, yet loaded"
            out["how"] = self._how_it_got_in(name, rec)
        failure = self.scheduler.failures().get(name)
        if failure is not None:
            out["last_failure"] = {"failures": failure.failures,
                                   "error": failure.error if private
                                   else redact_error(failure.error),
                                   "errno": failure.errno}
        return out

    def set_denied(self, module: str, deny: bool) -> dict[str, Any]:
        """``kmodctl deny/allow``: edit the persistent list (the setting stays as written)."""
        name = modname_normalize(module)
        try:
            changed = self.deny.set(name, deny)
        except OSError as exc:
            return error_reply(f"cannot write {self.deny.path}: {exc.strerror or exc}", "EIO")
        if changed:
            slog(LOG, logging.INFO, "%s %s (%s)", "denied" if deny else "allowed again", name,
                 self.deny.path, module=name)
        out: dict[str, Any] = {"ok": True, "module": name, "changed": changed,
                               "denied": self.deny.reason(name) is not None,
                               "deny": self.deny.denied()}
        if not deny and name in self.deny.setting:
            out["note"] = f"still denied by the 'deny' setting in {self.deny.config_file}"
        return out

    def _how_it_got_in(self, name: str, rec: ModuleRecord | None) -> str:
        if rec is not None:
            how = f"kmodd loaded it for {rec.kind} {rec.key}"
            if rec.role != "target" and rec.via:
                how += f", as {rec.role} of {' '.join(rec.via)}"
            elif rec.kind in ("admin", "kernel"):
                how += " (by name: the blacklist only applies to aliases)"
            return how
        holders: tuple[str, ...] = ()
        with contextlib.suppress(Exception):
            holders = tuple(self.kernel.holders(name))
        if holders:
            return (f"not loaded by kmodd; used by {' '.join(holders)}: most likely "
                    "loaded as their dependency (the blacklist does not apply to those)")
        return ("not loaded by kmodd: by name (modprobe NAME ignores the blacklist), "
                "before kmodd started, or from the initramfs")

    def _settle(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        timeout = msg.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float) or timeout < 0):
            return error_reply("timeout must be a non-negative number of seconds")
        if self.settled():
            return {"ok": True, "settled": True}
        if timeout == 0:
            return {"ok": True, "settled": False}
        if sum(1 for w in self._settle_waiters if w[0] is conn) >= MAX_SETTLE_PER_PEER:
            return error_reply("too many settle requests waiting on this connection",
                               "EAGAIN")
        timer = None
        entry: list[Any] = []

        def expire() -> None:
            if entry and entry[0] in self._settle_waiters:
                self._settle_waiters.remove(entry[0])
                conn.reply(msg, {"ok": True, "settled": False,
                                 "pending": self.scheduler.pending(),
                                 "coldplug": self.coldplug_state})

        if timeout is not None:
            timer = self.loop.call_later(float(timeout), expire)
        waiter = (conn, msg, timer)
        entry.append(waiter)
        self._settle_waiters.append(waiter)

        def drop(c: Connection) -> None:
            if waiter in self._settle_waiters:
                self._settle_waiters.remove(waiter)
                if timer is not None:
                    timer.cancel()

        conn.on_close.append(drop)
        return None

    def _control_load(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        name = _name_arg(msg, "name")
        options = msg.get("options") or ""
        if not isinstance(options, str) or len(options) > 4096:
            return error_reply("options must be a string")
        kind = msg.get("kind") or "admin"
        if kind not in ("admin", "kernel"):
            return error_reply("kind must be 'admin' or 'kernel'")
        if kind == "kernel":
            from kmodd.daemon.kernelreq import check_name

            problem = check_name(name)
            if problem is not None:
                # What the request FIFO answers too: refused, under kind kernel.
                slog(LOG, logging.WARNING, "kernel request refused: %s", problem,
                     request=name[:80], requested_by="kernel")
                return error_reply(f"kernel request refused: {problem}", "EINVAL")
        if kind == "admin" and options:
            refusal = self._refuse_params(name, options)
            if refusal is not None:
                return error_reply(refusal, "EINVAL")
        by = msg.get("requested_by")
        requested_by = by if isinstance(by, str) and by and len(by) < 256 else \
            f"kmodctl uid={conn.uid} pid={conn.cred.pid}"
        future = self.submit(Request(RequestKind(kind), name, None, requested_by, options))

        def done(f: Future[Outcome]) -> None:
            outcome = f.result()
            self.loop.call_soon_threadsafe(
                conn.reply, msg, {"ok": True, "status": outcome.status,
                                  "outcome": outcome.to_dict()})

        future.add_done_callback(done)
        return None

    def _refuse_params(self, name: str, options: str) -> str | None:
        """An admin's parameters unknown to the module are refused, as a direct load does."""
        from kmodd.modfile.params import check_params, split_params
        try:
            plan = self.resolver.plan(name, extra_options=options)
        except Exception:
            return None          # the load itself will report why it cannot resolve
        return check_params(plan, split_params(options))

    def _control_unload(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        name = modname_normalize(_name_arg(msg, "name"))
        force = bool(msg.get("force", False))

        def work() -> None:
            try:
                result = self.loader_unload(name, force=force)
                status = result.status
                reply = {"ok": True, "module": name, "status": status,
                         "error": result.error, "errno": result.errno}
                if status in ("unloaded", "remove-command", "absent"):
                    self.state.forget(name)
                    self.loop.call_soon_threadsafe(self._mark_dirty)
            except Exception as exc:
                reply = {"ok": True, "module": name, "status": "failed", "error": str(exc),
                         "errno": getattr(exc, "errno", None)}
            self.loop.call_soon_threadsafe(conn.reply, msg, reply)

        # delete_module is quick, a remove command may not be: off the loop.
        threading.Thread(target=work, name=f"kmodd-unload-{name}", daemon=True).start()
        return None


def _name_arg(msg: dict[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024 or "\0" in value \
            or value.startswith("-"):
        raise ValueError(f"{key!r} must be a module name or alias")
    return value


def _why_dict(rec: ModuleRecord, private: bool = True) -> dict[str, Any]:
    return {"kind": rec.kind, "key": rec.key, "devpath": rec.devpath,
            "requested_by": rec.requested_by if private else redact_requester(rec.requested_by),
            "role": rec.role, "via": list(rec.via)}


# --- what non-root readers see ------------------------------------------------------------
# Anyone may connect to the control socket; module options are the
# administrator's (they may hold keys and passwords: modprobe.d files are
# root's to read) and a requester's pid/uid is another user's business.

_CREDENTIAL = re.compile(r"\s*\b(?:uid|gid|pid)=\S*")
# kmodd.kernel.errors.load_message quotes the parameters: "... value in '...' (see dmesg)"
_QUOTED_PARAMS = re.compile(r" in '.*'(?= \(see dmesg\))", re.DOTALL)


def redact_requester(requested_by: str | None) -> str | None:
    """``kmodctl uid=0 pid=42`` -> ``kmodctl``: who asked, as a kind, not a process."""
    if not requested_by:
        return requested_by
    return _CREDENTIAL.sub("", requested_by).strip() or "hidden"


def redact_error(error: str | None) -> str | None:
    return _QUOTED_PARAMS.sub("", error) if error else error


def redact_outcome(event: dict[str, Any]) -> dict[str, Any]:
    """An outcome (``Outcome.to_dict()``, monitor event) as a non-root peer may see it."""
    out = dict(event)
    request = dict(out.get("request") or {})
    if "options" in request:
        request["options"] = None
    if "requested_by" in request:
        request["requested_by"] = redact_requester(request["requested_by"])
    out["request"] = request
    out["error"] = redact_error(out.get("error"))
    return out

