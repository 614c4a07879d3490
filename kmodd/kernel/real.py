"""The real kernel: ctypes module syscalls, /proc/modules and /sys/module.

Three layers, so the simulated kernel shares everything but the syscalls:

* :class:`KernelState` reads procfs/sysfs under a :class:`Root`;
* :class:`SyscallKernel` decides how to insert a file (finit_module, the
  compressed-file flag, user-space decompression + init_module), maps errno
  values to messages and remembers a kernel without module support;
* :class:`RealKernel` issues the three raw syscalls with ctypes.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import threading
from pathlib import Path

from kmodd.kernel import errors
from kmodd.kernel.protocol import InitState, KernelError, LoadedModule
from kmodd.root import Root

# x86_64 syscall numbers (include/uapi/asm-generic/unistd.h differs; these are
# arch/x86/entry/syscalls/syscall_64.tbl, the only architecture we ship for).
SYS_INIT_MODULE = 175
SYS_DELETE_MODULE = 176
SYS_FINIT_MODULE = 313

MODULE_INIT_IGNORE_MODVERSIONS = 1
MODULE_INIT_IGNORE_VERMAGIC = 2
MODULE_INIT_COMPRESSED_FILE = 4

_STATES = {"Live": InitState.LIVE, "Loading": InitState.COMING, "Unloading": InitState.GOING}


def parse_proc_modules(text: str) -> dict[str, LoadedModule]:
    """Parse /proc/modules.

    Line format (kernel/module/procfs.c): ``name size refcnt holders state addr
    [taint]`` where refcnt and holders are ``-`` without CONFIG_MODULE_UNLOAD,
    holders is ``-`` or ``a,b,`` and may contain ``[permanent],`` for a module
    with an init but no exit function.
    """
    result: dict[str, LoadedModule] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        name, size, refcnt, holders_field, state = fields[:5]
        try:
            size_i = int(size)
        except ValueError:
            continue
        refcount = None if refcnt == "-" else int(refcnt) if refcnt.isdigit() else None
        holders: list[str] = []
        permanent = False
        if holders_field != "-":
            for h in holders_field.split(","):
                if not h:
                    continue
                if h == "[permanent]":
                    permanent = True
                else:
                    holders.append(h)
        result[name] = LoadedModule(name=name, size=size_i, refcount=refcount,
                                    holders=tuple(holders), state=state, permanent=permanent)
    return result


def _read(path: Path | str) -> str | None:
    """A small procfs/sysfs file, None when it cannot be read.  Plain os
    calls: initstate is read for every step of every request."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


class KernelState:
    """Read-only kernel state from procfs and sysfs under ``root``."""

    def __init__(self, root: Root | None = None) -> None:
        self.root = root or Root()

    def _module_dir(self, name: str) -> Path:
        # Names come from requests (uevents, the kernel, admins): never let one
        # walk out of /sys/module.  An impossible name maps to a missing entry.
        if not name or "/" in name or "\0" in name or name.startswith("."):
            return self.root.path("sys/module") / ".invalid-module-name"
        return self.root.path("sys/module") / name

    def modules(self) -> dict[str, LoadedModule]:
        text = _read(self.root.path("proc/modules"))
        return {} if text is None else parse_proc_modules(text)

    def initstate(self, name: str) -> InitState:
        moddir = os.fspath(self._module_dir(name))
        initstate = moddir + "/initstate"
        text = _read(initstate)
        if text is not None:
            try:
                return InitState(text.strip())
            except ValueError:
                return InitState.LIVE
        # Built-in modules get a /sys/module directory (for parameters or a
        # version) but no initstate.  Checking for the directory after the read
        # avoids reporting BUILTIN for a module that vanished in between.
        if os.path.isdir(moddir) and not os.path.exists(initstate):
            return InitState.BUILTIN
        return InitState.ABSENT

    def refcount(self, name: str) -> int | None:
        text = _read(self._module_dir(name) / "refcnt")
        if text is not None and text.strip().lstrip("-").isdigit():
            return int(text.strip())
        mod = self.modules().get(name)
        return None if mod is None else mod.refcount

    def holders(self, name: str) -> tuple[str, ...]:
        try:
            return tuple(sorted(os.listdir(self._module_dir(name) / "holders")))
        except OSError:
            mod = self.modules().get(name)
            return () if mod is None else mod.holders

    def bound_devices(self, name: str) -> int:
        # /sys/module/NAME/drivers/BUS:DRIVER -> the driver directory, whose
        # device entries are symlinks into /sys/devices (next to files like
        # bind/unbind/uevent and the "module" link back to us).
        count = 0
        try:
            drivers = list((self._module_dir(name) / "drivers").iterdir())
        except OSError:
            return 0
        for driver in drivers:
            try:
                entries = list(driver.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.name == "module" or not entry.is_symlink():
                    continue
                try:
                    target = os.readlink(entry)
                except OSError:
                    continue
                if "devices/" in target:
                    count += 1
        return count

    def instance(self, name: str) -> str | None:
        # The inode number of /sys/module/NAME.  The kernel makes that kernfs
        # directory anew on every load (mod_sysfs_setup), and a kernfs inode
        # number is the node's 64-bit id, an idr slot plus a generation
        # (kernfs_id_ino), so it is not reused by the next load.  Chosen over
        # the core address in /proc/modules or sections/.text: those read as
        # 0 without CAP_SYSLOG (kallsyms_show_value), which kmodd's unit
        # does not keep.  Readable by anyone; no module is made to pay for it.
        moddir = os.fspath(self._module_dir(name))
        try:
            st = os.stat(moddir)
            if not os.path.exists(moddir + "/initstate"):
                return None          # built-in: never loaded, never unloaded
        except OSError:
            return None
        return f"sysfs:{st.st_ino}"

    def parameters(self, name: str) -> dict[str, str]:
        result: dict[str, str] = {}
        try:
            entries = sorted((self._module_dir(name) / "parameters").iterdir())
        except OSError:
            return result
        for entry in entries:
            text = _read(entry)  # write-only parameters cannot be read: skip them
            if text is not None:
                result[entry.name] = text.rstrip("\n")
        return result

    def modules_disabled(self) -> bool:
        return errors.modules_disabled(self.root)

    def supports_modules(self) -> bool:
        return self.root.path("proc/modules").exists()

    def link_kinds(self) -> set[str]:
        from kmodd.kernel.netlink import link_kinds

        # Every network namespace: rmmod of a link type's module deletes its
        # links in all of them (rtnl_link_unregister).
        return link_kinds(proc=self.root.path("proc"), run_netns=self.root.path("run/netns"))

    def kernel_compression(self) -> str | None:
        """The algorithm the kernel decompresses itself (/sys/module/compression), if any."""
        text = _read(self.root.path("sys/module/compression"))
        return text.strip() if text else None


class SyscallKernel(KernelState):
    """The Kernel protocol over three raw syscalls supplied by a subclass.

    The raw methods return 0 or raise OSError with the kernel's errno.  They
    also receive the module name, which the real kernel reads from the image
    itself but a simulation needs to be told.
    """

    def __init__(self, root: Root | None = None) -> None:
        super().__init__(root)
        # Set once a syscall answered ENOSYS: the kernel has no module support,
        # and asking again for every uevent would only spam the log.
        self.no_module_support = False
        self._lock = threading.Lock()

    # -- raw syscalls ---------------------------------------------------------
    def _finit_module(self, name: str, fd: int, params: bytes, flags: int) -> None:
        raise NotImplementedError

    def _init_module(self, name: str, image: bytes, params: bytes) -> None:
        raise NotImplementedError

    def _delete_module(self, name: str, flags: int) -> None:
        raise NotImplementedError

    # -- protocol -------------------------------------------------------------
    def _mark_no_support(self) -> None:
        with self._lock:
            self.no_module_support = True

    def load_module(self, name: str, path: str, params: str = "", *,
                    force: bool = False) -> bool:
        """Insert ``path``; True when inserted, False when it was already loaded (EEXIST)."""
        if self.no_module_support:
            raise errors.load_error(E.ENOSYS, name, path=path, root=self.root)
        flags = (MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC) if force else 0
        pbytes = params.encode()
        try:
            self._insert(name, path, pbytes, flags)
        except OSError as e:
            code = e.errno or E.EIO
            if code == E.EEXIST and self.initstate(name) is not InitState.ABSENT:
                return False
            if code == E.EEXIST:
                # The module's own init returned -EEXIST (a cpufreq driver when
                # another is registered): nothing is loaded, so it failed.
                raise KernelError(code, f"{name}: module initialisation failed: "
                                  f"{os.strerror(code)} (see dmesg)", name) from None
            if code == E.ENOSYS:
                self._mark_no_support()
            raise errors.load_error(code, name, path=path, params=params,
                                    root=self.root) from None
        return True

    def _insert(self, name: str, path: str, params: bytes, flags: int) -> None:
        # Imported here: kmodd.modfile pulls in the codec backends lazily anyway,
        # and a daemon that never loads a module need not import it at all.
        from kmodd.modfile import (
            Compression,
            ModuleFileError,
            detect_compression,
            read_module_image,
        )

        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError(e.errno or E.ENOENT,
                              f"{name}: cannot open {path}: {e.strerror}", name) from None
        try:
            kind = detect_compression(os.pread(fd, 8, 0))
            if kind is Compression.NONE:
                try:
                    self._finit_module(name, fd, params, flags)
                    return
                except OSError as e:
                    # Like libkmod: only a kernel without finit_module falls back.
                    if e.errno != E.ENOSYS:
                        raise
            elif self.kernel_compression() == kind.value:
                self._finit_module(name, fd, params, flags | MODULE_INIT_COMPRESSED_FILE)
                return
        finally:
            os.close(fd)
        # Compressed for an algorithm the kernel does not decompress (Debian 12:
        # none), a forced load, or no finit_module: hand the kernel the image.
        try:
            image = read_module_image(path)
        except ModuleFileError as e:
            raise KernelError(E.ENOEXEC, f"{name}: {e}", name) from None
        if flags:
            # init_module() has no flags; libkmod strips __versions/vermagic
            # with its ELF editor for this.  We do not forge images: refuse.
            raise KernelError(E.EINVAL, f"{name}: a forced load needs finit_module on an "
                              "uncompressed module file", name)
        self._init_module(name, image, params)

    def unload_module(self, name: str, *, force: bool = False) -> None:
        if self.no_module_support:
            raise errors.unload_error(E.ENOSYS, name, root=self.root)
        flags = os.O_NONBLOCK | (os.O_TRUNC if force else 0)
        try:
            self._delete_module(name, flags)
        except OSError as e:
            code = e.errno or E.EIO
            if code == E.ENOSYS:
                self._mark_no_support()
            raise errors.unload_error(code, name, holders=self.holders(name),
                                      root=self.root) from None


class RealKernel(SyscallKernel):
    """The running kernel, through ctypes ``syscall(2)``."""

    def __init__(self, root: Root | None = None) -> None:
        super().__init__(root)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long

    def _call(self, *args: object) -> None:
        ret = self._syscall(*args)
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _finit_module(self, name: str, fd: int, params: bytes, flags: int) -> None:
        self._call(ctypes.c_long(SYS_FINIT_MODULE), ctypes.c_int(fd), ctypes.c_char_p(params),
                   ctypes.c_int(flags))

    def _init_module(self, name: str, image: bytes, params: bytes) -> None:
        buf = ctypes.create_string_buffer(image, len(image))
        self._call(ctypes.c_long(SYS_INIT_MODULE), buf, ctypes.c_ulong(len(image)),
                   ctypes.c_char_p(params))

    def _delete_module(self, name: str, flags: int) -> None:
        self._call(ctypes.c_long(SYS_DELETE_MODULE), ctypes.c_char_p(name.encode()),
                   ctypes.c_uint(flags))
