"""kmodctl load's modprobe-like flags on the simulated kernel: -a, -n/--dry-run, -v."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kmodd.cli import ctl_load
from kmodd.kernel.sim import SimKernel, modules_dep_names
from tests.fixtures import FakeModule, build_tree

VERSION = "6.1.0-kmodd-load"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("loadtree")
    build_tree(base, [FakeModule("core-lib", exports=["core_fn"]),
                      FakeModule("drv-a", aliases=["x:a"], uses=["core_fn"]),
                      FakeModule("drv-b", uses=["core_fn"])], version=VERSION)
    return base


@pytest.fixture
def sim(tree: Path, tmp_path: Path) -> SimKernel:
    return SimKernel(tmp_path / "sim", deps=modules_dep_names(tree / "lib/modules" / VERSION))


def invoke(tree: Path, tmp_path: Path, sim: SimKernel, capsys: pytest.CaptureFixture[str],
           *argv: str) -> tuple[int, list[str], str]:
    parser = argparse.ArgumentParser(prog="kmodctl load")
    ctl_load.add_arguments(parser, "load")
    args = parser.parse_args(["-d", str(tree), "-S", VERSION, "-C", str(tmp_path / "none"),
                              *argv])
    args.command = "load"
    rc = ctl_load.run(args, kernel=sim)
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def moddir(tree: Path) -> Path:
    return tree / "lib/modules" / VERSION / "kernel/drivers/misc"


def test_all_loads_every_name(tree: Path, tmp_path: Path, sim: SimKernel,
                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = invoke(tree, tmp_path, sim, capsys, "-a", "drv_a", "drv-b")
    assert rc == 0
    assert sim.load_order == ["core_lib", "drv_a", "drv_b"]
    assert out == ["drv_a loaded", "drv_b loaded"]


def test_without_all_the_rest_are_parameters(tree: Path, tmp_path: Path, sim: SimKernel,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = invoke(tree, tmp_path, sim, capsys, "drv_a", "drv_b")
    # "drv_b" is taken as a parameter of drv_a (modprobe's reading), which is refused.
    assert rc == 1 and "drv_b" not in sim.load_order


def test_all_reports_each_failure_and_goes_on(tree: Path, tmp_path: Path, sim: SimKernel,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = invoke(tree, tmp_path, sim, capsys, "-a", "nosuch", "drv_b")
    assert rc == 1
    assert "nosuch: module not found" in err and out == ["drv_b loaded"]


def test_dry_run_loads_nothing_and_prints_the_steps(tree: Path, tmp_path: Path,
                                                    sim: SimKernel,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = invoke(tree, tmp_path, sim, capsys, "-n", "x:a")
    assert rc == 0 and sim.loaded() == {}
    assert out[:2] == [f"insmod {moddir(tree)}/core-lib.ko", f"insmod {moddir(tree)}/drv-a.ko"]
    # What is live already is skipped, as a real load would skip it.
    invoke(tree, tmp_path, sim, capsys, "core_lib")
    rc, out, _ = invoke(tree, tmp_path, sim, capsys, "--dry-run", "drv_a")
    assert rc == 0 and out == [f"insmod {moddir(tree)}/drv-a.ko", "drv_a: would load"]
    assert "drv_a" not in sim.loaded()


def test_verbose_prints_each_insmod(tree: Path, tmp_path: Path, sim: SimKernel,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = invoke(tree, tmp_path, sim, capsys, "-v", "-a", "drv_a", "drv_b")
    assert rc == 0
    assert out == [f"insmod {moddir(tree)}/core-lib.ko", f"insmod {moddir(tree)}/drv-a.ko",
                   "drv_a loaded", f"insmod {moddir(tree)}/drv-b.ko", "drv_b loaded"]


def test_json_with_several_names_is_a_list(tree: Path, tmp_path: Path, sim: SimKernel,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = invoke(tree, tmp_path, sim, capsys, "--json", "-a", "drv_a", "drv_b")
    docs = json.loads("\n".join(out))
    assert rc == 0 and [d["request"] for d in docs] == ["drv_a", "drv_b"]
    assert docs[0]["actions"][-1].endswith("drv-a.ko")


def test_direct_load_honours_the_deny_lists(tree: Path, tmp_path: Path, sim: SimKernel) -> None:
    """kmodctl load without the daemon refuses what a daemon would: the persistent
    list and the deny setting, for the module itself and for what needs it."""
    from kmodd.daemon.deny import system_refuse
    from kmodd.kernel.direct import load_direct
    from kmodd.root import Root

    base = tmp_path / "root"
    (base / "var/lib/kmodd").mkdir(parents=True)
    (base / "var/lib/kmodd/deny").write_text("core-lib\n")
    root = Root(base=base, modules_base=tree)
    config = [str(tmp_path / "none")]
    out = load_direct("drv-a", root=root, version=VERSION, config_paths=config,
                      kernel=sim, deny=system_refuse(root))
    assert not out.ok and "core_lib" in out.message and "kmodctl deny" in out.message
    assert sim.load_order == []
    (base / "var/lib/kmodd/deny").write_text("")
    (base / "etc").mkdir()
    (base / "etc/kmodd.conf").write_text('deny = ["drv_b"]\n')
    out = load_direct("drv-b", root=root, version=VERSION, config_paths=config,
                      kernel=sim, deny=system_refuse(root))
    assert not out.ok and "'deny' setting" in out.message
    assert load_direct("drv-a", root=root, version=VERSION, config_paths=config,
                       kernel=sim, deny=system_refuse(root)).ok
    assert sim.load_order == ["core_lib", "drv_a"]
