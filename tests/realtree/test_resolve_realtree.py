"""kmodctl resolve / deps against kmod 30 on Debian's installed module tree.

Every alias pattern of the tree is turned into a concrete modalias (and some
into near misses), then one ``kmodctl resolve -`` process answers them all and
libkmod (in-process, through ctypes) answers the same; a sample also goes
through ``modprobe -R`` itself.  ``kmodctl deps`` is compared with
``modprobe --show-depends`` for every module of the tree, then again under a
configuration with options, softdeps, install commands and a blacklist.

These tests never skip: without the tree or kmod they fail and say why.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kmodd.resolution.resolve import Resolver, open_resolver
from kmodd.root import Root
from tests.fixtures import (
    MODPROBE,
    LibKmod,
    instantiate,
    modprobe,
    mutate,
    read_alias_patterns,
    read_module_names,
    real_kernel_version,
    write_conf,
)

pytestmark = pytest.mark.realtree

REPO = Path(__file__).resolve().parents[2]
WORKERS = 4


def _real_version() -> str:
    try:
        found = [real_kernel_version()]
    except RuntimeError as exc:
        pytest.fail(str(exc))
    if not os.access(MODPROBE, os.X_OK):
        pytest.fail(f"kmod's modprobe is missing ({MODPROBE}): install kmod")
    return found[-1]


@pytest.fixture(scope="module")
def version() -> str:
    return _real_version()


@pytest.fixture(scope="module")
def moddir(version: str) -> Path:
    return Path("/lib/modules") / version


def kmodctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kmodd.cli.kmodctl", *args], input=stdin,
                          capture_output=True, text=True, check=False, env=env, cwd=REPO)


def _builtin_aliases(moddir: Path) -> list[str]:
    out = []
    for entry in (moddir / "modules.builtin.modinfo").read_bytes().split(b"\0"):
        key, _, value = entry.decode(errors="replace").partition("=")
        if key.endswith(".alias"):
            out.append(value)
    return out


@pytest.fixture(scope="module")
def inputs(moddir: Path) -> list[str]:
    """Thousands of lookups: every alias pattern instantiated, a quarter of them
    mutated into near misses, builtin aliases, module names (as written in the
    files, dashes included), builtin names and symbol: lookups."""
    rng = random.Random(20240601)
    out: list[str] = []
    for pattern, _ in read_alias_patterns(moddir):
        hit = instantiate(pattern, rng)
        out.append(hit)
        if rng.random() < 0.25:
            out.append(mutate(hit, rng))
    for alias in _builtin_aliases(moddir):
        out.append(instantiate(alias, rng))
    for line in (moddir / "modules.dep").read_text().splitlines():
        base = line.split(":", 1)[0].rsplit("/", 1)[-1]
        out.append(base.split(".", 1)[0])
    for line in (moddir / "modules.builtin").read_text().splitlines():
        out.append(line.rsplit("/", 1)[-1].split(".", 1)[0])
    symbols = [ln.split()[1] for ln in (moddir / "modules.symbols").read_text().splitlines()
               if ln.startswith("alias ")]
    out += rng.sample(symbols, 500)
    out += ["symbol:no_such_symbol", "nonexistent-module", "", "a]b", "usb:*", "pci:*"]
    return out


def _mismatches(inputs: Sequence[str], ours: Sequence[list[str]],
                theirs: Sequence[list[str]]) -> list[tuple[str, list[str], list[str]]]:
    return [(a, o, t) for a, o, t in zip(inputs, ours, theirs, strict=True) if o != t]


def test_resolve_process_matches_libkmod(version: str, moddir: Path, inputs: list[str]) -> None:
    assert len(inputs) > 30000
    res = kmodctl("resolve", "-S", version, "-", stdin="".join(a + "\n" for a in inputs))
    assert res.returncode == 1, res.stderr        # some inputs are meant to miss
    lines = res.stdout.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == len(inputs)
    ours = []
    for alias, line in zip(inputs, lines, strict=True):
        echoed, tab, names = line.partition("\t")
        assert (echoed, tab) == (alias, "\t")
        ours.append(names.split())
    lib = LibKmod(str(moddir))
    try:
        theirs = [lib.lookup(a) for a in inputs]
    finally:
        lib.close()
    bad = _mismatches(inputs, ours, theirs)
    assert not bad, f"{len(bad)} of {len(inputs)} differ from libkmod, e.g. {bad[:10]}"
    hits = sum(1 for t in theirs if t)
    assert 20000 < hits < len(inputs) - 2000      # both hits and misses were tested


def _parallel(fn: Callable[[str], subprocess.CompletedProcess[str]],
              items: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(fn, items))


def test_resolve_matches_modprobe_R(version: str, inputs: list[str]) -> None:
    sample = random.Random(7).sample(inputs, 1500)
    results = _parallel(lambda a: modprobe("-S", version, "-R", "--", a), sample)
    resolver = open_resolver(Root(), version)
    bad = [(a, resolver.lookup(a), r.stdout.split()) for a, r in zip(sample, results, strict=True)
           if resolver.lookup(a) != r.stdout.split() or bool(resolver.lookup(a)) !=
           (r.returncode == 0)]
    assert not bad, f"{len(bad)} differ from modprobe -R, e.g. {bad[:10]}"


@pytest.fixture(scope="module")
def blacklist_conf(tmp_path_factory: pytest.TempPathFactory, moddir: Path) -> Path:
    """Debian's configuration plus a blacklist of every 5th module that has aliases."""
    d = tmp_path_factory.mktemp("blacklist")
    aliased = sorted({m for _, m in read_alias_patterns(moddir)})
    write_conf(d, "blacklist.conf", "".join(f"blacklist {m}\n" for m in aliased[::5]))
    for src in ("/etc/modprobe.d", "/lib/modprobe.d"):
        for conf in sorted(Path(src).glob("*.conf")):
            if not (d / conf.name).exists():
                (d / conf.name).write_text(conf.read_text())
    return d


def test_resolve_blacklist_matches_libkmod(version: str, moddir: Path, inputs: list[str],
                                           blacklist_conf: Path) -> None:
    """``-b``: udev's view, libkmod's lookup through its blacklist filter."""
    configs = [str(blacklist_conf)]
    resolver = open_resolver(Root(), version, configs)
    assert len(resolver.config.blacklist) > 100
    lib = LibKmod(str(moddir), configs)
    try:
        theirs = [lib.lookup(a, blacklist=True) for a in inputs]
        plain = [lib.lookup(a) for a in inputs]
    finally:
        lib.close()
    ours = [resolver.resolve(a, blacklist_all=True) for a in inputs]
    bad = _mismatches(inputs, ours, theirs)
    assert not bad, f"{len(bad)} differ from libkmod's blacklist filter, e.g. {bad[:10]}"
    assert sum(1 for p, t in zip(plain, theirs, strict=True) if p != t) > 1000
    # and one kmodctl -b process over a slice agrees too
    part = inputs[::10]
    res = kmodctl("resolve", "-S", version, "-C", str(blacklist_conf), "-b", "-",
                  stdin="".join(a + "\n" for a in part))
    got = [ln.partition("\t")[2].split() for ln in res.stdout.split("\n")[:-1]]
    assert got == theirs[::10]


def _show_depends(version: str, configs: Sequence[str], flags: Sequence[str]
                  ) -> Callable[[str], subprocess.CompletedProcess[str]]:
    args = ["-S", version, *[a for c in configs for a in ("-C", c)], *flags]
    return lambda name: modprobe(*args, "--show-depends", "--", name)


def _compare_deps(version: str, requests: list[str], configs: Sequence[str],
                  flags: Sequence[str], resolver: Resolver) -> None:
    theirs = _parallel(_show_depends(version, configs, flags), requests)
    blacklist_all = "-b" in flags
    bad = []
    for req, res in zip(requests, theirs, strict=True):
        lines, found = resolver.show_depends(req, blacklist_all=blacklist_all)
        if lines != res.stdout.splitlines() or found != (res.returncode == 0):
            bad.append((req, lines, res.stdout.splitlines()))
    assert not bad, f"{len(bad)} of {len(requests)} differ, e.g. {bad[:5]}"
    # one kmodctl deps process prints exactly what all the modprobe runs printed
    proc = kmodctl("deps", "-S", version, *[a for c in configs for a in ("-C", c)], *flags,
                   *requests)
    assert proc.stdout == "".join(r.stdout for r in theirs)
    assert (proc.returncode == 0) == all(r.returncode == 0 for r in theirs)


def test_deps_every_module(version: str, moddir: Path) -> None:
    names = read_module_names(moddir)
    assert len(names) > 4000
    builtin = [ln.rsplit("/", 1)[-1].split(".", 1)[0]
               for ln in (moddir / "modules.builtin").read_text().splitlines()]
    requests = names + builtin
    _compare_deps(version, requests, [], [], open_resolver(Root(), version))


CONFIG = """\
options ext4 debug=1\tmore=2
options ext4  second=line
options e1000e IntMode=1,1 InterruptThrottleRate=3000
alias my-net e1000e
alias my-glob-* igb
alias my-snd snd-hda-intel
options my-net from_alias=1
options snd_hda_intel model=auto
softdep e1000e pre: crc32c-generic ptp post: my-snd
softdep igb pre: my-net
softdep snd-hda-* pre: soundcore
softdep xfs post: crypto-crc32c nonexistent-soft
install dummy /sbin/modprobe --ignore-install dummy $CMDLINE_OPTS && echo $CMDLINE_OPTS
install my-install /bin/true
install loop /bin/echo loop-cmd
install vfat /bin/echo vfat-cmd
softdep vfat pre: fat
remove ifb /bin/true
blacklist igb
blacklist snd-pcsp
blacklist usb-storage
"""

CONFIG_REQUESTS = [
    "ext4", "e1000e", "my-net", "my-glob-x", "my-snd", "igb", "snd-hda-intel", "snd_hda_codec",
    "xfs", "dummy", "my-install", "loop", "vfat", "ifb", "snd-pcsp", "usb-storage", "uas",
    "pci:v00008086d00001533sv00000000sd00000000bc02sc00i00", "usb:v0000p0000d0000dc00dsc00dp00"
    "ic08isc06ip50in00", "crypto-crc32c", "platform:pcspkr", "fs-vfat", "bonding", "dummy",
]


def test_deps_with_configuration(version: str, moddir: Path,
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    conf = tmp_path_factory.mktemp("conf")
    write_conf(conf, "00-test.conf", CONFIG)
    for src in ("/etc/modprobe.d", "/lib/modprobe.d"):
        for f in sorted(Path(src).glob("*.conf")):
            if not (conf / f.name).exists():
                (conf / f.name).write_text(f.read_text())
    configs = [str(conf)]
    names = read_module_names(moddir)
    requests = CONFIG_REQUESTS + random.Random(3).sample(names, 300)
    for flags in ([], ["-b"]):
        resolver = open_resolver(Root(), version, configs)
        _compare_deps(version, requests, configs, flags, resolver)
    # -C replaces the default directories: Debian's own options are gone
    resolver = open_resolver(Root(), version, [str(conf / "00-test.conf")])
    assert resolver.config.options_for("bonding") == ""
    _compare_deps(version, ["bonding", "ext4", "dummy"], [str(conf / "00-test.conf")], [],
                  resolver)


def test_wildcard_characters_in_lookups_match_libkmod(version: str, moddir: Path) -> None:
    """Keys holding '*', '?' or '[' (an administrator's ``resolve 'pci:*'``):
    libkmod's trie walk follows such a character both as a wildcard and as a
    literal edge, so a pattern can answer twice; kmodd must list the same."""
    rng = random.Random(11)
    patterns = [p for p, _ in read_alias_patterns(moddir)]
    keys = [*rng.sample(patterns, 400), "pci:*", "usb:v*", "acpi*:PNP0A0?:*", "of:N*T*C*",
            "cpu:type:x86,ven*fam*mod*:feature:*0089*"]
    resolver = open_resolver(Root(), version)
    lib = LibKmod(str(moddir))
    try:
        theirs = [lib.lookup(k) for k in keys]
    finally:
        lib.close()
    bad = _mismatches(keys, [resolver.lookup(k) for k in keys], theirs)
    assert not bad, f"{len(bad)} of {len(keys)} differ from libkmod, e.g. {bad[:5]}"
