"""kmodctl load: resolve a name or alias and load it with its dependencies, like modprobe.

:func:`load_direct` is the whole job without argument parsing or printing; the
daemon's control socket calls it for an admin request when it is not routing
through the scheduler.
"""

from __future__ import annotations

import argparse
import errno as E
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kmodd.cli.common import (
    add_daemon_options,
    add_tree_options,
    daemon_client,
    report,
    tree_from_args,
)
from kmodd.daemon.requests import SUCCESS_STATUSES
from kmodd.kernel.loader import Loader, StepResult, describe_failure
from kmodd.kernel.protocol import Kernel
from kmodd.modfile.params import check_params
from kmodd.resolution.plan import ModuleStep, Plan
from kmodd.root import Root


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
                "results": [asdict(r) for r in self.results], "actions": list(self.actions)}


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
               if r.status in ("loaded", "install-command", "failed") and r.name in by_name]
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
                coming_timeout: float = 30.0, dry_run: bool = False) -> LoadOutcome:
    """Resolve ``request`` (module name or alias) and load it, like ``modprobe``."""
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
    from kmodd.daemon.deny import refusals, system_policy

    # A deny holds for every source, this direct path included (the daemon's
    # scheduler applies the same policy to what it loads).
    refused = refusals(plan, system_policy(root).reason)
    blocking = [r for r in refused.values() if r.status == "failed"]
    if blocking:
        first = blocking[0]
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


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_tree_options(parser)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for a module another process is loading")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing; the exit status tells (like modprobe -q)")
    parser.add_argument("-a", "--all", action="store_true",
                        help="every argument is a module to load, no parameters "
                             "(like modprobe -a)")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="resolve and print what would be done; load nothing "
                             "(like modprobe -n -v)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print each insmod or install step (like modprobe -v)")
    add_daemon_options(parser)
    # kmodd-request's direct path: the kernel asked, so the daemon must treat
    # it as a kernel request (runaway detection, backoff), not an admin's.
    parser.add_argument("--kernel-request", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("name", metavar="NAME|ALIAS")
    parser.add_argument("params", nargs="*", metavar="param=value",
                        help="module parameters; with -a, more module names")


def load_via_daemon(client: Any, request: str, params: Sequence[str], *,
                    kernel: bool = False) -> LoadOutcome:
    """Hand the load to the running daemon, which records why and may autoclean it."""
    with client:
        if kernel:
            reply = client.load(request, format_params(params), kind="kernel",
                                requested_by="kernel")
        else:
            reply = client.load(request, format_params(params))
    outcome = reply.get("outcome") or {}
    if not reply.get("ok"):
        code = reply.get("code")
        return LoadOutcome(request, False, f"{request}: {reply.get('error', 'refused')}",
                           errno=getattr(E, code, None) if isinstance(code, str) else None)
    status = str(reply.get("status", ""))
    modules = tuple(outcome.get("modules") or ())
    if status in SUCCESS_STATUSES:
        return LoadOutcome(request, True, f"{', '.join(modules) or request} {status} "
                           "(through kmodd)", modules)
    error = outcome.get("error") or status
    return LoadOutcome(request, False, f"{request}: {status}: {error}", modules,
                       errno=outcome.get("errno"))


def requests_from_args(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, params) per module to load: ``-a`` makes every argument a name."""
    if args.all:
        return [(name, []) for name in [args.name, *args.params]]
    return [(args.name, list(args.params))]


def run(args: argparse.Namespace, *, kernel: Kernel | None = None) -> int:
    # The loader logs "no module support" for the daemon's journal; here the
    # same message is printed once below.
    logging.getLogger("kmodd.kernel.loader").setLevel(logging.CRITICAL)
    root, version = tree_from_args(args)
    # A dry run resolves here and asks the kernel only what is loaded; -v
    # needs the steps, which the daemon does not report: both act directly.
    use_daemon = not (args.dry_run or args.verbose or kernel is not None)
    status = 0
    outcomes = []
    for name, params in requests_from_args(args):
        client = daemon_client(args) if use_daemon else None   # one connection per load
        if client is not None:
            outcome = load_via_daemon(client, name, params, kernel=args.kernel_request)
        else:
            outcome = load_direct(name, params, root=root, version=version,
                                  config_paths=args.config, blacklist_all=args.use_blacklist,
                                  coming_timeout=args.timeout, kernel=kernel,
                                  dry_run=args.dry_run)
        if (args.verbose or args.dry_run) and not args.quiet and not args.json:
            for line in outcome.actions:
                print(line)
        outcomes.append(outcome)
        if not args.json:
            status |= report(args, outcome.ok, outcome.message, outcome.to_json())
        elif not outcome.ok:
            status = 1
    if args.json and not args.quiet:
        docs = [o.to_json() for o in outcomes]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    return status
