"""modprobe.d ``install`` / ``remove`` commands, run like kmod runs them, minus the injection.

kmod pastes the option text into the command with ``$CMDLINE_OPTS`` and hands
the result to system(3).  The command itself comes from root-owned
configuration and is trusted; the options and the module name may come from a
request (an admin's command line, a uevent's modalias, a kernel
request_module() string) and are not.  So options are split into words the way
the kernel splits parameters and each word is shell-quoted, and the module name
only ever reaches the shell as the ``MODPROBE_MODULE`` environment variable.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

SHELL = "/bin/sh"
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class CommandResult:
    command: str          # what the shell ran, after substitution
    returncode: int
    output: str = ""
    error: str | None = None   # None on success

    @property
    def ok(self) -> bool:
        return self.error is None


def split_options(options: str) -> list[str]:
    """Split module options into words like the kernel's next_arg(): spaces separate,
    double quotes group (and are kept, so ``a="x y"`` stays one word meaning the same)."""
    words: list[str] = []
    cur: list[str] = []
    in_quote = False
    for ch in options:
        if ch == '"':
            in_quote = not in_quote
            cur.append(ch)
        elif ch.isspace() and not in_quote:
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words


def quote_options(options: str) -> str:
    """The options as shell words: each kernel-parameter word quoted on its own."""
    return " ".join(shlex.quote(w) for w in split_options(options))


def expand(command: str, options: str) -> str:
    """Substitute ``$CMDLINE_OPTS`` (every occurrence) with the quoted options."""
    return command.replace("$CMDLINE_OPTS", quote_options(options))


def run_command(kind: str, module: str, command: str, options: str = "", *,
                timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
    """Run an install/remove ``command`` for ``module`` through /bin/sh."""
    import subprocess  # here: the daemon imports this module long before any command runs

    cmd = expand(command, options)
    env = dict(os.environ)
    env["MODPROBE_MODULE"] = module
    try:
        proc = subprocess.run([SHELL, "-c", cmd], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return CommandResult(cmd, -1, "", f"{module}: {kind} command timed out after "
                             f"{timeout:g}s: {cmd}")
    except OSError as e:
        return CommandResult(cmd, -1, "", f"{module}: could not run {kind} command "
                             f"{cmd!r}: {e.strerror}")
    output = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        return CommandResult(cmd, proc.returncode, output,
                             f"{module}: {kind} command failed with exit status "
                             f"{proc.returncode}: {cmd}")
    return CommandResult(cmd, 0, output)


def run_install(module: str, command: str, options: str = "", *,
                timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
    return run_command("install", module, command, options, timeout=timeout)


def run_remove(module: str, command: str, *, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
    # kmod does not substitute $CMDLINE_OPTS in remove commands; neither do we.
    return run_command("remove", module, command, "", timeout=timeout)
