"""Module indexes: the .bin reader against depmod's text files, modprobe and libkmod.

Fixture trees (``tests.fixtures.build_tree``: small ELF modules carrying the
real aliases of Debian's modules, indexed by the real ``depmod -b``) and the
real tree; expected answers come from kmod itself (``modprobe -R`` and
libkmod through ctypes) wherever kmod answers.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from kmodd.resolution import aliasmatch, index, index_cache
from kmodd.resolution.index import DepEntry, IndexCorrupt, ModuleTree
from kmodd.resolution.index_bin import BinIndex
from kmodd.resolution.names import alias_normalize
from tests.fixtures import (
    VERSION,
    FakeModule,
    LibKmod,
    build_tree,
    instantiate,
    modprobe,
    mutate,
    read_alias_patterns,
    real_moddir,
)

REAL_TREE = real_moddir()

# Modules carrying the real aliases of their Debian namesakes, so the indexes
# depmod writes have real shapes: usb-storage and uas share class patterns,
# option and qcserial share vendors, 8139too and 8139cp overlap on one PCI id.
# (file, subdir, uses); a module exports "sym_<name>" and uses its dependencies'.
FIXTURE_MODULES = (
    ("usb-common", "drivers/usb/common", ()),
    ("usbcore", "drivers/usb/core", ("usb_common",)),
    ("scsi_common", "drivers/scsi", ()),
    ("scsi_mod", "drivers/scsi", ("scsi_common",)),
    ("uas", "drivers/usb/storage", ("usb_storage", "scsi_mod", "usbcore")),
    ("usb-storage", "drivers/usb/storage", ("scsi_mod", "usbcore")),
    ("usbserial", "drivers/usb/serial", ("usbcore",)),
    ("usb_wwan", "drivers/usb/serial", ("usbserial",)),
    ("option", "drivers/usb/serial", ("usb_wwan", "usbserial")),
    ("qcserial", "drivers/usb/serial", ("usb_wwan", "usbserial")),
    ("ftdi_sio", "drivers/usb/serial", ("usbserial",)),
    ("mii", "drivers/net", ()),
    ("8139cp", "drivers/net/ethernet/realtek", ("mii",)),
    ("8139too", "drivers/net/ethernet/realtek", ("mii",)),
    ("dummy", "drivers/net", ()),
    ("hid", "drivers/hid", ()),
    ("hid-generic", "drivers/hid", ("hid",)),
    ("usbhid", "drivers/hid/usbhid", ("hid", "usbcore")),
)
BIN_FILES = ("modules.dep.bin", "modules.alias.bin", "modules.symbols.bin",
             "modules.builtin.bin", "modules.builtin.alias.bin")


def _real_tree() -> Path:
    if not (REAL_TREE / "modules.alias").exists():
        raise RuntimeError(f"{REAL_TREE}/modules.alias is missing: install linux-image-amd64")
    return REAL_TREE


def real_builtin() -> list[tuple[str, list[str]]]:
    """(name, aliases) of the real kernel's builtin modules."""
    aliases: dict[str, list[str]] = {}
    for path in (_real_tree() / "modules.builtin").read_text().split():
        aliases[path.rsplit("/", 1)[-1].split(".")[0].replace("-", "_")] = []
    for rec in (REAL_TREE / "modules.builtin.modinfo").read_bytes().decode().split("\0"):
        name, _, rest = rec.partition(".")
        key, _, value = rest.partition("=")
        if key == "alias" and value:
            aliases.setdefault(name, []).append(value)
    return list(aliases.items())


def fixture_modules() -> list[FakeModule]:
    real: dict[str, list[str]] = {}
    for pattern, module in read_alias_patterns(_real_tree()):
        real.setdefault(module, []).append(pattern)
    out = []
    for file, subdir, uses in FIXTURE_MODULES:
        name = file.replace("-", "_")
        out.append(FakeModule(file, aliases=real.get(name, []), exports=[f"sym_{name}"],
                              uses=[f"sym_{u}" for u in uses], subdir=subdir))
    return out


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tree(tmp_path_factory.mktemp("tree"), fixture_modules(), builtin=real_builtin())


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("noconfig")


def copy_tree(src: Path, dst: Path, drop: Iterable[str] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def text_aliases(moddir: Path, name: str = "modules.alias") -> list[tuple[str, str]]:
    """(pattern, module) lines; modules.alias patterns as depmod normalises them for the .bin."""
    out = []
    for line in (moddir / name).read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "alias":
            pattern = fields[1]
            if name == "modules.alias":
                pattern = normalize(pattern)
            out.append((pattern, fields[2]))
    return out


def normalize(pattern: str) -> str:
    """'-' to '_' outside brackets (the real tree has no unbalanced brackets)."""
    out = []
    depth = 0
    for c in pattern:
        depth += c == "["
        out.append("_" if c == "-" and not depth else c)
        depth -= c == "]"
    return "".join(out)


def sample_keys(patterns: Iterable[str], count: int, seed: int = 7) -> list[str]:
    """Modaliases from the patterns, one in five mutated into a near miss."""
    rng = random.Random(seed)
    pats = sorted(set(patterns))
    keys = []
    for _ in range(count):
        key = instantiate(rng.choice(pats), rng)
        keys.append(mutate(key, rng) if rng.random() < 0.2 else key)
    return keys


def modprobe_resolve(moddir: Path, config: Path, alias: str) -> list[str]:
    base = moddir.parent.parent.parent
    return modprobe("-d", str(base), "-S", moddir.name, "-C", str(config), "-R",
                    alias).stdout.split()


def kmod_alias_lookup(tree: ModuleTree, key: str) -> list[str]:
    """What kmod_module_new_from_lookup answers for a modalias with no configuration."""
    key = alias_normalize(key)
    return tree.alias(key) or tree.builtin_alias(key)


# -- the .bin reader against depmod's text files ----------------------------------


def test_dep_bin_matches_text(fixture_tree: Path) -> None:
    tree = ModuleTree(fixture_tree)
    lines = (fixture_tree / "modules.dep").read_text().splitlines()
    assert len(lines) == len(FIXTURE_MODULES)
    names = []
    for line in lines:
        path, deps = line.split(":", 1)
        name = os.path.basename(path).split(".")[0].replace("-", "_")
        names.append(name)
        want = DepEntry(name, str(fixture_tree / path),
                        tuple(os.path.basename(d).split(".")[0].replace("-", "_")
                              for d in deps.split()))
        assert tree.dep(name) == want
        assert tree.dep_path(name) == str(fixture_tree / path)
    assert tree.module_names() == sorted(names)
    assert tree.dep("uas") == DepEntry(
        "uas", str(fixture_tree / "kernel/drivers/usb/storage/uas.ko"),
        ("usb_storage", "usbcore", "usb_common", "scsi_mod", "scsi_common"))  # depmod's order
    assert tree.dep("usb-storage") is None        # keys are exact: callers normalise
    assert tree.dep("nosuchmodule") is None
    assert tree.dep_path("") is None


def test_alias_bin_patterns_match_text(fixture_tree: Path) -> None:
    tree = ModuleTree(fixture_tree)
    assert sorted(tree.alias_patterns()) == sorted(text_aliases(fixture_tree))


def test_symbols_and_builtin_match_text(fixture_tree: Path) -> None:
    tree = ModuleTree(fixture_tree)
    symbols = text_aliases(fixture_tree, "modules.symbols")
    assert len(symbols) == len(FIXTURE_MODULES)
    for key, module in symbols:
        assert tree.symbol(key) == [module]
    assert tree.symbol("symbol:no_such_symbol") == []
    builtin = (fixture_tree / "modules.builtin").read_text().split()
    for path in builtin:
        assert tree.is_builtin(os.path.basename(path)[:-3].replace("-", "_"))
    assert not tree.is_builtin("uas")
    assert not tree.is_builtin("")


# -- answers equal kmod's ---------------------------------------------------------------


def test_alias_equals_libkmod_on_fixture(fixture_tree: Path, empty_config: Path) -> None:
    tree = ModuleTree(fixture_tree)
    kmod = LibKmod(str(fixture_tree), [str(empty_config)])
    keys = sample_keys([p for p, _ in tree.alias_patterns()], 3000)
    multi = 0
    for key in keys:
        want = kmod.lookup(key)
        assert kmod_alias_lookup(tree, key) == want, key
        multi += len(want) > 1
    kmod.close()
    assert multi > 20          # the ordering of several answers is really exercised


def test_alias_equals_modprobe_resolve(fixture_tree: Path, empty_config: Path) -> None:
    tree = ModuleTree(fixture_tree)
    keys = [
        "usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00",   # usb-storage and uas
        "usb:v0BC2p2321d0100dc00dsc00dp00ic08isc06ip62in00",
        "usb:v12D1p1506d0000dc00dsc00dp00icFFisc02ip16in00",   # option, Huawei
        "usb:v05C6p9001d0000dc00dsc00dp00icFFisc00ip00in00",   # option and qcserial
        "pci:v000010ECd00008139sv000010ECsd00008139bc02sc00i00",
        "pci:v000010ECd00008139sv00000357sd00000000bc02sc00i00",
        "usb:v0403p6001d0600dc00dsc00dp00icFFiscFFipFFin00",
        "hid:b0003g0001v0000046Dp0000C52B",
        "rtnl-link-dummy",
        "usb:vFFFFpFFFFd0000dc00dsc00dp00icFEisc00ip00in00",    # no match
        "pci:v000010ECd00008139sv000010ECsd00008139bc02sc00i0",
    ]
    for key in keys:
        assert kmod_alias_lookup(tree, key) == modprobe_resolve(fixture_tree, empty_config, key)
    # modprobe -R answers these (module priority = position in modules.order)
    assert tree.alias(keys[0]) == ["uas", "usb_storage"]
    assert tree.alias(keys[4]) == ["8139cp", "8139too", "8139too"]   # two 8139too patterns


def test_builtin_alias_equals_kmod(fixture_tree: Path, empty_config: Path) -> None:
    tree = ModuleTree(fixture_tree)
    kmod = LibKmod(str(fixture_tree), [str(empty_config)])
    aliases = builtin_modinfo_aliases(fixture_tree)
    assert len(aliases) > 20
    for _, alias in aliases:
        if tree.alias(alias):
            continue
        assert tree.builtin_alias(alias) == kmod.lookup(alias), alias
    assert tree.builtin_alias("fs_debugfs") == ["debugfs"]
    assert tree.builtin_alias("fs-no-such") == []
    kmod.close()


def builtin_modinfo_aliases(moddir: Path) -> list[tuple[str, str]]:
    out = []
    for rec in (moddir / "modules.builtin.modinfo").read_bytes().decode().split("\0"):
        name, _, rest = rec.partition(".")
        key, _, value = rest.partition("=")
        if key == "alias" and value:
            out.append((name, value.replace("-", "_")))
    return out


# -- text fallbacks ------------------------------------------------------------------


def test_text_fallback_answers_like_the_bin(fixture_tree: Path, tmp_path: Path) -> None:
    text_dir = copy_tree(fixture_tree, tmp_path / VERSION, drop=BIN_FILES)
    binary = ModuleTree(fixture_tree)
    text = ModuleTree(text_dir)
    assert text.module_names() == binary.module_names()
    for name in binary.module_names():
        dep = binary.dep(name)
        assert dep is not None
        assert text.dep(name) == DepEntry(dep.name, dep.path.replace(str(fixture_tree),
                                                                     str(text_dir)), dep.deps)
    assert sorted(text.alias_patterns()) == sorted(binary.alias_patterns())
    # module priorities survive: the whole pattern list comes out in the same order
    assert text.alias_patterns() == binary.alias_patterns()
    for key in sample_keys([p for p, _ in binary.alias_patterns()], 2000, seed=11):
        assert text.alias(key) == binary.alias(key), key
    for key, _ in text_aliases(fixture_tree, "modules.symbols"):
        assert text.symbol(key) == binary.symbol(key)
    for name, alias in builtin_modinfo_aliases(fixture_tree):
        assert text.builtin_alias(alias) == binary.builtin_alias(alias)
        assert text.is_builtin(name) == binary.is_builtin(name)


def test_builtin_alias_fallback_keeps_kmods_order(tmp_path: Path) -> None:
    """All builtin aliases have priority 0: the order comes from the trie walk alone."""
    builtin = [("b1", ["x:a*"]), ("a2", ["x:*"]), ("c3", ["x:ab"]), ("d4", ["x:a?"]),
               ("e5", ["x:[a]b"]), ("f6", ["x:ab"]), ("a7", ["x:a*b"]), ("g8", ["x:a-b"]),
               ("h9", ["x:[a-]b"])]
    base = build_tree(tmp_path / "base", [], builtin=builtin)
    assert (base / "modules.builtin.alias.bin").exists()
    text_only = tmp_path / "text"
    text_only.mkdir()
    shutil.copyfile(base / "modules.builtin.modinfo", text_only / "modules.builtin.modinfo")
    kmod = LibKmod(str(base), [str(tmp_path)])
    with_bin = ModuleTree(base)
    without = ModuleTree(text_only)
    for key in ("x:ab", "x:a_b", "x:a", "x:b", "x:aab", "x:_b", "x:abb"):
        want = kmod.lookup(key)
        assert with_bin.builtin_alias(key) == want, key
        assert without.builtin_alias(key) == want, key
    assert kmod.lookup("x:ab") == ["c3", "f6", "d4", "b1", "a7", "e5", "h9", "a2"]
    kmod.close()


def test_missing_files_answer_nothing(tmp_path: Path) -> None:
    tree = ModuleTree(tmp_path)
    assert tree.dep("x") is None
    assert tree.dep_path("x") is None
    assert tree.alias("pci:v1") == []
    assert tree.symbol("symbol:x") == []
    assert not tree.is_builtin("x")
    assert tree.builtin_alias("x") == []
    assert tree.module_names() == []
    assert tree.alias_patterns() == []


# -- damaged indexes ------------------------------------------------------------------


def write_index(path: Path, entries: dict[str, list[tuple[int, str]]],
                version: int = 0x00020001) -> None:
    """A kmod index file, one trie node per character (no prefix compression)."""
    trie: dict = {}
    for key, values in entries.items():
        node = trie
        for ch in key:
            node = node.setdefault(ch, {})
        node[None] = values
    out = bytearray(12)

    def emit(node: dict) -> int:
        kids = {ch: emit(child) for ch, child in sorted((k, v) for k, v in node.items()
                                                         if k is not None)}
        offset = len(out)
        flags = 0
        if kids:
            first, last = ord(min(kids)), ord(max(kids))
            out.extend(bytes([first, last]))
            for c in range(first, last + 1):
                out.extend(struct.pack(">I", kids.get(chr(c), 0)))
            flags |= 0x20000000
        values = node.get(None)
        if values:
            out.extend(struct.pack(">I", len(values)))
            for prio, value in values:
                out.extend(struct.pack(">I", prio) + value.encode() + b"\0")
            flags |= 0x40000000
        return offset | flags

    root = emit(trie)
    out[0:12] = struct.pack(">III", 0xB007F457, version, root)
    path.write_bytes(bytes(out))


def tree_with(tmp_path: Path, name: str, data: bytes) -> ModuleTree:
    moddir = tmp_path / "m"
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / name).write_bytes(data)
    return ModuleTree(moddir)


def lookups(tree: ModuleTree) -> list[object]:
    return [tree.alias("pci:v00008086d00001234"), tree.dep("e1000e"), tree.symbol("symbol:a"),
            tree.is_builtin("x"), tree.builtin_alias("fs-x"), tree.module_names()]


@pytest.mark.parametrize("name", BIN_FILES)
def test_truncated_index_raises_or_answers_right(fixture_tree: Path, tmp_path: Path,
                                                 name: str) -> None:
    data = (fixture_tree / name).read_bytes()
    good = ModuleTree(fixture_tree)
    keys = {
        "modules.dep.bin": [("dep", n) for n in ("uas", "mii", "usbcore", "zzz")],
        "modules.alias.bin": [("alias", k) for k in
                              ("usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00",
                               "rtnl_link_dummy")],
        "modules.symbols.bin": [("symbol", "symbol:usb_serial_probe"),
                                ("symbol", "symbol:mii_link_ok")],
        "modules.builtin.bin": [("is_builtin", "debugfs"), ("is_builtin", "uas")],
        "modules.builtin.alias.bin": [("builtin_alias", "fs_debugfs"),
                                      ("builtin_alias", "crypto_dh")],
    }[name]
    step = max(1, len(data) // 300)
    cuts = sorted({*range(0, 40), *range(0, len(data), step), len(data) - 1})
    raised = 0
    for cut in cuts:
        moddir = tmp_path / f"cut{cut}"
        moddir.mkdir()
        (moddir / name).write_bytes(data[:cut])
        tree = ModuleTree(moddir)
        for method, key in keys:
            try:
                got = getattr(tree, method)(key)
            except IndexCorrupt as e:
                assert name in str(e)
                raised += 1
                continue
            want = getattr(good, method)(key)
            if method == "dep" and want is not None:
                want = DepEntry(want.name, want.path.replace(str(fixture_tree), str(moddir)),
                                want.deps)
            assert got == want, (cut, method, key)
    assert raised >= len(cuts) // 2


def test_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "modules.alias.bin"
    write_index(path, {"a": [(0, "m")]})
    data = path.read_bytes()
    for bad, problem in [(b"\xB0\x07\xFA\x57" + data[4:], "magic"),
                         (data[:4] + struct.pack(">I", 0x00030000) + data[8:], "version"),
                         (data[:4] + struct.pack(">I", 0x00010001) + data[8:], "version"),
                         (data[:8] + struct.pack(">I", 0x20000000 | 99999), "outside"),
                         (data[:8] + struct.pack(">I", 0x80000000 | 4), "outside"),
                         (data[:7], "header")]:
        tree = tree_with(tmp_path, "modules.alias.bin", bad)
        with pytest.raises(IndexCorrupt, match=problem) as exc:
            tree.alias("a")
        assert "modules.alias.bin" in str(exc.value)
    # a minor version bump is accepted, as kmod does
    write_index(path, {"a": [(0, "m")]}, version=0x00020007)
    assert ModuleTree(tmp_path).alias("a") == ["m"]


def test_cycles_are_detected(tmp_path: Path) -> None:
    # the root's children '*' and 'a' point back at the root: endless for a naive walk
    root = 12 | 0x20000000
    node = bytes([ord("*"), ord("a")]) + struct.pack(">" + "I" * 56, root, *([0] * 54), root)
    data = struct.pack(">III", 0xB007F457, 0x00020001, root) + node
    for name, call in [("modules.alias.bin", lambda t: t.alias("aaaa")),
                       ("modules.symbols.bin", lambda t: t.symbol("symbol:x")),
                       ("modules.builtin.alias.bin", lambda t: t.builtin_alias("x")),
                       ("modules.dep.bin", lambda t: t.module_names())]:
        tree = tree_with(tmp_path / name, name, data)
        with pytest.raises(IndexCorrupt, match="cycle"):
            call(tree)
    # an exact lookup consumes a key character per step, so it ends by itself
    assert tree_with(tmp_path / "d", "modules.dep.bin", data).dep("aaaa") is None


@pytest.mark.parametrize("garbage", [
    b"\xff" * 64, bytes(range(256)), b"\x00" * 64, b"\x20\x00\x00\x0c" * 16,
])
def test_garbage_nodes(tmp_path: Path, garbage: bytes) -> None:
    for flags in (0x20000000, 0x40000000, 0x80000000, 0xE0000000):
        data = struct.pack(">III", 0xB007F457, 0x00020001, flags | 12) + garbage
        tree = tree_with(tmp_path / f"{flags:x}{len(garbage)}{garbage[:2].hex()}",
                         "modules.alias.bin", data)
        try:
            result = tree.alias("pci:x")
        except IndexCorrupt as e:
            assert "modules.alias.bin" in str(e)
        else:
            assert isinstance(result, list)


def test_crafted_index_order_equals_libkmod(tmp_path: Path) -> None:
    """Equal priorities from different branches: kmod's merge order, not sorted order."""
    entries = {
        "x:*": [(0, "star")], "x:a*": [(0, "astar"), (0, "astar2")], "x:ab": [(0, "exact")],
        "x:a?": [(0, "aq")], "x:[ab]b": [(0, "cls")], "x:a[b]": [(2, "acls")],
        "x:ab*": [(1, "abstar"), (0, "abstar0")], "x:*b": [(0, "starb")],
        "x:a\\b": [(0, "escaped")], "x:a[!c]": [(0, "neg")], "x:a[^b]": [(0, "caret")],
    }
    moddir = tmp_path / "m"
    moddir.mkdir()
    write_index(moddir / "modules.alias.bin", entries)
    for name in ("modules.dep.bin", "modules.symbols.bin", "modules.builtin.bin"):
        write_index(moddir / name, {})
    kmod = LibKmod(str(moddir), [str(tmp_path)])
    tree = ModuleTree(moddir)
    # keys holding wildcard characters: kmod also walks through the patterns'
    # own '*', '?' and '[' literally, finding some patterns twice
    for key in ("x:ab", "x:a", "x:b", "x:abb", "x:bb", "x:a\\b", "x:ac", "x:",
                "x:a*", "x:ab*", "x:*b", "x:a?", "x:[ab]b", "x:a[b]", "x:*"):
        assert tree.alias(key) == kmod.lookup(key), key
    assert tree.alias("x:ab*").count("abstar0") == 2
    assert len(tree.alias("x:ab")) >= 8
    kmod.close()


# -- fnmatch semantics ---------------------------------------------------------------

_libc = ctypes.CDLL(None)
_libc.fnmatch.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]


@pytest.mark.parametrize("pattern", [
    "a*b", "a?c", "[abc]x", "[!a]x", "[^a]x", "[]a]x", "[a-]x", "[-a]x", "[z-a]x",
    "[[:digit:]]x", "[[:alpha:][:digit:]]", "[[:bogus:]]x", "a\\*", "a\\", "[a\\]]x",
    "[", "a[", "[]", "[!]a]", "*[0-9]", "\\[a]", "[.", "[[.a.]]x", "[[=a=]]x", "**a",
    "?*?", "[a-c-e]x", "[\\-]x", "[*]", "[?]x", "a[]-b]",
])
def test_fnmatch_equals_glibc(pattern: str) -> None:
    strings = ["", "a", "ab", "ax", "bx", "zx", "-x", "]x", "1x", "a*", "a\\", "[", "a[",
               "[]", "]", "a]a", "*", "?x", "a1", "[a]", ".x", "cx", "\\x", "a-b", "a]b",
               "aXb", "aab", "abc", "a/c"]
    for s in strings:
        want = _libc.fnmatch(pattern.encode(), s.encode(), 0) == 0
        assert aliasmatch.fnmatch(pattern, s) == want, (pattern, s)


# -- the real tree -------------------------------------------------------------------


@pytest.mark.realtree
@pytest.mark.parametrize("source", ["built", "cached", "walked"])
def test_real_tree_alias_equals_libkmod(empty_config: Path, tmp_path: Path,
                                        source: str) -> None:
    """Thousands of modaliases: fixture-style (odd fillers, near misses) and the
    benchmark's realistic ones; the index freshly built from the .bin, loaded
    back from the cache, and not prepared at all (every key a walk of the trie)."""
    from bench.modaliases import make_modaliases

    tree_dir = _real_tree()
    cache = tmp_path / "cache"
    if source == "cached":
        ModuleTree(tree_dir, cache_dir=cache).prepare_aliases()
        assert cache_files(cache)
    patterns = [p for p, _ in ModuleTree(tree_dir, use_cache=False).alias_patterns()]
    tree = ModuleTree(tree_dir, cache_dir=cache, use_cache=source == "cached",
                      prepare_after=10**9 if source == "walked" else 0)
    kmod = LibKmod(str(tree_dir), [str(empty_config)])
    assert len(patterns) > 20000
    keys = sample_keys(patterns, 2500, seed=2024) + make_modaliases(tree_dir, 2500, seed=7)
    # names without ':' may be module names, which kmod looks up in modules.dep first
    keys = [k for k in keys if ":" in k]
    hits = 0
    for key in keys:
        want = kmod.lookup(key)
        assert kmod_alias_lookup(tree, key) == want, key
        hits += bool(want)
    kmod.close()
    assert hits > 2500
    assert ("modules.alias" in tree._loaded) == (source != "walked")


@pytest.mark.realtree
def test_real_tree_bin_reader_matches_text() -> None:
    assert REAL_TREE.is_dir(), f"{REAL_TREE} is missing: install linux-image-amd64"
    tree = ModuleTree(REAL_TREE)
    assert sorted(tree.alias_patterns()) == sorted(text_aliases(REAL_TREE))
    dep_lines = (REAL_TREE / "modules.dep").read_text().splitlines()
    assert len(tree.module_names()) == len(dep_lines)
    assert BinIndex(REAL_TREE / "modules.dep.bin").search("e1000e") == \
        next(ln for ln in dep_lines if ln.startswith("kernel/drivers/net/ethernet/intel/e1000e/"))


@pytest.mark.parametrize("seed", range(6))
def test_fnmatch_equals_glibc_on_random_patterns(seed: int) -> None:
    """Random patterns over the characters that matter, against libc's fnmatch."""
    rng = random.Random(seed)
    for _ in range(400):
        pattern = "".join(rng.choice("ab*?[]!^-\\") for _ in range(rng.randint(0, 7)))
        for _ in range(10):
            s = "".join(rng.choice("ab-]\\[!") for _ in range(rng.randint(0, 5)))
            want = _libc.fnmatch(pattern.encode(), s.encode(), 0) == 0
            assert aliasmatch.fnmatch(pattern, s) == want, (pattern, s)


def test_prepared_index_equals_trie_walk_on_crafted_patterns() -> None:
    """WildIndex (buckets, chains, segment tries) against kmod's plain trie walk."""
    rng = random.Random(3)
    entries: dict[str, list[tuple[int, str]]] = {}
    for i in range(800):
        pattern = "".join(rng.choice(["a", "b", "ab", "ba", "*", "*", "?", "[ab]", "c"])
                          for _ in range(rng.randint(1, 7)))
        entries.setdefault("k:" + pattern, []).append((rng.randrange(50), f"m{i % 97}"))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"kmodd-crafted-{os.getpid()}.bin"
    try:
        write_index(tmp, entries)
        trie = BinIndex(tmp)
        prepared = aliasmatch.WildIndex(trie.items())
        reloaded = aliasmatch.WildIndex.from_bytes(prepared.to_bytes())
    finally:
        tmp.unlink()
    for _ in range(400):
        key = "k:" + "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        want = trie.searchwild(key, aliasmatch.fnmatch)
        assert prepared.search(key) == want, key
        assert reloaded.search(key) == want, key


# -- the prepared-index cache ------------------------------------------------------------


@pytest.fixture
def small_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache even the fixture tree's small index."""
    monkeypatch.setattr(index_cache, "MIN_SOURCE_SIZE", 0)


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("alias-*.idx"))


def test_cache_is_used_and_validated(fixture_tree: Path, tmp_path: Path, small_cache: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    moddir = copy_tree(fixture_tree, tmp_path / VERSION)
    cache = tmp_path / "cache"
    plain = ModuleTree(moddir, use_cache=False)
    keys = sample_keys([p for p, _ in plain.alias_patterns()], 500)
    want = [plain.alias(k) for k in keys]
    first = ModuleTree(moddir, cache_dir=cache, prepare_after=0)
    assert [first.alias(k) for k in keys] == want
    (stored,) = cache_files(cache)
    assert stored.stat().st_mode & 0o077 == 0

    # a second tree loads the stored form: the .bin is not decoded again
    def no_decode(*args: object) -> None:
        raise AssertionError("decoded the .bin although the cache is valid")
    monkeypatch.setattr(index, "BinIndex", no_decode)
    second = ModuleTree(moddir, cache_dir=cache, prepare_after=0)
    # (keys holding '*', '?' or '[' walk the real trie, as kmod does)
    plain_keys = [(k, w) for k, w in zip(keys, want, strict=True) if not set(k) & set("*?[")]
    assert len(plain_keys) > 300
    assert [second.alias(k) for k, _ in plain_keys] == [w for _, w in plain_keys]
    monkeypatch.undo()
    assert [second.alias(k) for k in keys] == want

    # depmod rewrote the index: the cached answers must not survive
    write_index(moddir / "modules.alias.new", {"pci:v*": [(0, "newmod")]})
    os.replace(moddir / "modules.alias.new", moddir / "modules.alias.bin")
    assert ModuleTree(moddir, cache_dir=cache, prepare_after=0).alias("pci:v1") == ["newmod"]
    assert ModuleTree(moddir, cache_dir=cache, prepare_after=0).alias(keys[0]) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "chmod", "chown", "garbage", "symlink"])
def test_damaged_or_foreign_cache_is_ignored(fixture_tree: Path, tmp_path: Path,
                                             small_cache: None, damage: str) -> None:
    moddir = copy_tree(fixture_tree, tmp_path / VERSION)
    cache = tmp_path / "cache"
    plain = ModuleTree(moddir, use_cache=False)
    keys = sample_keys([p for p, _ in plain.alias_patterns()], 300, seed=len(damage))
    want = [plain.alias(k) for k in keys]
    ModuleTree(moddir, cache_dir=cache).prepare_aliases()
    (stored,) = cache_files(cache)
    data = bytearray(stored.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x55
        stored.write_bytes(data)
    elif damage == "truncate":
        stored.write_bytes(data[: len(data) // 3])
    elif damage == "chmod":
        stored.chmod(0o666)
    elif damage == "chown":
        os.chown(stored, 4242, -1)
    elif damage == "garbage":
        stored.write_bytes(b"KMODDIX1" + bytes(range(256)) * 8)
    else:
        other = tmp_path / "elsewhere.idx"
        stored.rename(other)
        stored.symlink_to(other)
    tree = ModuleTree(moddir, cache_dir=cache, prepare_after=0)
    assert [tree.alias(k) for k in keys] == want


def test_alias_walks_the_trie_until_preparing_pays(fixture_tree: Path, tmp_path: Path,
                                                   small_cache: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    moddir = copy_tree(fixture_tree, tmp_path / VERSION)
    cache = tmp_path / "cache"
    plain = ModuleTree(moddir, use_cache=False)
    keys = [k for k in sample_keys([p for p, _ in plain.alias_patterns()], 400)
            if not set(k) & set("*?[")]
    keys = list(dict.fromkeys(keys))
    want = [plain.alias(k) for k in keys]
    assert len(keys) > 200 and sum(map(bool, want)) > 100
    walks: list[str] = []
    real_walk = index.BinIndex.searchwild

    def counted(self: BinIndex, key: str, fnmatch: Callable[[str, str], bool]) -> list[str]:
        walks.append(key)
        return real_walk(self, key, fnmatch)
    monkeypatch.setattr(index.BinIndex, "searchwild", counted)

    tree = ModuleTree(moddir, cache_dir=cache, prepare_after=100)
    assert [tree.alias(k) for k in keys[:99]] == want[:99]
    assert [tree.alias(k) for k in keys[:99]] == want[:99]     # remembered, not walked again
    assert walks == keys[:99]
    assert not cache_files(cache) and "modules.alias" not in tree._loaded
    # The 100th distinct key starts the build aside; answers are the same meanwhile.
    assert [tree.alias(k) for k in keys[99:]] == want[99:]
    for t in threading.enumerate():
        if t.name == "kmodd-index":
            t.join(30)
    assert cache_files(cache) and "modules.alias" in tree._loaded
    walked = len(walks)
    assert [tree.alias(k) for k in keys] == want
    assert len(walks) == walked                 # the prepared index answers now
    # A later tree walks as long as the first did, then takes the cached copy
    # (the .bin is not prepared again: the cache file stays as it was).
    (stored,) = cache_files(cache)
    before = stored.stat()
    again = ModuleTree(moddir, cache_dir=cache, prepare_after=100)
    assert [again.alias(k) for k in keys[:99]] == want[:99] and len(walks) == walked + 99
    assert "modules.alias" not in again._loaded
    again.prepare_aliases()
    assert [again.alias(k) for k in keys] == want and len(walks) == walked + 99
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_unwritable_cache_directory_is_harmless(fixture_tree: Path, tmp_path: Path,
                                                small_cache: None) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    tree = ModuleTree(fixture_tree, cache_dir=blocker / "cache")
    assert tree.alias("usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00") == \
        ["uas", "usb_storage"]


def test_stored_index_rejects_garbage() -> None:
    for data in (b"", b"\x00" * 10, bytes(range(256)), aliasmatch.marshal.dumps((1, 2))):
        with pytest.raises(ValueError):
            aliasmatch.WildIndex.from_bytes(data)
