"""kmodctl deps: the load plan, printed as ``modprobe --show-depends`` prints it.

Like modprobe with ``--show-depends``, what is already loaded is ignored.
``-b`` applies the blacklist to every module a request resolves to (udev's
behaviour) instead of only to modules found through an alias.
"""

from __future__ import annotations

import argparse
import json
import sys

from kmodd.cli.common import add_tree_options, tree_from_args
from kmodd.record import asdict
from kmodd.resolution.index import IndexCorrupt
from kmodd.resolution.plan import Plan
from kmodd.resolution.resolve import open_resolver


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_tree_options(parser)
    parser.add_argument("requests", nargs="+", metavar="NAME|ALIAS",
                        help="module name or alias")


def plan_json(plan: Plan) -> dict[str, object]:
    steps = []
    for step in plan.steps:
        d = asdict(step)
        d["role"] = step.role.value
        d["deps"] = list(step.deps)
        steps.append(d)
    return {"request": plan.request, "resolved": plan.resolved, "targets": list(plan.targets),
            "blacklisted": list(plan.blacklisted), "steps": steps}


def run(args: argparse.Namespace) -> int:
    root, version = tree_from_args(args)
    if not root.modules_dir(version).is_dir():
        print(f"kmodctl deps: {root.modules_dir(version)} is not a module directory",
              file=sys.stderr)
        return 2
    resolver = open_resolver(root, version, args.config)
    blacklist_all = bool(args.use_blacklist)
    status = 0
    try:
        for request in args.requests:
            if args.json:
                plan = resolver.plan(request, blacklist_all=blacklist_all)
                found = plan.resolved or bool(plan.blacklisted)
                print(json.dumps(plan_json(plan)))
            else:
                lines, found = resolver.show_depends(request, blacklist_all=blacklist_all)
                for line in lines:
                    print(line)
            if not found:
                status = 1
                print(f"kmodctl deps: module {request} not found in directory "
                      f"{root.modules_dir(version)}", file=sys.stderr)
    except IndexCorrupt as exc:
        sys.stdout.flush()
        print(f"kmodctl deps: {exc}", file=sys.stderr)
        return 2
    return status
