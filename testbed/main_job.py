"""The README's main job, run by ``scripts/run-main.sh`` (``python -m testbed main``).

Boots the test bed with the dozen default devices, streams the guest console,
and shows what kmodd does on Debian's real kernel.

HOOK for the daemon (issue 4): today the job is ``resolve_modaliases`` —
``kmodctl resolve -b`` over every modalias file in the guest, next to what
``modprobe -b -R`` says.  When the daemon is ready, add a function
``daemon_demo(vm) -> int`` here (start ``kmodd`` in the guest, ``kmodctl
settle``, a QMP hotplug, a kernel request, an autoclean) and point ``JOB`` at
it.  ``KMODD_MAIN_JOB=module:function`` selects another job without editing.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from testbed.vm import VM

MODALIASES = "find /sys/devices -name modalias -exec cat {} + | sort -u"


def resolve_modaliases(vm: VM) -> int:
    """kmodctl resolve over the guest's modalias files, compared with modprobe -R."""
    out = sys.stdout
    out.write(f"\n== Debian kernel {vm.kernel.version if vm.kernel else '?'} booted in "
              f"{vm.boot_seconds:.1f} s; devices: {', '.join(vm.devices)}\n")
    aliases = vm.run(MODALIASES, timeout=120).check().stdout.split()
    out.write(f"== {len(aliases)} distinct modaliases under /sys/devices\n")
    out.write("== kmodctl resolve -b - (modules each device needs)\n")
    ours = vm.run("kmodctl resolve -b -", input="\n".join(aliases) + "\n", timeout=600)
    if ours.stderr:
        sys.stderr.write(ours.stderr)
    if ours.rc not in (0, 1):  # 1 means some alias resolved to nothing, like modprobe -R
        out.write(ours.stdout)
        out.write(f"== kmodctl resolve failed (exit {ours.rc})\n")
        return ours.rc
    resolved = {}
    for line in ours.stdout.splitlines():
        alias, _, mods = line.partition("\t")
        resolved[alias] = mods.split()
        if mods:
            out.write(f"{mods:<32} {alias[:90]}\n")
    reference = vm.run(
        "for a in $(" + MODALIASES + "); do printf '%s\\t' \"$a\"; "
        "modprobe -b -R \"$a\" 2>/dev/null | tr '\\n' ' '; echo; done", timeout=600).check()
    differ = 0
    for line in reference.stdout.splitlines():
        alias, _, mods = line.partition("\t")
        if sorted(mods.split()) != sorted(resolved.get(alias, [])):
            differ += 1
            out.write(f"   differs from modprobe -b -R: {alias}: kmodd {resolved.get(alias)}"
                      f" modprobe {mods.split()}\n")
    wanted = sorted({m for mods in resolved.values() for m in mods})
    out.write(f"== {len(wanted)} modules wanted: {' '.join(wanted)}\n")
    out.write(f"== agreement with modprobe -b -R: {len(resolved) - differ}/{len(resolved)}\n")
    return 0 if differ == 0 else 1


JOB: Callable[[VM], int] = resolve_modaliases


def selected_job() -> Callable[[VM], int]:
    spec = os.environ.get("KMODD_MAIN_JOB")
    if not spec:
        return JOB
    module, _, name = spec.partition(":")
    job: Callable[[VM], int] = getattr(importlib.import_module(module), name)
    return job


def main(devices: list[str] | None = None, console: bool = True) -> int:
    job = selected_job()
    vm = VM(devices, console=sys.stderr if console else None)
    try:
        vm.boot()
        return job(vm)
    finally:
        vm.shutdown()
