"""Executes load plans and unloads against a Kernel, with modprobe's semantics.

Serial by design: the scheduler gets parallelism by calling :meth:`Loader.load_step`
from several workers in dependency order; ``kmodctl load`` and offline use go
through :meth:`Loader.load_plan`, which is modprobe's loop.
"""

from __future__ import annotations

import errno as E
import logging
import threading
import time
from collections.abc import Callable, Mapping
from enum import StrEnum

from kmodd.journal import NOTICE, journal_fields
from kmodd.kernel import commands, errors
from kmodd.kernel.early import EarlyLoads
from kmodd.kernel.protocol import InitState, Kernel, KernelError
from kmodd.record import dataclass
from kmodd.resolution.plan import ModuleStep, Plan, Role

LOG = logging.getLogger(__name__)

NO_MODULE_SUPPORT = "this kernel was built without loadable module support"


class StepStatus(StrEnum):
    """What happened to one module; compares and serialises as its plain string."""

    # loads
    LOADED = "loaded"
    ALREADY = "already"
    BUILTIN = "builtin"
    INSTALL_COMMAND = "install-command"
    FAILED = "failed"
    SKIPPED = "skipped"          # a dependency failed or was refused
    BACKOFF = "backoff"          # held back by the scheduler after failures
    REFUSED = "refused"          # left out by the deny policy, failing nobody (a softdep)
    # unloads
    UNLOADED = "unloaded"
    REMOVE_COMMAND = "remove-command"
    ABSENT = "absent"
    KEPT = "kept"                # a dependency still in use, left alone by a recursive unload

    @property
    def is_failure(self) -> bool:
        return self in (StepStatus.FAILED, StepStatus.SKIPPED)


@dataclass(frozen=True)
class StepResult:
    """What happened to one module (loads and unloads alike)."""

    name: str
    status: StepStatus
    error: str | None = None
    errno: int | None = None
    seconds: float | None = None        # time spent in the load syscall
    started: float | None = None        # monotonic, when that syscall began

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", StepStatus(self.status))

    @property
    def ok(self) -> bool:
        return not self.status.is_failure

    def to_dict(self) -> dict[str, object]:
        """For JSON output: ``started`` is a monotonic clock reading, of no use outside."""
        return {"name": self.name, "status": str(self.status), "error": self.error,
                "errno": self.errno, "seconds": self.seconds}


InstallRunner = Callable[[str, str, str], commands.CommandResult]
RemoveRunner = Callable[[str, str], commands.CommandResult]


class Loader:
    def __init__(self, kernel: Kernel, *, coming_timeout: float = 30.0,
                 run_install: InstallRunner | None = None,
                 run_remove: RemoveRunner | None = None,
                 early: EarlyLoads | None = None) -> None:
        self.kernel = kernel
        self.early = early
        self.coming_timeout = coming_timeout
        self._run_install: InstallRunner = run_install or commands.run_install
        self._run_remove: RemoveRunner = run_remove or commands.run_remove
        # ENOSYS is permanent for the life of the kernel: report it once, then
        # answer every later request without a syscall (visible to the daemon).
        self.no_module_support = False
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------------
    def _note_enosys(self) -> None:
        with self._lock:
            first = not self.no_module_support
            self.no_module_support = True
        if first:
            LOG.error("%s; not trying to load modules again", NO_MODULE_SUPPORT)

    def _unsupported(self, name: str) -> StepResult | None:
        if self.no_module_support:
            return StepResult(name, StepStatus.FAILED, NO_MODULE_SUPPORT, E.ENOSYS)
        if not self.kernel.supports_modules():
            self._note_enosys()
            return StepResult(name, StepStatus.FAILED, NO_MODULE_SUPPORT, E.ENOSYS)
        return None

    def _wait_settled(self, name: str) -> InitState:
        """Wait (bounded) while ``name`` is coming or going; return the state it settles in."""
        deadline = time.monotonic() + self.coming_timeout
        delay = 0.005
        while True:
            state = self.kernel.initstate(name)
            if state not in (InitState.COMING, InitState.GOING):
                return state
            if time.monotonic() >= deadline:
                return state
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)

    # -- loading ----------------------------------------------------------------------
    def load_step(self, step: ModuleStep) -> StepResult:
        """Load one module (its dependencies must already be live)."""
        name = step.name
        if step.builtin and step.install_command is None:
            return StepResult(name, StepStatus.BUILTIN)
        if step.install_command is not None and not self.kernel.supports_modules():
            # A command may not need module support at all ("install foo /bin/true").
            return self._install(step)
        unsupported = self._unsupported(name)
        if unsupported is not None:
            return unsupported
        early = self._take_early(step)
        if early is not None:
            return early
        state = self.kernel.initstate(name)
        if state in (InitState.COMING, InitState.GOING):
            state = self._wait_settled(name)
            if state is InitState.COMING:
                return StepResult(name, StepStatus.FAILED,
                                  f"{name}: still initialising after "
                                  f"{self.coming_timeout:g}s (see dmesg)", E.EBUSY)
            if state is InitState.GOING:
                return StepResult(name, StepStatus.FAILED,
                                  f"{name}: still being removed after "
                                  f"{self.coming_timeout:g}s", E.EBUSY)
        # Like kmod (module_is_inkernel): a live or built-in module is not loaded
        # again and its install command is not run.
        if state is InitState.LIVE:
            return StepResult(name, StepStatus.ALREADY)
        if state is InitState.BUILTIN:
            return StepResult(name, StepStatus.BUILTIN)
        if step.install_command is not None:
            return self._install(step)
        if step.path is None:
            return StepResult(name, StepStatus.FAILED, f"{name}: no module file in the module tree",
                              E.ENOENT)
        started = time.monotonic()
        try:
            inserted = self.kernel.load_module(name, step.path, step.options)
        except KernelError as e:
            if e.errno == E.ENOSYS:
                self._note_enosys()
            return StepResult(name, StepStatus.FAILED, e.message, e.errno,
                              time.monotonic() - started, started)
        return StepResult(name, StepStatus.LOADED if inserted else StepStatus.ALREADY,
                          seconds=time.monotonic() - started, started=started)

    def _take_early(self, step: ModuleStep) -> StepResult | None:
        """The head start's syscall for this step, in place of our own (kmodd.kernel.early)."""
        if self.early is None or step.install_command is not None or step.path is None:
            return None
        got = self.early.take(step.name, timeout=self.coming_timeout)
        if got is None:
            return None
        same = got.path == step.path and got.options == step.options
        if got.error is not None:
            if not same:
                return None         # tried with what the last boot resolved: try ours
            if got.error.errno == E.ENOSYS:
                self._note_enosys()
            return StepResult(step.name, StepStatus.FAILED, got.error.message, got.error.errno,
                              got.seconds, got.started)
        if not same and got.inserted:
            LOG.warning("%s: loaded early from %s with options %r; resolved now: %s, %r",
                        step.name, got.path, got.options, step.path, step.options)
        return StepResult(step.name, StepStatus.LOADED if got.inserted else StepStatus.ALREADY,
                          seconds=got.seconds, started=got.started)

    def _install(self, step: ModuleStep) -> StepResult:
        assert step.install_command is not None
        if step.kmod_ignores_install:
            LOG.log(NOTICE, "%s: running its install command although it has softdeps; "
                    "modprobe would load the module directly (kmod bug #446)", step.name,
                    extra=journal_fields(module=step.name))
        res = self._run_install(step.name, step.install_command,
                                step.options)
        if res.ok:
            return StepResult(step.name, StepStatus.INSTALL_COMMAND)
        return StepResult(step.name, StepStatus.FAILED, res.error, E.EINVAL)

    def load_plan(self, plan: Plan) -> list[StepResult]:
        """Load every step in order, like modprobe.

        A failing softdep is ignored (kmod: ``!m->required``).  A failing hard
        step makes the steps that need it (directly or not) "skipped"; steps of
        other targets that do not need it still run.
        """
        results: list[StepResult] = []
        broken: set[str] = set()
        for step in plan.steps:
            blockers = [d for d in step.deps if d in broken]
            if blockers:
                results.append(StepResult(step.name, StepStatus.SKIPPED,
                                          f"{step.name}: not loaded because "
                                          f"{', '.join(blockers)} failed", None))
                broken.add(step.name)
                continue
            res = self.load_step(step)
            results.append(res)
            if res.status == StepStatus.FAILED:
                if step.role in (Role.SOFTDEP_PRE, Role.SOFTDEP_POST):
                    LOG.info("ignoring failed softdep: %s", res.error)
                    continue
                broken.add(step.name)
                if res.errno == E.ENOSYS:
                    # Nothing else can load either; say so for the rest.
                    results += [StepResult(s.name, StepStatus.SKIPPED, NO_MODULE_SUPPORT, E.ENOSYS)
                                for s in plan.steps[len(results):]]
                    break
        return results

    @staticmethod
    def plan_ok(plan: Plan, results: list[StepResult]) -> bool:
        """Whether every target and hard dependency made it (softdep failures allowed)."""
        roles = {s.name: s.role for s in plan.steps}
        return plan.resolved and all(
            r.ok or roles.get(r.name) in (Role.SOFTDEP_PRE, Role.SOFTDEP_POST)
            for r in results)

    # -- unloading --------------------------------------------------------------------
    def unload(self, name: str, *, remove_command: str | None = None,
               force: bool = False) -> StepResult:
        """Remove one module like rmmod: refuse (EBUSY) while it is in use unless forced."""
        if remove_command is not None:
            res = self._run_remove(name, remove_command)
            if res.ok:
                return StepResult(name, StepStatus.REMOVE_COMMAND)
            return StepResult(name, StepStatus.FAILED, res.error, E.EINVAL)
        unsupported = self._unsupported(name)
        if unsupported is not None:
            return unsupported
        state = self.kernel.initstate(name)
        if state is InitState.ABSENT:
            return StepResult(name, StepStatus.ABSENT, f"{name}: not loaded", E.ENOENT)
        if state is InitState.BUILTIN:
            return StepResult(name, StepStatus.FAILED, f"{name}: built into the kernel, cannot be "
                              "unloaded", E.ENOENT)
        if not force:
            # Like modprobe -r: check in user space first so the message names
            # the holders instead of the kernel's bare EWOULDBLOCK.
            holders = self.kernel.holders(name)
            refs = self.kernel.refcount(name)
            if holders or (refs or 0) > 0:
                msg = (f"{name}: in use by: {' '.join(holders)}" if holders else
                       f"{name}: in use ({refs} reference{'s' if refs != 1 else ''}, "
                       "e.g. an open device or a mounted filesystem)")
                return StepResult(name, StepStatus.FAILED, msg, E.EBUSY)
        try:
            self.kernel.unload_module(name, force=force)
        except KernelError as e:
            if e.errno == E.ENOSYS:
                self._note_enosys()
            if e.errno == E.ENOENT:
                return StepResult(name, StepStatus.ABSENT, e.message, E.ENOENT)
            return StepResult(name, StepStatus.FAILED, e.message, e.errno)
        return StepResult(name, StepStatus.UNLOADED)

    def unload_recursive(self, plan_or_name: Plan | str, *,
                         remove_commands: Mapping[str, str] | None = None,
                         force: bool = False) -> list[StepResult]:
        """``modprobe -r``: the target(s), then dependencies nothing uses any more.

        With a Plan, the candidates are its steps in reverse (post-softdeps
        first, then the target, then hard dependencies and pre-softdeps, as
        modprobe -r orders them).  With a bare name, the kernel's own holder
        links say which modules it was using.  Only the targets' failures are
        errors; a dependency still in use is "kept".
        """
        cmds = dict(remove_commands or {})
        if isinstance(plan_or_name, str):
            return self._unload_by_holders(plan_or_name, cmds, force)
        plan = plan_or_name
        targets = set(plan.targets)
        results: list[StepResult] = []
        for step in reversed(plan.steps):
            if step.builtin:
                continue
            if step.name in targets:
                res = self.unload(step.name, remove_command=cmds.get(step.name), force=force)
                results.append(res)
                if res.status == StepStatus.FAILED:
                    break
                continue
            results.append(self._unload_if_unused(step.name, cmds.get(step.name)))
        return results

    def _unload_if_unused(self, name: str, remove_command: str | None) -> StepResult:
        if remove_command is None:
            state = self.kernel.initstate(name)
            if state in (InitState.ABSENT, InitState.BUILTIN):
                return StepResult(name, StepStatus.ABSENT if state is InitState.ABSENT
                                  else StepStatus.BUILTIN)
            if self.kernel.holders(name) or (self.kernel.refcount(name) or 0) > 0:
                return StepResult(name, StepStatus.KEPT, f"{name}: still in use", E.EBUSY)
        res = self.unload(name, remove_command=remove_command)
        if res.status == StepStatus.FAILED:
            # Non-fatal for a dependency, as in modprobe -r.
            return StepResult(name, StepStatus.KEPT, res.error, res.errno)
        return res

    def _unload_by_holders(self, name: str, cmds: Mapping[str, str],
                           force: bool) -> list[StepResult]:
        # Modules whose holders list the target are the ones it was using.
        used = [m for m, info in self.kernel.modules().items() if name in info.holders]
        first = self.unload(name, remove_command=cmds.get(name), force=force)
        results = [first]
        if first.status == StepStatus.FAILED or first.status == StepStatus.ABSENT:
            return results
        pending = list(used)
        seen = {name}
        while pending:
            dep = pending.pop(0)
            if dep in seen:
                continue
            seen.add(dep)
            below = [m for m, info in self.kernel.modules().items() if dep in info.holders]
            res = self._unload_if_unused(dep, cmds.get(dep))
            results.append(res)
            if res.status == StepStatus.UNLOADED:
                pending += below
        return results


def describe_failure(results: list[StepResult], plan: Plan | None = None) -> str | None:
    """The first hard failure's message (for one-line CLI and daemon reports)."""
    soft = {s.name for s in plan.steps if s.role in (Role.SOFTDEP_PRE, Role.SOFTDEP_POST)} \
        if plan is not None else set()
    for r in results:
        if r.status == StepStatus.FAILED and r.name not in soft:
            return r.error or errors.load_message(r.errno or E.EIO, r.name)
    return None
