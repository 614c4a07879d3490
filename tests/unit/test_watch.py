"""inotify watcher: depmod-style renames, modprobe.d edits, directories that
appear later, bursts coalesced into one call."""

from __future__ import annotations

import os
import selectors
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.daemon.watch import PathWatcher


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def pump(watcher: PathWatcher, wait: float = 1.0) -> None:
    """Run the watcher like the event loop does until it goes quiet."""
    sel = selectors.DefaultSelector()
    sel.register(watcher.fileno(), selectors.EVENT_READ)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            if sel.select(0.05):
                watcher.on_readable()
                deadline = min(deadline, time.monotonic() + 0.1)
    finally:
        sel.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    moddir = tmp_path / "lib/modules/6.1.0-test"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep.bin").write_bytes(b"old")
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def watched(tree: Path) -> Iterator[tuple[PathWatcher, Counter]]:
    counter = Counter()
    watcher = PathWatcher([tree / "lib/modules/6.1.0-test", tree / "etc/modprobe.d",
                           tree / "run/modprobe.d"], counter)
    yield watcher, counter
    watcher.close()


def test_depmod_rename_into_place_triggers(watched: tuple[PathWatcher, Counter],
                                           tree: Path) -> None:
    watcher, counter = watched
    moddir = tree / "lib/modules/6.1.0-test"
    pump(watcher, 0.2)
    assert counter.calls == 0
    tmp = moddir / "modules.dep.bin.12345.tmp"
    tmp.write_bytes(b"new")
    os.rename(tmp, moddir / "modules.dep.bin")
    pump(watcher)
    assert counter.calls == 1


def test_burst_is_coalesced(watched: tuple[PathWatcher, Counter], tree: Path) -> None:
    watcher, counter = watched
    moddir = tree / "lib/modules/6.1.0-test"
    # A depmod run: a dozen files renamed into place back to back.
    for name in ("dep", "dep.bin", "alias", "alias.bin", "softdep", "symbols", "symbols.bin",
                 "builtin.bin", "builtin.alias.bin", "devname", "weakdep", "order"):
        tmp = moddir / f"modules.{name}.99"
        tmp.write_text(name)
        os.rename(tmp, moddir / f"modules.{name}")
    watcher.on_readable()
    assert counter.calls == 1


def test_modprobe_d_edit_and_removal_trigger(watched: tuple[PathWatcher, Counter],
                                             tree: Path) -> None:
    watcher, counter = watched
    conf = tree / "etc/modprobe.d/blacklist-test.conf"
    conf.write_text("blacklist dummy\n")
    pump(watcher)
    # "At once": creation and the end of the write may land in two wake-ups.
    assert 1 <= counter.calls <= 2
    before = counter.calls
    conf.unlink()
    pump(watcher)
    assert counter.calls == before + 1


def test_editor_swap_files_are_ignored(watched: tuple[PathWatcher, Counter],
                                       tree: Path) -> None:
    watcher, counter = watched
    (tree / "etc/modprobe.d/.blacklist.conf.swp").write_text("x")
    (tree / "etc/modprobe.d/blacklist.conf~").write_text("x")
    pump(watcher, 0.3)
    assert counter.calls == 0


def test_directory_created_later_is_armed(watched: tuple[PathWatcher, Counter],
                                          tree: Path) -> None:
    watcher, counter = watched
    # /run/modprobe.d did not exist; neither did /run.
    (tree / "run").mkdir()
    pump(watcher, 0.3)
    (tree / "run/modprobe.d").mkdir()
    pump(watcher)
    assert counter.calls >= 1
    before = counter.calls
    (tree / "run/modprobe.d/x.conf").write_text("options dummy numdummies=2\n")
    pump(watcher)
    assert before + 1 <= counter.calls <= before + 2


def test_module_dir_replaced_is_followed(watched: tuple[PathWatcher, Counter],
                                         tree: Path) -> None:
    # A kernel package upgrade may remove and recreate the whole directory.
    watcher, counter = watched
    moddir = tree / "lib/modules/6.1.0-test"
    shutil.rmtree(moddir)
    pump(watcher)
    assert counter.calls >= 1
    moddir.mkdir()
    pump(watcher)
    before = counter.calls
    (moddir / "modules.alias.bin").write_bytes(b"x")
    pump(watcher)
    assert before + 1 <= counter.calls <= before + 2


def test_close_releases_the_descriptor(tree: Path) -> None:
    watcher = PathWatcher([tree / "etc/modprobe.d"], Counter())
    fd = watcher.fileno()
    watcher.close()
    with pytest.raises(OSError):
        os.fstat(fd)
