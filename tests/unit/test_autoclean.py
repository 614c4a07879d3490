"""Autoclean: the pure policy, then sweeps against the simulated kernel."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from kmodd.daemon.autoclean import (
    Autoclean,
    AutocleanPolicy,
    ModuleUse,
    busy_reason,
    kernel_snapshot,
    plan_sweep,
)
from kmodd.daemon.state import ModuleRecord, StateStore
from kmodd.kernel.loader import Loader
from tests.unit.daemon_fakes import FakeClock, GraphResolver, sim_kernel

POLICY = AutocleanPolicy(idle_timeout=60, never_unload=frozenset({"keepme"}))


def rec(name: str, idle_since: float | None = None, sweeps: int = 0,
        instance: str | None = "i1") -> ModuleRecord:
    return ModuleRecord(name, 0.0, "modalias", f"pci:{name}", idle_since=idle_since,
                        idle_sweeps=sweeps, instance=instance)


def use(name: str, **kw: object) -> ModuleUse:
    kw.setdefault("instance", "i1")
    return ModuleUse(name, True, **kw)  # type: ignore[arg-type]


def test_idle_module_goes_only_on_the_second_sweep_after_idle_timeout() -> None:
    records = {"m": rec("m")}
    uses = {"m": use("m")}
    first = plan_sweep(records, uses, POLICY, now=1000)
    assert first.unload == [] and first.idle["m"] == (1000, 1)
    # Second sweep, but not idle long enough yet.
    early = plan_sweep({"m": rec("m", 1000, 1)}, uses, POLICY, now=1030)
    assert early.unload == [] and early.idle["m"] == (1000, 2)
    assert "idle for 30s" in early.kept["m"]
    late = plan_sweep({"m": rec("m", 1000, 2)}, uses, POLICY, now=1060)
    assert late.unload == ["m"]
    # idle_timeout 0 still needs two sweeps, like kerneld.
    zero = AutocleanPolicy(idle_timeout=0)
    assert plan_sweep(records, uses, zero, now=5).unload == []
    assert plan_sweep({"m": rec("m", 5, 1)}, uses, zero, now=6).unload == ["m"]


def test_a_link_type_in_use_keeps_its_module() -> None:
    # rmmod dummy would destroy interface x although dummy's refcount is 0.
    dummy = ModuleRecord("dummy", 0.0, "kernel", "rtnl-link-dummy", idle_since=0,
                         idle_sweeps=5, instance="i1")
    bonding = ModuleRecord("bonding", 0.0, "kernel", "rtnl-link-bond", idle_since=0,
                           idle_sweeps=5, instance="i1")
    records = {"dummy": dummy, "bonding": bonding}
    uses = {"dummy": use("dummy"), "bonding": use("bonding")}
    kept = plan_sweep(records, uses, POLICY, now=1000, link_kinds={"dummy", "bond"})
    assert kept.unload == []
    assert "type dummy" in kept.kept["dummy"] and "type bond" in kept.kept["bonding"]
    assert sorted(plan_sweep(records, uses, POLICY, now=1000,
                             link_kinds={"veth"}).unload) == ["bonding", "dummy"]
    # Links unknown (netlink failed): link-type modules stay, others may go.
    mixed = {**records, "m": rec("m", 0, 5)}
    unknown = plan_sweep(mixed, {**uses, "m": use("m")}, POLICY, now=1000, link_kinds=None)
    assert unknown.unload == ["m"] and "cannot tell" in unknown.kept["dummy"]


@pytest.mark.parametrize(("u", "reason"), [
    (use("m", refcount=1), "refcount 1"),
    (use("m", holders=("x",), refcount=1), "used by x"),
    (use("m", bound_devices=2), "2 device(s) bound"),
    (use("m", permanent=True), "permanent"),
    (use("m", refcount=None), "cannot unload"),
    (use("keepme"), "never_unload"),
])
def test_modules_in_use_are_kept_and_their_idle_time_resets(u: ModuleUse, reason: str
                                                            ) -> None:
    assert reason in (busy_reason(u, POLICY) or "")
    records = {u.name: rec(u.name, idle_since=0, sweeps=5)}
    out = plan_sweep(records, {u.name: u}, POLICY, now=10_000)
    assert out.unload == []
    assert out.idle[u.name] == (None, 0)


def test_module_with_a_request_in_flight_is_kept() -> None:
    out = plan_sweep({"m": rec("m", 0, 3)}, {"m": use("m")}, POLICY, now=999, busy={"m"})
    assert out.unload == [] and "in flight" in out.kept["m"]


def test_modules_kmodd_did_not_load_are_never_considered() -> None:
    # "other" is idle and unused, but there is no record: kmodd did not load it.
    uses = {"m": use("m"), "other": use("other")}
    out = plan_sweep({"m": rec("m", 0, 1)}, uses, POLICY, now=100)
    assert out.unload == ["m"]
    assert "other" not in out.idle and "other" not in out.kept


def test_dependencies_follow_only_when_nobody_else_uses_them() -> None:
    records = {n: rec(n, 0, 1) for n in ("top", "dep", "shared", "deeper", "busy_dep")}
    uses = {
        "top": use("top"),
        "dep": use("dep", holders=("top",), refcount=1),
        "deeper": use("deeper", holders=("dep",), refcount=1),
        "shared": use("shared", holders=("top", "other"), refcount=2),
        "busy_dep": use("busy_dep", holders=("top",), refcount=2),   # plus an open device
        "foreign_dep": use("foreign_dep", holders=("top",), refcount=1),  # not ours
    }
    out = plan_sweep(records, uses, POLICY, now=100)
    assert out.unload == ["top", "dep", "deeper"]
    assert out.followers == {"dep", "deeper"}
    assert "foreign_dep" not in out.unload and "shared" not in out.unload


def test_records_of_modules_gone_are_forgotten() -> None:
    out = plan_sweep({"gone": rec("gone"), "m": rec("m")},
                     {"gone": ModuleUse("gone", False), "m": use("m")}, POLICY, now=1)
    assert out.forget == ["gone"]


# --- against the simulated kernel ------------------------------------------------

GRAPH = {"dummy": ("libdummy",), "libdummy": (), "nic": (), "snd": (), "held": (),
         "perm": (), "foreign": (), "keepme": ()}


def loaded_by_kmodd(tmp: Path) -> tuple[Autoclean, object, StateStore, FakeClock]:
    kernel = sim_kernel(tmp / "tree", GRAPH, permanent=("perm",))
    resolver = GraphResolver(tmp / "mods", GRAPH)
    loader = Loader(kernel)
    state = StateStore(tmp / "state.json")
    clock = FakeClock(10_000)
    for name in ("dummy", "nic", "snd", "held", "perm", "keepme"):
        plan = resolver.plan(name)
        for step in plan.steps:
            if kernel.initstate(step.name).value == "absent":
                assert loader.load_step(step).status == "loaded"
                state.record(ModuleRecord(step.name, clock.now, "admin", name,
                                          instance=kernel.instance(step.name)))
    # Loaded by someone else (modprobe by hand, initramfs): no record.
    kernel.load_module("foreign", resolver.path("foreign"))
    kernel.bind_device("nic", "e1000", "0000:00:03.0")
    kernel.set_users("held", 1)
    ac = Autoclean(kernel, state, loader.unload,
                   AutocleanPolicy(idle_timeout=60, never_unload=frozenset({"keepme"})),
                   clock=clock)
    return ac, kernel, state, clock


def test_sweeps_unload_only_what_kmodd_loaded_and_nobody_uses(tmp_path: Path) -> None:
    ac, kernel, state, clock = loaded_by_kmodd(tmp_path)
    first = ac.sweep()
    assert first.unloaded == []
    clock.advance(60)
    second = ac.sweep()
    assert second.unloaded == ["dummy", "snd", "libdummy"]
    # The dependency went after the module that used it.
    assert second.unloaded.index("dummy") < second.unloaded.index("libdummy")
    left = set(kernel.loaded())  # type: ignore[attr-defined]
    assert left == {"nic", "held", "perm", "keepme", "foreign"}
    assert "bound" in second.kept["nic"] and "refcount" in second.kept["held"]
    assert "permanent" in second.kept["perm"] and "never_unload" in second.kept["keepme"]
    assert sorted(state.records()) == ["held", "keepme", "nic", "perm"]
    deletes = [c.name for c in kernel.syscalls if c.call == "delete_module"]  # type: ignore[attr-defined]
    assert "foreign" not in deletes and "nic" not in deletes


def test_module_used_again_between_sweeps_is_kept(tmp_path: Path) -> None:
    ac, kernel, _state, clock = loaded_by_kmodd(tmp_path)
    ac.sweep()
    kernel.set_users("snd", 1)  # type: ignore[attr-defined]
    clock.advance(100)
    ac.sweep()
    kernel.set_users("snd", 0)  # type: ignore[attr-defined]
    clock.advance(100)
    report = ac.sweep()
    # Idle again, but only seen idle on one sweep since it was last used.
    assert "snd" not in report.unloaded and "snd" in kernel.loaded()  # type: ignore[attr-defined]
    clock.advance(60)
    assert "snd" in ac.sweep().unloaded


def test_unload_failure_is_reported_and_keeps_its_dependencies(tmp_path: Path) -> None:
    ac, kernel, state, clock = loaded_by_kmodd(tmp_path)
    kernel.unload_errors["dummy"] = errno.EBUSY  # type: ignore[attr-defined]
    ac.sweep()
    clock.advance(60)
    report = ac.sweep()
    assert "dummy" in report.failed and "libdummy" in report.failed
    assert {"dummy", "libdummy"} <= set(kernel.loaded())  # type: ignore[attr-defined]
    assert "dummy" in state and "libdummy" in state


def test_snapshot_of_a_module_gone_meanwhile(tmp_path: Path) -> None:
    kernel = sim_kernel(tmp_path / "tree", GRAPH)
    uses = kernel_snapshot(kernel, ["nothere"])
    assert uses["nothere"].loaded is False



def test_module_loaded_for_a_device_stays_while_the_device_does() -> None:
    r = ModuleRecord("aesni", 0.0, "coldplug", "cpu:type:x86,ven0000fam0006mod003F:feature:,0070",
                     devpath="/devices/system/cpu/cpu0", idle_since=0, idle_sweeps=3,
                     instance="i1")
    uses = {"aesni": use("aesni"), "lib": use("lib", holders=("aesni",), refcount=1)}
    records = {"aesni": r, "lib": rec("lib", 0, 3)}
    kept = plan_sweep(records, uses, POLICY, now=1000, devices_present={"aesni"})
    assert kept.unload == [] and "device /devices/system/cpu/cpu0" in kept.kept["aesni"]
    gone = plan_sweep(records, uses, POLICY, now=1000)          # unplugged
    assert gone.unload == ["aesni", "lib"]


def test_sweep_checks_the_device_under_sys(tmp_path: Path) -> None:
    ac, kernel, state, clock = loaded_by_kmodd(tmp_path)
    ac.sys_dir = tmp_path / "tree/sys"
    dev = ac.sys_dir / "devices/pci0000:00/0000:00:1f.3"
    dev.mkdir(parents=True)
    rec_snd = state.get("snd")
    assert rec_snd is not None
    state.record(ModuleRecord("snd", rec_snd.loaded_at, "modalias", "pci:v8086d1", devpath=
                              "/devices/pci0000:00/0000:00:1f.3", instance=rec_snd.instance))
    ac.sweep()
    clock.advance(60)
    assert "snd" not in ac.sweep().unloaded           # the sound card is still there
    dev.rmdir()                                         # hot-unplugged
    assert "snd" not in ac.sweep().unloaded             # idle from now: two sweeps again
    clock.advance(60)
    assert "snd" in ac.sweep().unloaded
    assert "snd" not in kernel.loaded()  # type: ignore[attr-defined]


# --- the very load kmodd made ----------------------------------------------------

def test_a_module_loaded_again_by_someone_else_is_not_ours() -> None:
    records = {"m": rec("m", 0, 5), "dep": rec("dep", 0, 5), "top": rec("top", 0, 5)}
    uses = {"m": use("m", instance="i2"),                 # rmmod m; modprobe m debug=1
            "top": use("top"),
            "dep": use("dep", holders=("top",), refcount=1, instance="i2")}
    out = plan_sweep(records, uses, POLICY, now=1000)
    assert out.unload == ["top"]                           # dep is no follower either
    assert sorted(out.forget) == ["dep", "m"] and sorted(out.reloaded) == ["dep", "m"]
    # No identity recorded (a state file from before), or none readable now: kept.
    unknown = plan_sweep({"a": rec("a", 0, 5, instance=None), "b": rec("b", 0, 5)},
                         {"a": use("a"), "b": use("b", instance=None)}, POLICY, now=1000)
    assert unknown.unload == [] and "identity" in unknown.kept["a"] + unknown.kept["b"]


def _reload_by_hand(kernel: object, name: str, tmp: Path) -> None:
    resolver = GraphResolver(tmp / "mods", GRAPH)
    kernel.unload_module(name)                                     # type: ignore[attr-defined]
    assert kernel.load_module(name, resolver.path(name), "debug=1")  # type: ignore[attr-defined]


def test_rmmod_modprobe_between_sweeps_is_left_alone(tmp_path: Path) -> None:
    ac, kernel, state, clock = loaded_by_kmodd(tmp_path)
    ac.sweep()
    _reload_by_hand(kernel, "snd", tmp_path)
    clock.advance(60)
    report = ac.sweep()
    assert "snd" in report.forgotten and "snd" not in state
    for _ in range(3):
        clock.advance(600)
        assert "snd" not in ac.sweep().unloaded
    assert "snd" in kernel.loaded()                                # type: ignore[attr-defined]


def test_a_module_no_longer_ours_is_logged_under_its_module_field(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # journalctl MODULE=snd finds why autoclean let go of it.
    ac, kernel, _state, clock = loaded_by_kmodd(tmp_path)
    ac.sweep()
    _reload_by_hand(kernel, "snd", tmp_path)
    clock.advance(60)
    with caplog.at_level(logging.INFO, logger="kmodd.daemon.autoclean"):
        ac.sweep()
    lines = [r for r in caplog.records if "loaded again by someone else" in r.getMessage()]
    assert [getattr(r, "MODULE", None) for r in lines] == ["snd"]


def test_reload_between_snapshot_and_unload_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kmodd.daemon.autoclean as autoclean

    ac, kernel, state, clock = loaded_by_kmodd(tmp_path)
    ac.sweep()
    clock.advance(60)
    real_snapshot = autoclean.kernel_snapshot

    def snapshot_then_reload(k: object, names: object) -> dict[str, ModuleUse]:
        uses = real_snapshot(k, names)  # type: ignore[arg-type]
        _reload_by_hand(kernel, "snd", tmp_path)       # right after the snapshot
        return uses
    monkeypatch.setattr(autoclean, "kernel_snapshot", snapshot_then_reload)
    report = ac.sweep()
    assert "dummy" in report.unloaded and "snd" not in report.unloaded
    assert "snd" in kernel.loaded() and "snd" not in state  # type: ignore[attr-defined]


def test_rmmod_modprobe_while_kmodd_was_down_is_left_alone(tmp_path: Path) -> None:
    ac, kernel, state, clock = loaded_by_kmodd(tmp_path)
    ac.sweep()
    state.save()
    _reload_by_hand(kernel, "snd", tmp_path)                       # kmodd stopped meanwhile
    restarted = StateStore(state.path)
    restarted.load(list(kernel.modules()), kernel.instance)        # type: ignore[attr-defined]
    assert "snd" not in restarted and "dummy" in restarted
    ac.state = restarted
    ac.sweep()
    clock.advance(60)
    report = ac.sweep()
    assert "dummy" in report.unloaded and "snd" not in report.unloaded
    assert "snd" in kernel.loaded()                                # type: ignore[attr-defined]
    deletes = [c.name for c in kernel.syscalls if c.call == "delete_module"]  # type: ignore[attr-defined]
    assert deletes.count("snd") == 1                               # the admin's rmmod only


# --- request_module() families: what the kernel can prove (docs/autoclean.md) ----

# (what the kernel asked for, the module it got, the family's decision)
FAMILY_CASES = [
    ("rtnl-link-dummy", "dummy", "links"),
    ("key-type-dns_resolver", "dns_resolver", "never"),
    ("nfct-helper-ftp", "nf_conntrack_ftp", "never"),
    ("tcp_bbr", "tcp_bbr", "never"),
    ("net-pf-38", "af_alg", "refcount"),
    ("net-sch-fq_codel", "sch_fq_codel", "refcount"),
    ("net-cls-flower", "cls_flower", "refcount"),
    ("crypto-cbc(aes)-all", "cbc", "refcount"),
    ("fs-btrfs", "btrfs", "refcount"),
    ("char-major-10-229", "fuse", "refcount"),
    ("block-major-7-0", "loop", "refcount"),
    ("nft-expr-counter", "nft_counter", "refcount"),
    ("binfmt-0064", "binfmt_misc", "never"),        # not reviewed: kept
]


def family_sweeps(tmp: Path, key: str, module: str, *, kind: str = "kernel",
                  users: int = 0, links: dict[str, str] | None = None,
                  netns: dict[str, dict[str, str]] | None = None,
                  unreadable: str = "") -> tuple[object, list[str], dict[str, str]]:
    kernel = sim_kernel(tmp / "tree", {module: ()})
    resolver = GraphResolver(tmp / "mods", {module: ()})
    loader = Loader(kernel)
    state = StateStore(tmp / "state.json")
    clock = FakeClock(10_000)
    assert loader.load_step(resolver.plan(module).steps[0]).status == "loaded"
    state.record(ModuleRecord(module, clock.now, kind, key, instance=kernel.instance(module)))
    if users:
        kernel.set_users(module, users)    # an open socket, a mount, a qdisc, a transform...
    kernel.links.update(links or {})
    kernel.netns_links.update(netns or {})
    kernel.netns_unreadable = unreadable
    ac = Autoclean(kernel, state, loader.unload, AutocleanPolicy(idle_timeout=60), clock=clock)
    ac.sweep()
    clock.advance(60)
    report = ac.sweep()
    return kernel, report.unloaded, report.kept


@pytest.mark.parametrize(("key", "module", "decision"), FAMILY_CASES)
def test_each_family_decision_on_the_simulated_kernel(tmp_path: Path, key: str, module: str,
                                                      decision: str) -> None:
    kernel, unloaded, kept = family_sweeps(tmp_path / "idle", key, module)
    if decision == "never":
        # Idle, refcount 0, and still kept: refcount 0 proves nothing for it.
        assert unloaded == [] and "cannot prove it unused" in kept[module]
        assert module in kernel.loaded()                   # type: ignore[attr-defined]
    else:
        assert unloaded == [module]
    if decision == "refcount":
        # Its objects hold references: in use means refcount > 0, and it stays.
        _k, unloaded, kept = family_sweeps(tmp_path / "used", key, module, users=1)
        assert unloaded == [] and "refcount 1" in kept[module]


def test_a_link_in_another_network_namespace_keeps_its_module(tmp_path: Path) -> None:
    # A container's dummy link: rmmod dummy would delete it.
    _k, unloaded, kept = family_sweeps(tmp_path / "a", "rtnl-link-dummy", "dummy",
                                       netns={"container1": {"eth9": "dummy"}})
    assert unloaded == [] and "type dummy" in kept["dummy"]
    # A namespace that cannot be read: we cannot tell, so it stays.
    _k, unloaded, kept = family_sweeps(tmp_path / "b", "rtnl-link-dummy", "dummy",
                                       unreadable="4026532177")
    assert unloaded == [] and "cannot tell" in kept["dummy"]
    # Other kinds elsewhere do not matter.
    _k, unloaded, _kept = family_sweeps(tmp_path / "c", "rtnl-link-dummy", "dummy",
                                        links={"br0": "bridge"},
                                        netns={"c1": {"v0": "veth"}})
    assert unloaded == ["dummy"]


def test_families_apply_by_module_name_too(tmp_path: Path) -> None:
    # An administrator's 'kmodctl load tcp_bbr' is still a congestion control module.
    _k, unloaded, kept = family_sweeps(tmp_path / "a", "tcp_bbr", "tcp_bbr", kind="admin")
    assert unloaded == [] and "TCP congestion control" in kept["tcp_bbr"]
    # A device driver or an administrator's ordinary module: the usual rules.
    _k, unloaded, _kept = family_sweeps(tmp_path / "b", "e1000", "e1000", kind="admin")
    assert unloaded == ["e1000"]
