"""Build artifacts for the test bed: an uncompressed vmlinux and a small initramfs.

Both live under ``build/testbed/`` and are rebuilt only when their inputs change
(a stamp file records the inputs).  Writes go to a temporary file first and are
renamed into place, so two processes building at once cannot see a half file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = PROJECT_ROOT / "build" / "testbed"
GUEST_DIR = Path(__file__).resolve().parent / "guest"

# Loaded by the initramfs with busybox insmod, in this order (dependencies first).
INITRAMFS_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "9pnet", "9pnet_virtio", "netfs", "fscache", "9p", "overlay",
)
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# Bump when the layout of the initramfs changes in a way the stamp cannot see.
FORMAT_VERSION = 3

_XZ_MAGIC = bytes.fromhex("FD377A585A00")
_ZSTD_MAGIC = bytes.fromhex("28B52FFD")
_GZIP_MAGIC = bytes.fromhex("1F8B08")


class TestbedError(RuntimeError):
    """The test bed cannot be built or booted; the message says why and what to do."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    moddir: Path


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


KERNEL_VERSION_ENV = "TESTBED_KERNEL_VERSION"
META_PACKAGE = "linux-image-amd64"


def packaged_kernel_version(meta: str = META_PACKAGE) -> str | None:
    """The kernel version Debian's *meta* package depends on (``<upstream>-<abi>-amd64``).

    That is the kernel ``scripts/install-deps.sh`` installed today; ``None`` when
    dpkg is missing or the package is not installed.
    """
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Depends}", meta],
            capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    status, _, depends = out.stdout.partition("\t")
    if out.returncode != 0 or "install ok installed" not in status:
        return None
    for dep in re.split(r"[,|]", depends):
        m = re.match(r"\s*linux-image-(\S+)", dep)
        if m and not m.group(1).endswith("-unsigned"):
            return m.group(1)
    return None


def find_kernel(version: str | None = None) -> Kernel:
    """The Debian kernel under test.

    In order: *version*, ``$TESTBED_KERNEL_VERSION``, the version ``linux-image-amd64``
    depends on, and failing that the newest ``/boot/vmlinuz-*`` with a module tree.
    Nothing here names a version: Debian moves the meta package every few weeks.
    """
    version = version or os.environ.get(KERNEL_VERSION_ENV) or None
    boot = Path("/boot")
    candidates = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(p.name[8:]))
    if version is None:
        packaged = packaged_kernel_version()
        if packaged is not None and (Path("/lib/modules") / packaged / "modules.dep").exists():
            candidates = [p for p in candidates if p.name == f"vmlinuz-{packaged}"] or candidates
    if version is not None:
        candidates = [p for p in candidates if p.name == f"vmlinuz-{version}"]
    with_modules = [p for p in candidates if (Path("/lib/modules") / p.name[8:]).is_dir()]
    if not with_modules:
        what = f"vmlinuz-{version}" if version else "vmlinuz-*"
        if candidates:
            raise TestbedError(
                f"/boot/{what} exists but /lib/modules/{candidates[-1].name[8:]} does not: "
                "reinstall linux-image-amd64 (scripts/install-deps.sh)")
        raise TestbedError(
            f"no kernel to boot: /boot/{what} not found; install Debian's linux-image-amd64 "
            "(run scripts/install-deps.sh as root)")
    chosen = with_modules[-1]
    ver = chosen.name[8:]
    if not os.access(chosen, os.R_OK):
        raise TestbedError(f"{chosen} is not readable by uid {os.getuid()}")
    return Kernel(version=ver, vmlinuz=chosen, moddir=Path("/lib/modules") / ver)


def _file_id(path: Path) -> list[object]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _stamp_ok(stamp: Path, target: Path, inputs: object) -> bool:
    try:
        return target.exists() and json.loads(stamp.read_text()) == inputs
    except (OSError, ValueError):
        return False


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF inside a bzImage (xz, zstd or gzip payload).

    The payload is found by its magic bytes; whatever follows the compressed
    stream (the bzImage trailer) is ignored.
    """
    attempts: list[str] = []
    for magic, name in ((_XZ_MAGIC, "xz"), (_ZSTD_MAGIC, "zstd"), (_GZIP_MAGIC, "gzip")):
        start = vmlinuz.find(magic)
        while start >= 0:
            try:
                out = _decompress(name, vmlinuz[start:])
            except Exception as exc:  # a false match of the magic inside other data
                attempts.append(f"{name} at {start}: {exc}")
            else:
                if out.startswith(b"\x7fELF"):
                    return out
                attempts.append(f"{name} at {start}: not an ELF image")
            start = vmlinuz.find(magic, start + 1)
    raise TestbedError("no compressed ELF payload found in the kernel image"
                       + (f" ({'; '.join(attempts[:5])})" if attempts else ""))


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        return dec.decompress(data)  # stops at the end of the stream: trailer ignored
    if kind == "gzip":
        gdec = __import__("zlib").decompressobj(16 + 15)
        out: bytes = gdec.decompress(data)
        return out
    import zstandard

    zdec = zstandard.ZstdDecompressor().decompressobj()
    zout: bytes = zdec.decompress(data)
    return zout


def vmlinux_path(kernel: Kernel) -> Path:
    """Path of the uncompressed kernel, extracting it first if needed."""
    target = BUILD_DIR / f"vmlinux-{kernel.version}"
    stamp = target.with_name(target.name + ".stamp")
    inputs = {"vmlinuz": _file_id(kernel.vmlinuz), "format": FORMAT_VERSION}
    if _stamp_ok(stamp, target, inputs):
        return target
    _write_atomic(target, extract_vmlinux(kernel.vmlinuz.read_bytes()))
    _write_atomic(stamp, json.dumps(inputs).encode())
    return target


# ---------------------------------------------------------------------------
# cpio "newc" writer


class CpioWriter:
    """Minimal writer for the SVR4 "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._size = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._add(header + encoded)
        self._add(data)

    def _add(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._size += len(chunk)
        pad = -self._size % 4
        if pad:
            self._parts.append(b"\0" * pad)
            self._size += pad

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        blob = b"".join(self._parts)
        return blob + b"\0" * (-len(blob) % 512)


def _module_file(kernel: Kernel, name: str, deps: dict[str, str]) -> Path:
    rel = deps.get(name)
    if rel is None:
        raise TestbedError(f"module {name} is not in {kernel.moddir}/modules.dep; "
                           "the test bed needs it in the initramfs")
    return kernel.moddir / rel


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _modules_dep(kernel: Kernel) -> dict[str, str]:
    deps: dict[str, str] = {}
    dep_file = kernel.moddir / "modules.dep"
    try:
        text = dep_file.read_text()
    except OSError as exc:
        raise TestbedError(f"cannot read {dep_file}: {exc}") from exc
    for line in text.splitlines():
        path = line.split(":", 1)[0]
        base = path.rsplit("/", 1)[-1]
        name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")
        deps[name] = path
    return deps


def _is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without a PT_INTERP program header."""
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELFCLASS64
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        path = Path(cand)
        if path.is_file() and _is_static_elf(path.read_bytes()):
            return path
    raise TestbedError("no statically linked busybox found (/bin/busybox): "
                       "install busybox-static (scripts/install-deps.sh)")


def _guest_files() -> Iterable[Path]:
    return sorted(p for p in GUEST_DIR.iterdir() if p.is_file() and p.suffix == ".sh")


def initramfs_path(kernel: Kernel) -> Path:
    """Path of the initramfs for *kernel*, (re)building it when an input changed."""
    target = BUILD_DIR / f"initramfs-{kernel.version}.cpio"
    stamp = target.with_name(target.name + ".stamp")
    deps = _modules_dep(kernel)
    busybox = find_busybox()
    modules = [_module_file(kernel, m, deps) for m in INITRAMFS_MODULES]
    guest = list(_guest_files())
    digest = hashlib.sha256()
    for path in guest:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    inputs = {
        "format": FORMAT_VERSION,
        "busybox": _file_id(busybox),
        "modules": [_file_id(m) for m in modules],
        "guest": digest.hexdigest(),
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    if _stamp_ok(stamp, target, inputs):
        return target

    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "run", "tmp", "lib", "lib/modules", "testbed",
              "newroot", "lower", "ovl"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    order = []
    for name, path in zip(INITRAMFS_MODULES, modules, strict=True):
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
        order.append(name)
    cpio.file("lib/modules/order", ("\n".join(order) + "\n").encode())
    for path in guest:
        cpio.file(f"testbed/{path.name}", path.read_bytes(), 0o755)
    cpio.symlink("init", "testbed/init.sh")
    _write_atomic(target, cpio.finish())
    _write_atomic(stamp, json.dumps(inputs).encode())
    return target


def build(version: str | None = None) -> tuple[Kernel, Path, Path]:
    """Kernel, vmlinux and initramfs, built if needed."""
    kernel = find_kernel(version)
    return kernel, vmlinux_path(kernel), initramfs_path(kernel)


def clean() -> None:
    shutil.rmtree(BUILD_DIR, ignore_errors=True)

