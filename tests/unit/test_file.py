"""Module files: compression detection by magic bytes and decompression backends."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from kmodd.modfile import (
    Compression,
    ModuleFileError,
    decompress,
    detect_compression,
    read_module_image,
)

# Not ELF on purpose: the file layer must not care what it decompresses.
PAYLOAD = b"\x7fELF" + bytes(range(256)) * 64 + b"tail"


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _compressors() -> dict[Compression, bytes]:
    return {
        Compression.NONE: PAYLOAD,
        # The kernel's build compresses modules with --check=crc32.
        Compression.XZ: lzma.compress(PAYLOAD, check=lzma.CHECK_CRC32),
        Compression.GZIP: gzip.compress(PAYLOAD),
        Compression.ZSTD: zstandard.ZstdCompressor().compress(PAYLOAD),
    }


@pytest.mark.parametrize("kind", list(Compression))
def test_detect_and_read_each_kind(tmp_path: Path, kind: Compression) -> None:
    data = _compressors()[kind]
    path = _write(tmp_path, "m.ko", data)   # name says nothing: magic decides
    assert detect_compression(path) is kind
    assert detect_compression(str(path)) is kind
    assert detect_compression(data) is kind
    assert detect_compression(memoryview(data)) is kind
    assert read_module_image(path) == PAYLOAD
    assert decompress(data, kind, path) == PAYLOAD


def test_compression_values_match_sysfs_names() -> None:
    # /sys/module/compression says "xz", "gzip" or "zstd"; the loader compares these.
    assert {c.value for c in Compression} == {"none", "xz", "gzip", "zstd"}


def test_short_and_empty_files_are_uncompressed(tmp_path: Path) -> None:
    assert detect_compression(b"") is Compression.NONE
    assert detect_compression(b"\x1f") is Compression.NONE       # half a gzip magic
    assert detect_compression(b"\xfd7zXZ") is Compression.NONE   # xz magic lacks its NUL
    assert read_module_image(_write(tmp_path, "empty.ko", b"")) == b""


@pytest.mark.parametrize("tool,kind", [("xz", Compression.XZ), ("gzip", Compression.GZIP),
                                       ("zstd", Compression.ZSTD)])
def test_files_written_by_the_command_line_tools(tmp_path: Path, tool: str,
                                                 kind: Compression) -> None:
    """What `make modules_install` produces: the real tools, not the Python codecs."""
    exe = shutil.which(tool)
    assert exe is not None, f"{tool} is required by the tests (apt-get install {tool})"
    src = _write(tmp_path, "m.ko", PAYLOAD)
    args = {"xz": [exe, "--check=crc32", "-k", "-f", str(src)],
            "gzip": [exe, "-k", "-f", "-n", str(src)],
            "zstd": [exe, "-q", "-k", "-f", str(src)]}[tool]
    subprocess.run(args, check=True)
    out = Path(str(src) + {"xz": ".xz", "gzip": ".gz", "zstd": ".zst"}[tool])
    assert detect_compression(out) is kind
    assert read_module_image(out) == PAYLOAD


def test_zstd_frame_without_content_size(tmp_path: Path) -> None:
    # Streamed compression (zstd reading a pipe) leaves the size out of the frame header;
    # ZstdDecompressor.decompress() alone would refuse this.
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    data = cctx.compress(PAYLOAD)
    assert zstandard.frame_content_size(data) == -1
    assert read_module_image(_write(tmp_path, "m.ko.zst", data)) == PAYLOAD


def test_concatenated_streams(tmp_path: Path) -> None:
    half = len(PAYLOAD) // 2
    a, b = PAYLOAD[:half], PAYLOAD[half:]
    z = zstandard.ZstdCompressor()
    assert read_module_image(_write(tmp_path, "z", z.compress(a) + z.compress(b))) == PAYLOAD
    assert read_module_image(_write(tmp_path, "g", gzip.compress(a) + gzip.compress(b))) == PAYLOAD
    assert read_module_image(_write(tmp_path, "x", lzma.compress(a) + lzma.compress(b))) == PAYLOAD


@pytest.mark.parametrize("kind", [Compression.XZ, Compression.GZIP, Compression.ZSTD])
def test_truncated_stream_is_an_error(tmp_path: Path, kind: Compression) -> None:
    data = _compressors()[kind]
    path = _write(tmp_path, "cut.ko", data[: len(data) // 2])
    with pytest.raises(ModuleFileError) as exc:
        read_module_image(path)
    assert exc.value.path == str(path)
    assert kind.value in exc.value.reason
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("kind", [Compression.XZ, Compression.GZIP, Compression.ZSTD])
def test_corrupt_stream_is_an_error(tmp_path: Path, kind: Compression) -> None:
    data = bytearray(_compressors()[kind])
    # Keep the magic, scribble over the rest: the decoder (or its checksum) must object.
    for i in range(8, len(data) - 8, 7):
        data[i] ^= 0x5A
    path = _write(tmp_path, "bad.ko", bytes(data))
    assert detect_compression(path) is kind
    with pytest.raises(ModuleFileError, match=kind.value):
        read_module_image(path)


@pytest.mark.parametrize("kind", [Compression.XZ, Compression.GZIP, Compression.ZSTD])
def test_magic_alone_is_an_error(tmp_path: Path, kind: Compression) -> None:
    magic = _compressors()[kind][:6 if kind is Compression.XZ else 4]
    with pytest.raises(ModuleFileError):
        read_module_image(_write(tmp_path, "m.ko", magic))


def test_trailing_garbage_after_zstd(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(PAYLOAD) + b"garbage"
    with pytest.raises(ModuleFileError, match="trailing garbage"):
        read_module_image(_write(tmp_path, "m.ko.zst", data))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ko"
    with pytest.raises(ModuleFileError, match="No such file"):
        read_module_image(missing)
    with pytest.raises(ModuleFileError, match="No such file"):
        detect_compression(missing)
    with pytest.raises(ModuleFileError, match="directory"):
        read_module_image(tmp_path)


def test_zstandard_imported_only_for_zstd_files(tmp_path: Path) -> None:
    # A daemon that only meets .ko files must not pay for zstandard at start-up.
    code = ("import sys; from kmodd.modfile import read_module_image; "
            f"read_module_image({str(_write(tmp_path, 'm.ko', PAYLOAD))!r}); "
            "import kmodd.modfile.elf; "
            "sys.exit(int('zstandard' in sys.modules or 'elftools' in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
