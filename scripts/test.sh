#!/usr/bin/env bash
# The project's test command (README, CI): install dependencies, then lint,
# type-check and run every test layer.  Every step runs even if an earlier one
# failed; a summary with the time of each step is printed at the end and the
# exit status is non-zero if any step failed.  pytest finding no tests
# (exit 5) is a failure, and so is a skipped VM test.
#
#   bash scripts/test.sh                 everything
#   bash scripts/test.sh unit vm         only these steps (lint types unit fuzz realtree pkg vm boot)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

STEPS=(lint types unit fuzz realtree pkg vm boot)
if [[ $# -gt 0 ]]; then STEPS=("$@"); fi
# CI must finish within 90 minutes on 2 cores: every step gets its own limit,
# capped by what is left of this overall budget (KMODD_TEST_BUDGET seconds).
BUDGET=${KMODD_TEST_BUDGET:-5100}

start_all=$SECONDS
declare -a SUMMARY=()
failed=0

run_step() {  # name timeout-seconds command...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - start_all)))
    if [[ $left -lt $limit ]]; then limit=$left; fi
    printf '\n===== %s: %s (limit %ss)\n' "$name" "$*" "$limit"
    local t0=$SECONDS rc
    if [[ $limit -le 0 ]]; then
        rc=124
    else
        timeout --foreground --kill-after=30 "$limit" "$@"
        rc=$?
    fi
    local took=$((SECONDS - t0)) verdict=ok
    if [[ $limit -le 0 ]]; then
        verdict="FAILED (no time left in the ${BUDGET}s budget)"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        verdict="FAILED (timed out after ${limit}s)"
    elif [[ $rc -eq 5 ]]; then
        verdict="FAILED (pytest collected no tests)"
    elif [[ $rc -ne 0 ]]; then
        verdict="FAILED (exit $rc)"
    fi
    [[ $verdict == ok ]] || failed=1
    SUMMARY+=("$(printf '%-9s %-40s %5ss' "$name" "$verdict" "$took")")
}

printf '===== install-deps\n'
if ! bash scripts/install-deps.sh; then
    echo "test.sh: scripts/install-deps.sh failed" >&2
    exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
PYTEST=(python -m pytest -ra --durations=15 -p no:cacheprovider)

for step in "${STEPS[@]}"; do
    case $step in
        lint)     run_step lint 600 ruff check . ;;
        types)    run_step types 900 mypy ;;
        unit)     run_step unit 2400 "${PYTEST[@]}" tests/unit ;;
        # every parser fuzzed a few seconds each (tests/fuzz/test_fuzz.py), < 3 min
        fuzz)     run_step fuzz 600 "${PYTEST[@]}" tests/fuzz ;;
        realtree) run_step realtree 2400 "${PYTEST[@]}" tests/realtree ;;
        # The Debian package: build, lintian, install into a Debian 12 chroot, purge.
        pkg)      run_step pkg 1800 "${PYTEST[@]}" tests/pkg ;;
        vm)       run_step vm 3600 "${PYTEST[@]}" tests/vm ;;
        # the Debian boot test bed: the image (cached), kmodd taken over and
        # given back in chroots of it (cached per package), four boots compared
        boot)     run_step boot 1800 "${PYTEST[@]}" -s tests/boot ;;
        *) echo "test.sh: unknown step $step (lint types unit fuzz realtree pkg vm boot)" >&2; exit 2 ;;
    esac
done

printf '\n===== summary (%ss in all)\n' "$((SECONDS - start_all))"
printf '%s\n' "${SUMMARY[@]}"
if [[ $failed -ne 0 ]]; then
    printf 'RESULT: FAILED\n'
    exit 1
fi
printf 'RESULT: all steps passed\n'
