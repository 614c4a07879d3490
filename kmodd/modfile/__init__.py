"""Module files on disk: compression detection by magic bytes and decompression.

The package holds what reads a module file: one codec per compression
(``gzip``, ``xz``, ``zstd``), ``elf`` (modinfo, vermagic), ``signature`` and
``params``; it sits above resolution and below the kernel layer.

The kernel signs a module before it is compressed, so everything that looks
inside a module (modinfo, vermagic, the signature trailer) works on the image
returned by :func:`read_module_image`.  Backends are imported only when a file
of their kind is met: a daemon that never sees a ``.ko.zst`` never pays for
``zstandard``.
"""

from __future__ import annotations

import enum
import importlib
import os
from pathlib import Path

__all__ = [
    "MODULE_SUFFIXES",
    "Compression",
    "ModuleFileError",
    "decompress",
    "detect_compression",
    "read_module_image",
]

# The suffixes kmod accepts as module files (path_ends_with_kmod_ext).
MODULE_SUFFIXES = (".ko", ".ko.gz", ".ko.xz", ".ko.zst")


class ModuleFileError(Exception):
    """A file that cannot be used as a kernel module; the message names it and says why."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


class Compression(enum.Enum):
    """How a module file is stored; the value is the name ``/sys/module/compression`` uses."""

    NONE = "none"
    XZ = "xz"
    GZIP = "gzip"
    ZSTD = "zstd"


# Magic bytes, as the kernel's and kmod's decompressors recognise them.  The
# file name is never trusted: Debian ships plain .ko files, but a recompressed
# module keeps working whatever it is called.
_MAGICS: tuple[tuple[bytes, Compression], ...] = (
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x1f\x8b", Compression.GZIP),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
)
_MAGIC_LEN = max(len(m) for m, _ in _MAGICS)

_BACKENDS = {
    Compression.XZ: "kmodd.modfile.xz",
    Compression.GZIP: "kmodd.modfile.gzip",
    Compression.ZSTD: "kmodd.modfile.zstd",
}


def _compression_of(head: bytes) -> Compression:
    for magic, kind in _MAGICS:
        if head.startswith(magic):
            return kind
    return Compression.NONE


def detect_compression(path_or_bytes: str | os.PathLike[str] | bytes | bytearray
                       | memoryview) -> Compression:
    """The compression of a module file (or of its first bytes), from magic bytes only."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _compression_of(bytes(path_or_bytes[:_MAGIC_LEN]))
    try:
        with open(path_or_bytes, "rb") as f:
            head = f.read(_MAGIC_LEN)
    except OSError as e:
        raise ModuleFileError(path_or_bytes, e.strerror or str(e)) from e
    return _compression_of(head)


def decompress(data: bytes, kind: Compression, path: str | os.PathLike[str] | None = None
               ) -> bytes:
    """Decompress a whole module image; a corrupt or truncated stream raises ModuleFileError."""
    if kind is Compression.NONE:
        return data
    backend = importlib.import_module(_BACKENDS[kind])
    result: bytes = backend.decompress(data, path)
    return result


def read_module_image(path: str | os.PathLike[str]) -> bytes:
    """The ELF image of a module file, decompressed if it is compressed.

    Raises ModuleFileError (never OSError or a codec's own exception) so callers
    have one thing to catch and one message to show.
    """
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError as e:
        raise ModuleFileError(path, "is a directory, not a module file") from e
    except OSError as e:
        raise ModuleFileError(path, e.strerror or str(e)) from e
    return decompress(data, _compression_of(data[:_MAGIC_LEN]), path)
