#!/usr/bin/env bash
# The README's main job: install dependencies, boot Debian's real kernel under
# QEMU with a dozen emulated devices and show the kmodd daemon at work in it
# (coldplug, a hotplug, a kernel request, an autoclean), narrated on stdout;
# exit 0 when every milestone was met.  --console streams the guest console to
# stderr.  The job itself is testbed/main_job.py; KMODD_MAIN_JOB=resolve runs
# the offline resolve check, KMODD_MAIN_JOB=module:function any other job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec .venv/bin/python -m testbed main "$@"
