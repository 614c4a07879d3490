"""gzip (``.ko.gz``) modules, with the standard library's zlib."""

from __future__ import annotations

import gzip
import os
import zlib

from kmodd.modfile import ModuleFileError


def decompress(data: bytes, path: str | os.PathLike[str] | None = None) -> bytes:
    try:
        # gzip.decompress checks the CRC and length trailer and joins members.
        return gzip.decompress(data)
    except EOFError as e:
        raise ModuleFileError(path, "truncated gzip stream") from e
    except (OSError, zlib.error) as e:
        raise ModuleFileError(path, f"corrupt gzip stream: {e}") from e
