"""kmodctl unload: remove a module like rmmod, or with ``-r`` like ``modprobe -r``.

Parsing and printing only: the daemon unloads through its control socket, and
without it kmodd.kernel.direct.unload_direct does the job.
"""

from __future__ import annotations

import argparse
import errno as E
import logging
from typing import Any

from kmodd.cli.common import (
    add_daemon_options,
    add_tree_options,
    daemon_client,
    report,
    tree_from_args,
)
from kmodd.kernel.direct import UnloadOutcome, unload_direct


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
