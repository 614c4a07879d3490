"""kmodctl resolve: the modules each alias resolves to, like ``modprobe -R``.

One output line per input, ``ALIAS<TAB>mod1 mod2 ...``.  Startup time
matters (udev rules and scripts call this per device), so the engine is
imported only once the arguments are parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from kmodd.cli.common import add_tree_options, tree_from_args


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_tree_options(parser)
    parser.add_argument("aliases", nargs="+", metavar="ALIAS",
                        help="module name or alias; '-' reads them from standard input, "
                             "one per line")


def _inputs(aliases: list[str]) -> Iterator[str]:
    for alias in aliases:
        if alias != "-":
            yield alias
            continue
        # Every line answers, empty ones included, so output lines pair with input lines.
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    from kmodd.index import IndexCorrupt
    from kmodd.resolve import open_resolver

    root, version = tree_from_args(args)
    if not root.modules_dir(version).is_dir():
        print(f"kmodctl resolve: {root.modules_dir(version)} is not a module directory",
              file=sys.stderr)
        return 2
    resolver = open_resolver(root, version, args.config)
    resolve = resolver.resolve
    blacklist_all = bool(args.use_blacklist)
    write = sys.stdout.write
    status = 0
    try:
        if args.json:
            import json
            for alias in _inputs(args.aliases):
                names = resolve(alias, blacklist_all=blacklist_all)
                status |= not names
                write(json.dumps({"alias": alias, "modules": names}) + "\n")
        else:
            for alias in _inputs(args.aliases):
                names = resolve(alias, blacklist_all=blacklist_all)
                status |= not names
                write(f"{alias}\t{' '.join(names)}\n")
    except IndexCorrupt as exc:
        sys.stdout.flush()
        print(f"kmodctl resolve: {exc}", file=sys.stderr)
        return 2
    return 1 if status else 0
