"""What every front end's argument parser shares: ``--version``.

At the bottom of the package so the daemon's settings parser and kmodctl's
both use it without one importing the other's layer.
"""

from __future__ import annotations

import argparse
from typing import Any


class VersionAction(argparse.Action):
    """``--version``: print "PROG VERSION" and exit; the version is read only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from kmodd import version

        print(f"{parser.prog.split()[0]} {version()}")
        parser.exit()
