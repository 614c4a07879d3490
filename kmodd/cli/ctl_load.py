"""kmodctl load: resolve a name or alias and load it with its dependencies, like modprobe.

Parsing and printing only: the daemon loads through its control socket, and
without it kmodd.kernel.direct.load_direct does the whole job.
"""

from __future__ import annotations

import argparse
import errno as E
import json
import logging
from collections.abc import Sequence
from typing import Any

from kmodd.cli.common import (
    add_daemon_options,
    add_tree_options,
    daemon_client,
    report,
    tree_from_args,
)
from kmodd.daemon.requests import SUCCESS_STATUSES
from kmodd.kernel.direct import LoadOutcome, format_params, load_direct
from kmodd.kernel.protocol import Kernel
from kmodd.root import Root


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
            from kmodd.daemon.deny import system_refuse  # read only on this path

            outcome = load_direct(name, params, root=root, version=version,
                                  config_paths=args.config, blacklist_all=args.use_blacklist,
                                  coming_timeout=args.timeout, kernel=kernel,
                                  dry_run=args.dry_run, deny=system_refuse(root or Root()))
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
