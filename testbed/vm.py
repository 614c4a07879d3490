"""A QEMU guest running Debian's real kernel, driven from the host.

    with VM() as vm:                      # boots; shuts down on exit
        r = vm.run("cat /proc/modules")   # Completed(rc, stdout, stderr)
        vm.qmp("device_add", driver="e1000", id="hot0")

The guest's root is the host's root (read-only over 9p, with a tmpfs overlay so
the guest can write), and the project checkout is shared read-write at the same
path, so the host's virtual environment runs unchanged inside the guest.

Commands go through a mailbox directory inside the checkout
(``build/testbed/run/<id>/mailbox``): the host writes ``N.cmd`` and rings a
doorbell on the guest's second serial port; the guest agent runs it and writes
``N.out``, ``N.err`` and (last, by rename) ``N.rc``, then answers on the serial
port.  See ``testbed/guest/agent.sh``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from testbed.initramfs import BUILD_DIR, PROJECT_ROOT, Kernel, TestbedError, build
from testbed.qmp import QMPClient, QMPError  # noqa: F401 (re-exported: testbed.vm.QMPError)

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = float(os.environ.get("TESTBED_BOOT_TIMEOUT", "180"))
DEFAULT_TIMEOUT = 120.0

# A dozen emulated devices with drivers in Debian's kernel (modalias -> module):
#   e1000 -> e1000, virtio-rng-pci -> virtio_rng, i6300esb -> i6300esb,
#   intel-hda + hda-duplex -> snd_hda_intel (+ snd_hda_codec_generic),
#   usb-ehci -> ehci_pci, usb-tablet -> usbhid, ich9-usb-uhci1 -> uhci_hcd,
#   ES1370 -> snd_ens1370, pcnet -> pcnet32, rtl8139 -> 8139cp/8139too,
#   virtio-net-pci -> virtio_net, lsi53c895a -> sym53c8xx, pvpanic -> pvpanic,
#   sdhci-pci -> sdhci_pci, ahci -> ahci.
# Backends (-audiodev snd0, -netdev user) are added automatically when named.
DEFAULT_DEVICES: list[str] = [
    "e1000",
    "virtio-rng-pci",
    "i6300esb",
    "intel-hda,id=hda",
    "hda-duplex,bus=hda.0,audiodev=snd0",
    "usb-ehci,id=ehci",
    "usb-tablet,bus=ehci.0",
    "ich9-usb-uhci1,id=uhci",
    "ES1370,audiodev=snd0",
    "pcnet,netdev=net1",
    "rtl8139,netdev=net2",
    "virtio-net-pci,netdev=net0",
    "lsi53c895a",
    "pvpanic",
    "sdhci-pci",
    "ahci",
]


@dataclass(frozen=True)
class Completed:
    """Result of a command run in the guest."""

    rc: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def returncode(self) -> int:
        return self.rc

    def check(self) -> Completed:
        """Return self, or raise GuestCommandError when rc != 0."""
        if self.rc != 0:
            raise GuestCommandError(self)
        return self


class GuestCommandError(AssertionError):
    def __init__(self, result: Completed) -> None:
        self.result = result
        super().__init__(f"guest command failed with rc={result.rc}\n"
                         f"--- stdout ---\n{result.stdout[-4000:]}\n"
                         f"--- stderr ---\n{result.stderr[-4000:]}")


class BootError(TestbedError):
    """The guest did not come up; the message says why and shows the console tail."""


class GuestTimeout(TimeoutError):
    """A guest command did not finish in time."""

    def __init__(self, message: str, partial: Completed | None = None) -> None:
        super().__init__(message)
        self.partial = partial


_vm_counter = itertools.count(1)


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the process that booted it dies.

    (Linux ties this to the thread that forked: boot VMs from a thread that
    outlives them, normally the main thread.)
    """
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _prune_stale_rundirs(parent: Path) -> None:
    """Remove run directories left by test-bed processes that no longer exist."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        pid = entry.name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def _audio_and_net_backends(devices: Sequence[str]) -> list[str]:
    args: list[str] = []
    audiodevs: list[str] = []
    netdevs: list[str] = []
    for dev in devices:
        for m in re.finditer(r"(?:^|,)audiodev=([^,]+)", dev):
            if m.group(1) not in audiodevs:
                audiodevs.append(m.group(1))
        for m in re.finditer(r"(?:^|,)netdev=([^,]+)", dev):
            if m.group(1) not in netdevs:
                netdevs.append(m.group(1))
    for a in audiodevs:
        args += ["-audiodev", f"none,id={a}"]
    for n in netdevs:
        args += ["-netdev", f"user,id={n},restrict=on"]
    return args


class VM:
    """One QEMU guest; a context manager that boots on entry and shuts down on exit.

    devices          ``-device`` values (default DEFAULT_DEVICES); ``audiodev=X`` and
                     ``netdev=X`` backends are created automatically (none / user,restrict)
    memory, cpus     guest size (``-m``, ``-smp``)
    extra_args       more QEMU arguments;  cmdline_extra: more kernel command line
    kernel_modprobe  what /proc/sys/kernel/modprobe is set to (None: kernel default)
    console          a text stream the guest console is copied to as it arrives
    share            the checkout shared read-write at the same path (default: this one)
    keep_rundir      keep build/testbed/run/<id> (mailbox, console.log, qemu.log)
    cache_venv       serve share/.venv from a read-only cached 9p export
    """

    def __init__(
        self,
        devices: Sequence[str] | None = None,
        memory: str = "1G",
        extra_args: Sequence[str] = (),
        cmdline_extra: str = "",
        *,
        cpus: int = 2,
        share: Path | str = PROJECT_ROOT,
        kernel_modprobe: str | None = "/bin/true",
        kernel_version: str | None = None,
        console: IO[str] | None = None,
        keep_rundir: bool = False,
        cache_venv: bool = True,
    ) -> None:
        self.devices = list(DEFAULT_DEVICES if devices is None else devices)
        self.memory = memory
        self.cpus = cpus
        self.extra_args = list(extra_args)
        self.cmdline_extra = cmdline_extra
        self.share = Path(share).resolve()
        self.kernel_modprobe = kernel_modprobe
        self.kernel_version = kernel_version
        self.console_stream = console
        self.keep_rundir = keep_rundir
        self.cache_venv = cache_venv
        self.kernel: Kernel | None = None
        self.boot_seconds: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        run_id = f"{os.getpid()}-{next(_vm_counter)}"
        self.rundir = self.share / "build" / "testbed" / "run" / run_id
        self.mailbox = self.rundir / "mailbox"
        self._sockdir = Path(tempfile.gettempdir()) / "testbed-unbooted"
        self._console_path = self.rundir / "console.log"
        self._agent_listener: socket.socket | None = None
        self._agent: socket.socket | None = None
        self._qmp = QMPClient(self._sockdir / "qmp.sock")
        self._send_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._done: dict[int, int] = {}
        self._cond = threading.Condition()
        self._agent_ready = False
        self._agent_closed = False
        self._reader: threading.Thread | None = None
        self._tailer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._final_console: str | None = None
        self._final_qemu_log: str | None = None

    # ------------------------------------------------------------------ boot

    def __enter__(self) -> VM:
        if self.proc is None:
            self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _qemu_binary(self) -> str:
        path = shutil.which(QEMU)
        if path is None:
            raise BootError(f"{QEMU} not found on PATH: install qemu-system-x86 "
                            "(run scripts/install-deps.sh as root)")
        return path

    def command_line(self, vmlinux: Path, initramfs: Path, mode: str = "agent") -> list[str]:
        """The QEMU command line (exposed for debugging and for the README)."""
        sock = self._sockdir
        append = " ".join([
            "console=ttyS0", "panic=-1", "oops=panic", "loglevel=4", "rdinit=/init",
            "8250.nr_uarts=2", "tsc=unstable",
            f"tb_share={self.share}", f"tb_mbox={self.mailbox}", f"tb_mode={mode}",
            f"tb_modprobe={self.kernel_modprobe or 'keep'}",
            self.cmdline_extra,
        ]).strip()
        args = [
            self._qemu_binary(), "-M", "pc", "-accel", "tcg",
            "-cpu", os.environ.get("TESTBED_CPU", "max"),
            "-m", self.memory, "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-no-reboot",
            "-kernel", str(vmlinux), "-initrd", str(initramfs), "-append", append,
            "-chardev", f"file,id=con,path={self._console_path}",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=agent,path={sock / 'agent.sock'}",
            "-serial", "chardev:agent",
            "-qmp", f"unix:{sock / 'qmp.sock'},server=on,wait=off",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=share,path={self.share},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=share,mount_tag=share",
        ]
        venv = self.share / ".venv"
        if self.cache_venv and venv.is_dir():
            args += ["-fsdev", f"local,id=venv,path={venv},security_model=none,readonly=on,"
                               "multidevs=remap",
                     "-device", "virtio-9p-pci,fsdev=venv,mount_tag=venv"]
            append += f" tb_venv={venv}"
            args[args.index("-append") + 1] = append
        args += _audio_and_net_backends(self.devices)
        for dev in self.devices:
            args += ["-device", dev]
        args += self.extra_args
        return args

    def boot(self, timeout: float = BOOT_TIMEOUT, *, mode: str = "agent",
             main_command: str | Sequence[str] | None = None) -> float:
        """Start QEMU and wait for the guest agent; return the boot time in seconds.

        ``mode="console"`` runs *main_command* as the guest's only job with its
        output on the console (see ``run_console``) instead of starting the agent.
        """
        if self.proc is not None:
            raise RuntimeError("VM already booted")
        self.kernel, vmlinux, initramfs = build(self.kernel_version)
        self._qemu_binary()
        self._sockdir = Path(tempfile.mkdtemp(prefix="testbed-"))
        self._qmp = QMPClient(self._sockdir / "qmp.sock")
        if self.rundir.exists():
            shutil.rmtree(self.rundir)
        self.mailbox.mkdir(parents=True)
        self._console_path.write_bytes(b"")
        if mode == "console":
            if main_command is None:
                raise ValueError("console mode needs main_command")
            (self.mailbox / "main.cmd").write_text(self._script(main_command, None, None))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self._sockdir / "agent.sock"))
        listener.listen(1)
        self._agent_listener = listener
        argv = self.command_line(vmlinux, initramfs, mode)
        start = time.monotonic()
        _prune_stale_rundirs(self.rundir.parent)
        with open(self.rundir / "qemu.log", "wb") as qemu_log:  # a pipe could fill and block
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        if self.console_stream is not None:
            self._tailer = threading.Thread(target=self._tail_console, daemon=True,
                                            name="testbed-console")
            self._tailer.start()
        try:
            self._accept_agent(start + timeout)
            if mode == "agent":
                self._wait_ready(start + timeout, timeout)
            self.boot_seconds = time.monotonic() - start
        except BaseException:
            self.shutdown()
            raise
        return self.boot_seconds

    def _accept_agent(self, deadline: float) -> None:
        assert self._agent_listener is not None
        self._agent_listener.settimeout(0.2)
        while True:
            try:
                conn, _ = self._agent_listener.accept()
                break
            except TimeoutError:
                self._check_alive("while starting QEMU")
                if time.monotonic() > deadline:
                    raise BootError("QEMU did not connect the agent serial port in time"
                                    + self._why()) from None
        self._agent = conn
        self._agent_listener.close()
        self._agent_listener = None
        self._reader = threading.Thread(target=self._read_agent, daemon=True,
                                        name="testbed-agent")
        self._reader.start()

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        with self._cond:
            while not self._agent_ready:
                self._cond.wait(0.2)
                if self._agent_ready:
                    break
                self._check_alive("while booting")
                console = self._read_console()
                if "TESTBED-FATAL" in console or "Kernel panic" in console:
                    raise BootError("the guest failed to boot" + self._why())
                if time.monotonic() > deadline:
                    raise BootError(f"the guest agent did not start within {timeout:.0f} s"
                                    " (TCG is slow when the host is busy; raise "
                                    "TESTBED_BOOT_TIMEOUT)" + self._why())

    def _check_alive(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            out = self.qemu_log()
            raise BootError(f"QEMU exited with status {self.proc.returncode} {when}"
                            + (f"\n--- qemu output ---\n{out.strip()[-3000:]}" if out else "")
                            + self._why())

    def _why(self) -> str:
        tail = "\n".join(self._read_console().splitlines()[-40:])
        return f"\n--- guest console (last lines) ---\n{tail}" if tail else \
            "\n(guest console is empty)"

    def _read_agent(self) -> None:
        assert self._agent is not None
        buf = b""
        while True:
            try:
                chunk = self._agent.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._on_agent_line(line.decode(errors="replace").strip())
        with self._cond:
            self._agent_closed = True
            self._cond.notify_all()

    def _on_agent_line(self, line: str) -> None:
        parts = line.split()
        with self._cond:
            if parts[:1] == ["ready"]:
                self._agent_ready = True
            elif len(parts) == 3 and parts[0] == "done" and parts[1].isdigit():
                with contextlib.suppress(ValueError):
                    self._done[int(parts[1])] = int(parts[2])
            self._cond.notify_all()

    # --------------------------------------------------------------- console

    def _read_console(self) -> str:
        if self._final_console is not None:
            return self._final_console
        try:
            return self._console_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def console_log(self) -> str:
        """Everything the guest wrote to its console (ttyS0) so far."""
        return self._read_console()

    def qemu_log(self) -> str:
        """What QEMU itself printed (warnings, errors)."""
        if self._final_qemu_log is not None:
            return self._final_qemu_log
        return self._read_text(str(self.rundir / "qemu.log"))

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self._read_console().splitlines()[-lines:])

    def _tail_console(self) -> None:
        assert self.console_stream is not None
        follow_file(self._console_path, self.console_stream, self._stopping, 0.05)

    # ------------------------------------------------------------------- run

    def _script(self, cmd: str | Sequence[str], cwd: str | Path | None,
                env: Mapping[str, str] | None) -> str:
        lines = [f"cd {shlex.quote(str(cwd or self.share))} || exit 125"]
        for key, value in (env or {}).items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"bad environment variable name {key!r}")
            lines.append(f"export {key}={shlex.quote(value)}")
        if isinstance(cmd, str):
            lines.append(cmd)
        else:
            lines.append("exec " + shlex.join([str(c) for c in cmd]))
        return "\n".join(lines) + "\n"

    def verify_share(self) -> None:
        """Fail unless the guest runs kmodd from the checkout under test.

        The guest sees the host's whole root, so a stale PATH, a copied virtual
        environment or an editable install made in another checkout would quietly
        run someone else's code; this turns that into an error.
        """
        share = str(self.share)
        r = self.run(
            'command -v kmodd; command -v kmodctl; '
            'python3 -c "import kmodd, sys; print(kmodd.__file__)"', timeout=300)
        paths = r.stdout.split()
        outside = [p for p in paths if not (p == share or p.startswith(share + "/"))]
        if r.rc != 0 or len(paths) != 3 or outside:
            raise TestbedError(
                f"the guest does not run the checkout under test ({share}): kmodd, kmodctl "
                f"and the kmodd package resolve to {paths or 'nothing'} "
                f"(rc={r.rc}, stderr: {r.stderr.strip()[-500:]}); "
                "run scripts/install-deps.sh in this checkout")

    def run(
        self,
        cmd: str | Sequence[str],
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        check: bool = False,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stream: IO[str] | None = None,
        stream_err: IO[str] | None = None,
    ) -> Completed:
        """Run *cmd* in the guest (a shell string for ``/bin/sh``, or an argv list).

        The command runs as root, in *cwd* (default: the project checkout), with
        the project's venv first on PATH.  Output is returned when it finishes;
        with *stream*, stdout and stderr are also copied there as they arrive
        (stderr to *stream_err* instead, if given).
        Raises ``GuestTimeout`` (with partial output and the console tail) when
        *timeout* expires; the command and every process it started are killed
        first.  *timeout* None waits forever.
        """
        if self.proc is None or self._agent is None:
            raise RuntimeError("VM is not booted")
        self._check_alive("before running a command")
        n = next(self._seq)
        base = self.mailbox / str(n)
        if input is not None:
            Path(f"{base}.in").write_bytes(input.encode() if isinstance(input, str) else input)
        Path(f"{base}.cmd").write_text(self._script(cmd, cwd, env))
        start = time.monotonic()
        self._send(f"run {n}\n")
        rc_path = Path(f"{base}.rc")
        deadline = None if timeout is None else start + timeout
        offsets = [0, 0]
        rc: int | None = None
        killed_at: float | None = None
        with self._cond:
            while True:
                if n in self._done:
                    rc = self._done.pop(n)
                    break
                if self._agent_closed or (self.proc.poll() is not None):
                    break
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    if killed_at is None:
                        killed_at = now
                        self._send(f"kill {n}\n")
                    elif now > killed_at + 15:
                        break
                self._cond.wait(0.05 if stream is not None else 0.25)
                if stream is not None:
                    self._stream_new(base, offsets, stream, stream_err)
                if n not in self._done and rc_path.exists():  # doorbell reply lost
                    text = rc_path.read_text()
                    if text.endswith("\n"):
                        rc = int(text)
                        break
        duration = time.monotonic() - start
        if stream is not None:
            self._stream_new(base, offsets, stream, stream_err)
        out = self._read_text(f"{base}.out")
        err = self._read_text(f"{base}.err")
        shown = cmd if isinstance(cmd, str) else shlex.join([str(c) for c in cmd])
        if rc is None or killed_at is not None:
            partial = Completed(-1 if rc is None else rc, out, err, duration)
            if self.proc.poll() is not None:
                why = f"QEMU exited (status {self.proc.returncode}) while running {shown!r}"
            elif killed_at is not None:
                why = f"guest command {shown!r} timed out after {timeout} s and was killed"
                if rc is None:
                    why += " (the guest did not confirm it)"
            else:
                why = f"guest command {shown!r} got no answer after {duration:.1f} s"
            raise GuestTimeout(f"{why}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n"
                               f"{err[-2000:]}" + self._why(), partial)
        result = Completed(rc, out, err, duration)
        for suffix in (".cmd", ".in", ".out", ".err", ".rc", ".pid"):
            Path(f"{base}{suffix}").unlink(missing_ok=True)
        if check:
            result.check()
        return result

    def _send(self, line: str) -> None:
        with self._send_lock:  # run() may be called from several threads
            assert self._agent is not None
            self._agent.sendall(line.encode())

    @staticmethod
    def _read_text(path: str) -> str:
        try:
            return Path(path).read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @staticmethod
    def _stream_new(base: Path, offsets: list[int], stream: IO[str],
                    stream_err: IO[str] | None) -> None:
        for i, suffix in enumerate((".out", ".err")):
            target = stream_err if i == 1 and stream_err is not None else stream
            try:
                with open(f"{base}{suffix}", "rb") as fh:
                    fh.seek(offsets[i])
                    data = fh.read()
            except OSError:
                continue
            if data:
                offsets[i] += len(data)
                target.write(data.decode(errors="replace"))
                target.flush()

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip through the agent running ``true``; returns seconds."""
        return self.run("true", timeout=timeout, check=True).duration

    # ------------------------------------------------------------------- QMP

    @property
    def qmp_events(self) -> list[dict[str, Any]]:
        """QMP events seen so far (appended while waiting for replies)."""
        return self._qmp.events

    def qmp(self, execute: str, **arguments: Any) -> dict[str, Any]:
        """Run a QMP command, e.g. ``vm.qmp("device_add", driver="e1000", id="nic9")``.

        Returns the ``return`` member (lists are wrapped as ``{"return": [...]}``);
        raises ``QMPError`` on an error reply.  Events seen meanwhile are appended
        to ``vm.qmp_events``.  Property names with dashes: pass ``**{"a-b": v}``.
        """
        if self.proc is None:
            raise RuntimeError("VM is not booted")
        return self._qmp.execute(execute, **arguments)

    # -------------------------------------------------------------- shutdown

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the guest (QMP quit, then SIGTERM/SIGKILL) and clean up."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception), self._qmp.lock:
                self._qmp.connect()
                self._qmp.settimeout(5)
                self._qmp.send("quit", {})
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._stopping.set()
        if self._tailer is not None:
            self._tailer.join(5)
            self._tailer = None
        self._qmp.close()
        for sock in (self._agent, self._agent_listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._agent = self._agent_listener = None
        if self._final_console is None and self._console_path.exists():
            self._final_console = self._read_console()
            with contextlib.suppress(OSError):
                (BUILD_DIR / "last-console.log").write_text(self._final_console)
        if self._final_qemu_log is None:
            self._final_qemu_log = self._read_text(str(self.rundir / "qemu.log"))
        if not self.keep_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
        if self._sockdir.name != "testbed-unbooted":
            shutil.rmtree(self._sockdir, ignore_errors=True)

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit by itself (console mode); return its status."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # --------------------------------------------------------- console mode

    def run_console(self, cmd: str | Sequence[str], timeout: float | None = None) -> int:
        """Boot with *cmd* as the guest's only job (no agent), output on the console.

        Streams the console to ``self.console_stream`` if set; returns *cmd*'s exit
        status (or raises ``BootError``/``GuestTimeout``).  The guest powers off after.
        """
        start = time.monotonic()
        self.boot(BOOT_TIMEOUT, mode="console", main_command=cmd)
        try:
            rc_path = self.mailbox / "main.rc"
            assert self.proc is not None
            while self.proc.poll() is None:
                if timeout is not None and time.monotonic() - start > timeout:
                    raise GuestTimeout(f"console command did not finish in {timeout} s"
                                       + self._why())
                time.sleep(0.2)
            if not rc_path.exists():
                raise BootError(f"the guest stopped before the command finished "
                                f"(QEMU status {self.proc.returncode})" + self._why())
            return int(rc_path.read_text().strip())
        finally:
            self.shutdown()


def follow_file(path: str | Path, stream: IO[str], stop: threading.Event,
                interval: float) -> None:
    """Copy what is appended to ``path`` (a guest's console) to ``stream``, CRLF
    as LF, until ``stop`` is set and nothing more has come."""
    pos = 0
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(pos)
                data = fh.read()
        except OSError:
            data = b""
        if data:
            pos += len(data)
            stream.write(data.decode(errors="replace").replace("\r\n", "\n"))
            stream.flush()
        elif stop.is_set():
            return
        else:
            time.sleep(interval)


@contextlib.contextmanager
def booted(**kwargs: Any) -> Iterator[VM]:
    """``with booted(devices=[...]) as vm:`` — a VM booted for the block."""
    vm = VM(**kwargs)
    vm.boot()
    try:
        yield vm
    finally:
        vm.shutdown()

