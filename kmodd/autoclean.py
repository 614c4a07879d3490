"""Idle-module unloading, like the old kerneld's ``rmmod -a`` timer.

:func:`plan_sweep` is the whole policy, a pure function of the records kmodd
keeps and a snapshot of the kernel; :class:`Autoclean` takes the snapshot,
applies the decision and is driven by the service's timer.

A module is unloaded only when kmodd loaded it, it has been seen unused on
two consecutive sweeps and for at least ``idle_timeout``, its refcount is
zero, nothing holds it, no device is bound to its drivers, it is not
permanent and not listed in ``never_unload`` -- and, when it was loaded for
a device (uevent, coldplug), that device is gone; when it provides a network
link type (``rtnl-link-dummy``), no link of that type exists, since a link
holds no reference on its module yet dies with it.  Its dependencies that kmodd
loaded and that only it used follow in the same sweep.  Modules loaded by
anyone else have no record, so they are never even considered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmodd.kernel.protocol import InitState, Kernel
from kmodd.state import ModuleRecord, StateStore

log = logging.getLogger("kmodd.autoclean")


@dataclass(frozen=True)
class ModuleUse:
    """What the kernel says about one module at sweep time."""

    name: str
    loaded: bool
    refcount: int | None = 0
    holders: tuple[str, ...] = ()
    bound_devices: int = 0
    permanent: bool = False


@dataclass(frozen=True)
class AutocleanPolicy:
    idle_timeout: float = 60.0
    never_unload: frozenset[str] = frozenset()
    sweeps: int = 2          # kerneld marked on one pass and removed on the next


@dataclass
class SweepPlan:
    unload: list[str] = field(default_factory=list)          # in order: dependents first
    followers: set[str] = field(default_factory=set)         # deps that follow an unload
    idle: dict[str, tuple[float | None, int]] = field(default_factory=dict)
    forget: list[str] = field(default_factory=list)          # no longer loaded
    kept: dict[str, str] = field(default_factory=dict)       # name -> why it stays


def busy_reason(use: ModuleUse, policy: AutocleanPolicy) -> str | None:
    """Why a module must stay regardless of how long it has been idle (None: it may go)."""
    if use.name in policy.never_unload:
        return "listed in never_unload"
    if use.permanent:
        return "permanent (no module_exit)"
    if use.refcount is None:
        return "the kernel cannot unload it"
    if use.holders:
        return "used by " + " ".join(use.holders)
    if use.refcount > 0:
        return f"refcount {use.refcount}"
    if use.bound_devices > 0:
        return f"{use.bound_devices} device(s) bound to its drivers"
    return None


def link_kinds_of(name: str, rec: ModuleRecord) -> set[str]:
    """Link types a module may provide: its own name (dummy, veth...) and the
    kind the kernel asked for when it requested it (``rtnl-link-KIND``)."""
    kinds = {name}
    if rec.key.startswith("rtnl-link-"):
        kinds.add(rec.key[len("rtnl-link-"):])
    return kinds


def plan_sweep(records: Mapping[str, ModuleRecord], uses: Mapping[str, ModuleUse],
               policy: AutocleanPolicy, now: float,
               busy: Iterable[str] = (), devices_present: Iterable[str] = (),
               link_kinds: Iterable[str] | None = ()) -> SweepPlan:
    """Decide one sweep.  ``busy``: modules a pending request involves;
    ``devices_present``: modules loaded for a device that is still there;
    ``link_kinds``: kinds of the network links that exist (None: unknown)."""
    busy_set = set(busy)
    present = set(devices_present)
    links = None if link_kinds is None else set(link_kinds)
    out = SweepPlan()
    for name, rec in records.items():
        use = uses.get(name)
        if use is None or not use.loaded:
            out.forget.append(name)
            continue
        reason = busy_reason(use, policy)
        if reason is None and rec.kind == "modules-load":
            # Listed for loading at boot: wanted whether used or not.
            reason = f"listed in {rec.requested_by or 'modules-load.d'}"
        if reason is None and name in busy_set:
            reason = "a request for it is in flight"
        if reason is None and name in present:
            # Loaded for a device, like udev would: it stays while the device
            # does (CPU feature modules, drivers whose probe passed it over).
            reason = f"its device {rec.devpath} is present"
        if reason is None and links is None and rec.key.startswith("rtnl-link-"):
            reason = "cannot tell whether links of its type exist"
        elif reason is None and links and (kinds := link_kinds_of(name, rec) & links):
            reason = f"network link(s) of type {', '.join(sorted(kinds))} exist"
        if reason is not None:
            out.idle[name] = (None, 0)
            out.kept[name] = reason
            continue
        idle_since = rec.idle_since if rec.idle_since is not None else now
        sweeps = rec.idle_sweeps + 1
        out.idle[name] = (idle_since, sweeps)
        if sweeps < policy.sweeps:
            out.kept[name] = f"idle on {sweeps} sweep(s), waiting for {policy.sweeps}"
        elif now - idle_since < policy.idle_timeout:
            out.kept[name] = f"idle for {now - idle_since:.0f}s of {policy.idle_timeout:g}s"
        else:
            out.unload.append(name)
    # Dependencies follow: a module kmodd loaded whose every user is going away.
    going = set(out.unload)
    changed = True
    while changed:
        changed = False
        for name in records:
            use = uses.get(name)
            if name in going or use is None or not use.loaded or not use.holders:
                continue
            if name in busy_set or name in present or not set(use.holders) <= going:
                continue
            rest = (use.refcount or 0) - len(use.holders)
            if use.refcount is None or rest != 0 or use.bound_devices or use.permanent \
                    or name in policy.never_unload:
                continue
            going.add(name)
            out.unload.append(name)
            out.followers.add(name)
            out.kept.pop(name, None)
            changed = True
    return out


def kernel_snapshot(kernel: Kernel, names: Iterable[str]) -> dict[str, ModuleUse]:
    """Read what :func:`plan_sweep` needs for ``names`` (errors: treat as in use)."""
    try:
        table = kernel.modules()
    except Exception as exc:
        log.warning("autoclean: cannot read the module list: %s", exc)
        return {}
    uses: dict[str, ModuleUse] = {}
    for name in names:
        mod = table.get(name)
        if mod is None:
            try:
                loaded = kernel.initstate(name) in (InitState.LIVE, InitState.COMING)
            except Exception:
                loaded = True
            # Listed nowhere but sysfs says live: be safe, pretend it is in use.
            uses[name] = ModuleUse(name, loaded, refcount=None if loaded else 0)
            continue
        try:
            bound = kernel.bound_devices(name)
        except Exception:
            bound = 1
        live = mod.state.lower() == "live"
        uses[name] = ModuleUse(name, True, mod.refcount if live else None, tuple(mod.holders),
                               bound, mod.permanent)
    return uses


@dataclass
class SweepReport:
    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"unloaded": self.unloaded, "failed": self.failed, "kept": self.kept,
                "forgotten": self.forgotten}


class Autoclean:
    """Applies :func:`plan_sweep` against a kernel and the state store."""

    def __init__(self, kernel: Kernel, state: StateStore, unload: Callable[[str], Any],
                 policy: AutocleanPolicy, *, busy: Callable[[], Iterable[str]] = lambda: (),
                 clock: Callable[[], float] = time.time, sys_dir: Path | None = None) -> None:
        self.sys_dir = sys_dir
        self.kernel = kernel
        self.state = state
        self.unload_fn = unload
        self.policy = policy
        self.busy = busy
        self.clock = clock
        self.sweeps = 0
        self.unloaded_total = 0

    def sweep(self) -> SweepReport:
        records = self.state.records()
        report = SweepReport()
        if not records:
            return report
        uses = kernel_snapshot(self.kernel, records)
        if not uses:
            return report
        decision = plan_sweep(records, uses, self.policy, self.clock(), self.busy(),
                              self._devices_present(records), self._link_kinds())
        self.sweeps += 1
        for name in decision.forget:
            if self.state.forget_if(name, records[name].loaded_at):
                report.forgotten.append(name)
        for name, (since, count) in decision.idle.items():
            self.state.set_idle(name, records[name].loaded_at, since, count)
        report.kept = dict(decision.kept)
        failed_users: set[str] = set()
        for name in decision.unload:
            use = uses[name]
            if name in set(self.busy()):
                # A request for it arrived since the snapshot: leave it.
                report.kept[name] = "a request for it is in flight"
                failed_users.add(name)
                continue
            if name in decision.followers and failed_users & set(use.holders):
                report.failed[name] = "a module using it could not be unloaded"
                failed_users.add(name)
                continue
            error = self._unload(name)
            if error is None:
                self.state.forget_if(name, records[name].loaded_at)
                report.unloaded.append(name)
                self.unloaded_total += 1
            else:
                report.failed[name] = error
                failed_users.add(name)
        return report

    def _link_kinds(self) -> set[str] | None:
        try:
            return self.kernel.link_kinds()
        except Exception as exc:
            log.warning("autoclean: cannot list network links: %s", exc)
            return None

    def _devices_present(self, records: Mapping[str, ModuleRecord]) -> set[str]:
        if self.sys_dir is None:
            return set()
        present = set()
        for name, rec in records.items():
            if rec.kind in ("modalias", "coldplug") and rec.devpath:
                try:
                    if (self.sys_dir / rec.devpath.lstrip("/")).exists():
                        present.add(name)
                except OSError:
                    present.add(name)
        return present

    def _unload(self, name: str) -> str | None:
        try:
            result = self.unload_fn(name)
        except Exception as exc:
            return str(exc)
        status = getattr(result, "status", "unloaded")
        if status in ("failed", "skipped"):
            return str(getattr(result, "error", None) or status)
        return None
