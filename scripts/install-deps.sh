#!/usr/bin/env bash
# Install everything kmodd needs to build, test and run its QEMU test bed on
# Debian 12, then create .venv and install kmodd into it (editable, with the
# test tools).  Idempotent: packages already installed are not fetched again,
# and pip runs only when pyproject.toml changed or the venv is incomplete.
#
#   sudo bash scripts/install-deps.sh        (root is needed only for apt-get)
#
# Environment: PYTHON (default python3) creates the venv; KMODD_SKIP_APT=1
# skips the package step (e.g. in a prepared image).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    # test bed: QEMU, Debian's kernel and its modules, the initramfs userland
    qemu-system-x86 ipxe-qemu linux-image-amd64 busybox-static
    # the reference tools kmodd is compared with, and what the guest runs
    kmod udev iproute2 procps coreutils mawk
    # systemd-journald and journalctl: the structured-logging test reads the real journal
    systemd util-linux
    # module files and kernel images
    xz-utils zstd
    # building systemd-python (journald, sd_notify) and other wheels
    python3-venv python3-dev libsystemd-dev pkg-config gcc
    # the boot test bed: a Debian root made with mmdebstrap, an ext4 image made
    # from it without loop mounts, copy-on-write overlays, a vfat disk; the
    # takeover image's initramfs is unpacked on the host (unmkinitramfs)
    mmdebstrap e2fsprogs qemu-utils dosfstools debian-archive-keyring initramfs-tools
    # the Debian package (contrib/build-deb.sh): build, lint, man pages,
    # completion, and the clean Debian 12 chroot it is installed into (tests/pkg)
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
    lintian scdoc bash-completion man-db mmdebstrap
    # the package's run-time dependencies: tests/unit/test_packaging.py runs kmodd
    # with Debian's own python3-zstandard (the floor pyproject.toml states)
    python3-pyudev python3-systemd python3-pyelftools python3-zstandard
    # kmodctl plot's test renders the SVG timeline in a headless browser
    chromium
)

log() { printf 'install-deps: %s\n' "$*" >&2; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -gt 0 && -z "${KMODD_SKIP_APT:-}" ]]; then
    log "installing: ${missing[*]}"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null; then
            SUDO=(sudo)
        else
            log "error: packages missing (${missing[*]}) and not running as root; rerun as root"
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
else
    log "Debian packages: all ${#PACKAGES[@]} present"
fi

# The test bed needs a kernel image and its modules (fail loudly, never skip).
if ! compgen -G '/boot/vmlinuz-*' >/dev/null; then
    log "error: no /boot/vmlinuz-* after installing linux-image-amd64"
    exit 1
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.kmodd-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]] \
    && .venv/bin/python -c 'import kmodd, pyudev, systemd.journal, elftools, zstandard, pytest, atheris' \
        2>/dev/null \
    && [[ -x .venv/bin/ruff && -x .venv/bin/mypy ]]; then
    log "venv: up to date"
else
    log "venv: pip install -e '.[test,fuzz]'"
    .venv/bin/python -m pip install --quiet -e '.[test,fuzz]'
    printf '%s\n' "$want" >"$stamp"
fi
log "done"
