"""The boot test bed's disk image: a Debian 12 root made with mmdebstrap.

    art = build_image()          # cached under build/boot/<key>/, progress on stderr
    art.base, art.kernel, art.initrd, art.data_disk

The root is built with ``mmdebstrap --variant=minbase`` (systemd as PID 1,
udev, kmod, initramfs-tools, Debian's kernel and the Python packages kmodd
depends on), set up for the test bed (hostname, fstab by UUID, the serial
agent unit, a vfat disk in fstab and a unit that creates a dummy link, both
kernel requests at boot), and made into an ext4 image with ``mkfs.ext4 -d``:
no loop mount, no kernel module needed on the host.  The image's own kernel
and initramfs are copied out of its ``/boot`` before ``mkfs`` (they are booted
with ``-kernel``/``-initrd``); nothing pins a kernel version.

The cache key hashes every input: the package list, this file, the agent,
the mirror and the mirror's ``linux-image-amd64`` version as the host's apt
lists know it.  A build is written under a temporary name and renamed into
place, so an interrupted build is never used.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.initramfs import PROJECT_ROOT, TestbedError

BOOT_BUILD_DIR = PROJECT_ROOT / "build" / "boot"
GUEST_DIR = Path(__file__).resolve().parent / "guest"
AGENT_SOURCE = GUEST_DIR / "boot_agent.py"

SUITE = "bookworm"
MIRROR = os.environ.get("TESTBED_DEBIAN_MIRROR", "http://deb.debian.org/debian")

PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "initramfs-tools", "zstd",
    "linux-image-amd64",
    # kmodd's run-time dependencies, so its package installs offline with dpkg -i
    "python3", "python3-pyudev", "python3-systemd", "python3-pyelftools",
    "python3-zstandard",
    # what the checks run
    "iproute2", "procps", "e2fsprogs", "dosfstools", "util-linux", "man-db",
)

HOSTNAME = "kmodd-boot"
# Fixed so /etc/fstab can name the filesystems by UUID as Debian's installer does.
ROOT_UUID = "6b6d6f64-6400-4000-8000-626f6f740001"
DATA_VOLUME_ID = "4B4D4444"  # vfat volume id: UUID=4B4D-4444
DATA_UUID = f"{DATA_VOLUME_ID[:4]}-{DATA_VOLUME_ID[4:]}"
DATA_MOUNT = "/mnt/data"
DUMMY_LINK = "kd0"
IMAGE_SIZE_MB = 3072
MACHINE_ID = "6b6d6f6464626f6f7474657374626564"
# A modules-load.d list, as packages and administrators write them: comments
# of both kinds, and a module with dependencies (macvtap needs macvlan and tap).
# None of these is loaded by anything else at boot.
MODULES_LOAD_CONF = "/etc/modules-load.d/testbed.conf"
MODULES_LOAD_LIST = ("tun", "nbd", "macvtap")
_MODULES_LOAD = """\
# Loaded at boot by systemd-modules-load (or kmodd after the takeover).
tun
; a comment of the other kind
nbd
macvtap
"""

_FSTAB = f"""\
# <file system> <mount point> <type> <options> <dump> <pass>
UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1
# A second disk by UUID: mounting it asks the kernel for fs-vfat (not loaded before).
# The device wait is longer than systemd's 90 s: under emulation on a loaded
# host udev has reached this disk only after that in some stock boots.
UUID={DATA_UUID} {DATA_MOUNT} vfat ro,nofail,x-systemd.device-timeout=5min 0 0
"""

_AGENT_UNIT = """\
[Unit]
Description=Test bed agent on the second serial port
DefaultDependencies=no
After=systemd-journald.socket
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/sbin/testbed-agent /dev/ttyS1
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
"""

_DUMMY_UNIT = f"""\
[Unit]
Description=Create the {DUMMY_LINK} dummy link (a kernel module request at boot)
After=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link add {DUMMY_LINK} type dummy

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class ImageArtifacts:
    """A built image: the ext4 base, the kernel and initramfs out of its /boot."""

    directory: Path
    base: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    data_disk: Path


def _log(msg: str) -> None:
    print(f"boot-image: {msg}", file=sys.stderr, flush=True)


def _mirror_kernel_version() -> str:
    """linux-image-amd64's candidate version in the host's apt lists ('' if unknown)."""
    try:
        out = subprocess.run(["apt-cache", "policy", "linux-image-amd64"], text=True,
                             capture_output=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m else ""


def cache_key() -> str:
    h = hashlib.sha256()
    for part in (SUITE, MIRROR, " ".join(PACKAGES), _mirror_kernel_version()):
        h.update(part.encode() + b"\0")
    for path in (Path(__file__), AGENT_SOURCE):
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _artifacts(directory: Path) -> ImageArtifacts:
    kernels = sorted(directory.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise TestbedError(f"{directory}: expected one vmlinuz-*, found {kernels}")
    version = kernels[0].name[len("vmlinuz-"):]
    return ImageArtifacts(directory=directory, base=directory / "base.img",
                          kernel=kernels[0], initrd=directory / f"initrd.img-{version}",
                          kernel_version=version, data_disk=directory / "data.img")


def _run(argv: list[str], what: str) -> None:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-40:], line]
        # mmdebstrap's own progress lines start with "I:"; dpkg's are noise
        if line.startswith(("I:", "E:", "W:")) or "error" in line.lower():
            _log(f"  {line}")
    if proc.wait() != 0:
        raise TestbedError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    _log(f"{what}: {time.monotonic() - t0:.0f} s")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise TestbedError(f"{name} not found: run scripts/install-deps.sh as root")
    return path


def _enable(root: Path, unit: str, target: str) -> None:
    # What `systemctl enable` does for an [Install] WantedBy= line.
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    link.unlink(missing_ok=True)
    link.symlink_to(f"/etc/systemd/system/{unit}")


def _customize(root: Path) -> None:
    (root / "etc/hostname").write_text(HOSTNAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    (root / "etc/fstab").write_text(_FSTAB)
    (root / DATA_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    sbin = root / "usr/local/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(AGENT_SOURCE, sbin / "testbed-agent")
    (sbin / "testbed-agent").chmod(0o755)
    units = root / "etc/systemd/system"
    (units / "testbed-agent.service").write_text(_AGENT_UNIT)
    (units / "testbed-dummy.service").write_text(_DUMMY_UNIT)
    _enable(root, "testbed-agent.service", "sysinit.target")
    _enable(root, "testbed-dummy.service", "multi-user.target")
    # Periodic jobs would fire at random moments of a measured boot.
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                  "fstrim.timer", "man-db.timer"):
        (root / "etc/systemd/system/timers.target.wants" / timer).unlink(missing_ok=True)
        link = units / timer
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")  # masked
    # A fixed machine id: an empty one makes every boot of a fresh overlay a
    # "first boot" (systemd applies presets then), unlike the boot after a reboot.
    (root / "etc/machine-id").write_text(MACHINE_ID + "\n")
    # man-db rebuilds its whole index on every package install (minutes under
    # emulation); its own switch turns that off.
    (root / "var/lib/man-db/auto-update").unlink(missing_ok=True)
    # A persistent journal: the shutdown of one boot is read in the next.
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    conf = root / MODULES_LOAD_CONF.lstrip("/")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(_MODULES_LOAD)


def _build(directory: Path) -> None:
    mmdebstrap, mkfs_vfat = _tool("mmdebstrap"), _tool("mkfs.vfat")
    root = directory / "root"
    _log(f"mmdebstrap {SUITE} ({len(PACKAGES)} packages) from {MIRROR} into {root}")
    _run([mmdebstrap, "--mode=root", "--variant=minbase", "--format=directory",
          "--include=" + ",".join(PACKAGES), SUITE, str(root), MIRROR], "mmdebstrap")
    _customize(root)
    _make_disk(root, directory)
    _run([mkfs_vfat, "-C", "-n", "KMODDDATA", "-i", DATA_VOLUME_ID,
          str(directory / "data.img"), "16384"], "mkfs.vfat")
    # The tree stays: derived images (the takeover, the handback) start from it.


def _make_disk(root: Path, directory: Path) -> None:
    """The tree's kernel and initramfs copied out, the tree made into base.img."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise TestbedError(f"the image should hold one kernel, found {kernels}")
    version = kernels[0].name[len("vmlinuz-"):]
    initrd = root / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise TestbedError(f"the image has no {initrd.name}: update-initramfs did not run")
    shutil.copyfile(kernels[0], directory / kernels[0].name)
    shutil.copyfile(initrd, directory / initrd.name)
    _log(f"mkfs.ext4 -d ({IMAGE_SIZE_MB} MB, kernel {version})")
    _run([_tool("mkfs.ext4"), "-q", "-F", "-t", "ext4", "-L", "root", "-U", ROOT_UUID,
          "-d", str(root), str(directory / "base.img"), f"{IMAGE_SIZE_MB}M"], "mkfs.ext4")


def build_image(*, force: bool = False) -> ImageArtifacts:
    """The image for the current inputs, built first if needed (needs root)."""
    key = cache_key()
    final = BOOT_BUILD_DIR / key
    if final.is_dir() and not force:
        return _artifacts(final)
    if os.geteuid() != 0:
        raise TestbedError("building the boot image needs root (mmdebstrap --mode=root, "
                           "mkfs.ext4 -d keeping ownership)")
    BOOT_BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BOOT_BUILD_DIR / f".{key}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.monotonic()
    _log(f"building the boot image {key} (first use; inputs changed or no cache)")
    try:
        _build(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # Older images (other keys) only take disk space.
    for old in BOOT_BUILD_DIR.iterdir():
        if old.is_dir() and old.name != key and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    _log(f"image ready in {time.monotonic() - t0:.0f} s: {final}")
    return _artifacts(final)


if __name__ == "__main__":
    art = build_image(force="--force" in sys.argv)
    print(art)
