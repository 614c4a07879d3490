"""kmodctl unload: remove a module like rmmod, or with ``-r`` like ``modprobe -r``.

:func:`unload_direct` does the job without printing, for the daemon to call.
"""

from __future__ import annotations

import argparse
import errno as E
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
from kmodd.kernel.loader import Loader, StepResult
from kmodd.kernel.protocol import Kernel
from kmodd.resolution.names import modname_normalize
from kmodd.resolution.plan import Plan
from kmodd.root import Root


@dataclass
class UnloadOutcome:
    request: str
    ok: bool
    message: str
    results: list[StepResult] = field(default_factory=list)
    errno: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"request": self.request, "ok": self.ok, "message": self.message,
                "errno": self.errno, "results": [asdict(r) for r in self.results]}


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


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_tree_options(parser, blacklist=False)
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="also remove the dependencies nothing uses any more "
                             "(modprobe -r)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="force removal even when in use (O_TRUNC; dangerous)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing; the exit status tells (like modprobe -q)")
    add_daemon_options(parser)
    parser.add_argument("name", metavar="NAME|ALIAS")


def unload_via_daemon(client: Any, request: str, *, force: bool) -> UnloadOutcome:
    """Ask the running daemon, so its record of what it loaded stays true."""
    with client:
        reply = client.unload(request, force=force)
    if not reply.get("ok"):
        return UnloadOutcome(request, False, f"{request}: {reply.get('error', 'refused')}",
                             errno=E.EPERM if reply.get("code") == "EPERM" else None)
    status = str(reply.get("status", ""))
    module = str(reply.get("module", request))
    if status in ("unloaded", "remove-command"):
        return UnloadOutcome(request, True, f"unloaded {module} (through kmodd)")
    error = reply.get("error") or (f"{module}: not loaded" if status == "absent" else status)
    return UnloadOutcome(request, False, str(error), errno=reply.get("errno"))


def run(args: argparse.Namespace) -> int:
    # The loader logs "no module support" for the daemon's journal; here the
    # same message is printed once below.
    logging.getLogger("kmodd.kernel.loader").setLevel(logging.CRITICAL)
    root, version = tree_from_args(args)
    # modprobe -r semantics (dependencies too) are worked out here, not by the daemon.
    client = None if args.recursive else daemon_client(args)
    if client is not None:
        outcome = unload_via_daemon(client, args.name, force=args.force)
    else:
        outcome = unload_direct(args.name, recursive=args.recursive, force=args.force,
                                root=root, version=version, config_paths=args.config)
    return report(args, outcome.ok, outcome.message, outcome.to_json())
