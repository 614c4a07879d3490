"""Configuration parsing checked against libkmod's own view of the same files.

``modprobe -c`` lists every accepted configuration line in libkmod's order and
libkmod logs each rejected line with its file and line number: both are
compared with what :func:`kmodd.resolution.config.load_config` makes of the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kmodd.resolution.config import compile_glob, load_config, parse_cmdline
from kmodd.resolution.resolve import open_resolver
from kmodd.root import MODPROBE_D_DIRS, Root
from tests.fixtures import (
    VERSION,
    FakeModule,
    build_tree,
    kmod_bad_lines,
    modprobe,
    modprobe_show_config,
    render_config,
    write_conf,
)

TRICKY = """\
alias a-b[x-z]-c mod-x
alias x\\-y z-z
alias   spaced\t\tmod_s   trailing words
alias a]b bad
alias a[b bad
alias onlyname
blacklist a-b c
blacklist
options tab-mod\tk=1\tj=2
options two-spaces  k=1
options trailing-space\x20
options nothing
install cont /bin/echo one \\
   two \\
three
install esc /bin/echo a\\b\\\\c
remove r-m /bin/rm-cmd
softdep sd-a pre: b-c  d post:e post: f pre: g
softdep sd-b c d
softdep sd-c
softdep sd-d   post:   x
  # indented comment is a bad line for libkmod
#comment
\t
unknown-command x y
include /etc/other.conf
config foo
weakdep wk-a wk-b wk-c
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("config-tree")
    build_tree(base, [FakeModule("top-drv", aliases=["t:*"], softdep="pre: mod-a post: mod-b"),
                      FakeModule("mod-a"), FakeModule("mod-b"), FakeModule("mod-c")])
    return base


def _ours(tree: Path, configs: list[str]) -> list[str]:
    cfg = load_config(Root(modules_base=tree), tree / "lib/modules" / VERSION, configs)
    return render_config(cfg)


def _same_as_kmod(tree: Path, configs: list[str]) -> None:
    theirs, _ = modprobe_show_config(tree, VERSION, configs)
    assert _ours(tree, configs) == theirs


def test_tricky_lines_like_libkmod(tree: Path, tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "tricky.conf", TRICKY)
    _same_as_kmod(tree, [str(conf)])


def test_bad_lines_reported_with_file_and_line(tree: Path, tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "tricky.conf", TRICKY)
    cfg = load_config(Root(modules_base=tree), tree / "lib/modules" / VERSION, [str(conf)])
    _, stderr = modprobe_show_config(tree, VERSION, [str(conf)])
    kmod = kmod_bad_lines(stderr)
    assert kmod, stderr
    ours = {(p.path, p.line) for p in cfg.problems
            if not p.message.startswith(("command include", "command config"))}
    # kmod 30 does not know weakdep yet; kmodd parses it (and never loads it)
    weak_line = TRICKY.splitlines().index("weakdep wk-a wk-b wk-c") + 1
    assert ours == kmod - {(str(conf), weak_line)}
    deprecated = [p for p in cfg.problems if p.message.startswith("command ")]
    assert [p.message.split()[1] for p in deprecated] == ["include", "config"]
    assert cfg.weakdeps == {"wk_a": ("wk-b", "wk-c")}


def test_weakdeps_never_loaded(tree: Path, tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "weak.conf", "weakdep mod-a mod-b\n")
    resolver = open_resolver(Root(modules_base=tree), VERSION, [str(conf)])
    assert resolver.config.weakdeps == {"mod_a": ("mod-b",)}
    assert [s.name for s in resolver.plan("mod-a").steps] == ["mod_a"]


def test_merge_by_name_first_directory_wins(tree: Path, tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    write_conf(d1, "b.conf", "options mod-c from=d1-b\n")
    write_conf(d1, "z.conf", "options mod-c from=d1-z\n")
    write_conf(d2, "a.conf", "options mod-c from=d2-a\n")
    write_conf(d2, "b.conf", "options mod-c from=d2-b-never\n")
    write_conf(d2, "c.alias", "options mod-c from=d2-c-alias\n")
    write_conf(d2, ".hidden.conf", "options mod-c from=hidden-never\n")
    write_conf(d2, "x.txt", "options mod-c from=txt-never\n")
    write_conf(d2, ".conf", "options mod-c from=dotconf-never\n")
    (d2 / "sub.conf").mkdir()
    write_conf(d2, "m.conf", "options mod-c from=d2-m\nsoftdep top-drv pre: mod-c\n")
    _same_as_kmod(tree, [str(d1), str(d2)])
    _same_as_kmod(tree, [str(d2), str(d1)])
    ours = _ours(tree, [str(d1), str(d2)])
    assert "options mod_c from=d2-b-never" not in ours


def test_modules_softdep_sorted_among_conf_files(tree: Path, tmp_path: Path) -> None:
    """modules.softdep takes its place by name: "a.conf" comes before it, "z.conf" after."""
    write_conf(tmp_path, "a.conf", "softdep top-drv pre: mod-c\n")
    write_conf(tmp_path / "later", "z.conf", "softdep top-drv post: mod-c\n")
    for configs in ([str(tmp_path)], [str(tmp_path / "later")], []):
        _same_as_kmod(tree, configs or ["/nonexistent"])
        resolver = open_resolver(Root(modules_base=tree), VERSION, configs or ["/nonexistent"])
        res = modprobe("-d", str(tree), "-S", VERSION,
                       *[a for c in configs for a in ("-C", c)], "--show-depends", "top-drv")
        assert resolver.show_depends("top-drv")[0] == res.stdout.splitlines()


def test_single_files_and_duplicate_names(tree: Path, tmp_path: Path) -> None:
    one = write_conf(tmp_path / "x", "settings", "options mod-a one=1\n")
    two = write_conf(tmp_path / "y", "settings", "options mod-a two=2\n")
    other = write_conf(tmp_path / "y", "other.conf", "options mod-a three=3\n")
    _same_as_kmod(tree, [str(one), str(two), str(other)])
    _same_as_kmod(tree, [str(two), str(tmp_path / "missing"), str(one)])


def test_default_dirs_under_root(tree: Path, tmp_path: Path) -> None:
    """Without -C the five modprobe.d directories under the root are read, in order."""
    root = tmp_path / "root"
    for i, d in enumerate(MODPROBE_D_DIRS):
        write_conf(root / d, "same.conf", f"options mod-a from={i}\n")
        write_conf(root / d, f"only{i}.conf", f"options mod-a only={i}\n")
    cfg = load_config(Root(base=root, modules_base=tree), tree / "lib/modules" / VERSION,
                      cmdline="")
    theirs, _ = modprobe_show_config(tree, VERSION, [str(root / d) for d in MODPROBE_D_DIRS])
    ours = render_config(cfg)
    assert ours == [ln for ln in theirs if not ln.startswith("options") or "mod_a" in ln]
    assert "options mod_a from=0" in ours


def test_cmdline_from_root(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text('quiet snd-foo.index=1 modprobe.blacklist=a,b-c\n')
    cfg = load_config(Root(base=tmp_path), None, [])
    assert cfg.options == {"snd_foo": ["index=1"]}
    # libkmod 30 keeps command-line blacklist names as written
    assert cfg.blacklist == {"a", "b-c"}


def test_cmdline_quoting_shapes() -> None:
    """The shapes libkmod's parser distinguishes (the real-tree tests compare many
    more against modprobe with a substituted /proc/cmdline)."""
    cfg = parse_cmdline('"parport.dyndbg=file a.c +p" m.p="x y" n.a.b=1 '
                        'o.flag "q.x"=1 v.k=a.b=c')
    assert cfg.option_entries == [("parport", 'dyndbg="file a.c +p"'), ("m", 'p="x y"'),
                                  ("o", "flag"), ("v", "k=a.b=c")]


@pytest.mark.parametrize("pattern,hits,misses", [
    ("a*b", ["ab", "a/x.b", "a**b"], ["a", "ba"]),
    ("a?c", ["abc", "a.c"], ["ac", "abbc"]),
    ("[!a-c]x", ["dx", "_x"], ["ax", "x"]),
    ("[^a-c]x", ["dx"], ["bx"]),
    ("[]a]x", ["]x", "ax"], ["bx"]),
    ("[[:digit:]x]", ["5", "x"], ["a"]),
    ("[[:nope:]]", [], ["n", "["]),
    ("a\\*", ["a*"], ["ab"]),
    ("a[b", ["a[b"], ["ab"]),
    ("[z-a]", [], ["z", "a", "-"]),
    ("[a-]", ["a", "-"], ["b"]),
])
def test_glob_follows_glibc(pattern: str, hits: list[str], misses: list[str]) -> None:
    import ctypes
    libc = ctypes.CDLL(None)
    match = compile_glob(pattern)
    for s in hits + misses:
        expected = libc.fnmatch(pattern.encode(), s.encode(), 0) == 0
        assert match(s) == expected, (pattern, s)
    assert all(match(s) for s in hits) and not any(match(s) for s in misses)


def _random_config(rng: random.Random) -> str:
    words = ["alias", "blacklist", "options", "install", "remove", "softdep", "include",
             "bogus", "#", "pre:", "post:", "mod-a", "mod_b", "x[a-c]-y", "a]b", "c[d",
             "k=v", 'p="q r"', "\\", "\\\\", "-", "_", "*", "?", "\t", "\r", "\x0b",
             "pre:x", "options\tm"]
    lines = []
    for _ in range(rng.randrange(1, 25)):
        n = rng.randrange(0, 7)
        sep = [" ", "  ", "\t", " \t"]
        line = "".join(rng.choice(words) + rng.choice(sep) for _ in range(n))
        if rng.random() < 0.2:
            line = rng.choice(["", " ", "\t"]) + line
        if rng.random() < 0.15:
            line += "\\"
        if rng.random() < 0.3:
            line = line.rstrip()
        lines.append(line)
    text = "\n".join(lines)
    return text + ("\n" if rng.random() < 0.8 else "")


def test_random_configs_like_libkmod(tree: Path, tmp_path: Path) -> None:
    """Fuzzed files (blanks, backslashes, brackets, bad commands) against modprobe -c."""
    rng = random.Random(1234)
    for i in range(60):
        conf = tmp_path / f"r{i}.conf"
        conf.write_text(_random_config(rng))
        theirs, stderr = modprobe_show_config(tree, VERSION, [str(conf)])
        cfg = load_config(Root(modules_base=tree), tree / "lib/modules" / VERSION, [str(conf)])
        assert render_config(cfg) == theirs, conf.read_text()
        ours_bad = {(p.path, p.line) for p in cfg.problems
                    if not p.message.startswith(("command include", "command config"))}
        assert ours_bad == kmod_bad_lines(stderr), conf.read_text()
