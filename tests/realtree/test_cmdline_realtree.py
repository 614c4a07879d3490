"""The kernel command line as libkmod reads it, with kmod itself as the oracle.

modprobe always reads /proc/cmdline, so each case runs modprobe in a private
mount namespace with a file bind-mounted over /proc/cmdline (root needed, as
for every realtree test), then compares ``modprobe -c`` and
``modprobe --show-depends`` with kmodd given the same command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmodd.resolution.config import load_config
from kmodd.resolution.resolve import open_resolver
from kmodd.root import Root
from tests.fixtures import modprobe, modprobe_show_config, real_kernel_version, render_config

pytestmark = pytest.mark.realtree

CMDLINES = [
    Path("/proc/cmdline").read_text() if Path("/proc/cmdline").exists() else "",
    "BOOT_IMAGE=/vmlinuz root=UUID=1234 ro quiet snd-hda-intel.model=auto e1000e.IntMode=1",
    '"parport.dyndbg=file drivers/parport/ieee1284_ops.c +mpf" quiet',
    'e1000e.opt="a b  c" x.y="unterminated tail',
    'bad"quote.p=1 next.p=2 "q.x"=1 v.k=a.b=c w.k=="x"',
    "modprobe.blacklist=snd_pcsp,snd-hda-intel,,igb modprobe.blacklist=e1000e",
    '"modprobe.blacklist=igb,e1000e" modprobe.blacklist',
    ".p=1 m.=2 m. =x mod.flag a.b.c=1 a[b.c=1 a]b.c=1 t\tab.p=1\nnl.p=2\x0bvt.p=3",
    "x.y=1 -- init.args=2 fake.mod=3",
    "",
    "nothing-here just words",
    "snd-pcsp.index=-2 snd_pcsp.index=-3 bonding.max_bonds=2",
]


@pytest.fixture(scope="module")
def version() -> str:
    try:
        found = [real_kernel_version()]
    except RuntimeError as exc:
        pytest.fail(str(exc))
    if os.geteuid() != 0:
        pytest.fail("the command-line tests bind-mount /proc/cmdline: run them as root")
    return found[-1]


@pytest.mark.parametrize("cmdline", CMDLINES)
def test_cmdline_config_like_modprobe(version: str, cmdline: str) -> None:
    moddir = Path("/lib/modules") / version
    theirs, stderr = modprobe_show_config(None, version, ["/nonexistent"], cmdline=cmdline)
    assert "mount" not in stderr, stderr
    cfg = load_config(Root(), moddir, ["/nonexistent"], cmdline=cmdline)
    ours = render_config(cfg)
    # -c lists modules.softdep too; the command line adds blacklist and options lines
    assert ours == theirs


@pytest.mark.parametrize("cmdline", CMDLINES[1:7] + CMDLINES[-1:])
def test_cmdline_plans_like_modprobe(version: str, cmdline: str) -> None:
    resolver = open_resolver(Root(), version, None, cmdline=cmdline)
    for req in ("snd-hda-intel", "pci:v00008086d00001533sv00000000sd00000000bc02sc00i00",
                "e1000e", "pci:v00008086d000010D3sv00000000sd00000000bc02sc00i00",
                "snd-pcsp", "platform:pcspkr", "parport", "bonding"):
        for flags in ([], ["-b"]):
            res = modprobe("-S", version, *flags, "--show-depends", req, cmdline=cmdline)
            lines, found = resolver.show_depends(req, blacklist_all=bool(flags))
            assert lines == res.stdout.splitlines(), (req, flags)
            assert found == (res.returncode == 0), (req, flags)
