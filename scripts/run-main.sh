#!/usr/bin/env bash
# The README's main job: install dependencies, boot Debian's real kernel under
# QEMU with a dozen emulated devices (console streamed to stderr) and run
# kmodd's main job in it.  Today: kmodctl resolve over every device's modalias,
# checked against modprobe -b -R.  The job itself is testbed/main_job.py (its
# JOB hook is where the daemon demonstration goes); KMODD_MAIN_JOB=module:function
# selects another one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec .venv/bin/python -m testbed main "$@"
