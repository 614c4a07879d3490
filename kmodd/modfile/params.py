"""Checking an administrator's module parameters against the module's .modinfo.

The kernel only logs "unknown parameter ignored" and loads the module anyway;
for parameters someone typed, refusing with the list of valid ones is kinder.
Used by direct loads and by the daemon for admin requests alike.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from kmodd.resolution.plan import Plan, Role

# Accepted by every module: the dynamic-debug hook (kernel/module/main.c).
_MAGIC_PARAMS = {"dyndbg"}


def unknown_params(path: str, params: Sequence[str]) -> tuple[list[str], list[str]]:
    """(unknown names among ``params``, the module's declared names), from its .modinfo."""
    from kmodd.modfile.elf import read_modinfo

    declared = [p.name for p in read_modinfo(path).parm]
    known = {n.replace("-", "_") for n in declared} | _MAGIC_PARAMS
    unknown = []
    for word in params:
        key = word.partition("=")[0].replace("-", "_")
        # "foo.bar" would be a parameter of another module: not ours to judge.
        if key and "." not in key and key not in known:
            unknown.append(key)
    return unknown, declared


def split_params(options: str) -> list[str]:
    """An option string as ``param=value`` words (kernel-style double quotes)."""
    try:
        return shlex.split(options)
    except ValueError:
        return options.split()


def check_params(plan: Plan, params: Sequence[str]) -> str | None:
    """Why the parameters are refused for a target module of ``plan``, or None."""
    if not params:
        return None
    for step in plan.steps:
        if step.role is not Role.TARGET or step.path is None or step.install_command:
            continue
        try:
            unknown, declared = unknown_params(step.path, params)
        except Exception:   # an unreadable file: loading it will say why more precisely
            continue
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            known = ", ".join(declared) if declared else "none"
            return (f"{step.name}: unknown parameter{plural} {', '.join(unknown)} "
                    f"(the module's parameters: {known})")
    return None
