"""xz (``.ko.xz``) modules, with the standard library's lzma."""

from __future__ import annotations

import lzma
import os

from kmodd.modfile import ModuleFileError


def decompress(data: bytes, path: str | os.PathLike[str] | None = None) -> bytes:
    try:
        # FORMAT_XZ rather than AUTO: the magic said xz, anything else is corruption.
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise ModuleFileError(path, f"corrupt xz stream: {e}") from e
    except EOFError as e:
        raise ModuleFileError(path, "truncated xz stream") from e
