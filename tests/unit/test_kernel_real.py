"""Pure parts of the real kernel layer: /proc/modules parsing, sysfs reading, errno messages."""

from __future__ import annotations

import errno as E
import os
import subprocess
from pathlib import Path

import pytest

from kmodd.kernel import errors
from kmodd.kernel.protocol import InitState, KernelError
from kmodd.kernel.real import KernelState, RealKernel, parse_proc_modules
from kmodd.root import Root
from tests.fixtures import real_moddir

# Captured from a Debian 6.1 guest (addresses shortened), plus edge cases.
SND = "snd_hda_intel,snd_intel_dspcfg,snd_hwdep,snd_hda_codec,snd_pcm,snd_timer,"
PROC_MODULES = f"""\
snd_hda_intel 57344 0 - Live 0xffffffffc0464000
snd_hda_codec 184320 1 snd_hda_intel, Live 0xffffffffc0413000
snd 126976 6 {SND} Live 0xffffffffc02de000
soundcore 16384 1 snd, Live 0xffffffffc02d4000
e1000 163840 0 - Loading 0xffffffffc0300000
dm_mod 184320 0 - Unloading 0xffffffffc0200000 (E)
crc32c_generic 16384 0 [permanent], Live 0xffffffffc0100000
nounload 16384 - - Live 0xffffffffc0000000 (OE)
broken line
"""


def test_parse_proc_modules() -> None:
    mods = parse_proc_modules(PROC_MODULES)
    assert list(mods) == ["snd_hda_intel", "snd_hda_codec", "snd", "soundcore", "e1000",
                          "dm_mod", "crc32c_generic", "nounload"]
    assert mods["snd"].refcount == 6
    assert mods["snd"].holders == ("snd_hda_intel", "snd_intel_dspcfg", "snd_hwdep",
                                   "snd_hda_codec", "snd_pcm", "snd_timer")
    assert mods["snd_hda_intel"].holders == () and mods["snd_hda_intel"].size == 57344
    assert mods["e1000"].state == "Loading"
    assert mods["dm_mod"].state == "Unloading"
    assert mods["crc32c_generic"].permanent and mods["crc32c_generic"].holders == ()
    assert mods["nounload"].refcount is None and mods["nounload"].holders == ()


def _tree(tmp_path: Path) -> Root:
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/modules").write_text(PROC_MODULES)
    (tmp_path / "proc/sys/kernel/modules_disabled").write_text("0\n")
    sm = tmp_path / "sys/module"
    (sm / "snd/holders").mkdir(parents=True)
    (sm / "snd/initstate").write_text("live\n")
    (sm / "snd/refcnt").write_text("6\n")
    for h in ("snd_pcm", "snd_timer"):
        (sm / "snd/holders" / h).symlink_to(f"../../{h}")
    (sm / "e1000/parameters").mkdir(parents=True)
    (sm / "e1000/initstate").write_text("coming\n")
    (sm / "e1000/parameters/copybreak").write_text("256\n")
    wo = sm / "e1000/parameters/writeonly"
    wo.write_text("x\n")
    wo.chmod(0o200)
    drv = tmp_path / "sys/bus/pci/drivers/e1000"
    drv.mkdir(parents=True)
    for f in ("bind", "unbind", "uevent", "new_id"):
        (drv / f).touch()
    (drv / "0000:00:03.0").symlink_to("../../../../devices/pci0000:00/0000:00:03.0")
    (drv / "module").symlink_to("../../../../module/e1000")
    (sm / "e1000/drivers").mkdir()
    (sm / "e1000/drivers/pci:e1000").symlink_to("../../../bus/pci/drivers/e1000")
    (sm / "8250/parameters").mkdir(parents=True)      # built-in: no initstate
    return Root(base=tmp_path)


def test_sysfs_state(tmp_path: Path) -> None:
    k = KernelState(_tree(tmp_path))
    assert k.supports_modules()
    assert not k.modules_disabled()
    assert k.initstate("snd") is InitState.LIVE
    assert k.initstate("e1000") is InitState.COMING
    assert k.initstate("8250") is InitState.BUILTIN
    assert k.initstate("absent") is InitState.ABSENT
    assert k.refcount("snd") == 6
    assert k.refcount("soundcore") == 1        # no refcnt file: from /proc/modules
    assert k.holders("snd") == ("snd_pcm", "snd_timer")
    assert k.bound_devices("e1000") == 1
    assert k.bound_devices("snd") == 0
    params = k.parameters("e1000")
    assert params["copybreak"] == "256"
    if os.geteuid() != 0:                      # root can read a 0200 file
        assert "writeonly" not in params


def test_no_proc_modules_means_no_support(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    k = RealKernel(Root(base=tmp_path))
    assert not k.supports_modules()
    assert k.modules() == {}


def test_modules_disabled(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (tmp_path / "proc/sys/kernel/modules_disabled").write_text("1\n")
    assert KernelState(root).modules_disabled()
    msg = errors.load_message(E.EPERM, "e1000", root=root)
    assert "modules_disabled" in msg


def test_eperm_blacklist_and_lockdown(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (tmp_path / "proc/cmdline").write_text("root=/dev/vda module_blacklist=foo,e1000 quiet\n")
    assert "module_blacklist" in errors.load_message(E.EPERM, "e1000", root=root)
    (tmp_path / "sys/kernel/security").mkdir(parents=True)
    (tmp_path / "sys/kernel/security/lockdown").write_text("none [integrity] confidentiality\n")
    msg = errors.load_message(E.EPERM, "snd", root=root)
    assert "locked down (integrity)" in msg
    (tmp_path / "sys/kernel/security/lockdown").write_text("[none] integrity confidentiality\n")
    assert "locked down" not in errors.load_message(E.EPERM, "snd", root=root)


@pytest.mark.parametrize("code,words", [
    (E.EEXIST, "already loaded"),
    (E.EBUSY, "another load"),
    (E.ENOEXEC, "invalid module format"),
    (E.EKEYREJECTED, "signature rejected"),
    (E.ENOKEY, "signing key"),
    (E.EINVAL, "see dmesg"),
    (E.ENOENT, "unknown symbol"),
    (E.ENOSYS, "without loadable module support"),
    (E.ENODEV, "No such device"),
])
def test_load_messages(code: int, words: str) -> None:
    assert words in errors.load_message(code, "m", root=Root(base=Path("/nonexistent")))


def test_unload_error_maps_ewouldblock_to_ebusy() -> None:
    err = errors.unload_error(E.EWOULDBLOCK, "snd", holders=("snd_pcm",))
    assert err.errno == E.EBUSY and "in use by: snd_pcm" in err.message
    assert errors.unload_error(E.ENOENT, "x").message == "x: not loaded"


def test_real_syscall_on_this_host(tmp_path: Path) -> None:
    """A real ctypes syscall with a bogus image: the build hosts' kernel has no module
    support (ENOSYS, remembered); a modular kernel refuses it (EPERM / ENOEXEC)."""
    k = RealKernel()
    ko = tmp_path / "x.ko"
    ko.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(KernelError) as info:
        k.load_module("x", str(ko))
    if k.supports_modules():
        assert info.value.errno in (E.EPERM, E.ENOEXEC)
    else:
        assert info.value.errno == E.ENOSYS
        assert k.no_module_support
        with pytest.raises(KernelError):
            k.unload_module("x")


def test_enoexec_tells_corrupt_from_other_kernel(tmp_path: Path) -> None:
    real = real_moddir() / "kernel/drivers/block/loop.ko"
    # The expected strings come from the module file, through kmod's modinfo.
    magic = subprocess.run(["modinfo", "-F", "vermagic", str(real)], capture_output=True,
                           text=True, check=True).stdout.strip()
    release = magic.split()[0]
    root = Root(base=tmp_path)
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("9.9.9-other\n")
    msg = errors.load_message(E.ENOEXEC, "loop", path=str(real), root=root)
    assert f"built for kernel {release}, this kernel is 9.9.9-other" in msg
    (tmp_path / "proc/sys/kernel/osrelease").write_text(release + "\n")
    assert f"vermagic '{magic}' or symbol versions" \
        in errors.load_message(E.ENOEXEC, "loop", path=str(real), root=root)
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"\x7fELF" + bytes(100))
    msg = errors.load_message(E.ENOEXEC, "junk", path=str(junk), root=root)
    assert msg.startswith(f"junk ({junk}): invalid module format: not a valid kernel module")


def test_hostile_names_stay_inside_sys_module(tmp_path: Path) -> None:
    k = KernelState(_tree(tmp_path))
    (tmp_path / "sys/kernel").mkdir(parents=True, exist_ok=True)
    for name in ("..", "../kernel", "snd/../e1000", ".", "", "a\0b", "../../proc"):
        assert k.initstate(name) is InitState.ABSENT, name
        assert k.parameters(name) == {} and k.bound_devices(name) == 0


def test_rtnetlink_link_kinds_parsed_from_a_dump() -> None:
    import struct

    from kmodd.kernel.netlink import parse_link_kinds

    def attr(kind: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), kind) + payload
        return raw + bytes(-len(raw) % 4)

    def newlink(kind: bytes | None) -> bytes:
        body = bytes(16) + attr(3, b"x\0")                          # IFLA_IFNAME
        if kind is not None:                                        # nested IFLA_LINKINFO
            body += attr(18 | 0x8000, attr(1, kind + b"\0"))
        return struct.pack("=IHHII", 16 + len(body), 16, 2, 1, 0) + body

    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    assert parse_link_kinds(newlink(b"dummy") + newlink(None)) == ({"dummy"}, False)
    assert parse_link_kinds(newlink(b"bridge") + done) == ({"bridge"}, True)
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    with pytest.raises(OSError):
        parse_link_kinds(error)
    with pytest.raises(OSError):
        parse_link_kinds(newlink(b"dummy")[:-4])               # cut short
