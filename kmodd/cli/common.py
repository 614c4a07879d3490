"""Options shared by the kmodctl sub-commands that work on a module tree."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kmodd.root import Root, run_path, running_kernel_version


def add_tree_options(parser: argparse.ArgumentParser, *, blacklist: bool = True) -> None:
    """``-d/-S/-C`` mean what they mean to modprobe."""
    parser.add_argument("-d", "--dirname", metavar="ROOT", default=None,
                        help="directory holding lib/modules/VERSION (default /)")
    parser.add_argument("-S", "--set-version", metavar="VERSION", dest="version", default=None,
                        help="kernel version (default: running kernel)")
    parser.add_argument("-C", "--config", metavar="CONFIG", action="append", default=None,
                        help="modprobe.d file or directory replacing the default ones "
                             "(repeatable)")
    if blacklist:
        parser.add_argument("-b", "--use-blacklist", action="store_true",
                            help="apply the blacklist to every module, like udev")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """``load``/``unload`` go through a running daemon unless told otherwise."""
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help=f"the daemon's control socket (default {run_path('control')})")
    parser.add_argument("--direct", action="store_true",
                        help="act on the kernel directly even when the daemon runs")


def daemon_client(args: argparse.Namespace) -> Any:
    """A control-socket client when the request is the daemon's to serve, else None.

    The daemon serves the running kernel's default tree only: with -d/-S/-C or
    --direct the caller acts itself, as it does when no daemon answers.
    """
    if args.direct or args.dirname or args.version or args.config:
        return None
    from kmodd.daemon.control import DEFAULT_SOCKET, Client

    return Client.try_connect(args.socket or DEFAULT_SOCKET, timeout=None)


def report(args: argparse.Namespace, ok: bool, message: str, as_json: dict[str, Any]) -> int:
    """Print an outcome as -q, --json or plain text ask; the exit status."""
    if args.json and not args.quiet:
        print(json.dumps(as_json, indent=2))
    elif ok and not args.quiet:
        print(message)
    elif not ok and not args.quiet:
        print(f"kmodctl {args.command}: {message}", file=sys.stderr)
    return 0 if ok else 1


def tree_from_args(args: argparse.Namespace) -> tuple[Root, str]:
    """The root and kernel version an invocation asks for."""
    modules_base = Path(args.dirname) if args.dirname else None
    root = Root(modules_base=modules_base)
    version = args.version or running_kernel_version()
    return root, version
