"""Command line for the test bed.

    python -m testbed build                    # extract vmlinux, build the initramfs
    python -m testbed run [--devices ...] -- CMD...   # boot, run CMD, print, exit with its status
    python -m testbed console -- CMD...        # CMD is the guest's only job, console streamed
    python -m testbed shell                    # boot, then read commands from stdin
    python -m testbed main                     # the README's main job (testbed/main_job.py)
    python -m testbed devices                  # the default device list
    python -m testbed qemu-cmdline             # print the QEMU command line
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from testbed.initramfs import TestbedError, build
from testbed.vm import DEFAULT_DEVICES, VM, GuestTimeout


def _add_vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default=None,
                   help="-device values separated by ';' "
                        "(default: the dozen DEFAULT_DEVICES; '' for none)")
    p.add_argument("--add-device", action="append", default=[], metavar="DEV",
                   help="a -device value added to the list (repeatable)")
    p.add_argument("--memory", default="1G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--kernel-modprobe", default="/bin/true",
                   help="value for /proc/sys/kernel/modprobe in the guest ('keep' leaves "
                        "the kernel's default)")
    p.add_argument("--quiet-console", action="store_true",
                   help="do not stream the guest console to stderr")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the command is killed (default: none)")


def _make_vm(args: argparse.Namespace, console: bool) -> VM:
    if args.devices is None:
        devices = list(DEFAULT_DEVICES)
    else:
        devices = [d for d in args.devices.split(";") if d.strip()]
    devices += args.add_device
    modprobe = None if args.kernel_modprobe == "keep" else args.kernel_modprobe
    return VM(devices, memory=args.memory, cpus=args.cpus, cmdline_extra=args.append,
              kernel_modprobe=modprobe,
              console=sys.stderr if console and not args.quiet_console else None)


def _command(words: list[str]) -> str | list[str]:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise SystemExit("testbed: no command given (use: -- CMD...)")
    # A single word with spaces is a shell command line; several words are an argv.
    return words[0] if len(words) == 1 else words


def cmd_run(args: argparse.Namespace) -> int:
    command = _command(args.command)
    vm = _make_vm(args, console=args.console)
    try:
        start = time.monotonic()
        vm.boot()
        print(f"testbed: booted {vm.kernel.version if vm.kernel else '?'} in "
              f"{vm.boot_seconds:.1f} s", file=sys.stderr)
        try:
            result = vm.run(command, timeout=args.timeout, stream=sys.stdout,
                            stream_err=sys.stderr)
        except GuestTimeout as exc:
            print(f"testbed: {exc}", file=sys.stderr)
            return 124
        sys.stdout.flush()
        print(f"testbed: exit status {result.rc} after {time.monotonic() - start:.1f} s",
              file=sys.stderr)
        return result.rc
    finally:
        vm.shutdown()


def cmd_console(args: argparse.Namespace) -> int:
    vm = _make_vm(args, console=True)
    if vm.console_stream is None:
        vm.console_stream = sys.stdout
    return vm.run_console(_command(args.command), timeout=args.timeout)


def cmd_shell(args: argparse.Namespace) -> int:
    vm = _make_vm(args, console=False)
    try:
        vm.boot()
        print(f"testbed: booted in {vm.boot_seconds:.1f} s; one command per line, "
              "'console' shows the guest console, 'qmp CMD {json}' runs QMP, EOF quits",
              file=sys.stderr)
        rc = 0
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            if line == "console":
                print(vm.console_log())
                continue
            if line.startswith("qmp "):
                import json

                parts = line.split(None, 2)
                arguments = json.loads(parts[2]) if len(parts) > 2 else {}
                print(json.dumps(vm.qmp(parts[1], **arguments), indent=2))
                continue
            result = vm.run(line, timeout=args.timeout)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            rc = result.rc
            print(f"[rc={rc} {result.duration:.2f}s]", file=sys.stderr)
        return rc
    finally:
        vm.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed",
                                     description="Debian's real kernel under QEMU")
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("build", help="build vmlinux and the initramfs under build/testbed")
    p_run = sub.add_parser("run", help="boot, run a command through the agent, exit with "
                                       "its status")
    _add_vm_options(p_run)
    p_run.add_argument("--console", action="store_true",
                       help="also stream the guest console to stderr")
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    p_con = sub.add_parser("console", help="boot with the command as the guest's only job, "
                                           "console on stdout")
    _add_vm_options(p_con)
    p_con.add_argument("command", nargs=argparse.REMAINDER)
    p_sh = sub.add_parser("shell", help="boot, then run commands read from stdin")
    _add_vm_options(p_sh)
    p_main = sub.add_parser("main", help="the README's main job (see testbed/main_job.py)")
    p_main.add_argument("--console", action="store_true",
                        help="stream the guest console to stderr (otherwise only its tail, "
                             "on failure)")
    p_main.add_argument("--quiet-console", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("devices", help="print the default devices")
    p_cl = sub.add_parser("qemu-cmdline", help="print the QEMU command line")
    _add_vm_options(p_cl)
    args = parser.parse_args(argv)
    try:
        if args.mode == "build":
            kernel, vmlinux, initramfs = build()
            print(f"kernel {kernel.version}\n{vmlinux}\n{initramfs}")
            return 0
        if args.mode == "devices":
            print("\n".join(DEFAULT_DEVICES))
            return 0
        if args.mode == "qemu-cmdline":
            _, vmlinux, initramfs = build()
            print(shlex.join(_make_vm(args, console=False).command_line(vmlinux, initramfs)))
            return 0
        if args.mode == "main":
            from testbed.main_job import main as main_job

            return main_job(console=args.console and not args.quiet_console)
        if args.mode == "run":
            return cmd_run(args)
        if args.mode == "console":
            return cmd_console(args)
        return cmd_shell(args)
    except GuestTimeout as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 124
    except TestbedError as exc:
        print(f"testbed: cannot boot the test bed: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
