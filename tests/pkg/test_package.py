"""The Debian package: built with contrib/build-deb.sh (lintian clean), installed
with dpkg into a clean Debian 12 chroot made with mmdebstrap, checked there with
contrib/debian/tests/installed-check.sh, then removed after a takeover and
purged: the chroot's file list must be what it was before the install.

The chroot's base (minbase + the package's dependencies + man-db,
bash-completion and systemd) is cached under build/pkg/ as a tarball whose name
is a hash of its inputs.  Needs root (mmdebstrap --mode=root, chroot) and the
Debian mirror on first use; never skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.pkg

CHECKOUT = Path(__file__).resolve().parents[2]
CACHE = CHECKOUT / "build" / "pkg"
SUITE = "bookworm"
MIRROR = os.environ.get("KMODD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What an administrator's machine has besides the package's own dependencies:
# man and completion to check the pages and completion, systemd for the unit.
EXTRA = ("man-db", "bash-completion", "systemd")
# Left out of the before/after comparison: dpkg's own database and logs,
# caches that the man-db and debconf triggers rewrite, and run/systemd/, which
# systemctl creates when it runs in a chroot (a tmpfs on a real system).
IGNORED = ("var/lib/dpkg/", "var/log/", "var/cache/man/", "var/cache/debconf/", "tmp/",
           "var/cache/ldconfig/", "run/systemd/")


def log(msg: str) -> None:
    print(f"pkg-test: {msg}", file=sys.stderr, flush=True)


def dependencies() -> list[str]:
    """The binary package's Depends from contrib/debian/control, names only."""
    control = (CHECKOUT / "contrib/debian/control").read_text()
    binary = control.split("\nPackage: kmodd\n", 1)[1]
    m = re.search(r"^Depends:(.*?)(?=^\S)", binary + "\nEnd:", flags=re.M | re.S)
    assert m, "no Depends in contrib/debian/control"
    names = [re.split(r"[\s(]", dep.strip())[0] for dep in m.group(1).split(",")]
    return [n for n in names if n and not n.startswith("${")]


def need_root() -> None:
    assert os.geteuid() == 0, "the package test needs root (mmdebstrap --mode=root, chroot)"
    for tool in ("mmdebstrap", "dpkg-buildpackage", "lintian", "chroot"):
        assert shutil.which(tool), f"{tool} is needed (bash scripts/install-deps.sh)"


def chroot_base() -> Path:
    packages = sorted({*dependencies(), *EXTRA})
    key = hashlib.sha256("\0".join([SUITE, MIRROR, *packages]).encode()).hexdigest()[:16]
    tarball = CACHE / f"chroot-{SUITE}-{key}.tar"
    if tarball.is_file():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("chroot-*.tar"):
        old.unlink()
    log(f"mmdebstrap {SUITE} minbase + {', '.join(packages)} (inputs changed or no cache)")
    tmp = tarball.with_suffix(f".tmp{os.getpid()}")
    r = subprocess.run(["mmdebstrap", "--mode=root", "--variant=minbase", "--format=tar",
                        "--include=" + ",".join(packages), SUITE, str(tmp), MIRROR],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, f"mmdebstrap failed:\n{r.stderr[-4000:]}"
    tmp.rename(tarball)
    return tarball


def in_chroot(root: Path, *argv: str, check: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def file_list(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel + "/"
        if rel.startswith(IGNORED):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = rel + name
            if not (path + "/").startswith(IGNORED):
                out.add(path)
    return out


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_root()
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["bash", str(CHECKOUT / "contrib/build-deb.sh"), str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stderr[-6000:]}"
    debs = list(out.glob("kmodd_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="module")
def system(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Path, set[str]]]:
    """A fresh chroot with the package installed, and its file list from before."""
    base = chroot_base()
    root = tmp_path_factory.mktemp("chroot")
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(base)], check=True,
                   timeout=300)
    before = file_list(root)
    shutil.copy(deb, root / "tmp" / deb.name)
    shutil.copy(CHECKOUT / "contrib/debian/tests/installed-check.sh",
                root / "tmp/installed-check.sh")
    # No /proc in the chroot: nothing in it can reach the host kernel's settings.
    in_chroot(root, "dpkg", "-i", f"/tmp/{deb.name}")
    yield root, before
    shutil.rmtree(root, ignore_errors=True)


def test_package_metadata(deb: Path) -> None:
    version = re.search(r'^version = "(.+)"', (CHECKOUT / "pyproject.toml").read_text(),
                        flags=re.M)
    assert version and deb.name == f"kmodd_{version.group(1)}_all.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Architecture"],
                            capture_output=True, text=True, check=True).stdout
    for dep in ("python3 (>= 3.11)", "python3-pyudev", "python3-systemd",
                "python3-pyelftools", "python3-zstandard", "kmod"):
        assert dep in fields
    assert "Architecture: all" in fields
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                           check=True).stdout
    # Nothing active in the package itself: no /etc file, no udev or sysctl rule
    # in a directory udev or sysctl read.
    assert " ./etc/" not in files
    assert "/udev/rules.d/" not in files and "/sysctl.d/" not in files
    # The systemd-modules-load drop-in only where systemd never reads it.
    dropins = re.findall(r"\S*systemd-modules-load\.service\.d/\S*", files)
    assert dropins == ["./usr/lib/kmodd/systemd/systemd-modules-load.service.d/",
                       "./usr/lib/kmodd/systemd/systemd-modules-load.service.d/50-kmodd.conf"]


def test_installed_system_passes_installed_check(system: tuple[Path, set[str]]) -> None:
    root, _ = system
    r = in_chroot(root, "sh", "/tmp/installed-check.sh", check=False)
    log("installed-check:\n" + r.stdout + r.stderr)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert "ok    completion: kmodctl lo<TAB> -> load" in r.stdout


def test_remove_gives_the_job_back_and_purge_leaves_nothing(
        system: tuple[Path, set[str]]) -> None:
    root, before = system
    in_chroot(root, "kmodd-takeover", "enable", "--no-initramfs")
    rule = root / "etc/udev/rules.d/80-drivers.rules"
    shipped = (root / "usr/lib/kmodd/udev/80-drivers.rules").read_text()
    assert rule.read_text() == shipped
    dropin = root / "etc/systemd/system/systemd-modules-load.service.d/50-kmodd.conf"
    assert dropin.read_bytes() == (
        root / "usr/lib/kmodd/systemd/systemd-modules-load.service.d/50-kmodd.conf").read_bytes()
    # An upgrade (here a reinstall) refreshes an outdated rule of a takeover in place.
    rule.write_text(shipped.replace("sm_ftl", "outdated"))
    deb = next((root / "tmp").glob("kmodd_*.deb"))
    in_chroot(root, "dpkg", "-i", f"/tmp/{deb.name}")
    assert rule.read_text() == shipped
    in_chroot(root, "dpkg", "-r", "kmodd")
    # prerm handed back: no rule shadowing udev's, no helper that is gone.
    assert not (root / "etc/udev/rules.d/80-drivers.rules").exists()
    assert not (root / "etc/sysctl.d/50-kmodd.conf").exists()
    assert not (root / "etc/systemd/system/sysinit.target.wants/kmodd.service").exists()
    assert not dropin.exists() and not dropin.parent.exists()
    in_chroot(root, "dpkg", "--purge", "kmodd")
    for name in ("installed-check.sh", *[p.name for p in (root / "tmp").glob("kmodd_*.deb")]):
        (root / "tmp" / name).unlink(missing_ok=True)
    after = file_list(root)
    assert (sorted(after - before), sorted(before - after)) == ([], []), \
        "left behind, then missing"
