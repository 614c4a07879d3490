"""The daemon's vocabulary: what a request is, what it came to, and how to submit one.

Every request source (uevents, coldplug, kernel requests, modules-load.d,
the control socket), the scheduler, the service and the CLI speak these
types; none of them needs the scheduler to name them.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from kmodd.record import dataclass

if TYPE_CHECKING:       # the CLI imports this module: keep its start-up light
    from concurrent.futures import Future


class RequestKind(StrEnum):
    """Where a request came from; compares and serialises as its plain string."""

    MODALIAS = "modalias"          # a uevent's MODALIAS
    COLDPLUG = "coldplug"          # a device's modalias found by the coldplug walk
    KERNEL = "kernel"              # request_module() through the request helper
    ADMIN = "admin"                # kmodctl load
    MODULES_LOAD = "modules-load"  # modules-load.d, /etc/modules, modules_load=

    @property
    def is_device(self) -> bool:
        """Asked for a device (its modalias), as udev's kmod builtin does."""
        return self in (RequestKind.MODALIAS, RequestKind.COLDPLUG)

    @property
    def blacklist_all(self) -> bool:
        """Device-driven requests honour the blacklist for every module, like udev;
        kernel and administrator requests only for aliases, like modprobe."""
        # systemd-modules-load probes with KMOD_PROBE_APPLY_BLACKLIST too.
        return self.is_device or self is RequestKind.MODULES_LOAD

    @property
    def dedup_kind(self) -> RequestKind:
        """coldplug and uevent requests behave the same (udev blacklist rules)."""
        return RequestKind.MODALIAS if self is RequestKind.COLDPLUG else self


class OutcomeStatus(StrEnum):
    """What one request came to; compares and serialises as its plain string."""

    LOADED = "loaded"
    PRESENT = "present"
    BUILTIN = "builtin"
    FAILED = "failed"
    UNRESOLVED = "unresolved"
    BLACKLISTED = "blacklisted"
    BACKOFF = "backoff"
    RUNAWAY = "runaway"

    @property
    def is_success(self) -> bool:
        """The module is in the kernel now: what modprobe exits 0 for."""
        return self in (OutcomeStatus.LOADED, OutcomeStatus.PRESENT, OutcomeStatus.BUILTIN)


def is_device_kind(kind: str) -> bool:
    """:attr:`RequestKind.is_device` for a kind read back as text (the state file)."""
    return kind in (RequestKind.MODALIAS.value, RequestKind.COLDPLUG.value)


OUTCOME_STATUSES: tuple[str, ...] = tuple(s.value for s in OutcomeStatus)
# As plain strings, for statuses read back from the control protocol.
SUCCESS_STATUSES: frozenset[str] = frozenset(s.value for s in OutcomeStatus if s.is_success)


@dataclass(frozen=True)
class Request:
    kind: RequestKind
    key: str             # the modalias, the request_module() name, or the admin's name/alias
    devpath: str | None = None
    requested_by: str = ""     # e.g. "uevent", "coldplug", "kernel", "kmodctl uid=0"
    options: str = ""

    def __post_init__(self) -> None:
        # A plain string names a kind too; an unknown one is refused here.
        object.__setattr__(self, "kind", RequestKind(self.kind))

    @property
    def blacklist_all(self) -> bool:
        return self.kind.blacklist_all

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "key": self.key, "devpath": self.devpath,
                "requested_by": self.requested_by, "options": self.options}


@dataclass(frozen=True)
class Outcome:
    request: Request
    status: OutcomeStatus
    modules: tuple[str, ...]
    error: str | None = None
    errno: int | None = None
    failed: tuple[str, ...] = ()     # the modules whose own load failed, when status is failed

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", OutcomeStatus(self.status))

    @property
    def ok(self) -> bool:
        return self.status.is_success

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request.to_dict(), "status": self.status.value,
                "modules": list(self.modules), "error": self.error, "errno": self.errno,
                "failed": list(self.failed)}


# The one entry point every request source is given (Scheduler.submit).
Submit = Callable[[Request], "Future[Outcome]"]
