"""A crash soak on the real kernel: kmodd SIGKILLed at seeded moments.

CI runs the first ``KMODD_SOAK_ROUNDS`` rounds (default 6: the run must fit its
90 minutes); the campaign is the same test with ``KMODD_SOAK_ROUNDS=20``, whose
figures are in docs/security.md.

One boot.  Each round starts kmodd, and at once kernel requests (links of
several types through ``ip link add``, a filesystem through ``mount -t``)
and, on the host, a QMP hotplug or unplug; the daemon is SIGKILLed at a
moment drawn from a fixed seed (during its start, coldplug or the requests),
then restarted.  After each round:

* every kernel request returned, within a bound, successfully (a helper whose
  daemon died loads the module itself), and no helper is left waiting;
* every device that had a driver has it, a hotplugged NIC gets its driver;
* ``state.json`` parses and agrees with ``/proc/modules``: each record names
  a loaded module and the very load of it (its sysfs identity);
* no module was loaded twice and nothing was unloaded: autoclean is off
  (idle timeout of an hour), so every module keeps its sysfs identity from
  the moment it first appears to the end.

Figures (kill moments, request times, restart-to-settled times) are printed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from testbed.vm import VM

ROUNDS = int(os.environ.get("KMODD_SOAK_ROUNDS", "6"))
SEED = 12
LOG = "/tmp/kmodd-soak.log"
CONF = "/tmp/kmodd-soak.toml"
# The helper's own timeout (60 s) plus a direct load under emulation.
REQUEST_BOUND_MS = 120_000
# Kinds of kernel requests: (label, command making the request, module it loads).
REQUESTS = [
    ("dummy", "ip link add s$R type dummy", "dummy"),
    ("veth", "ip link add s$R type veth peer name p$R", "veth"),
    ("ifb", "ip link add s$R type ifb", "ifb"),
    ("vxlan", "ip link add s$R type vxlan id 4$R dstport 4789", "vxlan"),
    ("ipip", "ip link add s$R type ipip remote 10.9.9.9", "ipip"),
    # get_fs_type() asks for fs-minix before the mount fails on /dev/null.
    ("mount", "mount -t minix /dev/null /tmp/soakmnt 2>/dev/null; grep -q '^minix ' "
              "/proc/modules", "minix"),
]
STATE_CHECK = r"""
import json, os, sys
data = json.load(open("/run/kmodd/state.json"))
mods = {l.split()[0] for l in open("/proc/modules")}
bad = []
for r in data["modules"]:
    ino = os.stat("/sys/module/" + r["name"]).st_ino if r["name"] in mods else None
    if r["name"] not in mods or r.get("instance") != "sysfs:%d" % ino:
        bad.append((r["name"], r.get("instance"), ino))
print(json.dumps({"records": len(data["modules"]), "bad": bad}))
"""


# One guest round trip for every check after a restart: the guest runs
# processes slowly under emulation, so sections are printed and split here.
CHECKS = (
    "echo @@ids; cd /sys/module && stat -c '%n %i' $(cut -d' ' -f1 /proc/modules); "
    "echo @@drivers; for d in /sys/bus/pci/devices/*; do [ -e $d/driver ] && "
    "echo \"${{d##*/}}\"; done; "
    "echo @@nic; ls /sys/bus/pci/drivers/e1000e 2>/dev/null | grep -c :; "
    "echo @@state; {python} -c '{state}'; echo @@end")


def sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("@@"):
            current = line[2:]
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def checks(vm: VM, python: str) -> dict[str, Any]:
    r = vm.run(CHECKS.format(python=python, state=STATE_CHECK), timeout=600)
    parts = sections(r.stdout)
    assert "end" in parts, f"checks did not finish:\n{r.stdout}\n{r.stderr}"
    ids = dict(ln.split() for ln in parts["ids"] if len(ln.split()) == 2)
    try:
        state = json.loads(parts["state"][-1])
    except (ValueError, IndexError):
        state = {"records": -1, "bad": [f"state check failed: {parts['state']} {r.stderr}"]}
    return {"ids": ids, "drivers": set(parts["drivers"]),
            "nic": int((parts["nic"] or ["0"])[-1] or 0), "state": state}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def test_crash_soak(fresh_vm: Callable[..., VM]) -> None:
    vm = fresh_vm()
    share = str(vm.share)
    python = f"{share}/.venv/bin/python"
    helper = f"{share}/contrib/kmodd-request"
    rng = random.Random(SEED)
    vm.run(f"echo {helper} > /proc/sys/kernel/modprobe; mkdir -p /tmp/soakmnt /tmp/soak; "
           f"printf 'autoclean_interval = 2\\nidle_timeout = 3600\\n' > {CONF}",
           timeout=60).check()
    initial = set(vm.run("cut -d' ' -f1 /proc/modules", timeout=60).stdout.split())
    start = (f"setsid {share}/.venv/bin/kmodd --config {CONF} --no-journal --log-level debug "
             f"</dev/null >>{LOG} 2>&1 & echo $!")
    # Wait for the new daemon to answer, not for the socket file: a killed
    # daemon leaves its socket behind, and settle would meet that one.
    settle = ("for i in $(seq 300); do kmodctl status >/dev/null 2>&1 && break; sleep 0.2; "
              "done; kmodctl settle --timeout 600 >/dev/null; echo settle=$?")
    # A first, undisturbed start: the drivers every later round must keep.
    pid = int(vm.run(start, timeout=60).stdout.split()[-1])
    assert "settle=0" in vm.run(settle, timeout=900).stdout
    now = first = checks(vm, python)
    bound, seen = first["drivers"], dict(first["ids"])
    figures: list[dict[str, Any]] = []
    failures: list[str] = []
    plugged = False
    for rnd in range(ROUNDS):
        kill_after = rng.uniform(0.0, 8.0)
        picks = rng.sample(REQUESTS, 3)
        script = "; ".join(
            f"t0=$(date +%s%N); {cmd}; rc=$?; t1=$(date +%s%N); "
            f"echo \"{label} $rc $(( (t1 - t0) / 1000000 ))\"; ip link del s$R 2>/dev/null"
            for label, cmd, _ in picks)
        # The checking daemon of the last round stops gracefully; a fresh one
        # starts (coldplug again) with the requests racing it.
        pid = int(vm.run(
            f"kill {pid}; for i in $(seq 300); do kill -0 {pid} 2>/dev/null || break; "
            f"sleep 0.1; done; (R={rnd}; {script}; echo end) >/tmp/soak/r{rnd}.txt 2>&1 & "
            f"{start}", timeout=120).stdout.split()[-1])
        t0 = time.monotonic()
        if not plugged:
            vm.qmp("device_add", driver="e1000e", id="soaknic")
        else:
            vm.qmp("device_del", id="soaknic")
        plugged = not plugged
        time.sleep(max(0.0, kill_after - (time.monotonic() - t0)))
        # The kill, then every request returns (its helper had an answer or
        # loads itself), and no helper is left; then a restart.
        r = vm.run(
            f"kill -9 {pid}; for i in $(seq 1800); do grep -q '^end' /tmp/soak/r{rnd}.txt && "
            f"break; sleep 0.1; done; cat /tmp/soak/r{rnd}.txt; echo @@waiting; "
            f"pgrep -f '[k]modd-request'; echo @@pid; {start}", timeout=400)
        requests_done = time.monotonic() - t0
        parts = sections("@@results\n" + r.stdout)
        pid = int(parts["pid"][-1])
        lines = [ln.split() for ln in parts["results"] if ln and ln != "end"]
        if "end" not in parts["results"]:
            failures.append(f"round {rnd}: requests did not finish: {parts['results']}")
        for label, rc, ms in (ln for ln in lines if len(ln) == 3):
            if rc != "0" or int(ms) > REQUEST_BOUND_MS:
                failures.append(f"round {rnd}: {label} rc={rc} in {ms} ms")
        if parts["waiting"]:
            failures.append(f"round {rnd}: helpers left waiting: {parts['waiting']}")
        t1 = time.monotonic()
        settled = vm.run(settle, timeout=900).stdout
        if "settle=0" not in settled:
            failures.append(f"round {rnd}: restarted daemon did not settle: {settled}")
        settle_s = time.monotonic() - t1
        now = checks(vm, python)
        if not bound <= now["drivers"]:
            failures.append(f"round {rnd}: devices lost their driver: {bound - now['drivers']}")
        if plugged and now["nic"] < 1:
            failures.append(f"round {rnd}: the hotplugged NIC has no driver")
        if now["state"]["bad"]:
            failures.append(f"round {rnd}: state.json disagrees with the kernel: "
                            f"{now['state']['bad']}")
        for name, ino in seen.items():
            if name not in now["ids"]:
                failures.append(f"round {rnd}: {name} was unloaded")
            elif now["ids"][name] != ino:
                failures.append(f"round {rnd}: {name} was loaded again")
        seen = {**now["ids"], **seen}
        fig = {"round": rnd, "kill_at_s": round(kill_after, 2),
               "requests_done_s": round(requests_done, 1),
               "requests": [" ".join(ln) for ln in lines],
               "settle_s": round(settle_s, 1), "records": now["state"]["records"]}
        figures.append(fig)
        progress(json.dumps(fig))
    vm.run(f"kill {pid}", timeout=60)
    times = sorted(int(req.split()[2]) for fig in figures for req in fig["requests"])
    if times:
        progress(f"kernel requests: {len(times)}, median {times[len(times) // 2]} ms, "
                 f"max {times[-1]} ms; kills: {len(figures)}")
    assert initial <= set(now["ids"]), "modules kmodd did not load were unloaded"
    assert not failures, "\n".join(failures) + "\n--- kmodd log tail\n" + \
        vm.run(f"tail -n 60 {LOG}", timeout=60).stdout
