"""The daemon: wires request sources -> scheduler -> loader, on one event loop.

:class:`Service` starts, stops and wires; the pieces live beside it: the
loop (kmodd.daemon.loop), the control operations (kmodd.daemon.operations),
journal and monitor reporting (kmodd.daemon.report), batched state saves
(kmodd.daemon.state.StateSaver).  The loader runs on the scheduler's
workers; coldplug waits on futures in a thread of its own.  Every handler
catches and logs: bad input never takes the daemon down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kmodd.daemon.autoclean import Autoclean, AutocleanPolicy, SweepReport
from kmodd.daemon.boot_lists import ListedModule, ListProblem
from kmodd.daemon.control import ControlServer
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
from kmodd.daemon.learned import LearnedOrder, learned_order
from kmodd.daemon.loadlog import LoadLog
from kmodd.daemon.loop import EventLoop
from kmodd.daemon.memory import release_memory
from kmodd.daemon.modules_load import MODULES_LOAD_MARKER, BootLoads, ListedFn
from kmodd.daemon.operations import ControlOps
from kmodd.daemon.report import OutcomeReporter
from kmodd.daemon.requests import Outcome, Request, Submit
from kmodd.daemon.scheduler import BackoffPolicy, Scheduler
from kmodd.daemon.settings import Settings, SettingsError, SettingsSource
from kmodd.daemon.state import ModuleRecord, StateSaver, StateStore
from kmodd.journal import log
from kmodd.kernel.early import EarlyLoads
from kmodd.kernel.loader import StepResult, StepStatus
from kmodd.kernel.protocol import Kernel
from kmodd.resolution.plan import ModuleStep, Plan

LOG = logging.getLogger(__name__)


ResolverFactory = Callable[[Settings], Resolver]



def _sd_notify(**fields: object) -> bool:
    try:
        from kmodd.daemon.systemd import notify
    except ImportError:
        return False
    try:
        return bool(notify(**fields))
    except Exception:       # sd_notify is best effort (sd_notify(3) ignores errors too)
        return False


def _sd_watchdog_interval() -> float | None:
    try:
        from kmodd.daemon.systemd import watchdog_interval
    except ImportError:
        return None
    try:
        return watchdog_interval()
    except Exception:       # a bad WATCHDOG_USEC=: no watchdog, as sd_watchdog_enabled
        return None


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


class Service:
    """The daemon object.  ``run()`` blocks until SIGTERM/SIGINT or :meth:`request_stop`.

    Every collaborator is injectable so unit tests run without netlink,
    FIFOs, inotify or systemd: ``sources`` (factories taking ``submit``),
    ``coldplug`` (``fn(submit, on_queued)``, blocking, run in a thread),
    ``watcher`` (factory taking ``on_change``).  Left at their defaults,
    the real ones from kmodd.daemon.uevents / kmodd.daemon.kernelreq / kmodd.daemon.watch are used.
    """

    # How often the request FIFO is checked (Service._check_sources).
    SOURCE_CHECK_INTERVAL = 1.0

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
                 install_signals: bool = True,
                 early: EarlyLoads | None = None, no_head_start: str = "",
                 learned: LearnedOrder | None = None) -> None:
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
        self.saver = StateSaver(self.state, self.loop, logger=LOG)
        self.reporter = OutcomeReporter()
        self.ops = ControlOps(self)
        self.loadlog = LoadLog()
        self.learned = learned if learned is not None else learned_order(settings)
        self.early = early
        self._no_head_start = no_head_start       # why there is none, for the journal
        if loader is None:
            from kmodd.kernel.loader import Loader
            loader = Loader(kernel, early=early)
        self.loader = loader
        self.resolver: Resolver = self._make_resolver(settings)
        self.scheduler = Scheduler(
            self.resolver, self.loader, kernel, max_workers=settings.max_workers,
            queue_limit=settings.queue_limit,
            backoff=BackoffPolicy(settings.backoff_initial, settings.backoff_max),
            runaway_limit=settings.runaway_limit, runaway_window=settings.runaway_window,
            on_outcome=self._on_outcome, on_module=self._on_module, on_plan=self._on_plan,
            on_runaway=self.reporter.runaway, on_idle=self._on_idle, on_load=self.loadlog.add,
            early=early)
        self.deny = self._make_deny(settings)
        self.scheduler.set_deny(self.deny.reason)
        self.autoclean = Autoclean(kernel, self.state, self._autoclean_unload,
                                   self._autoclean_policy(settings),
                                   busy=self.scheduler.busy_modules,
                                   sys_dir=settings.root_obj.sys)
        kwargs: dict[str, Any] = {}
        if peercred is not None:
            kwargs["peercred"] = peercred
        self.control = ControlServer(settings.socket, self.loop, self.ops.table(), **kwargs)
        self._source_factories = self._default_sources() if sources is _DEFAULT \
            else list(sources or ())
        self._coldplug_fn = self._default_coldplug() if coldplug is _DEFAULT else coldplug
        self._watcher_factory = self._default_watcher() if watcher is _DEFAULT else watcher
        listed_fn = self._default_modules_load() if modules_load is _DEFAULT \
            else modules_load
        self.boot_loads = None if listed_fn is None else BootLoads(
            listed_fn, self.modules_load_marker, self.submit, self.loop,
            mark=self.loadlog.mark, on_done=self._boot_loads_done)
        self._ready_wanted = False
        self.sources: list[Source] = []
        self._watched: dict[int, int] = {}       # id(source) -> the fd the loop watches
        self.watcher: Readable | None = None
        self.coldplug_state = "disabled"      # disabled | running | done
        self.ready = False
        self.reloads = 0
        self.last_reload_error: str | None = None
        self.last_sweep: SweepReport | None = None
        self._started = False
        self._stopping = False
        self._stopped = False
        self._handover_raised = False
        self._autoclean_timer: Any = None
        self._reload_timer: Any = None
        self._last_status = ""
        self._ready_unsent = False

    # --- construction helpers ---------------------------------------------------

    def _make_resolver(self, settings: Settings) -> Resolver:
        try:
            return self.resolver_factory(settings)
        except Exception as exc:    # any bad index or config: serve errors, wait for a reload
            log(LOG, logging.ERROR, "cannot read the module tree or configuration: %s", exc)
            return _BrokenResolver(f"module tree unavailable: {exc}")

    @staticmethod
    def _make_deny(settings: Settings) -> DenyPolicy:
        policy = DenyPolicy(settings.deny, deny_file(settings.root_obj), settings.config_file)
        if policy.error is not None:
            log(LOG, logging.ERROR, "deny list: %s; only the deny setting applies",
                 policy.error)
        return policy

    @staticmethod
    def _autoclean_policy(settings: Settings) -> AutocleanPolicy:
        return AutocleanPolicy(settings.idle_timeout, frozenset(settings.never_unload))

    def _default_sources(self) -> list[SourceFactory]:
        root = self.settings.root_obj
        fifo = self.settings.request_fifo
        # kmodd's own netlink reader by default: pyudev's imports were 0.8 s
        # of the start before coldplug in the VM (docs/performance.md).
        reader = self.settings.uevent_reader

        def uevents(submit: Submit) -> Source:
            from kmodd.daemon.uevents import UeventSource
            return UeventSource(submit, root, backend=reader)

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
            # Last boot's longest chains first, before the walk (learned.py).
            return coldplug(root, submit, on_queued=on_queued, first=self.learned.first())

        return run

    def _default_modules_load(self) -> ListedFn | None:
        if not self.settings.modules_load:
            return None
        root = self.settings.root_obj

        def read() -> tuple[list[ListedModule], list[ListProblem]]:
            from kmodd.daemon.boot_lists import listed_modules
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
        except Exception as exc:    # /proc/modules unreadable: keep every record (None)
            log(LOG, logging.WARNING, "cannot list loaded modules: %s", exc)
            live = None
        self.state.load(live, self._instance)
        self.control.start()       # fails if another kmodd listens: touch nothing then
        self._started = True
        # The only daemon now: what a killed one left behind can go.
        self.state.remove_leftovers()
        try:
            restored = self.loadlog.restore(self.loads_file)
            if restored:
                log(LOG, logging.INFO, "load log: %d load(s) of this boot from %s", restored,
                     self.loads_file)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log(LOG, logging.WARNING, "ignoring the load log %s: %s", self.loads_file, exc)
        for factory in self._source_factories:
            try:
                src = factory(self.submit)
            except Exception as exc:    # one source down (no netlink, no FIFO): serve the rest
                log(LOG, logging.ERROR, "request source unavailable: %s", exc)
                continue
            self.sources.append(src)
            self._watch_source(src)
        if self._watcher_factory is not None:
            try:
                self.watcher = self._watcher_factory(self._on_tree_change)
                self.loop.add_reader(self.watcher, self.watcher.on_readable, priority=True,
                                     what=f"request source {type(self.watcher).__name__}")
            except Exception as exc:    # no inotify: reloads still come with SIGHUP
                log(LOG, logging.WARNING, "not watching module indexes/modprobe.d: %s", exc)
        if self.settings.autoclean_interval > 0:
            self._autoclean_timer = self.loop.call_every(self.settings.autoclean_interval,
                                                         self.sweep, what="autoclean sweep")
        wd = self.watchdog_interval()
        if wd:
            # Ping from the loop itself: a wedged loop stops the pings.
            self.loop.call_every(max(0.05, wd / 2), self._ping_watchdog)
        self.loop.call_every(2.0, self._send_status)
        if any(hasattr(src, "check") for src in self.sources):
            self.loop.call_every(self.SOURCE_CHECK_INTERVAL, self._check_sources,
                                 what="request source check")
        if self.boot_loads is not None:
            self.boot_loads.start()
        if self.early is not None:
            log(LOG, logging.INFO, "head start: inserting %d module(s) the last boot loaded "
                 "for devices still present and the boot lists", len(self.early.names))
        elif self._no_head_start:
            log(LOG, logging.INFO, "no head start: %s", self._no_head_start)
        if self._coldplug_fn is not None:
            self.coldplug_state = "running"
            self.loadlog.mark("coldplug-start")
            threading.Thread(target=self._coldplug_thread, name="kmodd-coldplug",
                             daemon=True).start()
        else:
            self.coldplug_state = "disabled"
            self._raise_handover_flag()
        # READY=1 as soon as requests are served, as systemd-udevd does: the
        # unit is ordered before sysinit.target, so the whole boot waits for
        # it.  The walk goes on in its thread (`kmodctl settle` waits for it).
        self._set_ready()

    def _watch_source(self, src: Source) -> None:
        # The kernel waits on these: never behind control traffic.
        self.loop.add_reader(src, src.on_readable, priority=True,
                             what=f"request source {type(src).__name__}")
        self._watched[id(src)] = src.fileno()

    def _check_sources(self) -> None:
        """A source that can say so (the request FIFO) is checked, and watched
        again when it was lost: helpers must not wait for their watchdog."""
        for src in self.sources:
            check = getattr(src, "check", None)
            if check is None:
                continue
            before = self._watched.get(id(src), -1)
            problem = check()
            if problem is None and src.fileno() == before and \
                    self.loop.watching(src, src.on_readable):
                continue
            problem = problem or "no longer watched by the event loop"
            log(LOG, logging.ERROR, "request source %s: %s; watching it again",
                 type(src).__name__, problem)
            if self.loop.watching(before, src.on_readable):
                self.loop.remove(before)
            self._watch_source(src)
            src.on_readable()

    def _takes_over_from_udev(self) -> bool:
        # Only a daemon that hears uevents itself may tell udev to stand back.
        return any(src.udev_handover for src in self.sources)

    def _coldplug_queued(self) -> None:
        # Every device present has its request queued: udev may stand back.
        self._raise_handover_flag()

    def _raise_handover_flag(self) -> None:
        if self._handover_raised or self._stopping or not self._takes_over_from_udev():
            return
        flag = self.settings.root_obj.udev_handover
        try:
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.touch()
            self._handover_raised = True
        except OSError as exc:
            log(LOG, logging.WARNING, "cannot create %s (udev keeps loading drivers): %s",
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
            log(LOG, logging.WARNING, "cannot remove %s: %s",
                 self.settings.root_obj.udev_handover, exc.strerror or exc)

    @property
    def loads_file(self) -> Path:
        """The load log, saved at exit for the next daemon of this boot."""
        return Path(self.settings.state_file).parent / "loads.json"

    def _save_loads(self) -> None:
        try:
            self.loadlog.save(self.loads_file)
        except OSError as exc:
            log(LOG, logging.WARNING, "cannot save the load log to %s: %s", self.loads_file,
                 exc)

    @property
    def modules_load_marker(self) -> Path:
        """Present while this daemon serves modules-load.d: the drop-in for
        systemd-modules-load.service makes it do nothing then."""
        return Path(self.settings.state_file).parent / MODULES_LOAD_MARKER

    def _boot_loads_done(self) -> None:
        if self._ready_wanted:
            self._set_ready()

    def _ping_watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def _set_ready(self) -> None:
        # Later units may rely on the daemon taking requests and on the
        # modules-load.d lists being in; `kmodctl settle` tells when coldplug's
        # loads are done.
        if self.ready:
            return
        if self.boot_loads is not None and self.boot_loads.pending > 0:
            self._ready_wanted = True       # once the listed modules are in
            return
        self.ready = True
        # A manager not reading right now (notify never waits) hears it at
        # the next status tick (_send_status).
        self._ready_unsent = self.notify(READY=1, STATUS=self._status_line(),
                                         MAINPID=os.getpid()) is False
        log(LOG, logging.INFO, "kmodd ready: %d workers, socket %s",
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
        return 0

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
            # Stopping: a source that fails to close must not keep the others open.
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
        log(LOG, logging.INFO, "stopping: finishing loads in flight")
        self.notify(STOPPING=1, STATUS="stopping: finishing loads in flight")

        def drain() -> None:
            try:
                if not self.scheduler.shutdown(timeout=120.0):
                    log(LOG, logging.WARNING, "some loads were still running at exit")
            finally:
                self.loop.call_soon_threadsafe(self._finish_stop)

        threading.Thread(target=drain, name="kmodd-drain", daemon=True).start()

    def _finish_stop(self) -> None:
        self.saver.save_now()
        self._save_loads()
        self.ops.stop_settle()
        self._stopped = True

    def _cleanup(self) -> None:
        self._drop_handover_flag()
        if self.boot_loads is not None and self._started:
            self.boot_loads.set_served(False)
        if not self._stopped:          # start() failed or the loop crashed
            # Last resort on the way out: each step is tried whatever the others did.
            with contextlib.suppress(Exception):
                self.scheduler.shutdown(timeout=30.0)
            if self._started:
                with contextlib.suppress(Exception):
                    self.saver.save_now()
                with contextlib.suppress(Exception):
                    self._save_loads()
            for src in self.sources:
                with contextlib.suppress(Exception):
                    src.close()
        with contextlib.suppress(Exception):
            self.control.close()
        self.loop.close()

    # --- sources, reload ---------------------------------------------------------------

    def _coldplug_thread(self) -> None:
        assert self._coldplug_fn is not None
        result: ColdplugReport | None = None
        try:
            result = self._coldplug_fn(
                self.submit, lambda n: self.loop.call_soon_threadsafe(self._coldplug_queued))
        except Exception as exc:    # a failed walk still ends coldplug
            log(LOG, logging.ERROR, "coldplug failed: %s", exc)
        self.loop.call_soon_threadsafe(self._coldplug_finished, result)

    def _coldplug_finished(self, result: ColdplugReport | None) -> None:
        self.coldplug_state = "done"
        self.loadlog.mark("coldplug-end")
        # Off the loop: the next boot's order, then idle memory (memory.py).
        resolver = self.resolver
        self.learned.save_in_background(then=lambda: release_memory(resolver))
        self._coldplug_queued()
        loaded = result.loaded if result is not None else None
        log(LOG, logging.INFO, "coldplug done%s",
             f": loaded {' '.join(loaded)}" if loaded else "")
        if self.early is not None:
            log(LOG, logging.INFO, "head start: %s", self.early.summary())
            unasked = self.early.untaken()
            if unasked:
                # Only when the configuration changed in a way the stamp misses.
                log(LOG, logging.WARNING, "head start inserted %s, which no device asked "
                     "for this time", " ".join(unasked))
        self.ops.check_settle()

    def _on_tree_change(self) -> None:
        # depmod renames a dozen files: reload once the burst is over.
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        self._reload_timer = self.loop.call_later(0.2, self._reload_logged)

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except Exception as exc:    # SIGHUP/inotify have no one to answer: the journal is told
            log(LOG, logging.ERROR, "reload failed, keeping the previous configuration: %s",
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
        except Exception as exc:    # recorded for status, then the caller reports it
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
            log(LOG, logging.INFO, "max_workers changes take effect at the next start")
        self.autoclean.policy = self._autoclean_policy(settings)
        if self._autoclean_timer is not None:
            self._autoclean_timer.cancel()
            self._autoclean_timer = None
        if settings.autoclean_interval > 0:
            self._autoclean_timer = self.loop.call_every(settings.autoclean_interval,
                                                         self.sweep, what="autoclean sweep")
        self.reloads += 1
        self.last_reload_error = None
        log(LOG, logging.INFO, "configuration and module indexes reloaded")
        return {"reloads": self.reloads}

    # --- scheduler callbacks (worker threads) ---------------------------------------------

    def _on_plan(self, request: Request, plan: Plan) -> None:
        self.learned.note_plan(plan, kind=request.kind, key=request.key,
                               devpath=request.devpath)

    def _on_module(self, step: ModuleStep, request: Request, targets: tuple[str, ...],
                   result: StepResult) -> None:
        if not self.reporter.module_result(step, request, result):
            return
        self.learned.note(step.name, step.path, step.deps, result.seconds,
                          options=step.options)
        self.state.record(ModuleRecord(
            name=step.name, loaded_at=time.time(), kind=request.kind, key=request.key,
            devpath=request.devpath, requested_by=request.requested_by,
            role=str(step.role), via=targets,
            instance=self._instance(step.name)))
        self.loop.call_soon_threadsafe(self.saver.mark_dirty)

    def _instance(self, name: str) -> str | None:
        try:
            return self.kernel.instance(name)
        except Exception:       # the instance only tells reloads apart; unknown is fine
            return None

    def _on_outcome(self, outcome: Outcome) -> None:
        self.reporter.outcome(outcome)
        self.loop.call_soon_threadsafe(self._broadcast, outcome)

    def _broadcast(self, outcome: Outcome) -> None:
        self.reporter.broadcast(outcome)
        self.ops.check_settle()

    def _on_idle(self) -> None:
        self.loop.call_soon_threadsafe(self.ops.check_settle)

    # --- loop-thread handlers --------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def settled(self) -> bool:
        return self.coldplug_state != "running" and self.scheduler.idle()

    def sweep(self) -> SweepReport:
        report = self.autoclean.sweep()
        self.last_sweep = report
        for name in report.unloaded:
            log(LOG, logging.INFO, "autoclean: unloaded %s (unused)", name, module=name)
        for name, why in report.failed.items():
            log(LOG, logging.INFO, "autoclean: could not unload %s: %s", name, why,
                 module=name)
        if report.unloaded or report.forgotten:
            self.saver.save_now()
        elif report.kept:
            self.saver.mark_dirty()       # idle times survive a restart too
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
        if self._ready_unsent:
            if self.notify(READY=1, STATUS=line, MAINPID=os.getpid()) is not False:
                self._ready_unsent = False
                self._last_status = line
        elif line != self._last_status and self.notify(STATUS=line) is not False:
            self._last_status = line      # else tried again at the next tick

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

