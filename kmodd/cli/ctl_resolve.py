"""kmodctl resolve: the modules each alias resolves to, like ``modprobe -R``.

One output line per input, ``ALIAS<TAB>mod1 mod2 ...``.  Startup time
matters (udev rules and scripts call this per device), so the engine is
imported only once the arguments are parsed.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator

from kmodd.cli.common import add_tree_options, tree_from_args


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_tree_options(parser)
    parser.add_argument("aliases", nargs="+", metavar="ALIAS",
                        help="module name or alias; '-' reads them from standard input, "
                             "one per line")


def _stdin_batches() -> Iterator[list[str]]:
    """Lines of standard input, in batches of whatever has arrived.

    Answers are flushed after each batch: a long input streams at full speed,
    and a caller feeding one alias at a time through a pipe gets each answer
    before it sends the next.
    """
    stdin = sys.stdin.buffer
    # read1: whatever is available now, without waiting to fill the buffer.
    read = stdin.read1 if isinstance(stdin, io.BufferedReader) else stdin.read
    tail = b""
    while True:
        chunk = read(65536)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        # Every line answers, empty ones included, so output lines pair with input lines.
        yield [ln.rstrip(b"\r").decode("utf-8", "surrogateescape") for ln in lines]
    if tail:
        yield [tail.rstrip(b"\r").decode("utf-8", "surrogateescape")]


def _batches(aliases: list[str]) -> Iterator[list[str]]:
    for alias in aliases:
        if alias == "-":
            yield from _stdin_batches()
        else:
            yield [alias]


def run(args: argparse.Namespace) -> int:
    from kmodd.resolution.index import IndexCorrupt
    from kmodd.resolution.resolve import open_resolver

    root, version = tree_from_args(args)
    if not root.modules_dir(version).is_dir():
        print(f"kmodctl resolve: {root.modules_dir(version)} is not a module directory",
              file=sys.stderr)
        return 2
    resolver = open_resolver(root, version, args.config)
    resolve = resolver.resolve
    blacklist_all = bool(args.use_blacklist)
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper):
        out.reconfigure(errors="surrogateescape")
    status = 0
    dumps = None
    if args.json:
        import json
        dumps = json.dumps
    try:
        if "-" in args.aliases:
            # A stream of modaliases: the prepared index pays off at once.
            resolver.tree.prepare_aliases()
        for batch in _batches(args.aliases):
            text = []
            for alias in batch:
                names = resolve(alias, blacklist_all=blacklist_all)
                if not names:
                    status = 1
                if dumps is not None:
                    text.append(dumps({"alias": alias, "modules": names}) + "\n")
                else:
                    text.append(f"{alias}\t{' '.join(names)}\n")
            out.write("".join(text))
            out.flush()
    except IndexCorrupt as exc:
        out.flush()
        print(f"kmodctl resolve: {exc}", file=sys.stderr)
        return 2
    return status
