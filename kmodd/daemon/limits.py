"""Limits the scheduler enforces and the settings validate against."""

from __future__ import annotations

import os

# The kernel warns "request_module: runaway loop" past this many concurrent
# modprobe calls (kernel/module/kmod.c); a loader should never need more.
MAX_KMOD_CONCURRENT = 50
# Requests for one key (or loads of one module) within RUNAWAY_WINDOW seconds
# before they are refused as a runaway.  A real loop (a module asking for
# itself, a device re-announcing itself) runs far faster; a script calling
# the request helper in a loop or a device burst stays well below.
RUNAWAY_LIMIT = 100
RUNAWAY_WINDOW = 10.0


def default_max_workers(cpus: int | None = None) -> int:
    """Loads mostly wait (probing hardware, firmware, and every module init ends
    by waiting for all asynchronous probes in the system, a SCSI bus scan
    included), so 8 plus twice the CPUs, as udevd sizes its worker pool, never
    past the kernel's own limit."""
    count = cpus if cpus is not None else (os.cpu_count() or 1)
    return clamp_workers(8 + 2 * count)


def clamp_workers(n: int) -> int:
    return max(1, min(int(n), MAX_KMOD_CONCURRENT))
