"""The simulated kernel: the real state-reading and errno code over simulated syscalls."""

from __future__ import annotations

import errno as E
import gzip
import lzma
import threading
import time
from pathlib import Path

import pytest
import zstandard

from kmodd.kernel.protocol import InitState, KernelError
from kmodd.kernel.real import KernelState, parse_proc_modules
from kmodd.kernel.sim import SimKernel
from kmodd.root import Root

ELF = b"\x7fELF\x02\x01\x01" + bytes(9)


def ko(tmp: Path, name: str, payload: bytes | None = None) -> str:
    path = tmp / "mods" / f"{name}.ko"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(payload if payload is not None else ELF + name.encode() * 50)
    return str(path)


@pytest.fixture
def sim(tmp_path: Path) -> SimKernel:
    return SimKernel(tmp_path / "tree", deps={"b": ("a",), "c": ("b", "a")},
                     module_params={"a": {"max": "8", "debug": "0"}})


def test_load_writes_proc_and_sys(sim: SimKernel, tmp_path: Path) -> None:
    assert sim.load_module("a", ko(tmp_path, "a"), "max=3 bogus=1") is True
    assert sim.load_module("b", ko(tmp_path, "b")) is True
    mods = sim.modules()
    assert set(mods) == {"a", "b"}
    assert mods["a"].holders == ("b",) and mods["a"].refcount == 1
    assert mods["a"].state == "Live" and mods["b"].refcount == 0
    assert sim.initstate("a") is InitState.LIVE
    assert sim.holders("a") == ("b",)
    assert sim.refcount("a") == 1
    assert sim.parameters("a") == {"debug": "0", "max": "3"}
    # The kernel ignores unknown parameters with a log line; so does the sim.
    assert "a: unknown parameter 'bogus' ignored" in sim.dmesg
    # Reading through a plain KernelState on the same root gives the same answers.
    plain = KernelState(Root(base=tmp_path / "tree"))
    assert plain.modules() == mods
    assert plain.holders("a") == ("b",)


def test_dependency_not_live_is_unknown_symbol(sim: SimKernel, tmp_path: Path) -> None:
    with pytest.raises(KernelError) as info:
        sim.load_module("c", ko(tmp_path, "c"))
    assert info.value.errno == E.ENOENT
    assert "unknown symbol" in info.value.message and "dmesg" in info.value.message
    assert sim.initstate("c") is InitState.ABSENT


def test_eexist_is_success_returning_false(sim: SimKernel, tmp_path: Path) -> None:
    path = ko(tmp_path, "a")
    assert sim.load_module("a", path) is True
    assert sim.load_module("a", path) is False
    assert [s.result for s in sim.syscalls] == [0, E.EEXIST]


def test_eexist_from_the_modules_own_init_is_a_failure(tmp_path: Path) -> None:
    # pcc_cpufreq's init answers -EEXIST when another cpufreq driver is
    # registered: the syscall says EEXIST, yet nothing is loaded.
    sim = SimKernel(tmp_path / "tree", load_errors={"pcc": E.EEXIST})
    with pytest.raises(KernelError) as err:
        sim.load_module("pcc", ko(tmp_path, "pcc"))
    assert err.value.errno == E.EEXIST
    assert "module initialisation failed" in err.value.message
    assert sim.initstate("pcc") is InitState.ABSENT


def test_concurrent_load_second_waits_then_eexist(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", init_delays={"a": 0.3})
    path = ko(tmp_path, "a")
    results: dict[str, object] = {}

    def load(tag: str) -> None:
        t0 = time.monotonic()
        results[tag] = (sim.load_module("a", path), time.monotonic() - t0)

    threads = [threading.Thread(target=load, args=(t,), name=t) for t in ("t1", "t2")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    inserted = sorted(r[0] for r in results.values())   # type: ignore[index]
    assert inserted == [False, True]
    # The loser was held until the winner's init finished.
    assert all(r[1] >= 0.2 for r in results.values())    # type: ignore[index]
    assert sorted(s.result for s in sim.syscalls) == [0, E.EEXIST]
    assert sim.max_concurrent_seen == 1
    assert sim.load_order == ["a"]


def test_concurrent_load_second_gets_ebusy_when_first_fails(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", init_delays={"a": 0.2}, load_errors={"a": E.ENODEV})
    path = ko(tmp_path, "a")
    errs: list[int] = []

    def load() -> None:
        try:
            sim.load_module("a", path)
        except KernelError as e:
            errs.append(e.errno)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert sorted(errs) == sorted([E.ENODEV, E.EBUSY])
    assert sim.initstate("a") is InitState.ABSENT


def test_coming_state_visible_during_init(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", init_delays={"a": 0.3})
    th = threading.Thread(target=sim.load_module, args=("a", ko(tmp_path, "a")))
    th.start()
    time.sleep(0.1)
    assert sim.initstate("a") is InitState.COMING
    assert sim.modules()["a"].state == "Loading"
    th.join()
    assert sim.initstate("a") is InitState.LIVE


def test_unload_with_holders_is_ebusy(sim: SimKernel, tmp_path: Path) -> None:
    sim.load_module("a", ko(tmp_path, "a"))
    sim.load_module("b", ko(tmp_path, "b"))
    with pytest.raises(KernelError) as info:
        sim.unload_module("a")
    assert info.value.errno == E.EBUSY
    assert "in use by: b" in info.value.message
    # The raw kernel answer was EWOULDBLOCK, like Linux.
    assert sim.syscalls[-1].result == E.EWOULDBLOCK
    sim.unload_module("b")
    sim.unload_module("a")
    assert sim.modules() == {}
    assert not (tmp_path / "tree/sys/module/a").exists()


def test_unload_users_needs_force(sim: SimKernel, tmp_path: Path) -> None:
    sim.load_module("a", ko(tmp_path, "a"))
    sim.set_users("a", 2)
    assert sim.refcount("a") == 2
    with pytest.raises(KernelError) as info:
        sim.unload_module("a")
    assert info.value.errno == E.EBUSY
    sim.unload_module("a", force=True)
    assert sim.syscalls[-1].flags & 0o1000   # O_TRUNC
    assert sim.initstate("a") is InitState.ABSENT


def test_unload_absent_and_configured_error(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", unload_errors={"a": E.EPERM})
    with pytest.raises(KernelError) as info:
        sim.unload_module("zz")
    assert info.value.errno == E.ENOENT
    sim.load_module("a", ko(tmp_path, "a"))
    with pytest.raises(KernelError) as info:
        sim.unload_module("a")
    assert info.value.errno == E.EPERM


def test_permanent_module(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", permanent={"a"})
    sim.load_module("a", ko(tmp_path, "a"))
    assert sim.modules()["a"].permanent
    with pytest.raises(KernelError) as info:
        sim.unload_module("a")
    assert info.value.errno == E.EBUSY


def test_corrupt_module_is_enoexec(sim: SimKernel, tmp_path: Path) -> None:
    with pytest.raises(KernelError) as info:
        sim.load_module("a", ko(tmp_path, "a", b"garbage, not an ELF file"))
    assert info.value.errno == E.ENOEXEC
    assert "invalid module format" in info.value.message


def test_missing_file(sim: SimKernel, tmp_path: Path) -> None:
    with pytest.raises(KernelError) as info:
        sim.load_module("a", str(tmp_path / "nope.ko"))
    assert info.value.errno == E.ENOENT
    assert "cannot open" in info.value.message
    assert sim.syscalls == []


@pytest.mark.parametrize("kind,compress", [
    ("xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)),
    ("gzip", gzip.compress),
    ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
])
def test_compressed_decompressed_in_user_space(tmp_path: Path, kind: str, compress) -> None:  # type: ignore[no-untyped-def]
    sim = SimKernel(tmp_path / "t")           # no /sys/module/compression, like Debian 12
    image = ELF + b"payload" * 100
    sim.load_module("a", ko(tmp_path, "a", compress(image)))
    assert sim.images["a"] == image
    assert [s.call for s in sim.syscalls] == ["init_module"]


def test_compressed_finit_when_kernel_decompresses(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", compression="zstd")
    image = ELF + b"payload" * 100
    sim.load_module("a", ko(tmp_path, "a", zstandard.ZstdCompressor().compress(image)))
    assert sim.syscalls[0].call == "finit_module" and sim.syscalls[0].flags == 4
    assert sim.images["a"] == image
    # An algorithm the kernel does not know still goes through user space.
    sim.load_module("b", ko(tmp_path, "b", lzma.compress(image)))
    assert sim.syscalls[1].call == "init_module"


def test_corrupt_compressed_file(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t")
    with pytest.raises(KernelError) as info:
        sim.load_module("a", ko(tmp_path, "a", b"\xfd7zXZ\x00" + b"broken" * 10))
    assert info.value.errno == E.ENOEXEC
    assert "xz" in info.value.message


def test_no_module_support_enosys_once(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", supports_modules=False)
    assert not sim.supports_modules()
    assert not (tmp_path / "t/proc/modules").exists()
    path = ko(tmp_path, "a")
    with pytest.raises(KernelError) as info:
        sim.load_module("a", path)
    assert info.value.errno == E.ENOSYS
    assert sim.no_module_support
    n = len(sim.syscalls)
    with pytest.raises(KernelError):
        sim.load_module("a", path)
    assert len(sim.syscalls) == n      # no second syscall once ENOSYS is known


def test_modules_disabled_eperm_names_cause(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", modules_disabled=True)
    assert sim.modules_disabled()
    with pytest.raises(KernelError) as info:
        sim.load_module("a", ko(tmp_path, "a"))
    assert info.value.errno == E.EPERM
    assert "modules_disabled" in info.value.message


def test_builtin_and_bound_devices(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", builtin={"unix"})
    assert sim.initstate("unix") is InitState.BUILTIN
    sim.load_module("e1000", ko(tmp_path, "e1000"))
    assert sim.bound_devices("e1000") == 0
    sim.bind_device("e1000", "e1000", "0000:00:03.0")
    sim.bind_device("e1000", "e1000", "0000:00:04.0")
    assert sim.bound_devices("e1000") == 2


def test_proc_modules_round_trip_matches_parser(sim: SimKernel, tmp_path: Path) -> None:
    sim.load_module("a", ko(tmp_path, "a"))
    sim.load_module("b", ko(tmp_path, "b"))
    sim.load_module("c", ko(tmp_path, "c"))
    text = (tmp_path / "tree/proc/modules").read_text()
    parsed = parse_proc_modules(text)
    assert parsed["a"].holders == ("b", "c") and parsed["b"].holders == ("c",)
    assert sim.load_order == ["a", "b", "c"]


def test_going_module_refuses_load_with_ebusy(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "t", exit_delays={"a": 0.4})
    path = ko(tmp_path, "a")
    sim.load_module("a", path)
    th = threading.Thread(target=sim.unload_module, args=("a",))
    th.start()
    time.sleep(0.1)
    assert sim.initstate("a") is InitState.GOING
    assert sim.modules()["a"].state == "Unloading"
    with pytest.raises(KernelError) as info:
        sim.load_module("a", path)
    assert info.value.errno == E.EBUSY
    th.join()
    assert sim.initstate("a") is InitState.ABSENT


def test_parallel_loads_of_independent_modules(tmp_path: Path) -> None:
    names = [f"m{i}" for i in range(6)]
    sim = SimKernel(tmp_path / "t", init_delays={n: 0.3 for n in names})
    paths = {n: ko(tmp_path, n) for n in names}
    threads = [threading.Thread(target=sim.load_module, args=(n, paths[n])) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sim.max_concurrent_seen == 6
    assert sorted(sim.load_order) == names
    assert set(sim.modules()) == set(names)
    assert all(s.result == 0 for s in sim.syscalls)


def test_without_kept_images_loads_the_same_and_holds_no_copies(tmp_path: Path) -> None:
    # What a daemon run against the simulator uses: a real kernel's modules
    # do not count against kmodd's memory either.
    sim = SimKernel(tmp_path / "t", keep_images=False)
    image = ELF + b"payload" * 100
    assert sim.load_module("a", ko(tmp_path, "a", image))
    assert sim.initstate("a") is InitState.LIVE and sim.images == {}
    assert sim.modules()["a"].size == 4        # only the magic was read
    with pytest.raises(KernelError) as info:
        sim.load_module("b", ko(tmp_path, "b", b"not an ELF file"))
    assert info.value.errno == E.ENOEXEC
    assert sim.load_module("c", ko(tmp_path, "c", lzma.compress(image)))  # user space: init_module
    assert [s.call for s in sim.syscalls] == ["finit_module", "finit_module", "init_module"]
    assert sim.images == {}


def test_every_load_has_a_new_instance(sim: SimKernel, tmp_path: Path) -> None:
    assert sim.instance("snd") is None
    sim.load_module("snd", ko(tmp_path, "snd"))
    first = sim.instance("snd")
    assert first is not None and sim.instance("snd") == first
    sim.unload_module("snd")
    assert sim.instance("snd") is None
    sim.load_module("snd", ko(tmp_path, "snd"))
    assert sim.instance("snd") not in (None, first)
