"""zstd (``.ko.zst``) modules, with the ``zstandard`` package (no stdlib codec in 3.11)."""

from __future__ import annotations

import os

from kmodd.modfile import ModuleFileError

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decompress(data: bytes, path: str | os.PathLike[str] | None = None) -> bytes:
    import zstandard  # lazily: only users of .ko.zst files pay for it

    out: list[bytes] = []
    rest = data
    try:
        # A decompression object rather than ZstdDecompressor.decompress(): the
        # latter refuses frames written without a content size (streamed
        # compression), and the object tells a truncated frame from a complete
        # one through ``eof``.  Loop for concatenated frames, like the zstd tool.
        while True:
            obj = zstandard.ZstdDecompressor().decompressobj()
            out.append(obj.decompress(rest))
            if not obj.eof:
                raise ModuleFileError(path, "truncated zstd stream")
            rest = obj.unused_data
            if not rest:
                break
            if not rest.startswith(_ZSTD_MAGIC):
                raise ModuleFileError(path, "trailing garbage after zstd stream")
    except zstandard.ZstdError as e:
        raise ModuleFileError(path, f"corrupt zstd stream: {e}") from e
    return b"".join(out)
