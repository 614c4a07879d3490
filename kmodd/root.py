"""Every filesystem path kmodd touches, hung off one root so tests can use a tree."""

from __future__ import annotations

import os
from pathlib import Path

from kmodd.record import dataclass

# libkmod's search order; earlier directories win for files of the same name.
MODPROBE_D_DIRS = ("etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d",
                   "usr/lib/modprobe.d", "lib/modprobe.d")

# The daemon's runtime directory (the unit's RuntimeDirectory=kmodd): control
# socket, state, request FIFO, hand-over flag, index cache, runtime drop-ins.
# Every path under it comes from here; the settings may still move each one.
RUN_DIR = "run/kmodd"

# While this file exists udev leaves MODALIAS loads to kmodd: the takeover's
# copy of udev's 80-drivers.rules tests for it (systemd/80-drivers.rules, as
# the running system sees it, so the path is fixed).  kmodd creates it once
# it listens to uevents; the unit's ExecStopPost= and a clean stop remove it.
UDEV_HANDOVER = f"{RUN_DIR}/udev-handover"
# What is kept across boots (the unit's StateDirectory=kmodd).
STATE_DIR = "var/lib/kmodd"
DENY_FILE = f"{STATE_DIR}/deny"          # the persistent deny list (kmodctl deny)


@dataclass(frozen=True)
class Root:
    """A filesystem root: ``/`` on a real machine, a temporary tree in tests.

    ``modules_base`` mirrors ``modprobe -d``: the directory that holds
    ``lib/modules/VERSION``.  It defaults to the root itself.
    """

    base: Path = Path("/")
    modules_base: Path | None = None

    def path(self, relative: str) -> Path:
        return self.base / relative.lstrip("/")

    def modules_dir(self, version: str) -> Path:
        base = self.modules_base if self.modules_base is not None else self.base
        return base / "lib/modules" / version

    def modprobe_dirs(self) -> list[Path]:
        return [self.path(d) for d in MODPROBE_D_DIRS]

    @property
    def sys(self) -> Path:
        return self.path("sys")

    @property
    def proc(self) -> Path:
        return self.path("proc")

    @property
    def kmodd_run(self) -> Path:
        return self.path(RUN_DIR)

    @property
    def udev_handover(self) -> Path:
        return self.path(UDEV_HANDOVER)

    @property
    def state_dir(self) -> Path:
        return self.path(STATE_DIR)

    @property
    def deny_file(self) -> Path:
        return self.path(DENY_FILE)


def run_path(name: str = "") -> str:
    """``/run/kmodd/NAME`` on the running system (``/run/kmodd`` without a name):
    the default places the settings start from."""
    return f"/{RUN_DIR}/{name}" if name else f"/{RUN_DIR}"


def running_kernel_version(root: Root | None = None) -> str:
    """The release of the running kernel (``uname -r``), read under the root when it has one."""
    if root is not None and root.base != Path("/"):
        release = root.path("proc/sys/kernel/osrelease")
        if release.exists():
            return release.read_text().strip()
    return os.uname().release
