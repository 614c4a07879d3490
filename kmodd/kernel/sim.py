"""A simulated kernel on a temporary tree, for fast unit and fault-injection tests.

Only the three syscalls are simulated; everything above them (compression
handling, errno mapping, reading /proc/modules and /sys/module) is the real
code from :mod:`kmodd.kernel.real`, reading the files this class keeps up to
date under ``tree_root``.  Semantics follow Linux 6.x:

* a module's hard dependencies must be live, or the load fails with ENOENT
  ("unknown symbol"), so ordering bugs in a caller surface like on a real kernel;
* loading a module that is ``coming`` waits for the first load to finish, then
  gets EEXIST if it went live and EBUSY if it failed;
* delete_module() of a module with holders or a reference answers EWOULDBLOCK,
  of a module that is not live EBUSY, of an unknown one ENOENT;
* unknown parameters are ignored with a dmesg line, like the kernel does.
"""

from __future__ import annotations

import errno as E
import os
import threading
import time
from pathlib import Path

from kmodd.kernel.real import MODULE_INIT_COMPRESSED_FILE, SyscallKernel
from kmodd.record import dataclass, field
from kmodd.root import Root

# Only what the real kernel's module needs is imported before the head start's
# first insert (kmodd.cli.daemon makes this kernel first): the rest on use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from kmodd.resolution.plan import Plan

_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class Syscall:
    """One simulated syscall, as the test log records it."""

    call: str            # "finit_module" | "init_module" | "delete_module"
    name: str
    params: str = ""
    flags: int = 0
    thread: str = ""
    result: int = 0      # 0 or the errno returned


@dataclass
class _Module:
    name: str
    state: str                       # "coming" | "live" | "going"
    size: int
    params: dict[str, str]
    uses: tuple[str, ...] = ()       # modules this one depends on
    holders: set[str] = field(default_factory=set)
    users: int = 0                   # references that are not modules (open devices...)
    permanent: bool = False
    devices: dict[str, list[str]] = field(default_factory=dict)   # driver -> device names
    serial: int = 0                  # which load this is: a new identity every time

    @property
    def refcount(self) -> int:
        return len(self.holders) + self.users


def _parse_params(params: str) -> list[tuple[str, str]]:
    # The kernel's next_arg(): whitespace-separated, double quotes group.
    import shlex

    out: list[tuple[str, str]] = []
    try:
        words = shlex.split(params, posix=True)
    except ValueError:
        words = params.split()
    for word in words:
        key, _, value = word.partition("=")
        out.append((key.replace("-", "_"), value))
    return out


class SimKernel(SyscallKernel):
    """The Kernel protocol over a simulated module table; thread-safe."""

    def __init__(self, tree_root: Path, *, deps: Mapping[str, Sequence[str]] | None = None,
                 builtin: Iterable[str] = (), compression: str | None = None,
                 module_params: Mapping[str, Mapping[str, str]] | None = None,
                 load_errors: Mapping[str, int] | None = None,
                 unload_errors: Mapping[str, int] | None = None,
                 init_delays: Mapping[str, float] | None = None,
                 exit_delays: Mapping[str, float] | None = None,
                 permanent: Iterable[str] = (),
                 supports_modules: bool = True, modules_disabled: bool = False,
                 keep_images: bool = True) -> None:
        super().__init__(Root(base=Path(tree_root)))
        self.tree_root = Path(tree_root)
        self.deps: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in (deps or {}).items()}
        self.module_params = {k: dict(v) for k, v in (module_params or {}).items()}
        self.load_errors = dict(load_errors or {})
        self.unload_errors = dict(unload_errors or {})
        self.init_delays = dict(init_delays or {})
        self.exit_delays = dict(exit_delays or {})   # the module stays "going" meanwhile
        self.builtin = set(builtin)
        self.permanent = set(permanent)     # init without exit: can never be unloaded
        self.compression = compression
        self._has_modules = supports_modules
        self._cond = threading.Condition()
        self._mods: dict[str, _Module] = {}
        self.syscalls: list[Syscall] = []
        self.images: dict[str, bytes] = {}      # the (decompressed) image each load handed in
        # A daemon run against the simulator keeps no copies: a real kernel's
        # modules do not live in kmodd's memory either.
        self.keep_images = keep_images
        self.dmesg: list[str] = []
        self.load_order: list[str] = []         # modules in the order they went live
        self.concurrent = 0
        self.max_concurrent_seen = 0
        self.links: dict[str, str] = {}        # network interface -> its kind
        # Other network namespaces (containers): name -> {interface: kind}; and
        # one that cannot be read (a race, a denial): its name.
        self.netns_links: dict[str, dict[str, str]] = {}
        self.netns_unreadable = ""
        self._serial = 0
        self._write_static(modules_disabled)
        self._write_state()

    # -- configuration ------------------------------------------------------------
    def learn_plan(self, plan: Plan) -> None:
        """Take each step's hard dependencies as the module's symbol providers."""
        with self._cond:
            for step in plan.steps:
                self.deps.setdefault(step.name, tuple(step.deps))

    def link_kinds(self) -> set[str]:
        """Kinds of the links in every namespace, as the real kernel layer answers."""
        with self._cond:
            if self.netns_unreadable:
                raise OSError(E.EACCES, "cannot list the links of network namespace "
                              f"{self.netns_unreadable}")
            kinds = set(self.links.values())
            for links in self.netns_links.values():
                kinds |= set(links.values())
            return kinds

    def instance(self, name: str) -> str | None:
        """A new identity per load (the real kernel's is a new sysfs inode,
        which a temporary tree's filesystem may well reuse)."""
        with self._cond:
            mod = self._mods.get(name)
            return None if mod is None else f"sim:{mod.serial}"

    def set_users(self, name: str, users: int) -> None:
        """Non-module references (an open device node, a mounted filesystem...)."""
        with self._cond:
            self._mods[name].users = users
            self._write_state()

    def bind_device(self, name: str, driver: str, device: str, bus: str = "pci") -> None:
        with self._cond:
            self._mods[name].devices.setdefault(f"{bus}:{driver}", []).append(device)
            self._write_state()

    def set_modules_disabled(self, value: bool) -> None:
        with self._cond:
            self._write_static(value)

    def loaded(self) -> dict[str, str]:
        """name -> state, straight from the simulation (not via the files)."""
        with self._cond:
            return {n: m.state for n, m in self._mods.items()}

    # -- files ------------------------------------------------------------------
    def _write_static(self, modules_disabled: bool) -> None:
        sysmod = self.tree_root / "sys/module"
        sysmod.mkdir(parents=True, exist_ok=True)
        (self.tree_root / "sys/devices").mkdir(parents=True, exist_ok=True)
        kernel = self.tree_root / "proc/sys/kernel"
        kernel.mkdir(parents=True, exist_ok=True)
        (kernel / "modules_disabled").write_text("1\n" if modules_disabled else "0\n")
        if self.compression:
            (sysmod / "compression").write_text(self.compression + "\n")
        for name in self.builtin:
            (sysmod / name).mkdir(exist_ok=True)

    @staticmethod
    def _atomic_write(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _write_state(self) -> None:
        """Rewrite proc/modules and sys/module/* from the table; caller holds the lock."""
        if self._has_modules:
            lines = []
            for i, m in enumerate(reversed(list(self._mods.values()))):
                holders = "".join(f"{h}," for h in sorted(m.holders))
                if m.permanent:
                    holders += "[permanent],"
                state = {"coming": "Loading", "live": "Live", "going": "Unloading"}[m.state]
                lines.append(f"{m.name} {m.size} {m.refcount} {holders or '-'} {state} "
                             f"0xffffffffc{i:07x}000\n")
            self._atomic_write(self.tree_root / "proc/modules", "".join(lines))
        sysmod = self.tree_root / "sys/module"
        for entry in list(sysmod.iterdir()):
            if entry.is_dir() and entry.name not in self._mods and entry.name not in self.builtin:
                # Vanish atomically too: rename away first, then delete.
                gone = sysmod / f".{entry.name}.gone"
                os.rename(entry, gone)
                _rmtree(gone)
        for m in self._mods.values():
            d = sysmod / m.name
            if not d.exists():
                # Appear with initstate already inside: a directory without it
                # means "built-in" to readers (as in sysfs, where both come at once).
                fresh = sysmod / f".{m.name}.new"
                fresh.mkdir()
                (fresh / "initstate").write_text(m.state + "\n")
                os.rename(fresh, d)
            self._atomic_write(d / "initstate", m.state + "\n")
            self._atomic_write(d / "refcnt", f"{m.refcount}\n")
            self._sync_links(d / "holders", {h: f"../../{h}" for h in m.holders})
            pdir = d / "parameters"
            pdir.mkdir(exist_ok=True)
            for key, value in m.params.items():
                self._atomic_write(pdir / key, value + "\n")
            drivers = d / "drivers"
            drivers.mkdir(exist_ok=True)
            for driver, devices in m.devices.items():
                ddir = self.tree_root / "sys/bus" / driver.split(":")[0] / "drivers" / \
                    driver.split(":", 1)[1]
                ddir.mkdir(parents=True, exist_ok=True)
                for fname in ("bind", "unbind", "uevent"):
                    (ddir / fname).touch()
                links = {dev: f"../../../../devices/pci0000:00/{dev}" for dev in devices}
                links["module"] = f"../../../../module/{m.name}"
                self._sync_links(ddir, links, keep_files=True)
                self._sync_links(drivers, {driver: os.path.relpath(ddir, drivers)})

    @staticmethod
    def _sync_links(directory: Path, links: Mapping[str, str], keep_files: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for entry in directory.iterdir():
            if entry.is_symlink() and entry.name not in links:
                entry.unlink()
            elif not keep_files and not entry.is_symlink() and entry.name not in links:
                _rmtree(entry)
        for name, target in links.items():
            link = directory / name
            if not link.is_symlink():
                link.symlink_to(target)

    # -- simulated syscalls -------------------------------------------------------
    def _log(self, call: str, name: str, params: bytes, flags: int, result: int) -> None:
        self.syscalls.append(Syscall(call, name, params.decode(errors="replace"), flags,
                                     threading.current_thread().name, result))

    def _fail(self, call: str, name: str, params: bytes, flags: int, code: int) -> None:
        self._log(call, name, params, flags, code)
        raise OSError(code, os.strerror(code))

    def _finit_module(self, name: str, fd: int, params: bytes, flags: int) -> None:
        if not self.keep_images and not flags & MODULE_INIT_COMPRESSED_FILE:
            # The kernel reads the file itself; only the ELF magic matters here.
            self._load("finit_module", name, os.pread(fd, 4, 0), params, flags)
            return
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        if flags & MODULE_INIT_COMPRESSED_FILE:
            from kmodd.modfile import Compression, ModuleFileError, decompress, detect_compression

            kind = detect_compression(data)
            if self.compression is None or kind is Compression.NONE \
                    or kind.value != self.compression:
                with self._cond:
                    self._fail("finit_module", name, params, flags, E.EOPNOTSUPP)
            try:
                data = decompress(data, kind)
            except ModuleFileError:
                with self._cond:
                    self._fail("finit_module", name, params, flags, E.ENOEXEC)
        self._load("finit_module", name, data, params, flags)

    def _init_module(self, name: str, image: bytes, params: bytes) -> None:
        self._load("init_module", name, image, params, 0)

    def _load(self, call: str, name: str, image: bytes, params: bytes, flags: int) -> None:
        with self._cond:
            if not self._has_modules:
                self._fail(call, name, params, flags, E.ENOSYS)
            if (self.tree_root / "proc/sys/kernel/modules_disabled").read_text().strip() == "1":
                self._fail(call, name, params, flags, E.EPERM)
            if not image.startswith(_ELF_MAGIC):
                self._fail(call, name, params, flags, E.ENOEXEC)
            # add_unformed_module(): wait while another load of the same name is
            # in flight, then EEXIST if it went live, EBUSY if it failed/goes away.
            waited = False
            while name in self._mods and self._mods[name].state == "coming":
                waited = True
                self._cond.wait()
            if name in self._mods:
                self._fail(call, name, params, flags,
                           E.EEXIST if self._mods[name].state == "live" else E.EBUSY)
            if waited:
                self._fail(call, name, params, flags, E.EBUSY)
            if name in self.builtin:
                self._fail(call, name, params, flags, E.EEXIST)
            uses = self.deps.get(name, ())
            missing = [d for d in uses
                       if d not in self.builtin and
                       (d not in self._mods or self._mods[d].state != "live")]
            if missing:
                self.dmesg.append(f"{name}: Unknown symbol (needs {', '.join(missing)})")
                self._fail(call, name, params, flags, E.ENOENT)
            declared = dict(self.module_params.get(name, {}))
            for key, value in _parse_params(params.decode(errors="replace")):
                if key in declared:
                    declared[key] = value
                else:
                    self.dmesg.append(f"{name}: unknown parameter '{key}' ignored")
            self._serial += 1
            mod = _Module(name=name, state="coming", size=len(image), params=declared,
                          uses=tuple(d for d in uses if d not in self.builtin),
                          permanent=name in self.permanent, serial=self._serial)
            self._mods[name] = mod
            for d in mod.uses:
                self._mods[d].holders.add(name)
            if self.keep_images:
                self.images[name] = image
            self._log(call, name, params, flags, 0)
            self.concurrent += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self.concurrent)
            self._write_state()
        delay = self.init_delays.get(name, 0.0)
        if delay:
            time.sleep(delay)      # the module's init function, outside the lock
        with self._cond:
            self.concurrent -= 1
            code = self.load_errors.get(name, 0)
            if code:
                del self._mods[name]
                for d in mod.uses:
                    self._mods[d].holders.discard(name)
                self.dmesg.append(f"{name}: init failed with {code}")
                self._write_state()
                self._cond.notify_all()
                # The syscall itself was logged as started; record how it ended.
                self._log(call + ":init", name, params, flags, code)
                raise OSError(code, os.strerror(code))
            mod.state = "live"
            self.load_order.append(name)
            self._write_state()
            self._cond.notify_all()

    def _delete_module(self, name: str, flags: int) -> None:
        with self._cond:
            call, p = "delete_module", b""
            if not self._has_modules:
                self._fail(call, name, p, flags, E.ENOSYS)
            if (self.tree_root / "proc/sys/kernel/modules_disabled").read_text().strip() == "1":
                self._fail(call, name, p, flags, E.EPERM)
            mod = self._mods.get(name)
            if mod is None:
                self._fail(call, name, p, flags, E.ENOENT)
                return
            if mod.holders:
                self._fail(call, name, p, flags, E.EWOULDBLOCK)
            if mod.state != "live" or mod.permanent:
                self._fail(call, name, p, flags, E.EBUSY)
            if mod.users and not flags & os.O_TRUNC:
                self._fail(call, name, p, flags, E.EWOULDBLOCK)
            code = self.unload_errors.get(name, 0)
            if code:
                self._fail(call, name, p, flags, code)
            delay = self.exit_delays.get(name, 0.0)
            if delay:
                mod.state = "going"
                self._write_state()
        if delay:
            time.sleep(delay)      # the module's exit function, outside the lock
        with self._cond:
            del self._mods[name]
            for d in mod.uses:
                if d in self._mods:
                    self._mods[d].holders.discard(name)
            self._log(call, name, p, flags, 0)
            self._write_state()
            self._cond.notify_all()


def modules_dep_names(moddir: Path) -> dict[str, tuple[str, ...]]:
    """module -> its modules.dep dependencies, as names: a ``deps`` map for SimKernel."""
    from kmodd.resolution.names import modname_normalize

    result: dict[str, tuple[str, ...]] = {}
    for line in (Path(moddir) / "modules.dep").read_text().splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            result[modname_normalize(path)] = tuple(modname_normalize(d) for d in rest.split())
    return result


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for entry in path.iterdir():
        _rmtree(entry)
    path.rmdir()
