"""Boot images derived from the test bed's image: kmodd taken over, and given back.

    images = derived_images(deb)       # cached beside the image, progress on stderr
    images.takeover, images.handback   # ImageArtifacts, booted like the image itself

The administrator's steps run on the host, natively, in a chroot of the image's
tree, with ``/proc``, ``/sys`` and ``/dev`` mounted as mmdebstrap's hooks do:

* takeover: ``dpkg -i kmodd_*.deb`` then ``kmodd-takeover enable --no-start``,
  which runs the image's own ``update-initramfs -u`` (Debian's ``MODULES=most``);
* handback, in a chroot of the takeover's tree: ``kmodd-takeover disable`` (the
  initramfs rebuilt again) and ``dpkg --purge kmodd``.

Under emulation the in-guest ``update-initramfs`` takes tens of minutes; here it
takes seconds, and the result is the same files the guest would have written.
Each tree becomes its own ext4 image (same UUID, same vfat data disk), so a
boot of the base, of the takeover and of the handback differ only by what
these steps did.  The handback's tree is compared with the base's: the purge
must leave the files under ``/etc``, ``/usr`` and ``/var/lib`` as they were.

The host's own sysctls are never touched: ``/proc/sys`` is read-only in the
chroot (``kmodd-takeover`` writes ``kernel.modprobe`` on a live system; in the
chroot it warns and leaves it to ``/etc/sysctl.d``, which the boot applies).

The cache key hashes the image's key, the package's bytes and this file; the
derived images live in ``build/boot/<image key>/kmodd-<key>/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.image import ImageArtifacts, _artifacts, _log, _make_disk, _tool, build_image
from testbed.initramfs import PROJECT_ROOT, TestbedError

TAKEOVER_STEPS = ("dpkg -i /tmp/{deb}", "kmodd-takeover enable --no-start")
HANDBACK_STEPS = ("kmodd-takeover disable", "dpkg --purge kmodd")
# Compared after the purge; anything else that differs from the base is a leftover.
COMPARED = ("etc", "usr", "var/lib")
# What changes by design between two package operations and is not the
# package's: dpkg's own bookkeeping backups and the initramfs build's state.
_IGNORED_PREFIXES = ("var/lib/dpkg/", "var/lib/initramfs-tools/", "var/lib/ucf/cache/")
_IGNORED_SUFFIXES = ("-old", "~")
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


@dataclass(frozen=True)
class DerivedImages:
    takeover: ImageArtifacts
    handback: ImageArtifacts
    takeover_log: str
    handback_log: str
    # Paths under COMPARED that differ between the base and the handback tree
    # ("+ path" only after, "- path" only before, "~ path" changed type/target/content).
    leftovers: tuple[str, ...]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_deb(outdir: Path) -> Path:
    """kmodd's Debian package, built from this checkout (``contrib/build-deb.sh``)."""
    proc = subprocess.run(["bash", str(PROJECT_ROOT / "contrib" / "build-deb.sh"), str(outdir)],
                          cwd=PROJECT_ROOT, text=True, capture_output=True, timeout=900)
    debs = sorted(outdir.glob("kmodd_*_all.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise TestbedError(f"build-deb.sh failed (exit {proc.returncode}, made {debs}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return debs[0]


def cache_key(base: ImageArtifacts, deb: Path) -> str:
    h = hashlib.sha256()
    for part in (base.directory.name, _sha256(deb), _sha256(Path(__file__))):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if (p + "/").startswith(prefix)]


def _safe_rmtree(root: Path) -> None:
    # Never delete through a bind mount of the host's /dev or /sys.
    left = _mounts_under(root)
    if left:
        raise TestbedError(f"{root}: still mounted ({left}); not removing it")
    shutil.rmtree(root)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc (its sys/ read-only), /sys read-only and /dev, as mmdebstrap's hooks."""
    mount = _tool("mount")
    steps = [
        ([mount, "-t", "proc", "proc", str(root / "proc")], root / "proc"),
        ([mount, "--bind", str(root / "proc/sys"), str(root / "proc/sys")], root / "proc/sys"),
        ([mount, "-o", "remount,bind,ro", str(root / "proc/sys")], None),
        ([mount, "--bind", "-o", "ro", "/sys", str(root / "sys")], root / "sys"),
        ([mount, "--bind", "/dev", str(root / "dev")], root / "dev"),
    ]
    done: list[Path] = []
    try:
        for argv, target in steps:
            subprocess.run(argv, check=True, capture_output=True, text=True)
            if target is not None:
                done.append(target)
        yield
    finally:
        for target in reversed(done):
            proc = subprocess.run([_tool("umount"), str(target)], capture_output=True)
            if proc.returncode != 0:
                subprocess.run([_tool("umount"), "-l", str(target)], capture_output=True)


def _in_chroot(root: Path, commands: tuple[str, ...], what: str) -> str:
    log: list[str] = []
    chroot = _tool("chroot")
    with _chroot_mounts(root):
        for cmd in commands:
            t0 = time.monotonic()
            proc = subprocess.run([chroot, str(root), "/bin/sh", "-c", cmd], env=_CHROOT_ENV,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            took = time.monotonic() - t0
            log.append(f"# {cmd}  ({took:.1f} s, exit {proc.returncode})\n"
                       f"{proc.stdout}{proc.stderr}")
            _log(f"{what}: {cmd}: {took:.0f} s")
            if proc.returncode != 0:
                raise TestbedError(f"{what}: '{cmd}' failed (exit {proc.returncode}):\n"
                                   + "\n".join(log)[-4000:])
    return "\n".join(log)


def _entries(root: Path) -> dict[str, str]:
    """path -> what it is (type and mode, a link's target, a file's size and hash)."""
    out: dict[str, str] = {}
    for top in COMPARED:
        for dirpath, dirnames, filenames in os.walk(root / top):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                rel = str(path.relative_to(root))
                if rel.startswith(_IGNORED_PREFIXES) or rel.endswith(_IGNORED_SUFFIXES):
                    continue
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = "link " + os.readlink(path)
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = f"dir {st.st_mode:o}"
                elif rel.startswith("etc/") and stat.S_ISREG(st.st_mode):
                    # Configuration: the content counts, not only the name.
                    out[rel] = f"file {st.st_mode:o} {_sha256(path)}"
                else:
                    out[rel] = f"file {st.st_mode:o}"
    return out


def tree_difference(before: Path, after: Path) -> tuple[str, ...]:
    a, b = _entries(before), _entries(after)
    diff = [f"- {p}" for p in a.keys() - b.keys()] + [f"+ {p}" for p in b.keys() - a.keys()]
    diff += [f"~ {p} ({a[p]} -> {b[p]})" for p in a.keys() & b.keys() if a[p] != b[p]]
    return tuple(sorted(diff, key=lambda d: d[2:]))


def _copy_tree(src: Path, dest: Path) -> None:
    t0 = time.monotonic()
    subprocess.run([_tool("cp"), "-a", "--reflink=auto", str(src), str(dest)], check=True)
    _log(f"copied {src.name} tree: {time.monotonic() - t0:.0f} s")


def _load(directory: Path, base: ImageArtifacts) -> DerivedImages:
    def art(name: str) -> ImageArtifacts:
        return dataclasses.replace(_artifacts(directory / name), data_disk=base.data_disk)
    leftovers = (directory / "leftovers.txt").read_text().splitlines()
    return DerivedImages(art("takeover"), art("handback"),
                         (directory / "takeover" / "steps.log").read_text(),
                         (directory / "handback" / "steps.log").read_text(),
                         tuple(line for line in leftovers if line))


def derived_images(deb: Path, base: ImageArtifacts | None = None) -> DerivedImages:
    """The takeover and handback images for *deb* on *base* (default: the image)."""
    base = base or build_image()
    tree = base.directory / "root"
    if not tree.is_dir():
        raise TestbedError(f"{base.directory} keeps no tree: rebuild the image "
                           "(python -m testbed.image --force)")
    key = cache_key(base, deb)
    final = base.directory / f"kmodd-{key}"
    if final.is_dir():
        return _load(final, base)
    if os.geteuid() != 0:
        raise TestbedError("deriving the takeover image needs root (chroot, mounts)")
    t0 = time.monotonic()
    _log(f"deriving the takeover and handback images {key} from {deb.name}")
    tmp = base.directory / f".kmodd-{key}.{os.getpid()}"
    if tmp.exists():
        _safe_rmtree(tmp)
    (tmp / "takeover").mkdir(parents=True)
    (tmp / "handback").mkdir()
    try:
        work = tmp / "root"
        _copy_tree(tree, work)
        shutil.copyfile(deb, work / "tmp" / deb.name)
        steps = tuple(s.format(deb=deb.name) for s in TAKEOVER_STEPS)
        (tmp / "takeover" / "steps.log").write_text(_in_chroot(work, steps, "takeover"))
        (work / "tmp" / deb.name).unlink()
        _make_disk(work, tmp / "takeover")
        # The handback continues from the taken-over tree, as on the machine.
        (tmp / "handback" / "steps.log").write_text(
            _in_chroot(work, HANDBACK_STEPS, "handback"))
        _make_disk(work, tmp / "handback")
        (tmp / "leftovers.txt").write_text("".join(
            line + "\n" for line in tree_difference(tree, work)))
        _safe_rmtree(work)
        for old in base.directory.glob("kmodd-*"):
            _safe_rmtree(old)
        tmp.rename(final)
    finally:
        if tmp.exists():
            _safe_rmtree(tmp)
    _log(f"takeover and handback images ready in {time.monotonic() - t0:.0f} s: {final}")
    return _load(final, base)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m testbed.takeover KMODD_DEB")
    images = derived_images(Path(sys.argv[1]))
    print(images.takeover, images.handback, sep="\n")
    print("leftovers after the purge:", *images.leftovers, sep="\n  ")
