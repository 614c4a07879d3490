"""Plain data shared by resolution, loading and scheduling."""

from __future__ import annotations

from enum import StrEnum

from kmodd.record import dataclass, field


class Role(StrEnum):
    """Why a module is part of a plan."""

    SOFTDEP_PRE = "softdep-pre"
    DEPENDENCY = "dependency"
    TARGET = "target"
    SOFTDEP_POST = "softdep-post"


@dataclass(frozen=True)
class ModuleStep:
    """One module of a load plan.

    ``deps`` are the module's own hard dependencies (from modules.dep), so a
    scheduler can start it as soon as those are live.  ``install_command`` is
    set when modprobe.d replaces the load with an ``install`` command; the
    loader runs that instead of loading ``path``.  It should be the command as
    written, ``$CMDLINE_OPTS`` included: the loader substitutes ``options``
    shell-quoted (kmodd.kernel.commands), so request text never reaches the shell raw.
    """

    name: str
    path: str | None
    options: str = ""
    builtin: bool = False
    install_command: str | None = None
    deps: tuple[str, ...] = ()
    role: Role = Role.TARGET
    # modprobe would load this module directly, ignoring install_command,
    # because the module has softdeps (kmod bug #446); kmodd runs the command.
    kmod_ignores_install: bool = False


@dataclass(frozen=True)
class Plan:
    """What a request resolves to: target modules and every step, dependencies first."""

    request: str
    targets: tuple[str, ...]
    steps: tuple[ModuleStep, ...] = field(default=())
    # Modules the request resolved to but the blacklist kept out (not in targets).
    blacklisted: tuple[str, ...] = ()

    @property
    def resolved(self) -> bool:
        return bool(self.targets)
