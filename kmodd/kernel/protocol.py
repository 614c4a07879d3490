"""The one protocol kmodd uses to talk to a kernel.

``kmodd.kernel.real.RealKernel`` implements it with ctypes syscalls, procfs
and sysfs; ``kmodd.kernel.sim.SimKernel`` with a temporary tree, for fast
unit and fault-injection tests.  Nothing else in kmodd issues a module
syscall or reads /proc/modules.
"""

from __future__ import annotations

from enum import StrEnum

from kmodd.record import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    # The daemon reaches its first finit_module through this module without
    # importing typing (kmodd.kernel.early); nothing checks for the protocol
    # at run time, so there it is a plain base class.
    Protocol = object


class InitState(StrEnum):
    LIVE = "live"
    COMING = "coming"
    GOING = "going"
    BUILTIN = "builtin"
    ABSENT = "absent"


@dataclass(frozen=True)
class LoadedModule:
    """One line of /proc/modules."""

    name: str
    size: int
    refcount: int | None          # None when the kernel prints '-' (no unload support)
    holders: tuple[str, ...]
    state: str                    # Live / Loading / Unloading
    permanent: bool = False


class KernelError(Exception):
    """A module syscall failed; ``message`` is meant for an administrator."""

    def __init__(self, errno_: int, message: str, module: str = "") -> None:
        super().__init__(message)
        self.errno = errno_
        self.message = message
        self.module = module


class Kernel(Protocol):
    def load_module(self, name: str, path: str, params: str = "", *, force: bool = False) -> bool:
        """Insert the module at ``path``: finit_module, decompressing in user space
        when the kernel cannot, init_module as fallback.  EEXIST is success.
        Returns True when this call inserted it, False when it was already
        loaded (EEXIST).  Raises KernelError otherwise."""
        ...

    def unload_module(self, name: str, *, force: bool = False) -> None:
        """delete_module(name, O_NONBLOCK [| O_TRUNC when force]). Raises KernelError."""
        ...

    def modules(self) -> dict[str, LoadedModule]:
        """Parse /proc/modules."""
        ...

    def initstate(self, name: str) -> InitState:
        """/sys/module/NAME/initstate; BUILTIN when the directory exists without it."""
        ...

    def refcount(self, name: str) -> int | None: ...

    def holders(self, name: str) -> tuple[str, ...]: ...

    def bound_devices(self, name: str) -> int:
        """How many devices are bound to the drivers under /sys/module/NAME/drivers."""
        ...

    def parameters(self, name: str) -> dict[str, str]: ...

    def instance(self, name: str) -> str | None:
        """An identity of the loaded module that changes on every load (None:
        not loaded, or unreadable), so autoclean can tell the module it loaded
        from the same name loaded again by someone else."""
        ...

    def modules_disabled(self) -> bool: ...

    def link_kinds(self) -> set[str]:
        """Kinds of the network links that exist (dummy, bridge...): a link holds
        no reference on the module providing its type, yet dies with it."""
        ...

    def supports_modules(self) -> bool:
        """False on a kernel built without module support (no /proc/modules)."""
        ...
