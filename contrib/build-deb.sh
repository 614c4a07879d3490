#!/usr/bin/env bash
# build-deb.sh: build kmodd's Debian package with Debian's own tooling.
#
#   bash contrib/build-deb.sh [OUTDIR]        (default OUTDIR: build/deb)
#
# Copies the checkout (tracked and untracked files, not what .gitignore
# excludes) to a temporary directory, puts contrib/debian in place as debian/
# with a changelog for pyproject.toml's version (the one version source),
# runs dpkg-buildpackage -us -uc -b and lintian, and leaves
# kmodd_<version>_all.deb in OUTDIR.  Fails when lintian reports an error.
# Needs: debhelper dh-python pybuild-plugin-pyproject python3-all
# python3-setuptools scdoc lintian (scripts/install-deps.sh installs them).
set -euo pipefail

# A package is built with Debian's own python3, not whatever python3 comes
# first on PATH (a pyenv or virtual environment's has no dh-python modules).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV

src=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$src/build/deb}")
log() { printf 'build-deb: %s\n' "$*" >&2; }

version=$(python3 -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")

work=$(mktemp -d "${TMPDIR:-/tmp}/kmodd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/kmodd-$version
mkdir -p "$tree"

if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Files as they are in the working tree, uncommitted changes included.
    git -C "$src" ls-files -z --cached --others --exclude-standard \
        | (cd "$src" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
        | tar -C "$src" --null -T - -cf - | tar -C "$tree" -xf -
    when=$(git -C "$src" log -1 --format=%cD 2>/dev/null || date -R)
else
    tar -C "$src" --exclude=./.venv --exclude=./build --exclude=./.git \
        --exclude='__pycache__' -cf - . | tar -C "$tree" -xf -
    when=$(date -R)
fi
rm -rf "$tree/debian"
cp -a "$tree/contrib/debian" "$tree/debian"
cat >"$tree/debian/changelog" <<EOF
kmodd ($version) unstable; urgency=medium

  * Version $version, built from the source tree.

 -- kmodd developers <kmodd-devel@lists.example.org>  $when
EOF

log "building kmodd $version in $tree"
(cd "$tree" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    log "dpkg-buildpackage failed"
    exit 1
}
deb=$work/kmodd_${version}_all.deb
[[ -f $deb ]] || { log "no $deb after the build"; exit 1; }

log "lintian"
# lintian exits non-zero on errors; keep its report either way.
set +e
lintian --display-info "$work"/kmodd_"${version}"_*.changes >"$work/lintian.log" 2>&1
set -e
cat "$work/lintian.log" >&2
if grep -q '^E: ' "$work/lintian.log"; then
    log "lintian reports errors"
    exit 1
fi

mkdir -p "$out"
cp "$deb" "$out/"
log "built $out/kmodd_${version}_all.deb"
