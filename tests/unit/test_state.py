"""The persisted record of what kmodd loaded."""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path

import pytest

from kmodd.daemon import state
from kmodd.daemon.state import ModuleRecord, StateStore


def rec(name: str, loaded_at: float = 100.0, **kw: object) -> ModuleRecord:
    return ModuleRecord(name=name, loaded_at=loaded_at, kind=str(kw.pop("kind", "modalias")),
                        key=str(kw.pop("key", f"pci:{name}")), **kw)  # type: ignore[arg-type]


def test_round_trip_and_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "run/kmodd/state.json"
    store = StateStore(path)
    store.record(rec("e1000", devpath="/devices/pci0000:00/0000:00:03.0",
                     requested_by="uevent", idle_since=150.0, idle_sweeps=1))
    store.record(rec("crc32c", role="dependency", via=("btrfs",), kind="kernel", key="fs-btrfs"))
    store.save()
    # Only the final file: the temporary one was renamed over it.
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    data = json.loads(path.read_text())
    assert data["version"] == 1 and len(data["modules"]) == 2
    again = StateStore(path)
    again.load(live=["e1000", "crc32c", "other"])
    assert again.records() == store.records()
    assert again.get("crc32c") is not None and again.get("crc32c").via == ("btrfs",)  # type: ignore[union-attr]


def test_restart_drops_modules_no_longer_loaded(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    for name in ("a", "b", "c"):
        store.record(rec(name))
    store.save()
    again = StateStore(path)
    again.load(live=["a", "c", "unrelated"])
    assert sorted(again.records()) == ["a", "c"]


@pytest.mark.parametrize("content", [
    "{not json", "[]", '{"modules": "x"}', "\xff\xfe garbage", "[" * 60000,
])
def test_corrupt_file_is_logged_and_ignored(tmp_path: Path, content: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    path.write_text(content, errors="surrogateescape")
    store = StateStore(path)
    with caplog.at_level(logging.WARNING, logger="kmodd.daemon.state"):
        store.load(live=["a"])
    assert len(store) == 0
    assert "starting fresh" in caplog.text
    # And the next save replaces it with a good file.
    store.record(rec("a"))
    store.save()
    assert json.loads(path.read_text())["modules"][0]["name"] == "a"


def test_missing_file_is_a_first_start(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    store = StateStore(tmp_path / "nope/state.json")
    with caplog.at_level(logging.WARNING):
        store.load(live=[])
    assert len(store) == 0 and not caplog.text


def test_idle_updates_ignore_a_module_reloaded_since(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.json")
    store.record(rec("m", loaded_at=1.0))
    store.set_idle("m", 1.0, 50.0, 1)
    assert store.get("m").idle_since == 50.0  # type: ignore[union-attr]
    store.record(rec("m", loaded_at=2.0))      # unloaded and loaded again meanwhile
    store.set_idle("m", 1.0, 60.0, 2)
    assert store.get("m").idle_since is None  # type: ignore[union-attr]
    assert not store.forget_if("m", 1.0) and "m" in store
    assert store.forget_if("m", 2.0) and "m" not in store


def test_records_are_copies(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.json")
    store.record(rec("m"))
    copy = store.records()
    copy["m"].idle_sweeps = 99
    assert store.get("m").idle_sweeps == 0  # type: ignore[union-attr]


def test_every_field_is_persisted() -> None:
    from kmodd.record import fields
    r = rec("m", via=("x",), idle_since=3.0, idle_sweeps=2, role="dependency")
    assert set(r.to_dict()) == {f.name for f in fields(ModuleRecord)}
    assert ModuleRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r


GOOD = {"name": "good", "loaded_at": 1.0, "kind": "kernel", "key": "rtnl-link-good"}
BAD_RECORDS = [
    {**GOOD, "name": "a", "key": 5},
    {**GOOD, "name": "b", "kind": None},
    {**GOOD, "name": "c", "loaded_at": "yesterday"},
    {**GOOD, "name": "d", "loaded_at": True},
    {**GOOD, "name": "e", "devpath": 7},
    {**GOOD, "name": "f", "requested_by": ["x"]},
    {**GOOD, "name": "g", "role": {}},
    {**GOOD, "name": "h", "via": "abc"},
    {**GOOD, "name": "i", "via": [1, 2]},
    {**GOOD, "name": "j", "idle_since": "now"},
    {**GOOD, "name": "k", "idle_sweeps": -1},
    {**GOOD, "name": "l", "idle_sweeps": 1.5},
    {**GOOD, "name": "m", "loaded_at": float("inf")},
    {"name": "n", "loaded_at": 1.0, "kind": "kernel"},
    {**GOOD, "name": ""},
    {**GOOD, "name": "../x"},
    {**GOOD, "name": 42},
    42,
]


def test_each_bad_record_is_dropped_by_name_and_sweeps_still_work(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One record with ``"key": 5`` used to make every sweep raise."""
    from kmodd.daemon.autoclean import Autoclean, AutocleanPolicy
    from kmodd.kernel.sim import SimKernel

    path = tmp_path / "state.json"
    text = json.dumps({"version": 1, "modules": [*BAD_RECORDS, GOOD]}, allow_nan=True)
    path.write_text(text)
    store = StateStore(path)
    names = [r["name"] for r in BAD_RECORDS if isinstance(r, dict)]
    with caplog.at_level(logging.WARNING, logger="kmodd.daemon.state"):
        store.load(live=[n for n in names if isinstance(n, str)] + ["good"])
    assert sorted(store.records()) == ["good"]
    dropped = [r.getMessage() for r in caplog.records if "dropping record" in r.getMessage()]
    assert len(dropped) == len(BAD_RECORDS)
    for name in "abcdefghijklmn":
        assert any(f"record '{name}'" in m for m in dropped), name
    assert any("'key' has a bad value '5'" in m for m in dropped)
    # The sweep over what is left runs (the good record's module is simply absent).
    sim = SimKernel(tmp_path / "k")
    clean = Autoclean(sim, store, lambda n: None, AutocleanPolicy(idle_timeout=0),
                      clock=lambda: 9.0)
    assert clean.sweep().forgotten == ["good"]


def test_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.record(rec("a"))
    store.save()
    (tmp_path / ".state.k2j3h4").write_text("{half")       # a save cut short by SIGKILL
    (tmp_path / ".state.dir").mkdir()                       # not ours: left alone
    (tmp_path / "reply.123").write_text("")                 # not a state temporary
    assert StateStore(path).remove_leftovers() == [".state.k2j3h4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.dir", "reply.123",
                                                           "state.json"]


@pytest.mark.parametrize("content", [b'{"\xff\xff": []}', b'{"modules": ' + b"[" * 5000],
                         ids=["bad-utf8", "deeply-nested"])
def test_undecodable_or_deeply_nested_state_file_starts_fresh(tmp_path: Path,
                                                              content: bytes) -> None:
    """Found by fuzzing: both raised out of load(), so the daemon could not start."""
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = StateStore(path)
    store.load()
    assert store.records() == {}


def test_state_file_is_readable_by_root_only(tmp_path: Path) -> None:
    """Records name who asked (uid, pid): other users see that no more here than
    through the control socket."""
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.record(rec("a"))
    store.save()
    assert path.stat().st_mode & 0o777 == 0o600


def test_atomic_write_skips_a_taken_name_and_keeps_its_mode_whatever_the_umask(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A temporary name left by an earlier process with the same pid is never
    written through (O_EXCL, as mkstemp); the mode is set, not masked."""
    monkeypatch.setattr(state, "_tmp_counter", itertools.count())
    taken = tmp_path / f".x.{os.getpid()}.0"
    taken.write_text("someone else's")
    old = os.umask(0o077)
    try:
        state.write_atomically(tmp_path / "out", b"data", mode=0o644, prefix=".x.")
    finally:
        os.umask(old)
    assert (tmp_path / "out").read_bytes() == b"data"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o644
    assert taken.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name, "out"]


def test_atomic_write_through_a_planted_symlink_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "_tmp_counter", itertools.count())
    monkeypatch.setattr(state, "_TMP_TRIES", 1)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / f".x.{os.getpid()}.0").symlink_to(victim)
    with pytest.raises(FileExistsError, match="no free temporary name"):
        state.write_atomically(tmp_path / "out", b"data", mode=0o644, prefix=".x.")
    assert victim.read_text() == "keep" and not (tmp_path / "out").exists()


def test_failed_atomic_write_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")

    def no_rename(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(state.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        state.write_atomically(target, b"new", mode=0o644, prefix=".x.")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and target.read_bytes() == b"old"
