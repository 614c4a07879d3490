"""The request_module() helper path: the real contrib/kmodd-request script
against the daemon-side KernelRequestSource, and its fallback without a daemon."""

from __future__ import annotations

import errno
import os
import selectors
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from kmodd.daemon.kernelreq import (
    KernelRequestSource,
    can_open_helper_fds,
    check_name,
    process_start_time,
    reply_line,
)
from kmodd.daemon.requests import Outcome, Request

HELPER = Path(__file__).resolve().parents[2] / "contrib" / "kmodd-request"


class Loop:
    """A minimal event loop thread standing in for the service's."""

    def __init__(self, source: KernelRequestSource) -> None:
        self.source = source
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.source.fileno(), selectors.EVENT_READ)
        while not self.stop.is_set():
            if sel.select(timeout=0.05):
                self.source.on_readable()
        sel.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


class FakeScheduler:
    """submit() answering from a table, optionally later from another thread."""

    def __init__(self, statuses: dict[str, str], delay: float = 0.0) -> None:
        self.statuses = statuses
        self.delay = delay
        self.requests: list[Request] = []

    def submit(self, request: Request) -> Future[Outcome]:
        self.requests.append(request)
        future: Future[Outcome] = Future()
        status = self.statuses.get(request.key, "unresolved")
        modules = (request.key,) if status in ("loaded", "present", "builtin") else ()
        error = None if modules else f"module {request.key} not found"
        outcome = Outcome(request=request, status=status, modules=modules, error=error)
        if self.delay:
            threading.Timer(self.delay, future.set_result, (outcome,)).start()
        else:
            future.set_result(outcome)
        return future


@pytest.fixture
def fallback_log(tmp_path: Path) -> Path:
    return tmp_path / "fallback.log"


@pytest.fixture
def fake_kmodctl(tmp_path: Path, fallback_log: Path) -> Path:
    """Stands in for 'kmodctl load' in the helper's direct path; records its argv."""
    script = tmp_path / "kmodctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {fallback_log}\n'
                      'for last do :; done\n[ "$last" = missing ] && exit 1\nexit 0\n')
    script.chmod(0o755)
    return script


def helper_env(run_dir: Path, kmodctl: Path) -> dict[str, str]:
    # The kernel's usermode-helper environment, plus our test overrides.
    return {"HOME": "/", "TERM": "linux", "PATH": "/sbin:/usr/sbin:/bin:/usr/bin",
            "KMODD_RUN_DIR": str(run_dir), "KMODD_KMODCTL": str(kmodctl),
            "KMODD_FALLBACK": "kmodctl"}


def run_helper(env: dict[str, str], *args: str, timeout: float = 10,
               shell: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*shell, str(HELPER), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# The shells the helper's watchdog is written for: dash (Debian's /bin/sh)
# and busybox ash get the one-process watchdog, the others the subshell.
SHELLS = [("dash",), ("busybox", "sh"), ("bash",)]


@pytest.fixture
def served(run_dir: Path) -> Iterator[Callable[[FakeScheduler], KernelRequestSource]]:
    made: list[tuple[KernelRequestSource, Loop]] = []

    def make(sched: FakeScheduler) -> KernelRequestSource:
        source = KernelRequestSource(sched.submit, run_dir / "request")
        made.append((source, Loop(source)))
        return source

    yield make
    for source, loop in made:
        loop.close()
        source.close()


def test_round_trip_success_failure_and_already_present(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path, fallback_log: Path) -> None:
    sched = FakeScheduler({"dummy": "loaded", "fs-ext4": "present",
                           "crypto-cbc(aes)-all": "builtin"})
    source = served(sched)
    env = helper_env(run_dir, fake_kmodctl)

    assert run_helper(env, "-q", "--", "dummy").returncode == 0
    assert run_helper(env, "-q", "--", "fs-ext4").returncode == 0
    assert run_helper(env, "-q", "--", "crypto-cbc(aes)-all").returncode == 0
    failed = run_helper(env, "--", "nosuchmodule")
    assert failed.returncode == 1
    assert "nosuchmodule: unresolved: module nosuchmodule not found" in failed.stderr
    # Quiet, as the kernel calls it: no output at all.
    quiet = run_helper(env, "-q", "--", "nosuchmodule")
    assert quiet.returncode == 1 and quiet.stderr == ""

    assert [r.key for r in sched.requests] == [
        "dummy", "fs-ext4", "crypto-cbc(aes)-all", "nosuchmodule", "nosuchmodule"]
    assert all(r.kind == "kernel" and r.requested_by == "kernel" for r in sched.requests)
    # The daemon answered: the direct loader was never used.
    assert not fallback_log.exists()
    assert source.served == 5 and source.pending == 0
    # Reply FIFOs are cleaned up by the daemon.
    assert sorted(p.name for p in run_dir.iterdir()) == ["request", "request.pid"]


def test_fifo_and_pidfile_permissions(served: Callable[[FakeScheduler], KernelRequestSource],
                                      run_dir: Path) -> None:
    served(FakeScheduler({}))
    st = os.lstat(run_dir / "request")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    pid, mode, _start = (run_dir / "request.pid").read_text().split()
    assert pid == str(os.getpid())
    # Root with every capability (tests run so) may open helpers' /proc fds.
    assert mode == ("pipe" if can_open_helper_fds() else "fifo")


def test_slow_load_answered_when_future_completes(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path) -> None:
    sched = FakeScheduler({"slow": "loaded"}, delay=0.3)
    source = served(sched)
    env = helper_env(run_dir, fake_kmodctl)
    start = time.monotonic()
    # Several helpers at once, as several request_module() callers would.
    procs = [subprocess.Popen([str(HELPER), "-q", "--", "slow"], env=env) for _ in range(8)]
    codes = [p.wait(10) for p in procs]
    assert codes == [0] * 8
    assert 0.3 <= time.monotonic() - start < 5
    assert source.pending == 0


def test_fallback_without_daemon(run_dir: Path, fake_kmodctl: Path, fallback_log: Path) -> None:
    env = helper_env(run_dir, fake_kmodctl)
    # No FIFO at all: early boot.
    assert run_helper(env, "-q", "--", "dummy").returncode == 0
    assert run_helper(env, "-q", "--", "missing").returncode == 1
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy",
                                                    "load --kernel-request -- missing"]


def test_fallback_when_daemon_died_leaving_fifo(run_dir: Path, fake_kmodctl: Path,
                                                fallback_log: Path) -> None:
    # A crashed daemon leaves its FIFO and pid file; nobody reads the FIFO.
    os.mkfifo(run_dir / "request", 0o600)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "request.pid").write_text(f"{dead.pid}\n")
    result = run_helper(helper_env(run_dir, fake_kmodctl), "-q", "--", "dummy", timeout=5)
    assert result.returncode == 0
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]


def test_daemon_stopping_answers_retry_and_helper_loads_itself(
        run_dir: Path, fake_kmodctl: Path, fallback_log: Path) -> None:
    never: list[Future[Outcome]] = []

    def submit(request: Request) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        never.append(future)
        return future

    source = KernelRequestSource(submit, run_dir / "request")
    loop = Loop(source)
    proc = subprocess.Popen([str(HELPER), "-q", "--", "dummy"],
                            env=helper_env(run_dir, fake_kmodctl))
    deadline = time.monotonic() + 5
    while source.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.pending == 1
    loop.close()
    source.close()
    assert proc.wait(5) == 0
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
    # Stopping removes the FIFO and pid file so later helpers go direct at once.
    assert not (run_dir / "request").exists()
    assert not (run_dir / "request.pid").exists()
    # A late completion is not written twice (the reply is already closed).
    never[0].set_result(Outcome(Request("kernel", "dummy"), "loaded", ("dummy",)))


def test_daemon_dying_after_taking_request_means_direct_load(
        run_dir: Path, fake_kmodctl: Path, fallback_log: Path) -> None:
    # Once the daemon has taken a request the helper holds no write end of
    # its own: the daemon's death is end-of-file, and the helper loads itself.
    lost: list[Request] = []

    def swallow(request: Request) -> Future[Outcome]:
        lost.append(request)
        return Future()

    first = KernelRequestSource(swallow, run_dir / "request")
    loop = Loop(first)
    proc = subprocess.Popen([str(HELPER), "-q", "--", "dummy"],
                            env=helper_env(run_dir, fake_kmodctl))
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost
    loop.close()
    time.sleep(0.2)
    assert proc.poll() is None  # waiting for the outcome
    # Crash: the kernel closes every descriptor the daemon had.
    with first._lock:
        for reply in first._pending.values():
            os.close(reply.fd)
        first._pending.clear()
    os.close(first._fd)
    assert proc.wait(5) == 0
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]


def test_restarted_daemon_answers_reply_fifos_left_waiting(run_dir: Path) -> None:
    # A FIFO-variant helper (non-dash shell) whose request died with the
    # old daemon is told to load the module itself by the next daemon.
    reply = run_dir / "reply.31337"
    os.mkfifo(reply, 0o600)
    fd = os.open(reply, os.O_RDWR | os.O_NONBLOCK)
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = run_dir / f"reply.{dead.pid}"   # its helper was killed: nobody reads
    os.mkfifo(abandoned, 0o600)
    # A helper that has made its FIFO but not opened it yet: still running.
    setting_up = subprocess.Popen(["bash", "-c", "exec -a kmodd-request sleep 30"])
    time.sleep(0.1)
    young = run_dir / f"reply.{setting_up.pid}"
    os.mkfifo(young, 0o600)
    source = KernelRequestSource(FakeScheduler({}).submit, run_dir / "request")
    try:
        assert os.read(fd, 100) == b"+\nretry restarted daemon lost the request\n"
        assert not reply.exists()
        assert not abandoned.exists()
        assert young.exists()
    finally:
        setting_up.kill()
        setting_up.wait()
        os.close(fd)
        source.close()


def test_fifo_variant_round_trip_under_bash(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path, fallback_log: Path) -> None:
    # bash makes here-documents files, not pipes: the helper falls back to a
    # FIFO in the run directory, which the daemon unlinks once it is open.
    sched = FakeScheduler({"dummy": "loaded"})
    served(sched)
    env = helper_env(run_dir, fake_kmodctl)
    ok = subprocess.run(["bash", str(HELPER), "-q", "--", "dummy"], env=env, timeout=10)
    bad = subprocess.run(["bash", str(HELPER), "-q", "--", "other"], env=env, timeout=10)
    assert (ok.returncode, bad.returncode) == (0, 1)
    assert [r.key for r in sched.requests] == ["dummy", "other"]
    assert not fallback_log.exists()
    assert not list(run_dir.glob("reply.*"))


def test_hostile_lines_are_refused_without_crashing(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        tmp_path: Path, fake_kmodctl: Path) -> None:
    sched = FakeScheduler({"dummy": "loaded"})
    source = served(sched)
    elsewhere = tmp_path / "reply.1"
    os.mkfifo(elsewhere)
    symlink = run_dir / "reply.77"
    symlink.symlink_to(elsewhere)
    regular = run_dir / "reply.78"
    regular.write_text("")
    lines = [
        b"\xff\xfe binary\n",
        b"justonefield\n",
        b"a b c\n",
        f"dummy {elsewhere}\n".encode(),             # outside the run directory
        f"dummy {symlink}\n".encode(),               # symlink into elsewhere
        f"dummy {regular}\n".encode(),               # not a FIFO
        f"dummy {run_dir}/reply.abc\n".encode(),     # not reply.DIGITS
        f"dummy {run_dir}/../run/reply.5\n".encode(),
        b"x" * 10000 + b"\n",                        # over-long line
    ]
    with open(run_dir / "request", "wb", buffering=0) as fifo:
        for line in lines:
            fifo.write(line)
    deadline = time.monotonic() + 5
    while source.rejected < len(lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.rejected == len(lines)
    assert sched.requests == []
    # Still serving afterwards.
    assert run_helper(helper_env(run_dir, fake_kmodctl), "-q", "--", "dummy").returncode == 0
    assert [r.key for r in sched.requests] == ["dummy"]


def test_bad_name_with_valid_reply_gets_an_answer(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path) -> None:
    sched = FakeScheduler({})
    served(sched)
    reply = run_dir / "reply.4242"
    os.mkfifo(reply, 0o600)
    fd = os.open(reply, os.O_RDWR)
    try:
        with open(run_dir / "request", "wb", buffering=0) as fifo:
            fifo.write(f"a/../../etc {reply}\n".encode())
        with os.fdopen(os.dup(fd), "rb", buffering=0) as r:
            ack = r.readline()
            line = r.readline()
    finally:
        os.close(fd)
    assert ack == b"+\n"
    assert line.startswith(b"1 failed name has characters")
    assert sched.requests == []
    assert not reply.exists()


@pytest.mark.parametrize("name,ok", [
    ("dummy", True), ("fs-ext4", True), ("char-major-10-229", True),
    ("crypto-cbc(aes)-all", True), ("net-pf-10-proto-6", True), ("nf_conntrack-2", True),
    ("", False), ("-r", False), ("a b", False), ("a/b", False), ("$(reboot)", False),
    ("a;b", False), ("x" * 256, False), ("é", False), ("a\nb", False),
])
def test_check_name(name: str, ok: bool) -> None:
    assert (check_name(name) is None) is ok


def test_reply_line_codes() -> None:
    req = Request("kernel", "dummy")
    assert reply_line(Outcome(req, "loaded", ("dummy",))) == b"0 loaded dummy\n"
    assert reply_line(Outcome(req, "present", ("dummy",))) == b"0 present dummy\n"
    assert reply_line(Outcome(req, "builtin", ("dummy",))).startswith(b"0 ")
    assert reply_line(Outcome(req, "failed", (), "boom\nline two")) == b"1 failed boom line two\n"
    assert reply_line(Outcome(req, "blacklisted", ())).startswith(b"1 blacklisted")


def test_helper_round_trip_is_fast(served: Callable[[FakeScheduler], KernelRequestSource],
                                   run_dir: Path, fake_kmodctl: Path) -> None:
    """The helper sits on the kernel's request path: no Python, a few ms at most."""
    served(FakeScheduler({"dummy": "present"}))
    env = helper_env(run_dir, fake_kmodctl)
    helper: list[float] = []
    shell: list[float] = []
    python: list[float] = []
    for _ in range(15):
        for cmd, times in (([str(HELPER), "-q", "--", "dummy"], helper),
                           (["/bin/sh", "-c", ":"], shell),
                           (["python3", "-I", "-S", "-c", "pass"], python)):
            start = time.perf_counter()
            assert subprocess.run(cmd, env=env).returncode == 0
            times.append(time.perf_counter() - start)

    # Measured side by side, and the best of 15 of each: a busy machine delays
    # single runs, not the fastest one.  The round trip costs about one shell
    # start plus the watchdog's one process (a fork and an exec of sleep), far
    # less than a bare Python.
    assert min(helper) < 4 * min(shell) + 0.002, (min(helper), min(shell))
    assert min(helper) < min(python), (min(helper), min(python))


# -- the Python console script -------------------------------------------------

def run_console(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import sys
    root = str(Path(__file__).resolve().parents[2])
    return subprocess.run([sys.executable, "-m", "kmodd.cli.request", *args],
                          env={**env, "PYTHONPATH": root}, capture_output=True, text=True,
                          timeout=30, cwd=root)


def test_console_script_speaks_the_protocol_itself(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path, fallback_log: Path) -> None:
    sched = FakeScheduler({"dummy": "loaded"})
    served(sched)
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_PYTHON": "1"}
    assert run_console(env, "-q", "--", "dummy").returncode == 0
    failed = run_console(env, "--", "other")
    assert failed.returncode == 1 and "other: unresolved" in failed.stderr
    assert [r.key for r in sched.requests] == ["dummy", "other"]
    assert not fallback_log.exists()


def test_console_script_execs_the_sh_helper(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path) -> None:
    sched = FakeScheduler({"dummy": "loaded"})
    served(sched)
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_HELPER": str(HELPER)}
    assert run_console(env, "-q", "--", "dummy").returncode == 0
    assert [r.key for r in sched.requests] == ["dummy"]


def test_console_script_loads_directly_without_daemon(run_dir: Path, fake_kmodctl: Path) -> None:
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_PYTHON": "1"}
    # Real kmodctl load in-process; a name nothing provides touches no kernel.
    result = run_console(env, "--", "kmodd-test-no-such-module")
    assert result.returncode == 1
    assert "kmodd-test-no-such-module" in result.stderr
    quiet = run_console(env, "-q", "--", "kmodd-test-no-such-module")
    assert quiet.returncode == 1 and quiet.stderr == "" and quiet.stdout == ""


@pytest.mark.parametrize("argv,expected", [
    (["-q", "--", "dummy"], (True, ["dummy"])),
    (["dummy"], (False, ["dummy"])),
    (["-v", "-b", "dummy", "numdummies=2"], (False, ["dummy", "numdummies=2"])),
    (["-r", "dummy"], (False, None)),
    (["-q"], (True, None)),
])
def test_console_argument_parsing(argv: list[str],
                                  expected: tuple[bool, list[str] | None]) -> None:
    from kmodd.cli.request import parse
    assert parse(argv) == expected


# -- install-request-helper.sh ---------------------------------------------------

INSTALLER = HELPER.with_name("install-request-helper.sh")


def test_install_and_revert_on_a_tree(tmp_path: Path, run_dir: Path,
                                      fake_kmodctl: Path, fallback_log: Path) -> None:
    root = tmp_path / "root"
    proc = root / "proc/sys/kernel/modprobe"
    proc.parent.mkdir(parents=True)
    proc.write_text("/sbin/modprobe\n")

    def installer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INSTALLER), *args, "--root", str(root)],
                              capture_output=True, text=True, timeout=30)

    r = installer("install", "--kmodctl", str(fake_kmodctl), "--fallback", "kmodctl")
    assert r.returncode == 0, r.stderr
    installed = root / "usr/local/libexec/kmodd/kmodd-request"
    assert proc.read_text().strip() == "/usr/local/libexec/kmodd/kmodd-request"
    assert (root / "etc/sysctl.d/50-kmodd-request.conf").read_text().splitlines()[-1] == \
        "kernel.modprobe = /usr/local/libexec/kmodd/kmodd-request"
    assert (root / "var/lib/kmodd/modprobe.orig").read_text().strip() == "/sbin/modprobe"
    assert os.access(installed, os.X_OK)
    # The baked-in defaults work with the kernel's bare environment.
    r2 = subprocess.run([str(installed), "-q", "--", "dummy"], capture_output=True, text=True,
                        env={"PATH": "/sbin:/usr/sbin:/bin:/usr/bin",
                             "KMODD_RUN_DIR": str(run_dir)}, timeout=10)
    assert r2.returncode == 0
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
    # Installing twice keeps the original saved value.
    assert installer("install", "--kmodctl", str(fake_kmodctl)).returncode == 0
    assert (root / "var/lib/kmodd/modprobe.orig").read_text().strip() == "/sbin/modprobe"
    assert "kernel.modprobe = /usr/local/libexec/kmodd/kmodd-request" in \
        installer("status").stdout

    r = installer("uninstall")
    assert r.returncode == 0, r.stderr
    assert proc.read_text().strip() == "/sbin/modprobe"
    assert not (root / "etc/sysctl.d/50-kmodd-request.conf").exists()
    assert not installed.exists()
    assert not (root / "var/lib/kmodd/modprobe.orig").exists()


def test_installer_refuses_an_unsafe_kmodctl_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/modprobe").write_text("/sbin/modprobe\n")
    r = subprocess.run(["sh", str(INSTALLER), "install", "--root", str(root),
                        "--kmodctl", "/nonexistent/k|rm -rf /"], capture_output=True, text=True)
    assert r.returncode != 0
    assert (root / "proc/sys/kernel/modprobe").read_text() == "/sbin/modprobe\n"


# -- reply modes -------------------------------------------------------------------

def test_fifo_mode_is_used_when_the_daemon_says_so(run_dir: Path, fake_kmodctl: Path,
                                                   fallback_log: Path) -> None:
    # A daemon bounded without CAP_SYS_PTRACE cannot open helpers' /proc fds:
    # it advertises "fifo" and dash helpers use reply FIFOs instead.
    sched = FakeScheduler({"dummy": "loaded"})
    source = KernelRequestSource(sched.submit, run_dir / "request", pipe_replies=False)
    loop = Loop(source)
    seen: list[str] = []
    original = source._open_reply

    def spy(path: str) -> int | None:
        seen.append(path)
        return original(path)

    source._open_reply = spy  # type: ignore[method-assign]
    try:
        assert (run_dir / "request.pid").read_text().split()[1] == "fifo"
        env = helper_env(run_dir, fake_kmodctl)
        assert run_helper(env, "-q", "--", "dummy").returncode == 0
        console = run_console({**env, "KMODD_REQUEST_PYTHON": "1"}, "-q", "--", "dummy")
        assert console.returncode == 0
        assert len(seen) == 2 and all(p.startswith(f"{run_dir}/reply.") for p in seen)
        assert not fallback_log.exists()
        assert not list(run_dir.glob("reply.*"))
    finally:
        loop.close()
        source.close()


class DeniedSource(KernelRequestSource):
    """As if an LSM refused the daemon access to helpers' /proc fds."""

    def _open_reply(self, path: str) -> int | None:
        if path.startswith("/proc/"):
            self._open_errno = errno.EACCES
            return None
        return super()._open_reply(path)


def test_denied_pipe_frees_the_helper_and_switches_to_fifos(
        run_dir: Path, fake_kmodctl: Path, fallback_log: Path) -> None:
    sched = FakeScheduler({"dummy": "loaded"})
    source = DeniedSource(sched.submit, run_dir / "request", pipe_replies=True)
    loop = Loop(source)
    try:
        env = helper_env(run_dir, fake_kmodctl)
        # The first helper is told (SIGUSR1) to load by itself, at once.
        first = run_helper(env, "-q", "--", "dummy", timeout=10)
        assert first.returncode == 0
        assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
        assert (run_dir / "request.pid").read_text().split()[1] == "fifo"
        # Later helpers use FIFOs and are served by the daemon.
        assert run_helper(env, "-q", "--", "dummy").returncode == 0
        assert [r.key for r in sched.requests] == ["dummy"]
        assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
    finally:
        loop.close()
        source.close()


def test_stale_pidfile_with_a_recycled_pid_does_not_hang(run_dir: Path, fake_kmodctl: Path,
                                                         fallback_log: Path) -> None:
    # A crashed daemon left its FIFO (nobody reads it: opening it for writing
    # would block forever) and a pid file whose pid now belongs to someone
    # else -- here this very test process, with another start time.
    os.mkfifo(run_dir / "request", 0o600)
    (run_dir / "request.pid").write_text(f"{os.getpid()} pipe 1\n")
    result = run_helper(helper_env(run_dir, fake_kmodctl), "-q", "--", "dummy", timeout=5)
    assert result.returncode == 0
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]


def test_pidfile_names_the_daemon_process(served: Callable[[FakeScheduler], KernelRequestSource],
                                          run_dir: Path) -> None:
    served(FakeScheduler({}))
    pid, _mode, start = (run_dir / "request.pid").read_text().split()
    assert pid == str(os.getpid())
    assert start == process_start_time(os.getpid()) and start.isdigit()


def test_console_script_ignores_a_recycled_pid(run_dir: Path, fake_kmodctl: Path) -> None:
    os.mkfifo(run_dir / "request", 0o600)
    (run_dir / "request.pid").write_text(f"{os.getpid()} pipe 1\n")
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_PYTHON": "1"}
    # Falls through to the real direct load of a name nothing provides.
    result = run_console(env, "--", "kmodd-test-no-such-module")
    assert result.returncode == 1 and "kmodd-test-no-such-module" in result.stderr


def test_restarted_daemon_frees_helpers_the_dead_one_left_waiting(
        tmp_path: Path, run_dir: Path, fake_kmodctl: Path, fallback_log: Path) -> None:
    # The old daemon passed the helper's liveness check, then died before
    # taking the request: the helper waits for an acknowledgement.
    other_dir = tmp_path / "other"      # another kmodd instance's run directory
    other_dir.mkdir(mode=0o755)
    old_daemon = subprocess.Popen(["sleep", "60"])
    holders = []
    for d in (run_dir, other_dir):
        os.mkfifo(d / "request", 0o600)
        holders.append(os.open(d / "request", os.O_RDWR | os.O_NONBLOCK))  # never read
        (d / "request.pid").write_text(
            f"{old_daemon.pid} pipe {process_start_time(old_daemon.pid)}\n")
    waiting = subprocess.Popen([str(HELPER), "-q", "--", "dummy"],
                               env=helper_env(run_dir, fake_kmodctl))
    bystander = subprocess.Popen([str(HELPER), "-q", "--", "dummy"],
                                 env=helper_env(other_dir, fake_kmodctl))
    try:
        time.sleep(0.5)
        assert waiting.poll() is None and bystander.poll() is None  # stuck for good
        time.sleep(0.05)  # start times have clock-tick resolution
        source = KernelRequestSource(FakeScheduler({}).submit, run_dir / "request")
        try:
            assert waiting.wait(5) == 0
            assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
            # A helper of another instance is none of this daemon's business.
            time.sleep(0.3)
            assert bystander.poll() is None
        finally:
            source.close()
    finally:
        for proc in (bystander, waiting, old_daemon):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fd in holders:
            os.close(fd)


# -- a daemon that stops at each step: the helper never hangs, never creates files --

def _stop_after_liveness_check(run_dir: Path, how: str) -> threading.Thread:
    """A daemon that passes the helper's liveness check, then stops.

    The pid file is a FIFO, so the daemon knows the moment the helper has
    read it (the check is done); then it unlinks its request FIFO and closes
    it as ``close()`` does (``how="unlink"``), or just loses it as a SIGKILL
    does, the FIFO staying behind (``how="kill"``)."""
    fifo = run_dir / "request"
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    os.mkfifo(run_dir / "request.pid", 0o644)
    me = os.getpid()

    def daemon() -> None:
        with open(run_dir / "request.pid", "w") as pidfile:     # waits for the helper
            pidfile.write(f"{me} pipe {process_start_time(me)}\n")
        if how == "unlink":
            fifo.unlink()
        os.close(fd)

    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    return thread


# "kill" leaves the helper blocked opening the FIFO: each watchdog must cut
# that short too.
@pytest.mark.parametrize(("how", "shell"), [("unlink", ("dash",)),
                                            *(("kill", shell) for shell in SHELLS)],
                         ids=lambda v: v if isinstance(v, str) else v[0])
def test_daemon_stopping_right_after_the_liveness_check(
        run_dir: Path, fake_kmodctl: Path, fallback_log: Path, how: str,
        shell: tuple[str, ...]) -> None:
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_TIMEOUT": "2"}
    thread = _stop_after_liveness_check(run_dir, how)
    start = time.monotonic()
    result = run_helper(env, "-q", "--", "dummy", timeout=15, shell=shell)
    thread.join(5)
    assert result.returncode == 0
    assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
    # Unlinked: nothing to wait for, at once.  Left behind: the watchdog's bound.
    assert time.monotonic() - start < (1.5 if how == "unlink" else 6)
    # Never a regular file where the daemon's FIFO was.
    request = run_dir / "request"
    assert not request.exists() if how == "unlink" else stat.S_ISFIFO(request.lstat().st_mode)


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_daemon_that_never_takes_the_request(run_dir: Path, fake_kmodctl: Path,
                                             fallback_log: Path,
                                             shell: tuple[str, ...]) -> None:
    # Alive and holding its FIFO, but its event loop never reads it.
    fifo = run_dir / "request"
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    (run_dir / "request.pid").write_text(f"{os.getpid()} pipe "
                                         f"{process_start_time(os.getpid())}\n")
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_TIMEOUT": "1"}
    try:
        start = time.monotonic()
        assert run_helper(env, "-q", "--", "dummy", timeout=15, shell=shell).returncode == 0
        assert 0.9 < time.monotonic() - start < 5
        assert os.read(fd, 4096).startswith(b"dummy /")   # it did ask
        assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_daemon_that_takes_the_request_but_never_answers(run_dir: Path, fake_kmodctl: Path,
                                                         fallback_log: Path,
                                                         shell: tuple[str, ...]) -> None:
    never: list[Future[Outcome]] = []

    def submit(request: Request) -> Future[Outcome]:
        never.append(Future())
        return never[-1]

    source = KernelRequestSource(submit, run_dir / "request", free_orphans=False)
    loop = Loop(source)
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_TIMEOUT": "1"}
    try:
        start = time.monotonic()
        assert run_helper(env, "-q", "--", "dummy", timeout=15, shell=shell).returncode == 0
        assert 0.9 < time.monotonic() - start < 5
        assert len(never) == 1 and source.pending == 1
        assert fallback_log.read_text().splitlines() == ["load --kernel-request -- dummy"]
    finally:
        loop.close()
        source.close()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_watchdog_leaves_no_process_behind(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path, shell: tuple[str, ...]) -> None:
    served(FakeScheduler({"dummy": "present"}))
    marker = "4711"     # an unusual timeout names the watchdog's sleep
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_TIMEOUT": marker}
    # Killing the watchdog races its fork of sleep: seen leaking about one
    # sleep in twenty before its trap used SIGKILL, so try many times.
    for _ in range(60):
        assert run_helper(env, "-q", "--", "dummy", shell=shell).returncode == 0
    deadline = time.monotonic() + 5
    while True:
        left = subprocess.run(["pgrep", "-f", f"^sleep {marker}$"], capture_output=True,
                              text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []


@pytest.mark.parametrize("name", ["a b", "x;id", "$(id)", "../../x", "a" * 256, "-r"])
def test_names_no_module_can_have_are_refused_as_kernel_requests(
        served: Callable[[FakeScheduler], KernelRequestSource], run_dir: Path,
        fake_kmodctl: Path, fallback_log: Path, tmp_path: Path, name: str) -> None:
    """Refused by the helper itself: no daemon request, no admin load through
    kmodctl, no Python; one journal entry under kind kernel."""
    sched = FakeScheduler({})
    served(sched)
    journal = tmp_path / "journal"
    logger = tmp_path / "logger"
    logger.write_text(f'#!/bin/sh\n{{ echo "ARGS $*"; cat; }} >> {journal}\n')
    logger.chmod(0o755)
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_LOGGER": str(logger)}
    result = run_helper(env, "--", name)
    assert result.returncode == 1
    assert "kernel request refused" in result.stderr
    assert sched.requests == [] and not fallback_log.exists()
    entry = journal.read_text()
    assert entry.startswith("ARGS --journald\n")
    assert "REQUESTED_BY=kernel\n" in entry and "PRIORITY=4\n" in entry
    assert "MESSAGE=kernel request refused: " in entry
    # The name is shown cut and with anything odd replaced: one entry, no forged fields.
    assert entry.count("\n") == 6 and len(entry) < 400


def test_console_script_never_waits_unboundedly_either(run_dir: Path, fake_kmodctl: Path
                                                        ) -> None:
    # A daemon alive but never answering; the Python helper loads directly
    # after KMODD_REQUEST_TIMEOUT, like the sh helper.
    never: list[Future[Outcome]] = []

    def submit(request: Request) -> Future[Outcome]:
        never.append(Future())
        return never[-1]

    source = KernelRequestSource(submit, run_dir / "request", free_orphans=False)
    loop = Loop(source)
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_PYTHON": "1",
           "KMODD_REQUEST_TIMEOUT": "1"}
    try:
        start = time.monotonic()
        result = run_console(env, "--", "kmodd-test-no-such-module")
        assert time.monotonic() - start < 20
        assert len(never) == 1                       # it did ask the daemon first
        assert result.returncode == 1 and "kmodd-test-no-such-module" in result.stderr
    finally:
        loop.close()
        source.close()


def test_console_script_refuses_impossible_names(run_dir: Path, fake_kmodctl: Path,
                                                 fallback_log: Path) -> None:
    env = {**helper_env(run_dir, fake_kmodctl), "KMODD_REQUEST_PYTHON": "1"}
    result = run_console(env, "--", "x;id")
    assert result.returncode == 1 and "kernel request refused" in result.stderr
    assert not fallback_log.exists()
