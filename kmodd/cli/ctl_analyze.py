"""``kmodctl blame|critical-chain|plot``: the daemon's load log, read like
``systemd-analyze blame|critical-chain|plot`` reads a boot.

All three ask the daemon once (the read-only ``loads`` operation) and do the
rest here; imports stay light (no pyudev, no pyelftools).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kmodd.daemon.control import DEFAULT_SOCKET, Client, ControlError
from kmodd.daemon.loadlog import ChainLink, LoadRecord, blame, critical_chain, fmt_seconds


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    if command != "plot":
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "critical-chain":
        parser.add_argument("module", nargs="?", default=None,
                            help="the module whose chain to show (default: what ended coldplug)")


def fetch(socket: str) -> dict[str, Any]:
    """The daemon's ``loads`` reply; raises ControlError/OSError."""
    client = Client.try_connect(socket, timeout=30.0)
    if client is None:
        raise ControlError(f"kmodd is not running (no daemon at {socket})")
    with client:
        return client.call("loads")


def records_of(reply: dict[str, Any]) -> list[LoadRecord]:
    out = []
    for item in reply.get("records") or ():
        try:
            out.append(LoadRecord.from_dict(item))
        except (KeyError, TypeError, ValueError):
            continue        # a record from a newer daemon this client cannot read
    return out


def blame_lines(records: list[LoadRecord]) -> list[str]:
    lines = [f"{'In kernel':>10} {'Dep wait':>9}  {'Module':<24} {'Source':<15} Request"]
    for r in blame(records):
        key = r.key if len(r.key) <= 60 else r.key[:57] + "..."   # CPU modaliases are long
        line = (f"{fmt_seconds(r.in_kernel):>10} {fmt_seconds(r.dep_wait):>9}  "
                f"{r.module:<24} {r.source:<15} {key}")
        if r.failed:
            line += f"  FAILED: {r.error or 'failed'}"
        lines.append(line)
    return lines


def _link_text(link: ChainLink, above: ChainLink | None) -> str:
    r = link.record
    text = f"{r.module} @{fmt_seconds(r.start)} +{fmt_seconds(r.in_kernel)}"
    if r.failed:
        text += " FAILED"
    if above is not None and link.reason == "dependency":
        text += f" (dependency {above.record.module} waited for)"
    elif above is not None and link.reason == "async":
        text += f" ({above.record.module} returned only once {r.module}'s async probes were done)"
    return text


def chain_lines(chain: list[ChainLink], module: str | None,
                marks: dict[str, float]) -> list[str]:
    lines = ['The time when the load began is printed after the "@" character.',
             'The time it spent in the kernel is printed after the "+" character.', ""]
    if not chain:
        lines.append(f"no load of {module} recorded" if module else "no coldplug load recorded")
        return lines
    if module is None:
        end = max(chain[0].record.end, marks.get("coldplug-end", 0.0))
        lines.append(f"coldplug done @{fmt_seconds(end)}")
        indent = 0
    else:
        indent = -1
    above: ChainLink | None = None
    for link in chain:
        if indent < 0:
            lines.append(_link_text(link, above))
        else:
            lines.append("  " * indent + "└─" + _link_text(link, above))
        indent += 1
        above = link
    return lines


def chain_json(chain: list[ChainLink]) -> list[dict[str, Any]]:
    return [{**link.record.to_dict(), "reason": link.reason} for link in chain]


def run(args: argparse.Namespace) -> int:
    command = args.command
    try:
        reply = fetch(args.socket)
    except ControlError as exc:
        print(f"kmodctl {command}: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, OSError) as exc:
        print(f"kmodctl {command}: {exc}", file=sys.stderr)
        return 1
    records = records_of(reply)
    if command == "blame":
        if args.json:
            json.dump([r.to_dict() for r in blame(records)], sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print("\n".join(blame_lines(records)))
        return 0
    if command == "critical-chain":
        from kmodd.resolution.names import modname_normalize
        module = modname_normalize(args.module) if args.module else None
        chain = critical_chain(records, module)
        if args.json:
            json.dump({"module": module, "chain": chain_json(chain)}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print("\n".join(chain_lines(chain, module, reply.get("marks") or {})))
        return 0 if chain else 1
    if command == "plot":
        from kmodd.cli.plot import render_svg
        sys.stdout.write(render_svg(records, critical_chain(records),
                                    marks=reply.get("marks") or {},
                                    anchor=reply.get("anchor") or {}))
        return 0
    print(f"kmodctl: unknown command {command!r}", file=sys.stderr)
    return 2
