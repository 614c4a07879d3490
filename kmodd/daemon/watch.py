"""inotify on the module indexes and the modprobe.d directories.

depmod writes each ``modules.*.bin`` to a temporary name and renames it into
place; an administrator edits or drops files in ``modprobe.d``.  Either way
the daemon must reload at once, not at its next poll.  inotify is reached
through ctypes (libc's inotify_init1 / inotify_add_watch), so no new
dependency is needed.

A watched directory that does not exist yet (``/run/modprobe.d`` on most
machines, ``/lib/modules/VERSION`` before the kernel package is installed)
is watched through its nearest existing parent and armed when it appears.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# What changes a directory's contents as far as a reader is concerned.
# IN_MODIFY is left out on purpose: a file being written fires it per
# write(); IN_CLOSE_WRITE marks the end of the write.
DIR_MASK = (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE
            | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.inotify_rm_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


def _ignored_name(name: str) -> bool:
    # Editor droppings and depmod's temporary files: their rename into place
    # is the event that matters.
    return (name.startswith(".") or name.endswith("~") or name.endswith(".swp")
            or name.endswith(".tmp") or name.endswith(".dpkg-new") or name.endswith(".dpkg-tmp"))


class PathWatcher:
    """Calls ``on_change()`` once per burst of changes under ``paths``.

    Event-loop source: ``fileno()`` becomes readable on a change and
    ``on_readable()`` drains every queued event without blocking, then calls
    ``on_change`` once (a depmod run renames a dozen files; the daemon
    should reload once or twice, not a dozen times).
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]],
                 on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.paths = [Path(p) for p in paths]
        self.changes = 0  # times on_change was called, for status and tests
        self._fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        # wd -> (watched directory, the targets it stands for, is_parent watch)
        self._watches: dict[int, tuple[Path, set[Path], bool]] = {}
        for path in self.paths:
            self._arm(path)

    # -- event-loop source -------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def on_readable(self) -> None:
        changed = False
        rearm: set[Path] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                break
            if not data:
                break
            for wd, mask, name in self._parse(data):
                if mask & IN_Q_OVERFLOW:
                    # Events were lost: something may have changed.
                    changed = True
                    rearm.update(self.paths)
                    continue
                entry = self._watches.get(wd)
                if entry is None:
                    continue
                directory, targets, is_parent = entry
                if mask & IN_IGNORED:
                    # The watch is gone (directory removed or replaced):
                    # fall back to its parent until it reappears.
                    del self._watches[wd]
                    rearm.update(targets)
                    changed = True
                    continue
                if not targets:
                    continue  # a directory moved away and no longer stands for a path
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    rearm.update(targets)
                    changed = True
                    continue
                # A target that did not exist yet may just have appeared
                # (or a directory leading to it): arm it and re-read.
                child = directory / name if name else directory
                pending = [t for t in targets
                           if t != directory and (t == child or child in t.parents)]
                if pending:
                    rearm.update(pending)
                    changed = True
                    continue
                if is_parent or (name and _ignored_name(name)):
                    continue
                changed = True
        for path in rearm:
            self._arm(path)
        if changed:
            self.changes += 1
            self.on_change()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._watches.clear()

    # -- internals ---------------------------------------------------------
    @staticmethod
    def _parse(data: bytes) -> Iterable[tuple[int, int, str]]:
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            raw = data[offset:offset + length]
            offset += length
            name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            yield wd, mask, name

    def _add_watch(self, directory: Path, mask: int) -> int:
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(directory), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(directory))
        return int(wd)

    def _forget(self, target: Path) -> None:
        for entry in self._watches.values():
            entry[1].discard(target)

    def _arm(self, target: Path) -> None:
        """Watch ``target`` itself, or its nearest existing ancestor until it exists."""
        if self._fd < 0:
            return
        self._forget(target)
        candidate = target
        is_parent = False
        while True:
            try:
                wd = self._add_watch(candidate, PARENT_MASK if is_parent else DIR_MASK)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                    raise
                if candidate.parent == candidate:
                    return  # nothing to watch at all
                candidate = candidate.parent
                is_parent = True
                continue
            # inotify returns the same wd for the same inode; masks are
            # replaced, so a directory watched both ways keeps the wider one.
            if wd in self._watches:
                directory, targets, was_parent = self._watches[wd]
                if was_parent and not is_parent:
                    self._watches[wd] = (directory, targets | {target}, False)
                elif not was_parent and is_parent:
                    self._add_watch(candidate, DIR_MASK)
                    targets.add(target)
                else:
                    targets.add(target)
            else:
                self._watches[wd] = (candidate, {target}, is_parent)
            return

    def __enter__(self) -> PathWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_watch_paths(root: object, moddir: str | os.PathLike[str] | None) -> list[Path]:
    """The module directory and every modprobe.d directory of ``root`` (a kmodd Root)."""
    paths: list[Path] = []
    if moddir is not None:
        paths.append(Path(moddir))
    modprobe_dirs = getattr(root, "modprobe_dirs", None)
    if modprobe_dirs is not None:
        paths.extend(modprobe_dirs())
    return paths
