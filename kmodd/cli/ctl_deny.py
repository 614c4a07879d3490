"""``kmodctl deny|allow [MODULE...]``: the persistent hard deny list.

With the daemon running it takes effect at once (``deny``/``allow`` control
operations, root only); without it the list under ``/var/lib/kmodd`` is
edited directly and read at the daemon's next start.  ``kmodctl deny`` with
no module lists what is denied and by which list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kmodd.daemon.control import DEFAULT_SOCKET, Client, ControlError


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="filesystem root holding var/lib/kmodd (without a daemon)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("modules", nargs="*" if command == "deny" else "+", metavar="MODULE",
                        help="module names" + (" (none: list)" if command == "deny" else ""))


def _offline(args: argparse.Namespace, deny: bool) -> tuple[int, list[dict[str, Any]]]:
    from kmodd.daemon.deny import deny_file, read_deny_file, write_deny_file
    from kmodd.resolution.names import modname_normalize
    from kmodd.root import Root
    path = deny_file(Root(Path(args.root)))
    names = set(read_deny_file(path))
    results = []
    for module in args.modules:
        name = modname_normalize(module)
        changed = (name not in names) if deny else (name in names)
        (names.add if deny else names.discard)(name)
        results.append({"module": name, "changed": changed, "denied": deny})
    write_deny_file(path, names)
    return 0, results


def _print_list(deny: dict[str, list[str]], as_json: bool) -> None:
    if as_json:
        json.dump(deny, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return
    for name in deny.get("setting", []):
        print(f"{name}\t(deny setting in kmodd.conf)")
    for name in deny.get("persistent", []):
        print(f"{name}\t(kmodctl deny)")


def run(args: argparse.Namespace) -> int:
    command = args.command
    deny = command == "deny"
    client = Client.try_connect(args.socket, timeout=30.0)
    try:
        if client is None:
            if not args.modules:
                from kmodd.daemon.deny import deny_file, read_deny_file
                from kmodd.root import Root
                _print_list({"persistent": read_deny_file(deny_file(Root(Path(args.root))))},
                            args.json)
                return 0
            rc, results = _offline(args, deny)
            note = "kmodd is not running: the list takes effect at its next start"
        else:
            with client:
                if not args.modules:
                    _print_list(client.status().get("deny") or {}, args.json)
                    return 0
                results = [client.call(command, module=m) for m in args.modules]
            rc, note = 0, ""
    except ControlError as exc:
        print(f"kmodctl {command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kmodctl {command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(results, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for r in results:
            state = "denied" if deny else "allowed"
            print(f"{r['module']}: {state}" + ("" if r.get("changed") else " (already)"))
            if r.get("note"):
                print(f"  {r['note']}")
        if note:
            print(note, file=sys.stderr)
    return rc
