"""Idle memory: what the daemon gives back once coldplug is done.

Coldplug reads the module indexes (modules.alias.bin and modules.dep.bin,
about 2 MB on Debian's kernel) and allocates while it loads; afterwards the
daemon mostly sleeps.  The indexes are dropped (re-read on the next lookup:
a hotplug costs a read of the files again, a few milliseconds) and glibc is
asked to return the free pages of its heap (``malloc_trim(3)``), which it
otherwise keeps: about 5 of the 26 MB after a 20-device coldplug on the
development host (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import gc
import logging

LOG = logging.getLogger(__name__)


def _malloc_trim() -> bool:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):       # not glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def release_memory(resolver: object) -> None:
    """Drop the resolver's index caches and return free heap pages; never raises."""
    try:
        drop = getattr(getattr(resolver, "tree", None), "drop_caches", None)
        if drop is not None:
            drop()
        gc.collect()
        _malloc_trim()
    except Exception as exc:
        LOG.debug("releasing memory after coldplug: %s", exc)
