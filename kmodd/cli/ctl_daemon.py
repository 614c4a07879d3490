"""``kmodctl status|list|why|monitor|settle|reload``: talk to the running daemon.

These only talk to the socket, and ``settle`` runs at every boot: the
module imports nothing but ``kmodd.daemon.client`` (no argparse, json,
socket or typing modules; tests/unit/test_kmodctl_fast.py holds it to that).
:func:`parse_fast` reads the usual command lines itself; anything it does
not recognise (``--help``, abbreviations, errors) goes through argparse.
"""

from __future__ import annotations

import sys
import time

from kmodd.daemon.client import DEFAULT_SOCKET, Client, ControlError, dumps

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

# Options taking a value, per command (argparse's spelling in add_arguments).
_VALUE_OPTIONS = {"settle": {"-t": "timeout", "--timeout": "timeout"},
                  "monitor": {"-n": "count", "--count": "count"}}
_CONVERT = {"timeout": float, "count": int}


class FastArgs:
    """What argparse would produce for the command lines parse_fast accepts."""

    module: str     # why only

    def __init__(self, command: str) -> None:
        self.command = command
        self.socket = DEFAULT_SOCKET
        self.json = False
        if command == "status":
            self.prometheus = False
        elif command == "settle":
            self.timeout = 120.0
        elif command == "monitor":
            self.count = 0


def parse_fast(command: str, argv: list[str]) -> FastArgs | None:
    """The parsed command line, or None to leave it to argparse (help, errors,
    abbreviated or attached option values: whatever is not the plain form)."""
    args = FastArgs(command)
    positional: list[str] = []
    values = {"--socket": "socket", **_VALUE_OPTIONS.get(command, {})}
    flags = {"--json": "json"}
    if command == "status":
        flags["--prometheus"] = "prometheus"
    i = 0
    only_positional = False
    while i < len(argv):
        arg = argv[i]
        i += 1
        if only_positional or not arg.startswith("-") or arg == "-":
            positional.append(arg)
        elif arg == "--":
            only_positional = True
        elif arg in flags:
            setattr(args, flags[arg], True)
        elif arg in values:
            if i >= len(argv) or argv[i].startswith("-"):
                return None
            dest = values[arg]
            try:
                setattr(args, dest, _CONVERT.get(dest, str)(argv[i]))
            except ValueError:
                return None
            i += 1
        else:
            return None
    if command == "why":
        if len(positional) != 1:
            return None
        args.module = positional[0]
    elif positional:
        return None
    return args


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "why":
        parser.add_argument("module", help="module name")
    elif command == "status":
        parser.add_argument("--prometheus", action="store_true",
                            help="Prometheus text format, for node_exporter's textfile collector")
    elif command == "settle":
        parser.add_argument("-t", "--timeout", type=float, default=120.0, metavar="SECONDS",
                            help="give up after SECONDS (default 120; 0 only checks)")
    elif command == "monitor":
        parser.add_argument("-n", "--count", type=int, default=0, metavar="N",
                            help="exit after N outcomes (default: run until interrupted)")


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0, int(time.time() - ts))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def _why_text(why: dict[str, Any] | None) -> str:
    if not why:
        return "-"
    text = f"{why.get('kind')} {why.get('key')}"
    if why.get("role") and why["role"] != "target" and why.get("via"):
        text = f"{why['role']} of {' '.join(why['via'])} ({text})"
    if why.get("devpath"):
        text += f" [{why['devpath']}]"
    return text


def _print_json(obj: Any) -> None:
    sys.stdout.write(dumps(obj, indent=2, sort_keys=True) + "\n")


def _status(client: Client, as_json: bool) -> int:
    st = client.status()
    if as_json:
        _print_json(st)
        return 0
    out = st.get("outcomes", {})
    ac = st.get("autoclean", {})
    print(f"kmodd {st.get('version')} pid {st.get('pid')}, up {st.get('uptime', 0):.0f}s"
          + (" (stopping)" if st.get("stopping") else ""))
    print(f"  coldplug:  {st.get('coldplug')}; settled: {'yes' if st.get('settled') else 'no'}")
    print(f"  workers:   {st.get('loading')} loading of {st.get('workers')}, "
          f"{st.get('pending')} request(s) pending")
    print(f"  requests:  {st.get('submitted')} submitted; "
          + ", ".join(f"{k} {v}" for k, v in sorted(out.items()) if v))
    print(f"  loaded by kmodd: {st.get('loaded_by_kmodd')}; modules in backoff: "
          f"{st.get('backoff')}")
    if st.get("runaway"):
        print(f"  runaway:   {st['runaway']}")
    interval = ac.get("interval") or 0
    print("  autoclean: " + (f"every {interval:g}s, idle timeout {ac.get('idle_timeout'):g}s, "
                             f"{ac.get('unloaded')} unloaded" if interval else "disabled"))
    if st.get("last_reload_error"):
        print(f"  last reload failed: {st['last_reload_error']}")
    return 0


def _list(client: Client, as_json: bool) -> int:
    mods = client.list_modules()["modules"]
    if as_json:
        _print_json(mods)
        return 0
    print(f"{'Module':<24} {'State':<9} {'Refs':>4} {'kmodd':<5} {'Loaded':<19} {'Idle':>5}  Why")
    for m in mods:
        refs = "-" if m.get("refcount") is None else str(m["refcount"])
        print(f"{m['name']:<24} {m['state']:<9} {refs:>4} "
              f"{'yes' if m['loaded_by_kmodd'] else 'no':<5} {_fmt_time(m.get('loaded_at')):<19} "
              f"{_ago(m.get('idle_since')):>5}  {_why_text(m.get('why'))}")
    return 0


def _why(client: Client, module: str, as_json: bool) -> int:
    w = client.why(module)
    if as_json:
        _print_json(w)
        return 0
    name = w["module"]
    if w.get("loaded_by_kmodd"):
        print(f"{name}: loaded by kmodd at {_fmt_time(w.get('loaded_at'))}")
        role = w.get("role") or "target"
        if role != "target" and w.get("via"):
            print(f"  as {role} of {' '.join(w['via'])}")
        print(f"  request:      {w.get('kind')} {w.get('key')}")
        if w.get("devpath"):
            print(f"  device:       {w['devpath']}")
        if w.get("kind") == "modules-load":
            print(f"  listed in:    {w.get('requested_by') or 'modules-load.d'}")
        elif w.get("requested_by"):
            print(f"  requested by: {w['requested_by']}")
        if w.get("idle_since"):
            print(f"  unused since: {_fmt_time(w['idle_since'])}")
    elif w.get("state") in ("live", "coming", "going"):
        print(f"{name}: {w['state']}, not loaded by kmodd (autoclean leaves it alone)")
    elif w.get("state") == "builtin":
        print(f"{name}: built into the kernel")
    elif w.get("state") == "unknown":
        print(f"{name}: state unknown ({w.get('state_error')})")
    else:
        print(f"{name}: not loaded")
    if w.get("warning"):
        print(f"  WARNING: {w['warning']}: {w.get('how')}")
    elif w.get("denied"):
        print(f"  {w['denied']}")
    fail = w.get("last_failure")
    if fail:
        print(f"  last failure: {fail.get('error')} ({fail.get('failures')} time(s))")
    return 0


def _monitor(client: Client, count: int, as_json: bool) -> int:
    client.settimeout(None)
    stream = client.stream("monitor")
    next(stream)        # the acknowledgement
    if not as_json:
        print("monitoring load outcomes (Ctrl-C to stop)", flush=True)
    for seen, event in enumerate(stream, 1):
        if as_json:
            print(dumps(event, sort_keys=True), flush=True)
        else:
            req = event.get("request", {})
            mods = " ".join(event.get("modules", [])) or "-"
            line = (f"{time.strftime('%H:%M:%S', time.localtime(event.get('time', 0)))} "
                    f"{event.get('status'):<11} {mods:<20} {req.get('kind')} {req.get('key')}")
            if req.get("devpath"):
                line += f" {req['devpath']}"
            if event.get("error"):
                line += f": {event['error']}"
            print(line, flush=True)
        if count and seen >= count:
            break
    return 0


def _settle(client: Client, timeout: float, as_json: bool) -> int:
    # The daemon enforces the timeout; the socket waits a little longer.
    client.settimeout(timeout + 10.0)
    reply = client.settle(timeout)
    if as_json:
        _print_json(reply)
    elif not reply.get("settled"):
        print(f"kmodctl settle: timed out after {timeout:g}s "
              f"({reply.get('pending', '?')} pending, coldplug {reply.get('coldplug', '?')})",
              file=sys.stderr)
        for line in _waiting_lines(reply.get("waiting")):
            print(f"  {line}", file=sys.stderr)
    return 0 if reply.get("settled") else 1


def _waiting_lines(waiting: object) -> list[str]:
    """The daemon's account of what a settle still waits for, one line each."""
    if not isinstance(waiting, dict):
        return []
    lines = []
    for req in waiting.get("requests") or ():
        if not isinstance(req, dict):
            continue
        what = f"{req.get('kind')} {req.get('key')}: {req.get('stage')} for {req.get('age')}s"
        if req.get("waiting_for"):
            what += f", waiting for {' '.join(map(str, req['waiting_for']))}"
        lines.append(what)
    for state, names in sorted((waiting.get("loads") or {}).items()):
        lines.append(f"loads {state}: {' '.join(map(str, names))}")
    if waiting.get("telling"):
        lines.append(f"loads still being recorded: {waiting['telling']}")
    return lines


def run(args: argparse.Namespace) -> int:
    command = args.command
    client = Client.try_connect(args.socket, timeout=30.0)
    if client is None:
        print(f"kmodctl {command}: kmodd is not running (no daemon at {args.socket})",
              file=sys.stderr)
        return 1
    try:
        with client:
            if command == "status" and getattr(args, "prometheus", False):
                from kmodd.cli.prometheus import exposition
                sys.stdout.write(exposition(client.status(), client.call("loads")))
                return 0
            if command == "status":
                return _status(client, args.json)
            if command == "list":
                return _list(client, args.json)
            if command == "why":
                return _why(client, args.module, args.json)
            if command == "monitor":
                return _monitor(client, args.count, args.json)
            if command == "settle":
                return _settle(client, args.timeout, args.json)
            if command == "reload":
                reply = client.reload()
                if args.json:
                    _print_json(reply)
                else:
                    print("kmodd reloaded its configuration and the module indexes")
                return 0
    except ControlError as exc:
        print(f"kmodctl {command}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"kmodctl {command}: the daemon did not answer", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kmodctl {command}: {exc}", file=sys.stderr)
        return 1
    print(f"kmodctl: unknown command {command!r}", file=sys.stderr)
    return 2
