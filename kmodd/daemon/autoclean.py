"""Idle-module unloading, like the old kerneld's ``rmmod -a`` timer.

:func:`plan_sweep` is the whole policy, a pure function of the records kmodd
keeps and a snapshot of the kernel; :class:`Autoclean` takes the snapshot,
applies the decision and is driven by the service's timer.

A module is unloaded only when kmodd loaded it, it has been seen unused on
two consecutive sweeps and for at least ``idle_timeout``, its refcount is
zero, nothing holds it, no device is bound to its drivers, it is not
permanent and not listed in ``never_unload``, it is still the very load kmodd
made (``Kernel.instance()``, recorded at load time) -- and, when it was loaded for
a device (uevent, coldplug), that device is gone; when it provides a network
link type (``rtnl-link-dummy``), no link of that type exists in any network
namespace, since a link holds no reference on its module yet dies with it;
and the family of what the kernel requested lets a refcount of 0 prove it
unused at all (``FAMILIES``; the table and its reasons: docs/autoclean.md).
Its dependencies that kmodd loaded and that only it used follow in the same
sweep.  Modules loaded by
anyone else have no record, so they are never even considered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from kmodd.daemon.requests import RequestKind, is_device_kind
from kmodd.daemon.state import ModuleRecord, StateStore
from kmodd.journal import log
from kmodd.kernel.protocol import InitState, Kernel
from kmodd.record import dataclass, field

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleUse:
    """What the kernel says about one module at sweep time."""

    name: str
    loaded: bool
    refcount: int | None = 0
    holders: tuple[str, ...] = ()
    bound_devices: int = 0
    permanent: bool = False
    instance: str | None = None      # Kernel.instance(): which load this is


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
    reloaded: list[str] = field(default_factory=list)        # forgotten: not our load any more


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


@dataclass(frozen=True)
class Family:
    """A family of request_module() names and what autoclean may conclude for it.

    ``decision``: ``"refcount"`` -- every object of the family holds a
    reference on its module, so the usual rules (refcount, holders) prove it
    unused; ``"links"`` -- kept while a link of its kind exists in any network
    namespace; ``"never"`` -- its objects hold no reference and cannot all be
    found, so the kernel cannot prove it unused.  docs/autoclean.md has the
    table with the kernel functions behind each decision."""

    label: str
    patterns: tuple[str, ...]
    decision: str
    reason: str


FAMILIES: tuple[Family, ...] = (
    Family("network link type", ("rtnl-link-*",), "links",
           "a link holds no module reference; rtnl_link_unregister() deletes every link "
           "of the kind in every network namespace"),
    Family("key type", ("key-type-*",), "never",
           "keys hold no module reference and unregister_key_type() destroys every key "
           "of the type; no interface lists every key"),
    Family("conntrack helper", ("nfct-helper-*", "nf-conntrack-helper-*", "nf_conntrack_*"),
           "never",
           "connections using a helper hold no module reference; unregistering strips "
           "it from live connections in every namespace (nf_ct_iterate_destroy)"),
    Family("TCP congestion control", ("tcp_*",), "never",
           "a route's congctl metric holds only the algorithm's key, no reference; "
           "unloading silently changes those routes"),
    Family("address family", ("net-pf-*",), "refcount",
           "__sock_create() and sk_alloc() take references on the family's and the "
           "protocol's modules for every socket"),
    Family("queueing discipline", ("net-sch-*", "sch_*"), "refcount",
           "qdisc_create() takes a reference on ops->owner for every qdisc"),
    Family("traffic classifier or action", ("net-cls-*", "net-act-*", "cls_*", "act_*"),
           "refcount",
           "tcf_proto_lookup_ops() and tc_lookup_action() take a reference per filter "
           "and action"),
    Family("crypto algorithm", ("crypto-*",), "refcount",
           "every transform holds crypto_mod_get() on its algorithm's module"),
    Family("filesystem", ("fs-*",), "refcount",
           "get_fs_type() takes a reference every superblock keeps until its last "
           "mount, in any mount namespace, is gone"),
    Family("character or block device major", ("char-major-*", "block-major-*"),
           "refcount",
           "every open file holds a reference (cdev_get(), the disk's fops owner); a "
           "later open requests the module again"),
    Family("netfilter extension", ("nft-*", "nf-logger-*", "ipt_*", "ip6t_*", "xt_*",
                                    "arpt_*", "ebt_*", "nf-flowtable-*"),
           "refcount",
           "every rule's match, target, expression or logger holds try_module_get()"),
)
UNREVIEWED = Family("other kernel request", ("*",), "never",
                    "a family whose objects are not known to hold module references")


def family_of(name: str, rec: ModuleRecord) -> Family | None:
    """The family a record's module belongs to by what was requested (for kernel
    requests; any other unknown kernel request is UNREVIEWED) or by its own name
    (tcp_bbr, sch_fq...).  None: not a request_module() family (a device driver,
    an administrator's module), whose usual rules apply."""
    keys = [rec.key, name] if rec.key != name else [name]
    for key in keys:
        for family in FAMILIES:
            if any(fnmatchcase(key, pattern) for pattern in family.patterns):
                return family
    return UNREVIEWED if rec.kind == "kernel" and rec.role == "target" else None


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
    foreign: set[str] = set()
    for name, rec in records.items():
        use = uses.get(name)
        if use is None or not use.loaded:
            out.forget.append(name)
            continue
        if rec.instance is not None and use.instance is not None \
                and use.instance != rec.instance:
            # Unloaded and loaded again by someone else (rmmod; modprobe foo
            # debug=1): that load is theirs, and so is the module now.
            out.forget.append(name)
            out.reloaded.append(name)
            foreign.add(name)
            continue
        reason = _keep_reason(name, rec, use, policy, busy_set, present, links)
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
    _add_followers(out, records, uses, policy, foreign | busy_set | present)
    return out


def _keep_reason(name: str, rec: ModuleRecord, use: ModuleUse, policy: AutocleanPolicy,
                 busy: set[str], present: set[str], links: set[str] | None) -> str | None:
    """Why a module kmodd loaded stays, however long it is idle (None: it may go)."""
    reason = busy_reason(use, policy)
    if reason is None and (rec.instance is None or use.instance is None):
        # Only what the kernel proves is the very load kmodd made goes.
        reason = "which load this is is unknown (no load identity)"
    if reason is None and rec.kind == RequestKind.MODULES_LOAD:
        # Listed for loading at boot: wanted whether used or not.
        reason = f"listed in {rec.requested_by or 'modules-load.d'}"
    if reason is None and name in busy:
        reason = "a request for it is in flight"
    if reason is None and name in present:
        # Loaded for a device, like udev would: it stays while the device
        # does (CPU feature modules, drivers whose probe passed it over).
        reason = f"its device {rec.devpath} is present"
    family = family_of(name, rec)
    if reason is None and family is not None and family.decision == "never":
        reason = f"{family.label}: the kernel cannot prove it unused ({family.reason})"
    if reason is None and links is None and rec.key.startswith("rtnl-link-"):
        reason = "cannot tell whether links of its type exist in every network namespace"
    elif reason is None and links and (kinds := link_kinds_of(name, rec) & links):
        reason = f"network link(s) of type {', '.join(sorted(kinds))} exist"
    return reason


def _add_followers(out: SweepPlan, records: Mapping[str, ModuleRecord],
                   uses: Mapping[str, ModuleUse], policy: AutocleanPolicy,
                   stay: set[str]) -> None:
    """Dependencies follow: a module kmodd loaded whose every user is going
    away goes too (``stay``: not ours any more, busy, or its device is here)."""
    going = set(out.unload)
    changed = True
    while changed:
        changed = False
        for name in records:
            use = uses.get(name)
            if name in going or use is None or not use.loaded or not use.holders:
                continue
            rec = records[name]
            if name in stay or rec.instance is None or use.instance != rec.instance:
                continue
            if not set(use.holders) <= going:
                continue
            rest = (use.refcount or 0) - len(use.holders)
            if use.refcount is None or rest != 0 or use.bound_devices or use.permanent \
                    or name in policy.never_unload:
                continue
            family = family_of(name, rec)
            if family is not None and family.decision == "never":
                continue
            going.add(name)
            out.unload.append(name)
            out.followers.add(name)
            out.kept.pop(name, None)
            changed = True


def kernel_snapshot(kernel: Kernel, names: Iterable[str]) -> dict[str, ModuleUse]:
    """Read what :func:`plan_sweep` needs for ``names`` (errors: treat as in use)."""
    try:
        table = kernel.modules()
    except Exception as exc:
        LOG.warning("autoclean: cannot read the module list: %s", exc)
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
        try:
            instance = kernel.instance(name)
        except Exception:
            instance = None
        live = mod.state.lower() == "live"
        uses[name] = ModuleUse(name, True, mod.refcount if live else None, tuple(mod.holders),
                               bound, mod.permanent, instance)
    return uses


@dataclass
class SweepReport:
    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)


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
        for name in decision.reloaded:
            log(LOG, logging.INFO, "autoclean: %s was unloaded and loaded again by someone "
                 "else; it is not kmodd's any more", name, module=name)
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
            if self._instance(name) != records[name].instance:
                # Reloaded by someone else since the snapshot.
                report.kept[name] = "loaded again by someone else"
                self.state.forget_if(name, records[name].loaded_at)
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

    def _instance(self, name: str) -> str | None:
        try:
            return self.kernel.instance(name)
        except Exception:
            return None

    def _link_kinds(self) -> set[str] | None:
        try:
            return self.kernel.link_kinds()
        except Exception as exc:
            LOG.warning("autoclean: cannot list network links: %s", exc)
            return None

    def _devices_present(self, records: Mapping[str, ModuleRecord]) -> set[str]:
        if self.sys_dir is None:
            return set()
        present = set()
        for name, rec in records.items():
            if is_device_kind(rec.kind) and rec.devpath:
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
