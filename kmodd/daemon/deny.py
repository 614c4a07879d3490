"""A hard deny: modules kmodd never loads, whoever asks and however they are reached.

kmod's ``blacklist`` only stops alias lookups: a blacklisted module still
loads by name or as a dependency (``modprobe`` walks dependencies with no
filter), which is why people write ``install foo /bin/false``.  A denied
module is refused for every source (alias, name, dependency, softdep,
kernel request, administrator, modules-load.d), and so is everything that
needs it.

Two lists: the ``deny`` setting in kmodd.conf, and the persistent one
``kmodctl deny/allow`` edit, ``/var/lib/kmodd/deny`` under the root (one
name per line, ``#`` comments).
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Callable, Iterable
from pathlib import Path

from kmodd.daemon.state import write_atomically
from kmodd.kernel.loader import StepResult, StepStatus
from kmodd.record import dataclass
from kmodd.resolution.names import modname_normalize
from kmodd.resolution.plan import Plan, Role
from kmodd.root import Root


@dataclass(frozen=True)
class Refusal:
    """A step the deny policy refuses (status "failed") or leaves out because
    something it needs is refused (status "skipped")."""

    name: str
    status: str
    error: str
    errno: int = errno_mod.EPERM


def deny_file(root: Root) -> Path:
    return root.deny_file


def read_deny_file(path: Path) -> list[str]:
    """The names in the persistent list; a missing file is an empty list."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    names: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(modname_normalize(line))
    return list(dict.fromkeys(names))


def write_deny_file(path: Path, names: Iterable[str]) -> None:
    """Atomically: temporary file, fsync, rename (a crash leaves old or new)."""
    body = "# modules kmodd never loads (kmodctl deny/allow)\n" + "".join(
        f"{n}\n" for n in sorted(set(names)))
    write_atomically(path, body.encode(), mode=0o644, prefix=".deny.")


class DenyPolicy:
    """The two lists, and the reason a module is refused (None: allowed)."""

    def __init__(self, setting: Iterable[str], path: Path, config_file: str) -> None:
        self.setting = frozenset(modname_normalize(n) for n in setting)
        self.path = path
        self.config_file = config_file
        self.error: str | None = None
        try:
            self.persistent: frozenset[str] = frozenset(read_deny_file(path))
        except OSError as exc:
            # Unreadable: the setting still holds; the daemon logs this.
            self.persistent = frozenset()
            self.error = f"cannot read {path}: {exc.strerror or exc}"

    def reason(self, name: str) -> str | None:
        key = modname_normalize(name)
        if key in self.setting:
            return f"{key} is denied by the 'deny' setting in {self.config_file}"
        if key in self.persistent:
            return f"{key} is denied by 'kmodctl deny' ({self.path})"
        return None

    def denied(self) -> dict[str, list[str]]:
        return {"setting": sorted(self.setting), "persistent": sorted(self.persistent)}

    def set(self, name: str, deny: bool) -> bool:
        """Add or remove a persistent entry; True when the list changed."""
        key = modname_normalize(name)
        names = set(read_deny_file(self.path))
        if (key in names) == deny:
            self.persistent = frozenset(names)
            return False
        if deny:
            names.add(key)
        else:
            names.discard(key)
        write_deny_file(self.path, names)
        self.persistent = frozenset(names)
        return True


def refusals(plan: Plan, reason: Callable[[str], str | None]) -> dict[str, Refusal]:
    """The steps of ``plan`` a deny refuses, and every step that needs one of
    them through hard dependencies.  A refused softdep is only left out: the
    module that wants it still loads, as when a softdep is missing."""
    out: dict[str, Refusal] = {}
    needed = {d for s in plan.steps for d in s.deps} | set(plan.targets)
    for step in plan.steps:
        why = reason(step.name)
        if why is not None:
            # Nothing needs a bare softdep: it is left out without failing anyone.
            status = "failed" if step.name in needed or step.role not in (
                Role.SOFTDEP_PRE, Role.SOFTDEP_POST) else "refused"
            out[step.name] = Refusal(step.name, status, f"refused: {why}")
    if not out:
        return out
    for step in plan.steps:          # dependencies come first: one pass suffices
        if step.name in out:
            continue
        blocker = next((d for d in step.deps if d in out and out[d].status != "refused"),
                       None)
        if blocker is not None:
            cause = out[blocker]
            out[step.name] = Refusal(
                step.name, "skipped", f"{step.name} not loaded: it needs {blocker}"
                + (f", and {cause.error.removeprefix('refused: ')}"
                   if cause.status == "failed" else f" ({cause.error})"))
    # What only refused targets wanted is not loaded either.
    wanted = [t for t in plan.targets if t not in out]
    deps = {s.name: s.deps for s in plan.steps}
    keep: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in keep:
            keep.add(name)
            wanted += [d for d in deps.get(name, ()) if d not in out]
    soft = (Role.SOFTDEP_PRE, Role.SOFTDEP_POST)
    for step in plan.steps:
        if step.name in out or step.name in keep or (step.role in soft and keep):
            continue
        out[step.name] = Refusal(step.name, "refused",
                                 f"{step.name} not loaded: only refused modules need it")
    return out


def system_refuse(root: Root) -> Callable[[Plan], StepResult | None]:
    """For kmodd.kernel.direct.load_direct: the first step of a plan the system's
    policy (:func:`system_policy`, read when first needed) refuses outright."""
    policy: list[DenyPolicy] = []

    def refuse(plan: Plan) -> StepResult | None:
        if not policy:
            policy.append(system_policy(root))
        blocking = [r for r in refusals(plan, policy[0].reason).values()
                    if r.status == "failed"]
        if not blocking:
            return None
        first = blocking[0]
        return StepResult(first.name, StepStatus.FAILED, first.error, first.errno)

    return refuse


def system_policy(root: Root) -> DenyPolicy:
    """The policy a daemon on *root* would apply: the ``deny`` setting of the
    settings files there, and the persistent list.  For the tools that load
    without the daemon (``kmodctl load`` direct), so a deny holds for them too."""
    from kmodd.daemon.settings import SettingsError, merge

    try:
        settings = merge({"root": str(root.base)})
        setting, config_file = settings.deny, settings.config_file
    except (SettingsError, OSError, ValueError):
        # A broken settings file must not open the door: the persistent list
        # still applies, and the daemon reports the file itself.
        setting, config_file = (), "kmodd.conf"
    return DenyPolicy(setting, deny_file(root), config_file)
