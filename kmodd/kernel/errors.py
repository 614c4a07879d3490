"""errno values of the module syscalls -> messages an administrator can act on.

The kernel reuses a handful of errno values for very different causes (EPERM
for lockdown, ``modules_disabled`` and ``module_blacklist=``; EBUSY/EAGAIN for
"in use" and for a failed concurrent load).  Where the cause can be told from
procfs/sysfs we look, so the message names the one that applies.
"""

from __future__ import annotations

import errno as E
import os
from pathlib import Path

from kmodd.kernel.protocol import KernelError
from kmodd.root import Root, running_kernel_version

# The kernel answers delete_module() for a module in use with EWOULDBLOCK
# (== EAGAIN); rmmod/modprobe and administrators know that situation as EBUSY.
_UNLOAD_IN_USE = (E.EAGAIN, E.EWOULDBLOCK)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def modules_disabled(root: Root) -> bool:
    return (_read(root.path("proc/sys/kernel/modules_disabled")) or "0").strip() == "1"


def lockdown_mode(root: Root) -> str | None:
    """The active lockdown mode ("integrity"/"confidentiality"), None when off or unknown."""
    text = _read(root.path("sys/kernel/security/lockdown"))
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            mode = word[1:-1]
            return None if mode == "none" else mode
    return None


def cmdline_blacklisted(root: Root, module: str) -> bool:
    """Whether the kernel command line's ``module_blacklist=`` names the module."""
    text = _read(root.path("proc/cmdline")) or ""
    for word in text.split():
        if word.startswith("module_blacklist="):
            names = word.split("=", 1)[1].split(",")
            if module in (n.replace("-", "_") for n in names):
                return True
    return False


def _eperm_reason(root: Root, module: str) -> str:
    # Order matters: modules_disabled and module_blacklist= are certain causes,
    # lockdown only refuses unsigned modules, missing privileges is the fallback.
    if modules_disabled(root):
        return ("module loading is disabled (/proc/sys/kernel/modules_disabled is 1; "
                "only a reboot re-enables it)")
    if cmdline_blacklisted(root, module):
        return "the kernel command line blacklists it (module_blacklist=)"
    mode = lockdown_mode(root)
    if mode is not None:
        return f"the kernel is locked down ({mode}) and refuses this module (unsigned?)"
    if os.geteuid() != 0:
        return "operation not permitted (loading modules needs root / CAP_SYS_MODULE)"
    return "operation not permitted (lockdown, security module or missing CAP_SYS_MODULE)"


def _enoexec_reason(path: str | None, root: Root) -> str:
    """Tell a corrupt file from a module built for another kernel (only on this error path,
    so the ELF reader is imported only then)."""
    generic = "corrupt file or built for another kernel (vermagic/modversions; see dmesg)"
    if not path:
        return generic
    try:
        from kmodd.modfile.elf import vermagic

        magic = vermagic(path)
    except Exception:
        return "not a valid kernel module (corrupt or truncated file; see dmesg)"
    if not magic:
        return "the file has no vermagic: not a kernel module (see dmesg)"
    built_for = magic.split()[0]
    running = running_kernel_version(root)
    if built_for != running:
        return (f"built for kernel {built_for}, this kernel is {running} "
                f"(vermagic '{magic.strip()}'; see dmesg)")
    # Same release: with modversions the kernel compares the rest of vermagic
    # (SMP, preempt, mod_unload...) and each imported symbol's CRC.
    return (f"vermagic '{magic.strip()}' or symbol versions do not match this kernel, "
            "or the file is corrupt (see dmesg)")


def load_message(errno_: int, module: str, *, path: str | None = None, params: str = "",
                 root: Root | None = None) -> str:
    """What an administrator should read when loading ``module`` failed with ``errno_``."""
    root = root or Root()
    where = f" ({path})" if path else ""
    if errno_ == E.EEXIST:
        return f"{module}: already loaded"
    if errno_ == E.EBUSY:
        return (f"{module}: busy: another load of this module was in progress and failed, "
                "or the module is being removed (see dmesg)")
    if errno_ == E.ENOEXEC:
        return f"{module}{where}: invalid module format: {_enoexec_reason(path, root)}"
    if errno_ == E.EKEYREJECTED:
        return f"{module}{where}: module signature rejected by the kernel (see dmesg)"
    if errno_ == E.ENOKEY:
        return (f"{module}{where}: module signature required but the signing key is not "
                "trusted by the kernel (see dmesg)")
    if errno_ == E.EKEYEXPIRED:
        return f"{module}{where}: module signing key has expired (see dmesg)"
    if errno_ == E.EPERM:
        return f"{module}: {_eperm_reason(root, module)}"
    if errno_ == E.EINVAL:
        detail = f" in '{params}'" if params else ""
        return f"{module}: invalid module parameter or value{detail} (see dmesg)"
    if errno_ == E.ENOENT:
        return (f"{module}: unknown symbol in module, or a dependency is not loaded "
                "(see dmesg)")
    if errno_ == E.ENOSYS:
        return "this kernel was built without loadable module support"
    if errno_ == E.ETXTBSY:
        return f"{module}{where}: module file is open for writing"
    if errno_ == E.ENOMEM:
        return f"{module}: out of memory while loading"
    if errno_ == E.EFAULT or errno_ == E.EFBIG:
        return f"{module}{where}: module image rejected ({os.strerror(errno_)}; see dmesg)"
    # Anything else comes from the module's own init function (e.g. ENODEV
    # when there is no matching hardware).
    return f"{module}: module initialisation failed: {os.strerror(errno_)} (see dmesg)"


def unload_message(errno_: int, module: str, *, holders: tuple[str, ...] = (),
                   root: Root | None = None) -> str:
    root = root or Root()
    if errno_ in (E.EBUSY, *_UNLOAD_IN_USE):
        if holders:
            return f"{module}: in use by: {' '.join(holders)}"
        return f"{module}: in use (or still initialising, or cannot be unloaded)"
    if errno_ == E.ENOENT:
        return f"{module}: not loaded"
    if errno_ == E.EPERM:
        if modules_disabled(root):
            return f"{module}: module unloading is disabled (modules_disabled is 1)"
        return f"{module}: operation not permitted (needs root / CAP_SYS_MODULE)"
    if errno_ == E.ENOSYS:
        return "this kernel was built without loadable module support"
    return f"{module}: could not unload: {os.strerror(errno_)}"


def load_error(errno_: int, module: str, *, path: str | None = None, params: str = "",
               root: Root | None = None) -> KernelError:
    return KernelError(errno_, load_message(errno_, module, path=path, params=params,
                                            root=root), module)


def unload_error(errno_: int, module: str, *, holders: tuple[str, ...] = (),
                 root: Root | None = None) -> KernelError:
    # In-use is reported as EBUSY whatever the kernel's spelling (see _UNLOAD_IN_USE).
    code = E.EBUSY if errno_ in _UNLOAD_IN_USE else errno_
    return KernelError(code, unload_message(errno_, module, holders=holders, root=root),
                       module)
