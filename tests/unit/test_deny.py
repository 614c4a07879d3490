"""The hard deny: refused for every source and every way a module is reached;
kmodctl deny/allow persist; why flags blacklisted or denied modules that are loaded."""

from __future__ import annotations

import errno as E
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.daemon.control import Client
from kmodd.daemon.deny import DenyPolicy, read_deny_file, refusals
from kmodd.daemon.requests import Request
from kmodd.daemon.service import Service
from kmodd.resolution.plan import ModuleStep, Plan, Role
from tests.unit.daemon_fakes import GatedLoader, GraphResolver
from tests.unit.test_service import Env, Notifier, in_thread, stop


def test_refusals_cover_dependents_and_spare_softdeps() -> None:
    plan = Plan("t", ("t",), (
        ModuleStep("pre", "/m/pre.ko", role=Role.SOFTDEP_PRE),
        ModuleStep("d", "/m/d.ko", role=Role.DEPENDENCY),
        ModuleStep("mid", "/m/mid.ko", deps=("d",), role=Role.DEPENDENCY),
        ModuleStep("t", "/m/t.ko", deps=("mid",)),
    ))

    def deny(*names: str) -> dict[str, tuple[str, str]]:
        got = refusals(plan, lambda n: f"{n} is denied by X" if n in names else None)
        return {k: (v.status, v.error) for k, v in got.items()}

    assert deny() == {}
    got = deny("d")
    assert got["d"] == ("failed", "refused: d is denied by X")
    assert got["mid"][0] == "skipped" and "needs d, and d is denied by X" in got["mid"][1]
    assert got["t"][0] == "skipped" and "needs mid" in got["t"][1]
    assert got["pre"][0] == "refused"          # only the refused target wanted it
    # A refused softdep is only left out; the target still loads.
    assert {k: s for k, (s, _) in deny("pre").items()} == {"pre": "refused"}
    # A refused target: what only it needed is not loaded either.
    assert {k: s for k, (s, _) in deny("t").items()} == {
        "t": "failed", "pre": "refused", "d": "refused", "mid": "refused"}


GRAPH = {"core": (), "a": ("core",), "solo": (), "bl": (), "nic": (), "user": ("bl",)}
ALIASES = {"pci:v1d2": ("solo",), "pci:bl": ("bl",), "rtnl-link-x": ("a",)}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    d = Path(tempfile.mkdtemp(prefix="kmodd-deny-", dir="/tmp"))
    yield Env(tmp_path, d)
    shutil.rmtree(d, ignore_errors=True)


def service(env: Env, **settings: object) -> Service:
    env.kernel.deps.update({k: tuple(v) for k, v in GRAPH.items()})

    def factory(_: object) -> GraphResolver:
        r = GraphResolver(env.tmp / "mods", GRAPH, aliases=ALIASES, blacklist={"bl"})
        env.resolvers.append(r)
        return r

    env.notifier = Notifier()
    env.loader = GatedLoader(env.kernel)
    return Service(env.settings(**settings), env.kernel, factory, loader=env.loader,
                   sources=(), coldplug=None, watcher=None, notify=env.notifier,
                   watchdog_interval=lambda: None)


def finits(env: Env) -> list[str]:
    return [c.name for c in env.kernel.syscalls if c.call == "finit_module"]


def test_deny_setting_refuses_every_source_naming_the_setting(env: Env) -> None:
    svc = service(env, deny=("core", "solo"), config_file="/etc/kmodd.conf")
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    cases = [Request("admin", "solo", None, "kmodctl uid=0"),          # by name
             Request("modalias", "pci:v1d2", "/devices/x", "uevent"),   # by alias
             Request("coldplug", "pci:v1d2", "/devices/x", "coldplug"),
             Request("kernel", "solo", None, "kernel"),                 # request_module()
             Request("modules-load", "solo", None, "/etc/modules:1"),
             Request("admin", "a", None, "kmodctl uid=0"),              # as a dependency
             Request("kernel", "rtnl-link-x", None, "kernel")]
    for req in cases:
        out = svc.submit(req).result(10)
        assert out.status == "failed" and out.errno == E.EPERM, (req, out)
        assert out.error is not None and "denied by the 'deny' setting in /etc/kmodd.conf" \
            in out.error, out.error
    assert finits(env) == []
    assert svc.submit(Request("admin", "nic")).result(10).status == "loaded"
    stop(svc, t, rc)


def test_kmodctl_deny_allow_persist_across_restarts(env: Env,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import kmodctl
    sock = str(env.sock)
    svc = service(env)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert kmodctl.main(["deny", "solo", "--socket", sock]) == 0
    assert capsys.readouterr().out == "solo: denied\n"
    path = env.tmp / "tree/var/lib/kmodd/deny"
    assert read_deny_file(path) == ["solo"]
    out = svc.submit(Request("admin", "solo")).result(10)
    assert out.status == "failed" and "denied by 'kmodctl deny'" in (out.error or "")
    assert kmodctl.main(["deny", "--socket", sock]) == 0
    assert capsys.readouterr().out == "solo\t(kmodctl deny)\n"
    stop(svc, t, rc)
    # A new daemon reads the list again.
    svc = service(env)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert svc.submit(Request("kernel", "solo")).result(10).errno == E.EPERM
    assert kmodctl.main(["allow", "solo", "--socket", sock]) == 0
    assert capsys.readouterr().out == "solo: allowed\n"
    assert svc.submit(Request("kernel", "solo")).result(10).status == "loaded"
    assert read_deny_file(path) == []
    with Client(env.sock, timeout=10) as c:
        # Only root may change the list: the control server checks the op.
        from kmodd.daemon.operations import ROOT_OPS
        assert {"deny", "allow"} <= ROOT_OPS
        assert c.request({"op": "deny"})["ok"] is False     # a module is required
    stop(svc, t, rc)
    # Without a daemon the file is edited for the next start.
    assert kmodctl.main(["deny", "nic", "--socket", sock, "--root", str(env.tmp / "tree")]) == 0
    assert read_deny_file(path) == ["nic"]


def test_why_flags_blacklisted_or_denied_modules_that_are_loaded(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from kmodd.cli import kmodctl
    svc = service(env)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    # The blacklist stops the alias, not the name nor a dependency.
    assert svc.submit(Request("modalias", "pci:bl")).result(10).status == "blacklisted"
    assert svc.submit(Request("admin", "user")).result(10).status == "loaded"
    with Client(env.sock, timeout=10) as c:
        why = c.why("bl")
        assert why["blacklisted"] is True and why["warning"] == \
            "bl is blacklisted in modprobe.d, yet loaded"
        assert why["how"] == "kmodd loaded it for admin user, as dependency of user"
        # Loaded by someone else, used by another module.
        env.kernel.load_module("solo", env.resolvers[0].path("solo"))
        assert c.why("solo").get("warning") is None
        assert c.call("deny", module="solo")["denied"] is True
        why = c.why("solo")
        assert why["warning"] == "solo is denied, yet loaded"
        assert "not loaded by kmodd" in why["how"]
        assert c.why("nic").get("warning") is None and c.why("nic").get("denied") is None
    assert kmodctl.main(["why", "bl", "--socket", str(env.sock)]) == 0
    assert "WARNING: bl is blacklisted in modprobe.d, yet loaded: kmodd loaded it" in \
        capsys.readouterr().out
    stop(svc, t, rc)


def test_unreadable_deny_file_keeps_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "deny"
    path.mkdir()                     # a directory: reading it fails
    policy = DenyPolicy(["x"], path, "/etc/kmodd.conf")
    assert policy.error is not None and str(path) in policy.error
    assert policy.reason("x") is not None and policy.reason("y") is None


def test_deny_and_modules_load_settings(tmp_path: Path) -> None:
    from kmodd.daemon.settings import SettingsError, merge, parse_settings
    conf = tmp_path / "kmodd.conf"
    conf.write_text('deny = ["snd-pcsp", "pcspkr"]\nmodules_load = false\n')
    s = merge({"config_file": str(conf)})
    assert s.deny == ("snd_pcsp", "pcspkr") and s.modules_load is False
    # Flags win over the file.
    s, _ = parse_settings(["--config", str(conf), "--deny", "a-b,c", "--deny", "d"])
    assert s.deny == ("a_b", "c", "d")
    conf.write_text("")
    assert parse_settings(["--config", str(conf)])[0].modules_load is True
    assert parse_settings(["--config", str(conf), "--no-modules-load"])[0].modules_load is False
    conf.write_text("deny = 3\n")
    with pytest.raises(SettingsError, match="deny must be a list of strings"):
        merge({"config_file": str(conf)})
