"""modprobe.d ``install`` / ``remove`` commands, run like kmod runs them, minus the injection.

kmod pastes the option text into the command where ``$CMDLINE_OPTS`` stands
and hands the result to system(3) (libkmod's ``module_do_install_commands``),
so an option such as ``x=$(id)`` runs ``id`` whenever the command quotes
``$CMDLINE_OPTS`` in double quotes, and one containing ``'`` breaks out of
single quotes.  The command itself comes from root-owned configuration and is
trusted; the options and the module name may come from a request (an admin's
command line, a uevent's modalias, a kernel request_module() string) and are
not.  Deliberate difference from kmod: option text never becomes shell syntax.
Each ``$CMDLINE_OPTS`` is replaced by a parameter expansion, chosen by the
quoting context it stands in:

* unquoted: ``"$@"``, the positional parameters set to the options split into
  words the way the kernel splits parameters (so ``b="x y"`` stays one word);
* inside double quotes: ``${CMDLINE_OPTS}``, the options text from the
  environment (the same text kmod would paste);
* inside single quotes: ``'"${CMDLINE_OPTS}"'`` (close, expand, reopen).

Each of the three is safe in every context (a parameter expansion's result is
never parsed again as shell code), so a command the context scanner reads
wrongly gets a different text, never an injection.  The module name only ever
reaches the shell as the ``MODPROBE_MODULE`` environment variable.
"""

from __future__ import annotations

import os

from kmodd.record import dataclass

SHELL = "/bin/sh"
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class CommandResult:
    command: str          # the command as configured (and the options it was given)
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


PLACEHOLDER = "$CMDLINE_OPTS"
# What stands in for PLACEHOLDER in each quoting context (see the module docstring).
_UNQUOTED = '"$@"'
_DOUBLE = "${CMDLINE_OPTS}"
_SINGLE = "'\"${CMDLINE_OPTS}\"'"


def _scan(command: str) -> list[tuple[int, str]]:
    """(offset, context) of each ``$CMDLINE_OPTS`` in ``command``.

    A small POSIX sh quoting scanner: context is ``"none"`` (also inside
    ``$(...)`` and backquotes, which start a new command), ``"double"`` or
    ``"single"``.  An escaped ``\\$CMDLINE_OPTS`` is literal text to the shell
    and is left alone."""
    found: list[tuple[int, str]] = []
    stack = ["none"]         # none | double | single | cmd (inside $( or ( ) | bq
    i, n = 0, len(command)
    while i < n:
        top = stack[-1]
        if top != "single" and command.startswith(PLACEHOLDER, i):
            found.append((i, "double" if top == "double" else "none"))
            i += len(PLACEHOLDER)
            continue
        c = command[i]
        if top == "single":
            if c == "'":
                stack.pop()
            elif command.startswith(PLACEHOLDER, i):
                found.append((i, "single"))
                i += len(PLACEHOLDER)
                continue
        elif c == "\\":
            i += 2
            continue
        elif top == "double":
            if c == '"':
                stack.pop()
            elif c == "`":
                stack.append("bq")
            elif command.startswith("$(", i):
                stack.append("cmd")
                i += 2
                continue
        else:
            if c == "'":
                stack.append("single")
            elif c == '"':
                stack.append("double")
            elif c == "`":
                if top == "bq":
                    stack.pop()
                else:
                    stack.append("bq")
            elif command.startswith("$(", i) or (c == "(" and top == "cmd"):
                stack.append("cmd")
                i += 2 if c == "$" else 1
                continue
            elif c == ")" and top == "cmd":
                stack.pop()
        i += 1
    return found


def expand(command: str) -> str:
    """``command`` with every ``$CMDLINE_OPTS`` replaced by its safe expansion.

    Run the result with :func:`shell_argv` (positional parameters = option
    words) and ``CMDLINE_OPTS`` = the option text in the environment."""
    out: list[str] = []
    last = 0
    for offset, context in _scan(command):
        out.append(command[last:offset])
        out.append({"none": _UNQUOTED, "double": _DOUBLE, "single": _SINGLE}[context])
        last = offset + len(PLACEHOLDER)
    out.append(command[last:])
    return "".join(out)


def shell_argv(command: str, options: str) -> list[str]:
    """The argv running ``command`` with ``options``: sh -c EXPANDED sh WORD..."""
    return [SHELL, "-c", expand(command), SHELL, *split_options(options)]


SYSTEMD_RUN = "systemd-run"
SYSTEMD_BOOTED = "/run/systemd/system"      # sd_booted(): systemd is PID 1


def transient_runner() -> str | None:
    """systemd-run, when commands must leave kmodd's sandbox through a transient unit.

    Under systemd, kmodd runs with a bounded capability set, a read-only file
    system (``ProtectSystem=strict``), read-only /sys and address-family and
    system-call filters, and its children inherit all of them: a command that
    works under modprobe (writing /sys, running a tool that opens an AF_INET
    socket) can fail.  ``systemd-run --pipe --wait`` runs it as a transient
    service of PID 1 instead, unconfined, as modprobe would have run it.
    None (run /bin/sh directly) without systemd or without systemd-run."""
    import shutil

    from kmodd.journal import under_systemd

    if not under_systemd() or not os.path.isdir(SYSTEMD_BOOTED):
        return None
    return shutil.which(SYSTEMD_RUN)


def transient_argv(systemd_run: str, kind: str, module: str, command: str, options: str,
                   timeout: float) -> tuple[list[str], bytes]:
    """(argv, stdin) running ``command`` as a transient unit.

    No request text goes into the unit's command line, where the service
    manager expands ``$VAR`` (before systemd 254, and with
    --expand-environment=yes after): the module, the options and each option
    word travel as environment values (never expanded), the script as
    systemd-run's stdin (``--pipe``) to ``sh -s``.  The command itself reads
    /dev/null, as when run directly."""
    words = split_options(options)
    argv = [systemd_run, "--pipe", "--wait", "--collect", "--quiet",
            f"--description=kmodd {kind} command",
            # Our timeout kills systemd-run; this stops the unit too.
            f"--property=RuntimeMaxSec={max(1, int(timeout))}",
            f"--setenv=MODPROBE_MODULE={module}", f"--setenv=CMDLINE_OPTS={options}",
            *(f"--setenv=KMODD_OPT_{i}={word}" for i, word in enumerate(words)),
            "--", SHELL, "-s"]
    names = [f"KMODD_OPT_{i}" for i in range(len(words))]
    script = "set --" + "".join(f' "${n}"' for n in names) + "\n"
    if names:
        script += "unset " + " ".join(names) + "\n"
    script += "{\n" + expand(command) + "\n} </dev/null\n"
    return argv, script.encode()


def run_command(kind: str, module: str, command: str, options: str = "", *,
                timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
    """Run an install/remove ``command`` for ``module`` through /bin/sh (in a
    transient unit under systemd, see :func:`transient_runner`)."""
    import subprocess  # here: the daemon imports this module long before any command runs

    cmd = command if not options else f"{command}  [options: {options}]"
    env = dict(os.environ)
    env["MODPROBE_MODULE"] = module
    env["CMDLINE_OPTS"] = options
    systemd_run = transient_runner()
    stdin: bytes | None = None
    if systemd_run is not None:
        argv, stdin = transient_argv(systemd_run, kind, module, command, options, timeout)
    else:
        argv = shell_argv(command, options)
    try:
        proc = subprocess.run(argv, env=env, input=stdin,
                              stdin=subprocess.DEVNULL if stdin is None else None,
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
