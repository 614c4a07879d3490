"""Loading and unloading without the daemon, as modprobe and rmmod do.

``kmodctl load/unload --direct`` (and when no daemon runs), the
request helper's last resort and offline use call these; the daemon loads
through its scheduler instead.  The hard deny policy is a parameter: this
layer knows plans and the kernel, not the daemon's settings.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Sequence

from kmodd.kernel.loader import Loader, StepResult, StepStatus, describe_failure
from kmodd.kernel.protocol import Kernel
from kmodd.modfile.params import check_params
from kmodd.record import dataclass, field
from kmodd.resolution.names import modname_normalize
from kmodd.resolution.plan import ModuleStep, Plan
from kmodd.root import Root

# The first step of a plan a deny policy refuses (None: the plan may load).
Refuse = Callable[[Plan], "StepResult | None"]


@dataclass
class LoadOutcome:
    request: str
    ok: bool
    message: str
    targets: tuple[str, ...] = ()
    results: list[StepResult] = field(default_factory=list)
    errno: int | None = None
    # modprobe -v style lines: what was (or with --dry-run, would be) done.
    actions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"request": self.request, "ok": self.ok, "message": self.message,
                "targets": list(self.targets), "errno": self.errno,
                "results": [r.to_dict() for r in self.results], "actions": list(self.actions)}


def step_action(step: ModuleStep) -> str:
    """One step as modprobe -v prints it: ``insmod PATH OPTIONS`` or ``install COMMAND``."""
    if step.install_command is not None:
        return f"install {step.install_command}"
    return f"insmod {step.path}" + (f" {step.options}" if step.options else "")


def plan_actions(plan: Plan, kernel: Kernel) -> list[str]:
    """What loading ``plan`` would do now, like ``modprobe -n -v``: modules already
    live or built in are skipped, as the loader skips them."""
    try:
        live = set(kernel.modules())
    except OSError:
        live = set()
    return [step_action(step) for step in plan.steps
            if not step.builtin and step.name not in live]


def format_params(params: Sequence[str]) -> str:
    """Command-line ``param=value`` words -> the kernel's parameter string.

    A value with spaces arrived as one argv word; the kernel splits on spaces
    unless the value is double-quoted, so quote it.
    """
    out = []
    for word in params:
        key, eq, value = word.partition("=")
        if eq and any(c.isspace() for c in value) and not value.startswith('"'):
            word = f'{key}="{value}"'
        out.append(word)
    return " ".join(out)


def load_plan_direct(plan: Plan, kernel: Kernel, *, params: Sequence[str] = (),
                     coming_timeout: float = 30.0, dry_run: bool = False) -> LoadOutcome:
    """Execute an already resolved plan; ``params`` are the admin's for the targets."""
    if not plan.resolved:
        if plan.blacklisted:
            return LoadOutcome(plan.request, False,
                               f"{plan.request}: blacklisted ({', '.join(plan.blacklisted)})",
                               errno=E.EPERM)
        return LoadOutcome(plan.request, False, f"{plan.request}: module not found",
                           errno=E.ENOENT)
    refusal = check_params(plan, params)
    if refusal is not None:
        return LoadOutcome(plan.request, False, refusal, plan.targets, errno=E.EINVAL)
    if dry_run:
        # modprobe -n: everything up to the syscalls, which are only described.
        actions = plan_actions(plan, kernel)
        return LoadOutcome(plan.request, True,
                           f"{', '.join(plan.targets)}: "
                           f"{'would load' if actions else 'nothing to do'}",
                           plan.targets, actions=actions)
    loader = Loader(kernel, coming_timeout=coming_timeout)
    results = loader.load_plan(plan)
    by_name = {step.name: step for step in plan.steps}
    actions = [step_action(by_name[r.name]) for r in results
               if r.status in (StepStatus.LOADED, StepStatus.INSTALL_COMMAND, StepStatus.FAILED)
               and r.name in by_name]
    ok = Loader.plan_ok(plan, results)
    if ok:
        done = {r.name: r.status for r in results}
        summary = ", ".join(f"{t} {done.get(t, 'loaded')}" for t in plan.targets)
        return LoadOutcome(plan.request, True, summary, plan.targets, results,
                           actions=actions)
    failed = next((r for r in results if r.status == "failed"), None)
    message = describe_failure(results, plan) or f"{plan.request}: not loaded"
    return LoadOutcome(plan.request, False, message, plan.targets, results,
                       failed.errno if failed else None, actions=actions)


def load_direct(request: str, params: Sequence[str] = (), *, root: Root | None = None,
                version: str | None = None, config_paths: Sequence[str] | None = None,
                kernel: Kernel | None = None, blacklist_all: bool = False,
                coming_timeout: float = 30.0, dry_run: bool = False,
                deny: Refuse | None = None) -> LoadOutcome:
    """Resolve ``request`` (module name or alias) and load it, like ``modprobe``.

    ``deny`` is the hard deny policy (kmodd.daemon.deny.system_refuse for the
    tools that load without the daemon): what it refuses is never loaded."""
    from kmodd.resolution.resolve import open_resolver
    from kmodd.root import running_kernel_version

    root = root or Root()
    version = version or running_kernel_version()
    try:
        resolver = open_resolver(root, version, config_paths)
        plan = resolver.plan(request, extra_options=format_params(params),
                             blacklist_all=blacklist_all)
    except Exception as e:   # IndexCorrupt, OSError, ValueError from a bad alias...
        return LoadOutcome(request, False, f"{request}: cannot resolve: {e}", errno=E.ENOENT)
    # A deny holds for every source, this direct path included (the daemon's
    # scheduler applies the same policy to what it loads).
    first = deny(plan) if deny is not None else None
    if first is not None:
        return LoadOutcome(request, False, f"{request}: {first.name}: {first.error}",
                           errno=first.errno)
    if kernel is None:
        from kmodd.kernel.real import RealKernel

        kernel = RealKernel(Root())   # -d only moves the module tree, never /proc or /sys
    outcome = load_plan_direct(plan, kernel, params=params, coming_timeout=coming_timeout,
                               dry_run=dry_run)
    if not plan.resolved and not plan.blacklisted:
        moddir = root.modules_dir(version)
        where = moddir if moddir.is_dir() else f"{moddir}, which does not exist"
        outcome.message = f"{request}: module not found in {where}"
    return outcome


@dataclass
class UnloadOutcome:
    request: str
    ok: bool
    message: str
    results: list[StepResult] = field(default_factory=list)
    errno: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"request": self.request, "ok": self.ok, "message": self.message,
                "errno": self.errno, "results": [r.to_dict() for r in self.results]}


def _resolve(request: str, root: Root, version: str, config_paths: Sequence[str] | None
             ) -> tuple[Plan | None, dict[str, str]]:
    """The request's plan and the modprobe.d remove command of each module in it."""
    try:
        from kmodd.resolution.resolve import open_resolver

        resolver = open_resolver(root, version, config_paths)
        plan = resolver.plan(request)
    except Exception:   # no tree for this kernel, corrupt index...: unload by name
        return None, {}
    names = [s.name for s in plan.steps] or [modname_normalize(request)]
    # remove patterns are globs, first match wins, as kmod matches them
    remove = {n: cmd for n in names if (cmd := resolver.remove_command(n)) is not None}
    return (plan if plan.resolved else None), remove


def unload_direct(request: str, *, recursive: bool = False, force: bool = False,
                  root: Root | None = None, version: str | None = None,
                  config_paths: Sequence[str] | None = None,
                  kernel: Kernel | None = None) -> UnloadOutcome:
    from kmodd.root import running_kernel_version

    root = root or Root()
    version = version or running_kernel_version()
    plan, remove = _resolve(request, root, version, config_paths)
    if kernel is None:
        from kmodd.kernel.real import RealKernel

        kernel = RealKernel(Root())
    loader = Loader(kernel)
    targets = list(plan.targets) if plan is not None else [modname_normalize(request)]
    results: list[StepResult] = []
    if recursive and plan is not None:
        results = loader.unload_recursive(plan, remove_commands=remove, force=force)
    elif recursive:
        results = loader.unload_recursive(targets[0], remove_commands=remove, force=force)
    else:
        for name in targets:
            results.append(loader.unload(name, remove_command=remove.get(name), force=force))
    target_results = [r for r in results if r.name in targets]
    bad = [r for r in target_results if r.status in ("failed", "absent")]
    if bad:
        return UnloadOutcome(request, False, bad[0].error or f"{bad[0].name}: not unloaded",
                             results, bad[0].errno)
    if not target_results:
        return UnloadOutcome(request, False, f"{request}: not loaded", results, E.ENOENT)
    done = [r.name for r in results if r.status in ("unloaded", "remove-command")]
    return UnloadOutcome(request, True, "unloaded " + " ".join(done) if done else "nothing to do",
                         results)
