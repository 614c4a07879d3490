"""The daemon's side of the kernel's request_module() helper.

The kernel runs ``/proc/sys/kernel/modprobe -q -- NAME`` and blocks the
requesting process until it exits, so the helper (``contrib/kmodd-request``,
a POSIX shell script) must cost next to nothing: it makes a reply FIFO,
writes one line ``NAME REPLYPATH`` into the daemon's request FIFO and reads
one line back.  Wire protocol:

* request FIFO: ``RUN/request`` (mode 0600, so only root can ask); the
  daemon keeps it open read-write, so a helper's open() never blocks while
  the daemon lives and the daemon never sees end-of-file.
* ``RUN/request.pid``: ``PID MODE START``, the daemon's pid and start time
  (a helper that finds no such process loads the module itself instead of
  writing into a FIFO nobody reads; the start time guards against a pid
  reused after a crash) and ``pipe`` or ``fifo``: whether the daemon may open
  the helpers' ``/proc/PID/fd/N`` (ptrace read access: a daemon whose
  capabilities are bounded needs CAP_SYS_PTRACE, the helper having all).
* reply channel: ``/proc/HELPERPID/fd/N``, the read end of a pipe the
  helper made (dash turns a here-document into a pipe, so this costs no
  process), or with other shells a FIFO ``RUN/reply.HELPERPID`` it made
  with mkfifo (root, 0600).  The helper holds a write end of its own until
  the daemon answers ``+`` (taken), so a reply written early is never lost,
  then drops it, so end-of-file means the daemon died.  The daemon opens the
  channel non-blocking, writes ``+`` at once, and later one line
  ``CODE STATUS DETAIL`` (CODE 0: loaded, built in or already there;
  1: failed; ``retry``: the daemon is going away, load it yourself).  A
  reply FIFO is unlinked by the daemon as soon as it has it open.  Should
  the daemon fail to open a ``/proc`` channel after all (an LSM), it sends
  the helper SIGUSR1 (the helper then loads the module itself) and tells
  later helpers ``fifo``.  A new daemon also sends SIGUSR1 to helpers of
  its run directory started before it: they may be waiting on a previous
  daemon that died between their liveness check and reading their request.

The helper never waits unboundedly and never creates a file in the run
directory: it opens the request FIFO read-only (no O_CREAT; a daemon gone
since the liveness check means ENOENT, not a regular file left behind),
checks it is a FIFO and writes through ``/proc/self/fd`` of that
descriptor; a watchdog signals it after ``KMODD_REQUEST_TIMEOUT`` seconds
(60) without an answer, and every failure path loads directly with
``kmodctl load --kernel-request`` (still a kernel request should a daemon
answer).  A name no module can have is refused by the helper itself, with
a journal entry under kind kernel, and never reaches the daemon.

Everything read from the FIFO is validated: the name's characters and
length, and the reply path (a pipe under ``/proc/PID/fd/``, or a FIFO
directly in the run directory named ``reply.DIGITS`` and not a symlink;
either way owned by the daemon's uid, i.e. made by root).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import signal
import stat
import struct
import termios
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from kmodd.daemon.requests import Outcome, Request, RequestKind, Submit
from kmodd.journal import log
from kmodd.root import run_path

LOG = logging.getLogger(__name__)

# request_module() formats into a MODULE_NAME_LEN (56) buffer, so names from
# the kernel are short; the limit leaves room for administrators' aliases.
MAX_NAME = 255
# What request_module() names look like: "fs-ext4", "char-major-10-229",
# "net-pf-10-proto-6", "crypto-cbc(aes)-all", "rtnl-link-dummy",
# "nf-logger-2-0", "tcp_bbr", "pci:v00008086d...".  No '/', no whitespace,
# no shell metacharacters except the parentheses crypto names need; never
# a leading '-' (it would read as an option to a fallback modprobe).
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,:+@()=-]*\Z")
REPLY_RE = re.compile(r"reply\.[0-9]{1,10}\Z")
PROC_REPLY_RE = re.compile(r"/proc/[0-9]{1,10}/fd/[0-9]{1,4}\Z")
ACK = b"+\n"
MAX_LINE = 4096          # PIPE_BUF: the helper's write is atomic below it


CAP_SYS_PTRACE = 19


def can_open_helper_fds() -> bool:
    """Whether /proc/PID/fd/N of a helper (root, every capability) can be opened.

    ptrace_may_access() in READ mode: same uid, and either the helper's
    permitted capabilities are a subset of ours or we have CAP_SYS_PTRACE.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, names a process for good."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2:].split()[19]


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat start times use."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def is_helper(pid: int, proc: str = "/proc") -> bool:
    """Whether ``pid`` runs kmodd-request (as the script or its interpreter's argument)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as handle:
            argv = handle.read(4096).split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"kmodd-request") for arg in argv[:3])


def check_name(name: str) -> str | None:
    """Why ``name`` is not acceptable as a request_module() name, or None."""
    if not name:
        return "empty name"
    if len(name) > MAX_NAME:
        return f"name longer than {MAX_NAME} characters"
    if not NAME_RE.match(name):
        return "name has characters a module name or alias cannot have"
    return None


def reply_line(outcome: Outcome | None, error: str | None = None) -> bytes:
    """The one line written back to a helper."""
    if outcome is None:
        code, status, detail = "1", "failed", error or "internal error"
    else:
        code = "0" if outcome.ok else "1"
        status = outcome.status
        detail = outcome.error or " ".join(outcome.modules)
    text = f"{code} {status} {detail}".strip()
    text = text.replace("\n", " ").replace("\r", " ")[:1000]
    return (text + "\n").encode("utf-8", "replace")


class _Reply:
    """An open reply FIFO waiting for its outcome."""

    __slots__ = ("answered", "fd", "name", "path", "read_at")

    def __init__(self, fd: int, path: str, name: str, read_at: float = 0.0) -> None:
        self.fd = fd
        self.path = path
        self.name = name
        self.answered = False
        self.read_at = read_at      # monotonic: when its line was read


class KernelRequestSource:
    """Event-loop source serving ``kmodd-request`` helpers over FIFOs."""

    udev_handover = False     # the kernel's own requests, not its uevents

    def __init__(self, submit: Submit, fifo_path: str | os.PathLike[str], *,
                 owner_uid: int | None = None, pipe_replies: bool | None = None,
                 free_orphans: bool = True) -> None:
        self.submit = submit
        self.fifo_path = Path(fifo_path)
        self.run_dir = self.fifo_path.parent
        self.pid_path = self.fifo_path.with_name(self.fifo_path.name + ".pid")
        # Root in production; tests run the daemon side as themselves.
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self.pipe_replies = can_open_helper_fds() if pipe_replies is None else pipe_replies
        self._open_errno = 0
        self.served = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._pending: dict[int, _Reply] = {}
        self._buffer = b""
        self._discarding = False
        self._closed = False
        self._stopping = False
        # Helpers started before this instant may be waiting on a FIFO
        # inode a previous daemon left (see free_orphaned_helpers).
        self._born = boot_ticks()
        self.reads = 0            # chunks read from the request FIFO
        self._read_at = 0.0       # when the last chunk was read
        self._checked = (0, 0)    # (unread bytes, reads) at the last check()
        self._prepare_dir()
        self._fd = self._make_fifo()
        self._ident = self._identity(self._fd)
        self._sweep_stale_replies()
        self._write_pidfile()
        if free_orphans:
            # Off the start-up path: scanning /proc takes milliseconds.
            threading.Thread(target=self.free_orphaned_helpers, name="kmodd-orphans",
                             daemon=True).start()

    # -- setup -------------------------------------------------------------
    def _prepare_dir(self) -> None:
        self.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = os.lstat(self.run_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "not a directory", str(self.run_dir))
        # Anyone who can write the directory could plant reply FIFOs or
        # replace the request FIFO.
        if st.st_uid != self.owner_uid or st.st_mode & 0o022:
            raise PermissionError(errno.EPERM,
                                  "run directory must be owned by the daemon's user "
                                  "and not group/world-writable", str(self.run_dir))

    def _make_fifo(self) -> int:
        path = os.fspath(self.fifo_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale FIFO from a previous run, or anything else
        old_umask = os.umask(0o077)
        try:
            os.mkfifo(path, 0o600)
        finally:
            os.umask(old_umask)
        # O_RDWR: never blocks on open, and we stay a writer ourselves, so
        # the FIFO never reports end-of-file between helpers.
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    @staticmethod
    def _identity(fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def _write_pidfile(self) -> None:
        tmp = self.pid_path.with_name(self.pid_path.name + ".tmp")
        mode = "pipe" if self.pipe_replies else "fifo"
        tmp.write_text(f"{os.getpid()} {mode} {process_start_time(os.getpid())}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.pid_path)

    def _sweep_stale_replies(self) -> None:
        """Answer or remove reply FIFOs left by a previous daemon.

        A helper whose daemon died before answering is still blocked reading
        its FIFO: tell it to load the module itself.  A FIFO nobody reads
        whose helper (the pid in its name) is no longer a running
        kmodd-request was left by a killed helper and is removed; one whose
        helper still runs may be being set up and stays.
        """
        try:
            names = os.listdir(self.run_dir)
        except OSError:
            return
        for name in names:
            if not REPLY_RE.match(name):
                continue
            path = os.path.join(self.run_dir, name)
            self._open_errno = 0
            fd = self._open_reply(path)  # unlinks it when it is a valid one
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.write(fd, ACK + b"retry restarted daemon lost the request\n")
                os.close(fd)
            elif self._open_errno == errno.ENXIO and not is_helper(int(name.split(".")[1])):
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if stat.S_ISFIFO(st.st_mode) and st.st_uid == self.owner_uid:
                        os.unlink(path)
                        LOG.info("removed %s, left by a killed helper", path)

    def free_orphaned_helpers(self, proc: str = "/proc") -> list[int]:
        """Tell helpers a previous daemon took but never answered to load for themselves.

        A helper whose daemon died after the liveness check but before
        taking its request waits for an acknowledgement nobody will send.
        Helpers started before this daemon are sent SIGUSR1 (their trap
        loads the module directly); the worst case for one that was about
        to be served by us is a second, harmless load attempt.
        """
        freed: list[int] = []
        try:
            entries = os.listdir(proc)
        except OSError:
            return freed
        ours = os.fsencode(self.run_dir)
        for entry in entries:
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if not is_helper(int(entry), proc):
                    continue
                if int(process_start_time(int(entry))) >= self._born:
                    continue
                # Only helpers talking to this run directory.
                with open(f"{proc}/{entry}/environ", "rb") as handle:
                    env = handle.read(65536).split(b"\0")
                run_dir = next((v[len(b"KMODD_RUN_DIR="):] for v in env
                                if v.startswith(b"KMODD_RUN_DIR=")), run_path().encode())
                if run_dir.rstrip(b"/") != ours:
                    continue
                os.kill(int(entry), signal.SIGUSR1)
                freed.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        if freed:
            log(LOG, logging.WARNING, "told %d kmodd-request helper(s) left waiting by a "
                "previous daemon to load for themselves", len(freed), requested_by="kernel")
        return freed

    # -- event-loop source -------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def unread(self) -> int:
        """Bytes written into the request FIFO and not read yet (FIONREAD)."""
        try:
            got = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", got)[0])

    def check(self) -> str | None:
        """What is wrong with the request FIFO, repaired; None when all is well.

        Called every second from the event loop, so that helpers can never
        be left to their watchdog silently: the descriptor must still be
        the FIFO this source made and the path must still lead to it (else
        a new one is made), and requests must not sit unread across two
        checks with no read in between (the loop no longer calls
        :meth:`on_readable`: the caller watches the FIFO again).
        """
        if self._closed:
            return None
        try:
            ours = self._identity(self._fd) == self._ident
        except OSError:
            ours = False
        try:
            there = os.lstat(self.fifo_path)
            linked = (there.st_dev, there.st_ino) == self._ident
        except OSError:
            linked = False
        if not ours or not linked:
            problem = (f"{self.fifo_path} was removed or replaced" if ours else
                       "its descriptor was closed or reused")
            if ours:
                self.on_readable()      # what was written into the old one
                os.close(self._fd)
                self._fd = self._make_fifo()
            else:
                # Our FIFO is still there but we no longer hold it: helpers
                # wait in open() for a writer; reopening it lets them in.
                self._fd = os.open(self.fifo_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC) \
                    if linked else self._make_fifo()
            self._ident = self._identity(self._fd)
            self._checked = (0, self.reads)
            with contextlib.suppress(OSError):
                self._write_pidfile()
            return problem
        waiting = self.unread()
        before, reads = self._checked
        self._checked = (waiting, self.reads)
        if waiting and before and reads == self.reads:
            return f"{waiting} byte(s) of requests left unread for a second"
        return None

    def on_readable(self) -> None:
        """Read every queued request line and answer or queue each; never blocks."""
        while not self._closed:
            try:
                chunk = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(LOG, logging.ERROR, "request FIFO read failed: %s", exc, errno=exc.errno)
                return
            if not chunk:
                return
            self.reads += 1
            self._read_at = time.monotonic()
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        data = self._buffer + chunk
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        for raw in lines:
            if self._discarding:
                self._discarding = False  # end of an over-long line
                continue
            # The lines after this one were read from the FIFO too: a bug or
            # bad input in one must not leave their helpers waiting.
            try:
                self.handle_line(raw)
            except Exception:
                self.rejected += 1
                LOG.exception("request FIFO: serving %r failed", raw[:120])
        if len(self._buffer) > MAX_LINE:
            # Not a helper's line (they are written atomically and short):
            # drop it up to its newline instead of growing without bound.
            self._buffer = b""
            self._discarding = True
            self._reject("over-long line on the request FIFO")

    def handle_line(self, raw: bytes) -> Future[Outcome] | None:
        """Validate one ``NAME REPLYPATH`` line, open the reply and queue the request."""
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            self._reject("non-ASCII request line")
            return None
        parts = line.split(" ")
        if len(parts) != 2:
            self._reject(f"malformed request line {line[:80]!r}")
            return None
        name, reply_path = parts
        fd = self._open_reply(reply_path)
        if fd is None:
            self._reject(f"unusable reply path {reply_path[:120]!r} for {name[:80]!r}")
            if self._open_errno in (errno.EACCES, errno.EPERM) and PROC_REPLY_RE.match(reply_path):
                self._cannot_reach(reply_path)
            return None
        reply = _Reply(fd, reply_path, name, self._read_at or time.monotonic())
        try:
            os.write(fd, ACK)  # the helper may now drop its own write end
        except OSError:
            os.close(fd)  # the helper is gone
            return None
        if self._stopping:
            self._answer(reply, None, line=b"retry daemon stopping\n")
            return None
        problem = check_name(name)
        if problem is not None:
            self.rejected += 1
            log(LOG, logging.WARNING, "kernel request refused: %s", problem,
                request=name[:80], requested_by="kernel")
            self._answer(reply, None, problem)
            return None
        request = Request(kind=RequestKind.KERNEL, key=name, requested_by="kernel")
        try:
            future = self.submit(request)
        except Exception as exc:
            log(LOG, logging.ERROR, "cannot queue kernel request %s: %s", name, exc,
                request=name, requested_by="kernel")
            self._answer(reply, None, f"daemon could not queue the request: {exc}")
            return None
        with self._lock:
            self._pending[fd] = reply
        self.served += 1
        # Runs in whichever thread completes the future (a worker), or right
        # here when it is already done; the write cannot block (see _answer).
        future.add_done_callback(functools.partial(self._complete, reply))
        return future

    def _open_reply(self, path: str) -> int | None:
        """Open a helper's reply channel for writing if, and only if, it is a valid one."""
        # O_NONBLOCK: fails with ENXIO instead of waiting when nobody reads
        # (the helper is gone).
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
        in_run_dir = False
        if PROC_REPLY_RE.match(path):
            pass  # /proc/PID/fd/N is a magic link by nature: no O_NOFOLLOW
        elif (os.path.isabs(path) and os.path.dirname(path) == os.fspath(self.run_dir)
                and REPLY_RE.match(os.path.basename(path))):
            flags |= os.O_NOFOLLOW  # no symlink games in the run directory
            in_run_dir = True
        else:
            return None
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            self._open_errno = exc.errno or 0
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != self.owner_uid:
            os.close(fd)
            return None
        if in_run_dir:
            # Both ends are open now (the helper opened its own first), so
            # the name is no longer needed: nothing is left behind whatever
            # happens next.  Only the FIFO we opened is removed.
            with contextlib.suppress(OSError):
                current = os.lstat(path)
                if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(path)
        return fd

    def _cannot_reach(self, path: str) -> None:
        """A helper waits on a pipe we may not open: free it, and stop offering pipes."""
        if self.pipe_replies:
            self.pipe_replies = False
            log(LOG, logging.WARNING, "cannot open helpers' reply pipes (%s); "
                "switching them to FIFOs", os.strerror(self._open_errno), requested_by="kernel")
            with contextlib.suppress(OSError):
                self._write_pidfile()
        pid = int(path.split("/")[2])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read(4096)
        except OSError:
            return
        # Only a kmodd-request helper is signalled (its trap loads directly).
        if b"kmodd-request" in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)

    def _complete(self, reply: _Reply, future: Future[Outcome]) -> None:
        try:
            outcome = future.result()
        except Exception as exc:
            self._answer(reply, None, f"internal error: {exc}")
            return
        self._answer(reply, outcome)

    def _answer(self, reply: _Reply, outcome: Outcome | None, error: str | None = None,
                *, line: bytes | None = None) -> None:
        with self._lock:
            if reply.answered:
                return
            reply.answered = True
            self._pending.pop(reply.fd, None)
        data = line if line is not None else reply_line(outcome, error)
        try:
            # One short write into an empty pipe: atomic and never blocks.
            # EPIPE: the helper died meanwhile; nothing to tell anyone.
            os.write(reply.fd, data)
        except OSError:
            pass
        finally:
            os.close(reply.fd)
        if LOG.isEnabledFor(logging.DEBUG):
            # The daemon's share of the round trip (bench/bench_request.py).
            LOG.debug("kernel request %s answered %.1f ms after its line was read: %s",
                      reply.name, (time.monotonic() - reply.read_at) * 1000,
                      data.decode("utf-8", "replace").strip())

    def _reject(self, what: str) -> None:
        self.rejected += 1
        log(LOG, logging.WARNING, "request FIFO: %s", what, requested_by="kernel")

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        """Stop serving: answer queued and in-flight requests with ``retry``.

        The helpers then load the module themselves, so nothing the kernel
        waits for is lost across a daemon stop or restart.  Call after the
        daemon has let in-flight loads finish if it wants their real
        outcomes delivered.
        """
        if self._closed:
            return
        # Requests already written but not yet read are answered too.
        self._stopping = True
        self.on_readable()
        self._closed = True
        with self._lock:
            pending = list(self._pending.values())
        for reply in pending:
            self._answer(reply, None, line=b"retry daemon stopping\n")
        try:
            if self.pid_path.read_text().split()[:1] == [str(os.getpid())]:
                self.pid_path.unlink()
        except OSError:
            pass
        try:
            st = os.lstat(self.fifo_path)
            if stat.S_ISFIFO(st.st_mode):
                os.unlink(self.fifo_path)
        except OSError:
            pass
        # Only our own FIFO: a number closed behind our back may be another's now.
        with contextlib.suppress(OSError):
            if self._identity(self._fd) == self._ident:
                os.close(self._fd)
        self._fd = -1
