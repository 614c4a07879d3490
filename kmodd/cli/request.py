"""kmodd-request-py: the request_module() helper's Python equivalent.

The kernel should run the POSIX sh helper (``contrib/kmodd-request``: the
package's ``/usr/libexec/kmodd/kmodd-request``, and the ``kmodd-request`` a
pip install puts on PATH) directly: a Python interpreter costs more than a
whole modprobe.  This console script execs the sh helper when one is
installed, else speaks the same FIFO protocol itself (see
kmodd/daemon/kernelreq.py), else loads the module directly like ``kmodctl load``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from kmodd.root import run_path

DEFAULT_RUN_DIR = run_path()
HELPER_PATHS = ("/usr/libexec/kmodd/kmodd-request", "/usr/local/libexec/kmodd/kmodd-request")
_TOLERATED = {"-q", "--quiet", "-v", "--verbose", "-b", "--use-blacklist", "-s", "--syslog"}


def find_helper() -> str | None:
    """The sh helper to exec, if any: $KMODD_REQUEST_HELPER, the install paths,
    or the source tree's contrib/ when running from a checkout."""
    candidates = [os.environ.get("KMODD_REQUEST_HELPER", "")]
    candidates += HELPER_PATHS
    candidates.append(str(Path(__file__).resolve().parents[2] / "contrib" / "kmodd-request"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def parse(argv: list[str]) -> tuple[bool, list[str] | None]:
    """(quiet, [NAME, params...]) or (quiet, None) when this is not a plain load."""
    quiet = False
    rest: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            rest = argv[i + 1:]
            break
        if arg in ("-q", "--quiet"):
            quiet = True
        elif arg in _TOLERATED:
            continue
        elif arg.startswith("-"):
            return quiet, None
        else:
            rest = argv[i:]
            break
    return quiet, (rest or None)


def _daemon_mode(run_dir: str) -> str | None:
    """The live daemon's reply mode ("pipe" or "fifo"), or None without a daemon."""
    fifo = os.path.join(run_dir, "request")
    try:
        import stat

        if not stat.S_ISFIFO(os.stat(fifo).st_mode):
            return None
        with open(fifo + ".pid") as handle:
            words = handle.read().split()
        from kmodd.daemon.kernelreq import process_start_time

        # The start time guards against a pid recycled after a crash.
        start = process_start_time(int(words[0]))
        if len(words) > 2 and words[2] != start:
            return None
        return words[1] if len(words) > 1 else "fifo"
    except (OSError, ValueError, IndexError):
        return None


def request_timeout() -> int:
    """KMODD_REQUEST_TIMEOUT seconds (60), as the sh helper reads it."""
    value = os.environ.get("KMODD_REQUEST_TIMEOUT", "")
    return int(value) if value.isdigit() and int(value) > 0 else 60


def ask_daemon(name: str, run_dir: str) -> tuple[str, str] | None:
    """Send NAME to the daemon; (code, rest of the answer), or None if it went away."""
    from kmodd.daemon.kernelreq import check_name

    mode = _daemon_mode(run_dir)
    if check_name(name) is not None or mode is None:
        return None
    fifo_path = None
    if mode == "pipe":
        # The daemon opens /proc/OURPID/fd/N to answer, as with the sh helper.
        read_fd, write_fd = os.pipe()
        reply = f"/proc/{os.getpid()}/fd/{read_fd}"
    else:
        fifo_path = reply = os.path.join(run_dir, f"reply.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo_path)
        os.mkfifo(fifo_path, 0o600)
        write_fd = os.open(fifo_path, os.O_RDWR)
        read_fd = os.open(fifo_path, os.O_RDONLY)
    import signal

    def retry(signum: int, frame: object) -> None:
        # The daemon cannot answer (see KernelRequestSource): load ourselves.
        raise InterruptedError("daemon asked us to load directly")

    previous = signal.signal(signal.SIGUSR1, retry)
    # No unbounded wait, as in the sh helper: a daemon that died after our
    # liveness check, or hangs, means loading directly after the timeout.
    previous_alarm = signal.signal(signal.SIGALRM, retry)
    signal.alarm(request_timeout())
    try:
        line = f"{name} {reply}\n".encode()
        fifo = os.open(os.path.join(run_dir, "request"), os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fifo, line)
        finally:
            os.close(fifo)
        with os.fdopen(read_fd, "rb", buffering=0, closefd=False) as reader:
            ack = reader.readline()
            os.close(write_fd)   # from now on, end-of-file means the daemon died
            write_fd = -1
            answer = reader.readline().decode("utf-8", "replace").strip()
        if ack != b"+\n" or not answer:
            return None
        code, _, rest = answer.partition(" ")
        return code, rest
    except OSError:
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGUSR1, previous)
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        if fifo_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(fifo_path)


def refuse(quiet: bool, name: str, problem: str) -> int:
    """A name no module can have: refused under kind kernel, as the sh helper does."""
    safe = "".join(c if c.isascii() and c.isprintable() else "?" for c in name[:80])
    message = f"kernel request refused: {problem}: {safe}"
    try:
        from systemd import journal

        journal.send(message, PRIORITY=4, SYSLOG_IDENTIFIER="kmodd-request",
                     REQUESTED_BY="kernel", REQUEST=safe)
    except Exception:  # no journal (early boot, containers): stderr only
        pass
    if not quiet:
        print(f"kmodd-request: {message}", file=sys.stderr)
    return 1


def load_directly(quiet: bool, words: list[str]) -> int:
    from kmodd.cli.kmodctl import main as kmodctl

    # Still the kernel's request, should a daemon answer kmodctl after all.
    words = ["--kernel-request", "--", *words]
    if not quiet:
        return kmodctl(["load", *words])
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1), os.dup(2)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        return kmodctl(["load", *words])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("KMODD_REQUEST_PYTHON") != "1":
        helper = find_helper()
        if helper is not None:
            os.execv(helper, [helper, *args])
    quiet, words = parse(args)
    if words is None:
        print("usage: kmodd-request [-q] -- NAME", file=sys.stderr)
        return 1
    if len(words) == 1:
        from kmodd.daemon.kernelreq import check_name

        problem = check_name(words[0])
        if problem is not None:
            return refuse(quiet, words[0], problem)
        answer = ask_daemon(words[0], os.environ.get("KMODD_RUN_DIR", DEFAULT_RUN_DIR))
        if answer is not None and answer[0] in ("0", "1"):
            if answer[0] == "1" and not quiet:
                print(f"kmodd-request: {words[0]}: {answer[1]}", file=sys.stderr)
            return int(answer[0])
    return load_directly(quiet, words)


if __name__ == "__main__":
    sys.exit(main())
