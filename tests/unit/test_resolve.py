"""Lookups and plans on a small fixture tree, each answer checked against kmod.

The tree is made of tiny ELF objects indexed by the real ``depmod -b``; every
expected value comes from ``modprobe -R`` / ``modprobe --show-depends`` (with
and without ``-b``) or from libkmod, run on the same tree and configuration.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmodd.journal import NOTICE
from kmodd.kernel.loader import Loader
from kmodd.kernel.sim import SimKernel
from kmodd.resolution.config import load_config
from kmodd.resolution.index import ModuleTree
from kmodd.resolution.plan import Role
from kmodd.resolution.resolve import Resolver, open_resolver
from kmodd.root import Root
from tests.fixtures import (
    MODPROBE,
    VERSION,
    FakeModule,
    LibKmod,
    build_tree,
    instantiate,
    modprobe,
    mutate,
    read_alias_patterns,
    write_conf,
)

MODULES = [
    FakeModule("core", exports=["core_fn"]),
    FakeModule("mid", exports=["mid_fn"], uses=["core_fn"], aliases=["mid:*"]),
    FakeModule("top-drv", uses=["mid_fn"], aliases=["brk:[a-c]-x*", "pci:v00001234d*"],
               softdep="pre: core post: mid"),
    FakeModule("sd-main", aliases=["sdm:*"]),
    FakeModule("sd-pre", uses=["core_fn"]),
    FakeModule("sd-post"),
    FakeModule("blk", aliases=["blk:*", "shared:*"]),
    FakeModule("ok-drv", aliases=["shared:*"]),
    FakeModule("inst", aliases=["inst:*"]),
    FakeModule("multi-a", aliases=["multi:*"]),
    FakeModule("multi-b", aliases=["multi:a*", "multi:ab"]),
    FakeModule("opt-mod", aliases=["opt:*"], uses=["mid_fn"]),
    FakeModule("cyc-a", aliases=["cyc:*"]),
    FakeModule("cyc-b"),
]
BUILTIN = [("bltin", ["bltin:*", "shared2:*"]), ("bltin_two", ["shared2:x*"])]

# One configuration exercising every command, split over files whose names
# decide the order; the .bak file and the hidden file must be ignored.
CONFIG_FILES = {
    "10-options.conf": """\
        options top-drv a=1\tb=2
        options top_drv  c=3
        alias myalias top-drv
        options myalias d=4
        options opt-mod x=1
        options opt:* never=1
        options mid m=1
        """,
    "20-softdep.conf": """\
        softdep sd-main pre: sd-pre myalias post: sd-post
        softdep sd_m* pre: mid
        install sd-main /bin/ignored-because-of-softdeps
        softdep cyc-a pre: cyc-b
        softdep cyc-b pre: cyc-a post: nothing-resolves-this
        """,
    "30-blacklist.conf": """\
        blacklist blk
        blacklist top-drv
        blacklist bltin
        """,
    "40-install.conf": """\
        install inst /sbin/foo $CMDLINE_OPTS --x
        options inst q=1
        install nomod /bin/echo hi $CMDLINE_OPTS
        remove rmonly /bin/false
        install in* /bin/glob
        install core /bin/core-cmd
        """,
    "50-alias.conf": """\
        alias glob-* mid
        alias glob-[x-z]* core
        alias ghost nonexistent
        alias multi:ab sd-post
        alias two ok-drv
        alias two blk
        """,
    "60-alias.conf.bak": "alias never mid\n",
    ".hidden.conf": "alias never mid\n",
}

REQUESTS = [
    "core", "mid", "top-drv", "top_drv", "sd-main", "sd_pre", "sd-post", "blk", "ok-drv",
    "inst", "multi-a", "multi_b", "opt-mod", "cyc-a", "cyc-b", "bltin", "bltin_two", "bltin-two",
    "myalias", "ghost", "nomod", "rmonly", "glob-a", "glob-x1", "two", "multi:ab", "multi:a1",
    "multi:zz", "shared:1", "shared2:1", "shared2:x1", "bltin:foo", "brk:b-x", "brk:b_x9",
    "brk:d-x", "brk:[b]-x", "pci:v00001234d00005678", "pci:v00001235d00005678",
    "symbol:core_fn", "symbol:mid_fn", "symbol:nothing", "inst:1", "opt:2", "sdm:3", "cyc:4",
    "nothing", "", "a]b", "mid:x-y", "in", "insx",
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("resolve-tree")
    build_tree(base, MODULES, builtin=BUILTIN)
    return base


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resolve-conf")
    for name, text in CONFIG_FILES.items():
        write_conf(d, name, text)
    return d


def _resolver(tree: Path, configs: list[str]) -> Resolver:
    return open_resolver(Root(modules_base=tree), VERSION, configs)


def _kmod(tree: Path, configs: list[str], *args: str) -> tuple[int, list[str]]:
    argv = ["-d", str(tree), "-S", VERSION]
    for c in configs:
        argv += ["-C", c]
    res = modprobe(*argv, *args)
    return res.returncode, res.stdout.splitlines()


@pytest.fixture(scope="module", params=["configured", "empty"])
def setup(request: pytest.FixtureRequest, tree: Path, confdir: Path
          ) -> tuple[Path, list[str], Resolver]:
    configs = [str(confdir)] if request.param == "configured" else ["/nonexistent"]
    return tree, configs, _resolver(tree, configs)


def test_lookup_matches_modprobe_R(setup: tuple[Path, list[str], Resolver]) -> None:
    tree, configs, resolver = setup
    for req in REQUESTS:
        rc, out = _kmod(tree, configs, "-R", req)
        ours = resolver.lookup(req)
        assert ours == out, req
        assert (rc == 0) == bool(ours), req


def test_show_depends_matches_modprobe(setup: tuple[Path, list[str], Resolver]) -> None:
    tree, configs, resolver = setup
    for req in REQUESTS:
        for blacklist_all in (False, True):
            flags = ["-b"] if blacklist_all else []
            rc, out = _kmod(tree, configs, *flags, "--show-depends", req)
            lines, found = resolver.show_depends(req, blacklist_all=blacklist_all)
            assert lines == out, (req, blacklist_all)
            assert found == (rc == 0), (req, blacklist_all)


def test_blacklist_filter_matches_libkmod(setup: tuple[Path, list[str], Resolver]) -> None:
    """``resolve -b`` is udev's view: libkmod's lookup through the blacklist filter."""
    tree, configs, resolver = setup
    lib = LibKmod(str(tree / "lib/modules" / VERSION), configs)
    try:
        for req in REQUESTS:
            assert resolver.resolve(req) == lib.lookup(req), req
            assert resolver.resolve(req, blacklist_all=True) == lib.lookup(req, blacklist=True), req
    finally:
        lib.close()


def test_instantiated_aliases_match_libkmod(tree: Path, confdir: Path) -> None:
    moddir = tree / "lib/modules" / VERSION
    rng = random.Random(2)
    inputs = []
    for pattern, _ in read_alias_patterns(moddir):
        for _ in range(20):
            hit = instantiate(pattern, rng)
            inputs += [hit, mutate(hit, rng)]
    resolver = _resolver(tree, [str(confdir)])
    lib = LibKmod(str(moddir), [str(confdir)])
    try:
        for alias in inputs:
            assert resolver.lookup(alias) == lib.lookup(alias), alias
    finally:
        lib.close()


def test_plan_structure(tree: Path, confdir: Path) -> None:
    """The merged plan: each module once, roles and deps as modules.dep says,
    order taken from modprobe's own listing."""
    resolver = _resolver(tree, [str(confdir)])
    tree_index = ModuleTree(tree / "lib/modules" / VERSION)
    for req in REQUESTS:
        plan = resolver.plan(req)
        names = [s.name for s in plan.steps]
        assert len(names) == len(set(names)), req
        _, out = _kmod(tree, [str(confdir)], "--show-depends", req)
        # modprobe's first appearance of each file is the plan's order
        first_paths = list(dict.fromkeys(line.split()[1] for line in out
                                         if line.startswith("insmod ")))
        # (kmod inserts a module with softdeps even when it has an install command)
        assert [s.path for s in plan.steps
                if s.path and (not s.install_command or s.kmod_ignores_install)] == \
            [p for p in first_paths], req
        for step in plan.steps:
            entry = tree_index.dep(step.name)
            assert step.deps == (entry.deps if entry else ()), (req, step.name)
            if step.role is Role.TARGET:
                assert step.name in plan.targets
        for target in plan.targets:
            assert any(s.name == target and s.role is Role.TARGET for s in plan.steps)


def test_plan_softdeps_blacklist_install(tree: Path, confdir: Path) -> None:
    resolver = _resolver(tree, [str(confdir)])
    plan = resolver.plan("sd-main")
    roles = {s.name: s.role for s in plan.steps}
    order = [s.name for s in plan.steps]
    assert roles["sd_pre"] is Role.SOFTDEP_PRE and roles["sd_post"] is Role.SOFTDEP_POST
    assert order.index("sd_pre") < order.index("sd_main") < order.index("sd_post")
    # softdeps present: libkmod ignores the install command (ignorecmd, kmod bug
    # #446); kmodd keeps it and marks the difference.
    main = [s for s in plan.steps if s.name == "sd_main"]
    assert [(s.install_command, s.kmod_ignores_install) for s in main] == \
        [("/bin/ignored-because-of-softdeps", True)]

    # blacklisted through an alias only, unless blacklist_all (udev / -b)
    assert resolver.plan("blk").targets == ("blk",)
    assert resolver.plan("blk:1").targets == ()
    assert resolver.plan("blk:1").blacklisted == ("blk",)
    assert resolver.plan("blk", blacklist_all=True).blacklisted == ("blk",)
    shared = resolver.plan("shared:1")
    assert shared.targets == ("ok_drv",) and shared.blacklisted == ("blk",)

    inst = resolver.plan("inst", extra_options="y=2")
    step = inst.steps[-1]
    _, out = _kmod(tree, [str(confdir)], "--show-depends", "inst", "y=2")
    assert out == [f"install /sbin/foo $CMDLINE_OPTS --x {step.options}"]
    assert step.install_command == "/sbin/foo $CMDLINE_OPTS --x"

    builtin = resolver.plan("shared2:x1")
    assert [(s.name, s.builtin, s.path) for s in builtin.steps] == [("bltin_two", True, None)]
    assert builtin.blacklisted == ("bltin",)
    # a builtin found by name is not an alias: the alias-only blacklist lets it through
    assert [(s.name, s.builtin) for s in resolver.plan("bltin").steps] == [("bltin", True)]


def test_extra_options_only_on_target(tree: Path, confdir: Path) -> None:
    resolver = _resolver(tree, [str(confdir)])
    for req in ("opt-mod", "top-drv", "myalias", "inst"):
        _, out = _kmod(tree, [str(confdir)], "--show-depends", req, "k=v", "s=two words")
        # modprobe quotes a value with spaces it got as one argument
        lines, _ = resolver.show_depends(req, extra_options='k=v s="two words"')
        assert lines == out, req


def test_resolver_is_pure_and_reusable(tree: Path, confdir: Path) -> None:
    """Repeated and interleaved calls give the same answers (no hidden state)."""
    resolver = _resolver(tree, [str(confdir)])
    first = {req: (resolver.lookup(req), resolver.show_depends(req)) for req in REQUESTS}
    for req in reversed(REQUESTS):
        assert (resolver.lookup(req), resolver.show_depends(req)) == first[req]


def test_config_object_reusable(tree: Path, confdir: Path) -> None:
    moddir = tree / "lib/modules" / VERSION
    config = load_config(Root(modules_base=tree), moddir, [str(confdir)])
    a = Resolver(config, ModuleTree(moddir))
    b = Resolver(config, ModuleTree(moddir))
    assert [a.lookup(r) for r in REQUESTS] == [b.lookup(r) for r in REQUESTS]


def _kmodctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "kmodd.cli.kmodctl", *args], input=stdin,
                          capture_output=True, text=True, check=False, cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)})


def test_cli_resolve_pairs_lines_with_modprobe(tree: Path, confdir: Path) -> None:
    common = ["-d", str(tree), "-S", VERSION, "-C", str(confdir)]
    stdin_part = REQUESTS[:10]
    res = _kmodctl("resolve", *common, "multi:ab", "-", "nothing",
                   stdin="".join(r + "\n" for r in stdin_part))
    inputs = ["multi:ab", *stdin_part, "nothing"]
    assert res.returncode == 1                     # "nothing" does not resolve
    lines = res.stdout.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == inputs
    for alias, line in zip(inputs, lines, strict=True):
        _, out = _kmod(tree, [str(confdir)], "-R", alias)
        assert line == f"{alias}\t{' '.join(out)}"
    ok = _kmodctl("resolve", *common, "mid", "two")
    assert ok.returncode == 0 and ok.stdout == "mid\tmid\ntwo\tok_drv blk\n"
    blocked = _kmodctl("resolve", *common, "-b", "two", "blk:1")
    assert blocked.returncode == 1 and blocked.stdout == "two\tok_drv\nblk:1\t\n"
    js = _kmodctl("resolve", *common, "--json", "two", "nothing")
    assert [json.loads(ln) for ln in js.stdout.splitlines()] == [
        {"alias": "two", "modules": ["ok_drv", "blk"]}, {"alias": "nothing", "modules": []}]
    missing = _kmodctl("resolve", "-d", str(tree), "-S", "no-such-version", "mid")
    assert missing.returncode == 2 and "no-such-version" in missing.stderr


def test_cli_deps_prints_modprobe_lines(tree: Path, confdir: Path) -> None:
    common = ["-d", str(tree), "-S", VERSION, "-C", str(confdir)]
    requests = ["top-drv", "inst", "sd-main", "shared2:x1", "blk:1"]
    for flags in ([], ["-b"]):
        res = _kmodctl("deps", *common, *flags, *requests)
        expected = "".join(modprobe("-d", str(tree), "-S", VERSION, "-C", str(confdir), *flags,
                                    "--show-depends", r).stdout for r in requests)
        assert res.returncode == 0 and res.stdout == expected
    bad = _kmodctl("deps", *common, "top-drv", "nothing")
    assert bad.returncode == 1 and "nothing" in bad.stderr
    js = _kmodctl("deps", *common, "--json", "sd-main", "blk:1")
    first, second = (json.loads(ln) for ln in js.stdout.splitlines())
    plan = _resolver(tree, [str(confdir)]).plan("sd-main")
    assert first["targets"] == list(plan.targets)
    assert [(s["name"], s["role"], s["path"], s["options"]) for s in first["steps"]] == \
        [(s.name, s.role.value, s.path, s.options) for s in plan.steps]
    assert second["resolved"] is False and second["blacklisted"] == ["blk"]


def _random_config(rng: random.Random) -> str:
    names = [m.file for m in MODULES] + ["bltin", "bltin-two", "ghost", "nothing"]
    patterns = [*names, "sd*", "*-a", "mult?-*", "top[-_]drv", "[a-c]*", "mid:*", "two", "al1"]
    lines = []
    for _ in range(rng.randrange(3, 14)):
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(f"alias {rng.choice(['al1', 'al2', *patterns])} {rng.choice(names)}")
        elif kind == 1:
            lines.append(f"options {rng.choice([*names, 'al1', 'mid:x', 'two'])} "
                         f"{rng.choice(['a=1', 'b=2 c=3', '', ' d=4'])}")
        elif kind == 2:
            pre = " ".join(rng.sample([*names, "al1", "mid:1", "shared:1"], rng.randrange(3)))
            post = " ".join(rng.sample([*names, "al2"], rng.randrange(3)))
            lines.append(f"softdep {rng.choice(patterns)} pre: {pre} post: {post}")
        elif kind == 3:
            lines.append(f"install {rng.choice(patterns)} /bin/cmd{rng.randrange(9)} $CMDLINE_OPTS")
        elif kind == 4:
            lines.append(f"remove {rng.choice(patterns)} /bin/rm{rng.randrange(9)}")
        else:
            lines.append(f"blacklist {rng.choice(names)}")
    return "\n".join(lines) + "\n"


def test_random_configurations_like_modprobe(tree: Path, tmp_path: Path) -> None:
    """Random mixes of aliases, options, softdeps (cycles included), install and
    remove commands and blacklists: plans and lookups equal modprobe's."""
    for seed in range(12):
        rng = random.Random(seed)
        conf = tmp_path / f"c{seed}.conf"
        conf.write_text(_random_config(rng))
        resolver = _resolver(tree, [str(conf)])
        for req in rng.sample([*REQUESTS, "al1", "al2"], 8):
            rc, out = _kmod(tree, [str(conf)], "-R", "--", req)
            assert resolver.lookup(req) == out, (conf.read_text(), req)
            for flags in ([], ["-b"]):
                rc, out = _kmod(tree, [str(conf)], *flags, "--show-depends", "--", req)
                lines, found = resolver.show_depends(req, blacklist_all=bool(flags))
                assert (lines, found) == (out, rc == 0), (conf.read_text(), req, flags)


def test_cli_resolve_answers_each_line_as_it_arrives(tree: Path, confdir: Path) -> None:
    """A caller feeding one alias at a time through a pipe gets each answer
    before sending the next; odd bytes and a last line without newline pair up."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmodd.cli.kmodctl", "resolve", "-d", str(tree), "-S", VERSION,
         "-C", str(confdir), "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.stdin is not None and proc.stdout is not None
    def kmod(alias: str) -> bytes:
        return " ".join(_kmod(tree, [str(confdir)], "-R", "--", alias)[1]).encode()

    try:
        for alias in (b"mid", b"two", b"", b"x\xff"):
            proc.stdin.write(alias + b"\n")
            proc.stdin.flush()
            expected = kmod(alias.decode("utf-8", "surrogateescape")) if alias[:1] != b"x" else b""
            assert proc.stdout.readline() == alias + b"\t" + expected + b"\n"
        proc.stdin.write(b"shared:1")
        proc.stdin.close()
        assert proc.stdout.read() == b"shared:1\t" + kmod("shared:1") + b"\n"
        assert proc.wait(timeout=30) == 1
    finally:
        proc.kill()


def test_cli_relative_module_root_gives_absolute_paths(tree: Path, confdir: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    args = ["-d", tree.name, "-S", VERSION, "-C", str(confdir)]
    ours = subprocess.run([sys.executable, "-m", "kmodd.cli.kmodctl", "deps", *args, "top-drv"],
                          capture_output=True, text=True, cwd=tree.parent, check=False,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    theirs = subprocess.run([MODPROBE, *args, "--show-depends", "top-drv"], capture_output=True,
                            text=True, cwd=tree.parent, check=False)
    assert ours.stdout == theirs.stdout and f"insmod {tree}/lib/modules/" in ours.stdout


def test_remove_command_first_matching_pattern(tree: Path, tmp_path: Path) -> None:
    """The first remove command whose pattern matches, as ``modprobe -r -n -v`` shows it."""
    conf = write_conf(tmp_path, "rm.conf", "remove mid* /bin/echo first\n"
                      "remove mid /bin/echo exact\nremove c?re /bin/echo core\n")
    resolver = _resolver(tree, [str(conf)])
    for name in ("mid", "core", "sd_main"):
        _, out = _kmod(tree, [str(conf)], "-r", "-n", "-v", name)
        shown = [ln.removeprefix("remove ") for ln in out if ln.startswith("remove ")]
        assert resolver.remove_command(name) == (shown[0] if shown else None), name
    assert resolver.remove_command("mid") is not None


@pytest.mark.parametrize("how", ["argument", "stream"])
def test_cli_resolve_corrupt_alias_index_is_a_clear_error(tree: Path, tmp_path: Path,
                                                          how: str) -> None:
    # A stream prepares the alias index at once, a single key walks the trie:
    # both name the damaged file and exit 2, without a traceback.
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    moddir = copy / "lib/modules" / VERSION
    data = (moddir / "modules.alias.bin").read_bytes()
    (moddir / "modules.alias.bin").write_bytes(data[:12] + b"\xff" * 16)
    args = ["resolve", "-d", str(copy), "-S", VERSION, "-C", str(tmp_path / "none")]
    res = _kmodctl(*args, "-", stdin="pci:v1\n") if how == "stream" else \
        _kmodctl(*args, "pci:v1")
    assert res.returncode == 2, res
    assert "modules.alias.bin" in res.stderr and "Traceback" not in res.stderr


def test_install_command_honoured_despite_softdeps_kmod_bug_446(
        tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``install foo /bin/false`` forbids foo even when foo has softdeps, unlike modprobe."""
    conf = write_conf(tmp_path / "conf", "forbid.conf",
                      "install sd-main /bin/false\nsoftdep sd-main pre: sd-pre post: sd-post\n")
    resolver = _resolver(tree, [str(conf)])
    # kmod's plan loads the module: --show-depends prints an insmod, and so do we.
    rc, theirs = _kmod(tree, [str(conf)], "--show-depends", "sd-main")
    assert rc == 0 and any(ln.startswith("insmod ") and "sd-main" in ln for ln in theirs)
    assert resolver.show_depends("sd-main") == (theirs, True)
    plan = resolver.plan("sd-main")
    sim = SimKernel(tmp_path / "kernel")
    sim.learn_plan(plan)
    with caplog.at_level(logging.DEBUG, logger="kmodd.kernel.loader"):
        results = {r.name: r for r in Loader(sim).load_plan(plan)}
    assert results["sd_main"].status == "failed"
    assert "sd_main" not in sim.loaded()
    assert {"sd_pre", "sd_post"} <= set(sim.loaded())   # softdeps as modprobe loads them
    notices = [r for r in caplog.records if r.levelno == NOTICE]
    assert len(notices) == 1 and "modprobe would load the module directly" in \
        notices[0].getMessage()
