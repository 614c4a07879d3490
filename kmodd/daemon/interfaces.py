"""What the daemon needs from its collaborators, said once.

The real ones (kmodd.resolution.resolve.Resolver, kmodd.kernel.loader.Loader,
the request sources) follow these protocols, and so do the test fakes: the
service never probes a collaborator for what it can do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kmodd.daemon.requests import Submit
from kmodd.kernel.loader import StepResult
from kmodd.kernel.protocol import InitState
from kmodd.resolution.plan import ModuleStep, Plan


class Planner(Protocol):
    """Turns a request's key into a load plan (what the scheduler needs)."""

    def plan(self, request: str, *, extra_options: str = "",
             blacklist_all: bool = False) -> Plan: ...


class Resolver(Planner, Protocol):
    """Everything the daemon asks of modprobe.d and the module indexes."""

    def remove_command(self, module: str) -> str | None:
        """modprobe.d's remove command for ``module`` (first matching pattern)."""
        ...

    def blacklisted(self, module: str) -> bool:
        """``module`` is named by a blacklist line (modprobe.d or the command line)."""
        ...


class StepLoader(Protocol):
    """Loads one module of a plan (what the scheduler needs)."""

    def load_step(self, step: ModuleStep) -> StepResult: ...


class ModuleLoader(StepLoader, Protocol):
    """Loads and unloads, as kmodd.kernel.loader.Loader does."""

    def unload(self, name: str, *, remove_command: str | None = None,
               force: bool = False) -> StepResult: ...


class KernelState(Protocol):
    """The one kernel read the scheduler makes before loading."""

    def initstate(self, name: str) -> InitState: ...


class Readable(Protocol):
    """A file descriptor the event loop watches."""

    def fileno(self) -> int: ...
    def on_readable(self) -> None: ...
    def close(self) -> None: ...


class Source(Readable, Protocol):
    """A request source: feeds ``submit`` when its descriptor is readable."""

    # True for a source that hears the kernel's uevents itself: udev may
    # then stand back from loading drivers (kmodd.root.Root.udev_handover).
    udev_handover: bool


class ColdplugReport(Protocol):
    @property
    def loaded(self) -> Sequence[str]: ...


SourceFactory = Callable[[Submit], Source]
ColdplugFn = Callable[[Submit, Callable[[int], None]], "ColdplugReport | None"]
WatcherFactory = Callable[[Callable[[], None]], Readable]
