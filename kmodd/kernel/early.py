"""Loads started before the daemon has read a single index: the head start.

At coldplug the kernel's own work (the slowest inits) is the floor, and a
Python daemon spends its first second or more importing, reading indexes and
walking ``/sys`` before its first ``finit_module``.  The daemon's previous
boots already resolved the devices that are still present, so the entry
point hands such a remembered set of modules (``kmodd.daemon.learned``
decides which, and when it is still valid) to :class:`EarlyLoads`, which
inserts them in a few threads, dependencies first, while the rest of the
daemon starts.  ctypes releases the interpreter lock for the syscall, so the
kernel's inits run in parallel with the imports.

Nothing is reported here: when the daemon's own request for a module reaches
the loader (``Loader.load_step``), the loader takes the early result in
place of its own syscall (:meth:`EarlyLoads.take`), so every load is still
attributed, logged and recorded by the one path that always does it.
"""

from __future__ import annotations

import errno as E
import threading
import time

from kmodd.kernel.protocol import KernelError
from kmodd.record import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kmodd.kernel.protocol import Kernel


@dataclass(frozen=True)
class EarlyModule:
    """One module to insert early: what the daemon's loader would insert."""

    name: str
    path: str
    options: str = ""
    deps: tuple[str, ...] = ()      # modules to be live first (in this list or already)


@dataclass(frozen=True)
class EarlyResult:
    """The head start's syscall for one module."""

    inserted: bool                  # False: it was already there (EEXIST)
    started: float                  # monotonic, when the syscall began
    seconds: float                  # spent in the syscall
    path: str
    options: str
    error: KernelError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class EarlyLoads:
    """Insert ``modules`` (in priority order) in ``workers`` threads, each after
    its dependencies; a module whose dependency failed is left for the daemon."""

    def __init__(self, kernel: Kernel, modules: Sequence[EarlyModule], *, workers: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kernel = kernel
        self.clock = clock
        self.created = clock()
        self._modules = {m.name: m for m in modules}
        self._pending = [m.name for m in modules]
        self._running: set[str] = set()
        self._results: dict[str, EarlyResult] = {}
        self._dropped: set[str] = set()       # never tried: a dependency failed
        self._taken: set[str] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"kmodd-early-{i}",
                                          daemon=True)
                         for i in range(max(1, min(workers, len(modules))))] if modules else []

    def start(self) -> EarlyLoads:
        for thread in self._threads:
            thread.start()
        return self

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._modules)

    # -- workers ------------------------------------------------------------------
    def _next_locked(self) -> EarlyModule | None:
        """The first pending module whose dependencies are done; None when none is
        ready yet.  Modules behind a failed dependency are dropped."""
        for name in list(self._pending):
            module = self._modules[name]
            blocked = False
            for dep in module.deps:
                if dep in self._dropped or (dep in self._results and not self._results[dep].ok):
                    self._pending.remove(name)
                    self._dropped.add(name)
                    blocked = True
                    break
                if dep in self._modules and dep not in self._results:
                    blocked = True
                    break
            if not blocked:
                self._pending.remove(name)
                self._running.add(name)
                return module
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                module = None
                while not self._stopped and self._pending:
                    module = self._next_locked()
                    if module is not None:
                        break
                    self._cond.wait()
                if module is None:
                    self._cond.notify_all()
                    return
            result = self._insert(module)
            with self._cond:
                self._running.discard(module.name)
                self._results[module.name] = result
                if result.error is not None and result.error.errno == E.ENOSYS:
                    self._stopped = True          # no module support: stop at once
                    self._dropped.update(self._pending)
                    self._pending.clear()
                self._cond.notify_all()

    def _insert(self, module: EarlyModule) -> EarlyResult:
        started = self.clock()
        try:
            inserted = self.kernel.load_module(module.name, module.path, module.options)
            error = None
        except KernelError as exc:
            inserted, error = False, exc
        except Exception as exc:        # a bug below must not lose the daemon's own load
            inserted, error = False, KernelError(E.EIO, f"{module.name}: {exc}", module.name)
        return EarlyResult(inserted, started, self.clock() - started, module.path,
                           module.options, error)

    # -- the loader's side --------------------------------------------------------
    def take(self, name: str, timeout: float | None = None) -> EarlyResult | None:
        """The early result for ``name``, waiting while its syscall is running;
        None when the head start never had it, had not started it (it never
        will then), dropped it, or gave it out before: the caller then loads as
        usual.  Each result is given out once."""
        if name not in self._modules:
            return None
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            if name in self._pending:
                # Not started yet: the daemon got there first and loads it itself
                # (no waiting behind the head start's queue); what depends on it
                # is left to the daemon as well.
                self._pending.remove(name)
                self._dropped.add(name)
                self._cond.notify_all()
                return None
            while name in self._running:
                remaining = None if deadline is None else deadline - self.clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if name in self._taken or name not in self._results:
                return None
            self._taken.add(name)
            return self._results[name]

    def holds(self, name: str) -> bool:
        """Whether the head start has a syscall for ``name`` running or a result not
        yet given out: the caller must ask :meth:`take`, not the kernel's state
        (a module coming or live by the head start is not "already loaded")."""
        with self._cond:
            return name in self._running or (name in self._results and name not in self._taken)

    def summary(self) -> str:
        """For the journal: what the head start did, timed from its creation."""
        with self._cond:
            results = list(self._results.values())
        if not results:
            return "nothing inserted"
        inserted = sum(1 for r in results if r.inserted)
        failed = sum(1 for r in results if r.error is not None)
        first = min(r.started for r in results) - self.created
        last = max(r.started + r.seconds for r in results) - self.created
        return (f"{inserted} inserted, {len(results) - inserted - failed} already there, "
                f"{failed} failed; syscalls from +{first:.2f} s to +{last:.2f} s")

    def untaken(self) -> list[str]:
        """Modules the head start inserted that no request of the daemon took."""
        with self._cond:
            return sorted(n for n, r in self._results.items()
                          if r.inserted and n not in self._taken)

    def wait(self, timeout: float | None = None) -> bool:
        """Until every worker is done (tests, and the daemon's stop)."""
        deadline = None if timeout is None else self.clock() + timeout
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - self.clock())
            thread.join(remaining)
        return not any(t.is_alive() for t in self._threads)
