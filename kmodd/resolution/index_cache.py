"""A private cache of prepared indexes, so a short-lived ``kmodctl`` starts fast.

Decoding modules.alias.bin and preparing it for matching takes a few hundred
milliseconds; loading the prepared form takes a few.  An entry is only used
when the source file is the very one it was made from (device, inode, size,
modification and change times), when it was written by this Python (marshal
is version-specific), when its checksum holds, and when it is a regular file
owned by us that nobody else may write.  Anything else is ignored and
rebuilt: the cache can make kmodd faster, never answer differently.

Location: ``$KMODD_CACHE_DIR`` if set (empty disables the cache), else
``/run/kmodd/cache`` for root (tmpfs, gone at reboot like the indexes' users
expect) and ``$XDG_CACHE_HOME/kmodd`` (``~/.cache/kmodd``) for others.  Nothing
is ever written next to the kernel's files.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import stat
import sys
import zlib
from pathlib import Path

from kmodd.root import run_path

_MAGIC = b"KMODDIX1"
# Small indexes are quicker to decode than to look up in a cache.
MIN_SOURCE_SIZE = 256 * 1024


def default_dir() -> Path | None:
    env = os.environ.get("KMODD_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    if os.geteuid() == 0:
        return Path(run_path("cache"))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kmodd"


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What says a file is unchanged: depmod replaces indexes by rename."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class IndexCache:
    """Prepared forms of index files, one cache file per (kind, source path)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def _path(self, kind: str, source: str) -> Path | None:
        if self.directory is None:
            return None
        # readable when short; hashlib would cost more start-up time than it is worth
        name = source.strip("/").replace("%", "%25").replace("/", "%")
        if len(name) > 200:
            raw = os.fsencode(source)
            name = f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}{len(raw)}"
        return self.directory / f"{kind}-{name}.idx"

    def _meta(self, kind: str, source: str, ident: tuple[int, ...]) -> tuple[object, ...]:
        return (kind, source, ident, sys.implementation.cache_tag, marshal.version)

    def get(self, kind: str, source: str, ident: tuple[int, ...]) -> bytes | None:
        """The stored payload for this exact source file, or None."""
        path = self._path(kind, source)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_mode & 0o022):
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        except OSError:
            return None
        finally:
            os.close(fd)
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
            return None
        hlen = int.from_bytes(data[8:12], "big")
        try:
            meta, crc = marshal.loads(data[12:12 + hlen])
        except (EOFError, ValueError, TypeError):
            return None
        payload = data[12 + hlen:]
        if meta != self._meta(kind, source, ident) or zlib.crc32(payload) != crc:
            return None
        return payload

    def put(self, kind: str, source: str, ident: tuple[int, ...], payload: bytes) -> None:
        """Store a payload; failures (read-only, no permission, full) are ignored."""
        path = self._path(kind, source)
        if path is None:
            return
        header = marshal.dumps((self._meta(kind, source, ident), zlib.crc32(payload)))  # type: ignore[arg-type]
        tmp = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            dst = os.stat(path.parent)
            if dst.st_uid != os.geteuid() or dst.st_mode & 0o022:
                return
            tmp = str(path.parent / f".tmp-{os.getpid()}-{path.name}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + len(header).to_bytes(4, "big") + header + payload)
            os.replace(tmp, path)
            tmp = None
        except OSError:
            pass
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
