"""Test bed: boots Debian's real kernel under QEMU and runs commands in it.

See ``testbed.vm.VM`` and ``python -m testbed --help``.
"""

from testbed.initramfs import TestbedError, build, find_kernel
from testbed.vm import (
    DEFAULT_DEVICES,
    VM,
    BootError,
    Completed,
    GuestCommandError,
    GuestTimeout,
    QMPError,
    booted,
)

__all__ = [
    "DEFAULT_DEVICES",
    "VM",
    "BootError",
    "Completed",
    "GuestCommandError",
    "GuestTimeout",
    "QMPError",
    "TestbedError",
    "booted",
    "build",
    "find_kernel",
]
