"""kmodctl: the administrator's front end.

Each sub-command lives in its own ``kmodd.cli.ctl_*`` module exposing
``add_arguments(parser)`` and ``run(args) -> int``; only the one asked for is
imported, so a resolve does not pay for the daemon client and vice versa.
A sub-command module may offer ``parse_fast(command, argv)``: when it
understands the command line, argparse is never imported (the socket-only
commands, ``kmodctl settle`` first of all, start in a few imports).
"""

from __future__ import annotations

import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "resolve": ("kmodd.cli.ctl_resolve", "print the modules each alias resolves to"),
    "deps": ("kmodd.cli.ctl_deps", "print the load plan like modprobe --show-depends"),
    "info": ("kmodd.cli.ctl_info", "show module information like modinfo"),
    "load": ("kmodd.cli.ctl_load", "load a module and its dependencies like modprobe"),
    "unload": ("kmodd.cli.ctl_unload", "unload a module like modprobe -r"),
    "status": ("kmodd.cli.ctl_daemon", "show the daemon's state"),
    "list": ("kmodd.cli.ctl_daemon", "list modules with who loaded them and why"),
    "why": ("kmodd.cli.ctl_daemon", "tell what caused a module to be loaded"),
    "monitor": ("kmodd.cli.ctl_daemon", "stream load outcomes as they happen"),
    "settle": ("kmodd.cli.ctl_daemon", "wait until coldplug is done and nothing is pending"),
    "reload": ("kmodd.cli.ctl_daemon", "make the daemon reload configuration and indexes"),
    "blame": ("kmodd.cli.ctl_analyze", "every load since boot, slowest first"),
    "critical-chain": ("kmodd.cli.ctl_analyze",
                       "the chain of waits that decided when coldplug (or a module) was done"),
    "plot": ("kmodd.cli.ctl_analyze", "an SVG timeline of the loads (kmodctl plot > loads.svg)"),
    "deny": ("kmodd.cli.ctl_deny", "never load these modules, whoever asks (no module: list)"),
    "allow": ("kmodd.cli.ctl_deny", "take modules off the deny list"),
}


def _usage() -> str:
    lines = ["usage: kmodctl COMMAND [options]", "       kmodctl --version", "",
             "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from kmodd import version

        print(f"kmodctl {version()}")
        return 0
    command = args[0]
    if command not in COMMANDS:
        print(f"kmodctl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    name = COMMANDS[command][0]
    __import__(name)            # not importlib: one import less on the fast path
    module = sys.modules[name]
    parse_fast = getattr(module, "parse_fast", None)
    parsed = parse_fast(command, args[1:]) if parse_fast is not None else None
    if parsed is None:
        import argparse

        parser = argparse.ArgumentParser(prog=f"kmodctl {command}",
                                         description=COMMANDS[command][1])
        module.add_arguments(parser, command)
        parsed = parser.parse_args(args[1:])
        parsed.command = command
    try:
        return int(module.run(parsed))
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
