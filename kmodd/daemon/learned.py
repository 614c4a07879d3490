"""Learned coldplug order: start the longest chains of module inits first.

At coldplug a loader is done when the slowest chain of inits is done (on the
benchmark machine: scsi_common -> scsi_mod -> scsi_transport_spi ->
sym53c8xx, whose init scans its bus for seconds, and since Linux 5.18
``do_init_module()`` ends every init with ``async_synchronize_full()``, so
inits finishing meanwhile wait for it too).  The order of the walk of
``/sys/devices`` says nothing about that; the last boot's load log does.

kmodd notes every load (init time, the module's hard dependencies, its
file's identity) and every device request's plan: which device's modalias
asked for which target modules, whoever inserted them (at boot udev loads
drivers until kmodd is ready: those are learned untimed, and the next head
start inserts them too).  After coldplug it merges this into ``/var/lib/kmodd/learned.json``
(a thread of its own, never on the way to the first load).  At the next
coldplug the devices known from that file, whose ``modalias`` still reads
the same, are submitted first, heaviest chain first, before the walk of
``/sys/devices`` even starts; the walk then adds the rest in its own order.

What is remembered is thrown away when it could mislead: everything when the
kernel release differs, a module's timing when its file's size or mtime
changed (or it is gone).  A damaged or foreign file is ignored (and
replaced at the next save).  None of udevd, modprobe or mdevd does this.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from kmodd.kernel.early import EarlyLoads, EarlyModule
from kmodd.record import dataclass, replace

# The head start runs this module before the daemon has imported logging or
# typing (kmodd.cli.daemon): logging is imported when a line is written,
# typing by type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

    from kmodd.daemon.settings import Settings
    from kmodd.kernel.protocol import Kernel
    from kmodd.resolution.plan import Plan
    from kmodd.root import Root


def _log() -> logging.Logger:
    import logging
    return logging.getLogger(__name__)

FORMAT = 1
LEARNED_FILE = "learned.json"       # under the state directory (Root.state_dir)
MAX_MODULES = 8192
MAX_DEVICES = 4096
MAX_FILE = 4 * 1024 * 1024
MAX_DEPTH = 64
# The devices map also keeps the plans of modules-load.d entries, under this
# prefix and the name as listed, with no devpath (never a coldplug device).
LISTED = "modules-load:"


@dataclass(frozen=True)
class ModuleTiming:
    """One module as last loaded: its init time and what identifies its file."""

    init: float                       # seconds in the load syscall
    deps: tuple[str, ...] = ()        # its own hard dependencies (modules.dep)
    path: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    options: str | None = None        # as inserted; None: unknown (no head start)

    def to_dict(self) -> dict[str, Any]:
        return {"init": self.init, "deps": list(self.deps), "path": self.path,
                "size": self.size, "mtime_ns": self.mtime_ns, "options": self.options}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleTiming:
        init = float(d["init"])
        if not 0.0 <= init < 3600.0:
            raise ValueError(f"init time {init!r}")
        deps = d.get("deps") or []
        if not isinstance(deps, list) or not all(isinstance(x, str) for x in deps):
            raise ValueError("deps")
        path = d.get("path")
        size, mtime = d.get("size"), d.get("mtime_ns")
        if path is not None and not isinstance(path, str):
            raise ValueError("path")
        if (size is not None and not isinstance(size, int)) or \
                (mtime is not None and not isinstance(mtime, int)):
            raise ValueError("size/mtime_ns")
        options = d.get("options")
        if options is not None and (not isinstance(options, str) or "\0" in options):
            raise ValueError("options")
        return cls(init, tuple(deps), path, size, mtime, options)


def file_identity(path: str | None) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a module file; (None, None) when it has none or is gone."""
    if path is None:
        return None, None
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


class Learned:
    """What earlier boots taught: module timings and each device's target modules."""

    def __init__(self, kernel: str, modules: Mapping[str, ModuleTiming] | None = None,
                 devices: Mapping[str, tuple[str, tuple[str, ...]]] | None = None, *,
                 stamp: str | None = None, soft: Iterable[str] = (),
                 cmdline: Mapping[str, str] | None = None) -> None:
        self.kernel = kernel
        self.modules: dict[str, ModuleTiming] = dict(modules or {})
        # modalias -> (devpath, target modules)
        self.devices: dict[str, tuple[str, tuple[str, ...]]] = dict(devices or {})
        # The configuration the options were resolved under (config_stamp).
        self.stamp = stamp
        # Devices whose plan had softdeps: their order is more than modules.dep's.
        self.soft: set[str] = set(soft)
        # Each known module's parameters on the kernel command line (module_params).
        self.cmdline: dict[str, str] = dict(cmdline or {})

    def forget_options_changed_on(self, cmdline: Mapping[str, str]) -> None:
        """Modules whose command-line parameters differ from ``cmdline``'s lose
        their remembered options (kmod adds ``MODULE.PARAM=`` to them)."""
        for name, timing in self.modules.items():
            if timing.options is not None and \
                    self.cmdline.get(name, "") != cmdline.get(name, ""):
                self.modules[name] = replace(timing, options=None)

    def chain(self, module: str, _memo: dict[str, float] | None = None,
              _path: frozenset[str] = frozenset()) -> float:
        """Seconds of the longest chain of inits ending with ``module``'s: its own
        init after its slowest dependency's chain (unknown modules count 0)."""
        memo = {} if _memo is None else _memo
        if module in memo:
            return memo[module]
        timing = self.modules.get(module)
        # Unknown, a cycle or an absurd depth (real chains are a few modules
        # long): bad data must cost neither a loop nor the recursion limit.
        if timing is None or module in _path or len(_path) >= MAX_DEPTH:
            return 0.0
        inner = _path | {module}
        value = timing.init + max((self.chain(d, memo, inner) for d in timing.deps),
                                  default=0.0)
        memo[module] = value
        return value

    def weight(self, modalias: str) -> float:
        """The longest chain a device's request started last time."""
        entry = self.devices.get(modalias)
        if entry is None:
            return 0.0
        memo: dict[str, float] = {}
        return max((self.chain(m, memo) for m in entry[1]), default=0.0)

    def first(self, read_modalias: Callable[[str], str | None], *,
              unweighted: bool = False) -> list[tuple[str, str]]:
        """``(devpath, modalias)`` of the known devices still present with the same
        modalias, heaviest chain first (ties: modalias order, for stable runs);
        with ``unweighted`` also those whose modules no boot has timed, last."""
        memo: dict[str, float] = {}
        ranked = []
        for modalias, (devpath, targets) in self.devices.items():
            weight = max((self.chain(m, memo) for m in targets), default=0.0)
            if weight > 0.0 or unweighted:
                ranked.append((-weight, modalias, devpath))
        ranked.sort()
        out = []
        for _, modalias, devpath in ranked:
            if read_modalias(devpath) == modalias:
                out.append((devpath, modalias))
        return out

    def head_start(self, read_modalias: Callable[[str], str | None],
                   present: Callable[[str], bool], listed: Iterable[str] = ()
                   ) -> list[EarlyModule]:
        """What to insert before the daemon has read an index: first the
        modules-load.d entries ``listed`` now whose plan is known (READY=1, and
        so sysinit.target, waits for them), then for each known device still
        present with the same modalias (heaviest chain first), its targets
        and their dependencies, dependencies first, when every module of the chain
        is known with its file and options or already present.  Plans with
        softdeps are left to the daemon (their order is not modules.dep's).
        Devices whose modules someone else loaded last time (udev, before kmodd
        was ready) come last: nothing timed them."""
        chosen: dict[str, EarlyModule] = {}
        keys = [LISTED + name for name in listed if LISTED + name in self.devices]
        keys += [modalias for _, modalias in self.first(read_modalias, unweighted=True)]
        for key in keys:
            if key in self.soft:
                continue
            adding: dict[str, EarlyModule] = {}
            if all(self._chain_into(t, chosen, adding, present, frozenset())
                   for t in self.devices[key][1]):
                chosen.update(adding)
        return list(chosen.values())

    def _chain_into(self, name: str, chosen: Mapping[str, EarlyModule],
                    adding: dict[str, EarlyModule], present: Callable[[str], bool],
                    path: frozenset[str]) -> bool:
        if name in chosen or name in adding or present(name):
            return True
        timing = self.modules.get(name)
        if timing is None or timing.path is None or timing.options is None or \
                name in path or len(path) >= MAX_DEPTH:
            return False
        inner = path | {name}
        if not all(self._chain_into(d, chosen, adding, present, inner) for d in timing.deps):
            return False
        adding[name] = EarlyModule(name, timing.path, timing.options, timing.deps)
        return True

    def valid(self, kernel: str,
              identity: Callable[[str | None], tuple[int | None, int | None]] = file_identity
              ) -> Learned:
        """What still holds for this kernel: module timings whose file is unchanged."""
        if kernel != self.kernel:
            return Learned(kernel)
        kept = {name: t for name, t in self.modules.items()
                if t.path is None or identity(t.path) == (t.size, t.mtime_ns)}
        return Learned(kernel, kept, self.devices, stamp=self.stamp, soft=self.soft,
                       cmdline=self.cmdline)

    def to_dict(self) -> dict[str, Any]:
        def device(alias: str, devpath: str, targets: tuple[str, ...]) -> dict[str, Any]:
            d: dict[str, Any] = {"devpath": devpath, "targets": list(targets)}
            if alias in self.soft:
                d["soft"] = True
            return d
        return {"format": FORMAT, "kernel": self.kernel, "stamp": self.stamp,
                "cmdline": dict(sorted(self.cmdline.items())),
                "modules": {n: t.to_dict() for n, t in sorted(self.modules.items())},
                "devices": {a: device(a, d, t) for a, (d, t) in sorted(self.devices.items())}}

    @classmethod
    def from_dict(cls, data: Any) -> Learned:
        """Raises ValueError (TypeError, KeyError) on anything not written by to_dict."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a learned-order file of this format")
        kernel = data.get("kernel")
        modules, devices = data.get("modules"), data.get("devices")
        if not isinstance(kernel, str) or not isinstance(modules, dict) or \
                not isinstance(devices, dict):
            raise ValueError("missing kernel, modules or devices")
        stamp = data.get("stamp")
        if stamp is not None and not isinstance(stamp, str):
            raise ValueError("stamp")
        cmdline = data.get("cmdline") or {}
        if not isinstance(cmdline, dict) or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in cmdline.items()):
            raise ValueError("cmdline")
        mods = {str(n): ModuleTiming.from_dict(t) for n, t in modules.items()}
        devs: dict[str, tuple[str, tuple[str, ...]]] = {}
        soft = set()
        for alias, d in devices.items():
            devpath, targets = d["devpath"], d["targets"]
            if not isinstance(devpath, str) or not isinstance(targets, list) or \
                    not all(isinstance(t, str) for t in targets):
                raise ValueError(f"device {alias!r}")
            devs[str(alias)] = (devpath, tuple(targets))
            if d.get("soft") is True:
                soft.add(str(alias))
        return cls(kernel, mods, devs, stamp=stamp, soft=soft, cmdline=cmdline)


def read(path: Path, kernel: str) -> Learned:
    """The valid part of the file for this kernel; empty (logged) when unusable."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE + 1)
        if len(raw) > MAX_FILE:
            raise ValueError("file too large")
        return Learned.from_dict(json.loads(raw)).valid(kernel)
    except FileNotFoundError:
        return Learned(kernel)
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        # RecursionError: json.loads of a deeply nested document.
        _log().warning("ignoring the learned coldplug order in %s: %s", path, exc)
        return Learned(kernel)


def write(path: Path, learned: Learned) -> None:
    """Atomically (state.write_atomically), mode 0644; not fsynced: losing the
    lesson in a crash only costs the next boot its order."""
    from kmodd.daemon.state import write_atomically
    write_atomically(path, json.dumps(learned.to_dict(), separators=(",", ":")).encode(),
                     mode=0o644, prefix=".learned.", durable=False)


class LearnedOrder:
    """The daemon's side: the order for this coldplug, the notes for the next.

    ``note`` is called by the workers for every load (a dict update under a
    lock); ``first`` by the coldplug thread; ``save`` after coldplug, in a
    thread (it stats module files and writes the file).
    """

    def __init__(self, path: Path, kernel: str, sys_dir: Path,
                 stamp: Callable[[], str] | None = None,
                 cmdline: Callable[[], str] | None = None,
                 listed: Callable[[], list[str]] | None = None) -> None:
        self.path = path
        self.kernel = kernel
        self.sys_dir = sys_dir
        self._stamp = stamp
        self._cmdline = cmdline
        # The names modules-load.d lists now, when the daemon loads the lists.
        self._listed = listed
        self._lock = threading.Lock()
        self._modules: dict[str, tuple[float, tuple[str, ...], str | None, str | None]] = {}
        # Modules of device plans, timed or not: (deps, path or None, options).
        self._planned: dict[str, tuple[tuple[str, ...], str | None, str]] = {}
        self._devices: dict[str, tuple[str, set[str]]] = {}
        self._soft: set[str] = set()
        # The file as head_start() read it, for the coldplug's first(): one read.
        self._read_once: Learned | None = None
        # Why the last head_start() gave nothing, for the journal.
        self.head_start_note = ""

    def _read_modalias(self, devpath: str) -> str | None:
        # Only what the walk itself would find: a device under /sys/devices.
        if not devpath.startswith("/devices/") or "/../" in devpath + "/":
            return None
        try:
            with open(os.path.join(self.sys_dir, devpath.lstrip("/"), "modalias"), "rb") as f:
                return f.read(4096).rstrip(b"\n").decode("ascii", "replace")
        except (OSError, ValueError):
            return None

    def first(self) -> list[tuple[str, str]]:
        """The known devices to submit before the walk, heaviest chain first
        (empty when nothing usable was learned; never raises)."""
        learned, self._read_once = self._read_once, None
        try:
            if learned is None:
                learned = read(self.path, self.kernel)
            return learned.first(self._read_modalias)
        except Exception as exc:
            _log().warning("learned coldplug order unusable: %s", exc)
            return []

    def _present(self, name: str) -> bool:
        # Live, coming or built in: the head start has nothing to insert.
        return os.path.exists(os.path.join(self.sys_dir, "module", name))

    def head_start(self) -> list[EarlyModule]:
        """What to insert before the daemon has started (Learned.head_start), when
        the configuration is the one the options were resolved under; never raises."""
        try:
            learned = self._read_once = read(self.path, self.kernel)
            if not learned.devices:
                self.head_start_note = "nothing learned for this kernel yet"
                return []
            if self._stamp is None or learned.stamp is None or learned.stamp != self._stamp():
                self.head_start_note = ("the configuration changed since it was learned "
                                        "(modprobe.d, module indexes, deny list or modprobe.* "
                                        "on the kernel command line)")
                return []
            learned.forget_options_changed_on(self._module_params())
            modules = learned.head_start(self._read_modalias, self._present,
                                         self._listed() if self._listed is not None else ())
            if not modules:
                self.head_start_note = (f"nothing to insert: {len(learned.devices)} device(s) "
                                        "known, their modules already in or not insertable "
                                        "early")
            return modules
        except Exception as exc:
            self.head_start_note = f"{self.path} unusable: {exc}"
            return []

    def _module_params(self) -> dict[str, str]:
        return module_params(self._cmdline() if self._cmdline is not None else "")

    def note_plan(self, plan: Plan, *, kind: str, key: str, devpath: str | None) -> None:
        """A device request's plan, whoever ends up inserting its modules: at boot
        udev and the initramfs load drivers until kmodd is ready, and what they
        loaded this time the next head start can insert before them.  A plan
        with softdeps marks its device (left to the daemon); a module replaced
        by an install command is kept without a path (never inserted early)."""
        from kmodd.resolution.plan import Role
        if kind == "modules-load":
            key, devpath = LISTED + key, ""
        elif not devpath or kind not in ("coldplug", "modalias"):
            return
        steps = [s for s in plan.steps if not s.builtin]
        targets = {s.name for s in steps if s.role is Role.TARGET}
        with self._lock:
            for step in steps:
                if len(self._planned) < MAX_MODULES or step.name in self._planned:
                    self._planned[step.name] = (
                        step.deps, None if step.install_command else step.path, step.options)
            if targets and (len(self._devices) < MAX_DEVICES or key in self._devices):
                self._devices.setdefault(key, (devpath, set()))[1].update(targets)
            if any(s.role in (Role.SOFTDEP_PRE, Role.SOFTDEP_POST) for s in steps) and \
                    len(self._soft) < MAX_DEVICES:
                self._soft.add(key)

    def note(self, name: str, path: str | None, deps: Iterable[str], seconds: float | None,
             options: str | None = None) -> None:
        """One module inserted by kmodd (``seconds`` in the syscall), for any
        request: its timing.  Which device asked for it is its plan's business
        (``note_plan``)."""
        if seconds is None:
            return
        with self._lock:
            if len(self._modules) < MAX_MODULES or name in self._modules:
                self._modules[name] = (float(seconds), tuple(deps), path, options)

    def merged(self) -> Learned:
        """The file's valid content updated with this boot's notes."""
        base = read(self.path, self.kernel)
        with self._lock:
            modules = dict(self._modules)
            planned = dict(self._planned)
            devices = {k: (d, tuple(sorted(t))) for k, (d, t) in self._devices.items()}
            soft = set(self._soft)
        stamp = self._stamp() if self._stamp is not None else None
        if base.stamp != stamp:
            # Options resolved under another configuration are never inserted early.
            base.modules = {n: replace(t, options=None) for n, t in base.modules.items()}
            base.stamp = stamp
        params = self._module_params()
        base.forget_options_changed_on(params)
        for name, (deps, path, planned_options) in planned.items():
            if name in modules:
                continue
            # Not inserted by kmodd this boot: the last known init time, if any.
            known = base.modules.get(name)
            init = known.init if known is not None and known.path == path else 0.0
            size, mtime = file_identity(path)
            base.modules[name] = ModuleTiming(init, deps, path, size, mtime, planned_options)
        for name, (init, deps, path, options) in modules.items():
            size, mtime = file_identity(path)
            base.modules[name] = ModuleTiming(init, deps, path, size, mtime, options)
        base.devices.update(devices)
        base.soft = (base.soft - devices.keys()) | soft
        base.soft &= base.devices.keys()
        base.cmdline = {m: p for m, p in params.items() if m in base.modules}
        # Bounded whatever the machine: keep the heaviest.
        if len(base.devices) > MAX_DEVICES:
            keep = sorted(base.devices, key=base.weight, reverse=True)[:MAX_DEVICES]
            base.devices = {k: base.devices[k] for k in keep}
        if len(base.modules) > MAX_MODULES:
            keep = sorted(base.modules, key=lambda n: base.modules[n].init,
                          reverse=True)[:MAX_MODULES]
            base.modules = {k: base.modules[k] for k in keep}
        return base

    def save(self) -> None:
        """Merge and write; never raises (a read-only /var only loses the lesson)."""
        try:
            with self._lock:
                if not self._modules and not self._devices:
                    return          # nothing planned (a restart mid-boot): keep the file as is
            write(self.path, self.merged())
        except Exception as exc:
            _log().warning("cannot save the learned coldplug order to %s: %s", self.path, exc)

    def save_in_background(self, then: Callable[[], None] | None = None) -> threading.Thread:
        """``save`` in a thread of its own, then ``then`` (in that thread)."""
        def run() -> None:
            self.save()
            if then is not None:
                then()
        t = threading.Thread(target=run, name="kmodd-after-coldplug", daemon=True)
        t.start()
        return t


# What resolution reads besides the module files: a change to any of them and
# the options remembered with the modules may be wrong (no head start then).
INDEX_FILES = ("modules.dep", "modules.dep.bin", "modules.alias", "modules.alias.bin",
               "modules.softdep", "modules.builtin", "modules.builtin.bin",
               "modules.builtin.modinfo", "modules.symbols.bin")


def _identity_line(path: Path, base: Path) -> str:
    # Named relative to the root: the same tree under another root is the same.
    try:
        name = str(path.relative_to(base))
    except ValueError:
        name = str(path)
    try:
        st = os.stat(path)
    except OSError:
        return f"{name} -"
    return f"{name} {st.st_mode:o} {st.st_size} {st.st_mtime_ns}"


def module_params(cmdline: str) -> dict[str, str]:
    """``MODULE.PARAM=VALUE`` words of a kernel command line by module (names
    with '-' read as '_', as kmod does), ``modprobe.*`` words under "modprobe"."""
    out: dict[str, list[str]] = {}
    for word in cmdline.split():
        key = word.split("=", 1)[0]
        if "." not in key.strip("."):
            continue
        module = key.split(".", 1)[0].replace("-", "_")
        out.setdefault(module, []).append(word)
    return {m: " ".join(words) for m, words in out.items()}


def read_cmdline(root: Root) -> str:
    try:
        return (root.proc / "cmdline").read_text(errors="replace")
    except OSError:
        return ""


def config_stamp(settings: Settings, version: str) -> str:
    """The configuration a plan was resolved under: the command line's modprobe.*
    words (blacklist), deny lists, every modprobe.d file, the module indexes and
    the boot lists (by size and mtime), the command line's modules_load= words.
    Other command-line words are compared module by module (Learned.cmdline):
    a boot loader's or another module's word changes nothing here."""
    root = settings.root_obj
    cmdline = read_cmdline(root)
    lines = [f"kernel {version}", "deny " + ",".join(settings.deny),
             _identity_line(root.deny_file, root.base),
             "cmdline " + module_params(cmdline).get("modprobe", "")]
    configs = [Path(p) for p in settings.modprobe_config] \
        if settings.modprobe_config is not None else root.modprobe_dirs()
    for config in configs:
        lines.append(_identity_line(config, root.base))
        try:
            names = sorted(os.listdir(config))
        except OSError:
            continue
        lines.extend(_identity_line(config / name, root.base) for name in names)
    modules_dir = root.modules_dir(version)
    lines.extend(_identity_line(modules_dir / name, modules_dir) for name in INDEX_FILES)
    # The boot lists: /etc/modules carries options, and a list that changed
    # may name a module under another alias.
    from kmodd.daemon.boot_lists import DEBIAN_MODULES, conf_files
    # The words as they are (an identity, not a parse: no shlex on this path).
    lines.append("modules_load " + " ".join(
        w for w in cmdline.split()
        if w.split("=", 1)[0].replace("-", "_").endswith("modules_load")))
    lines.extend(_identity_line(p, root.base)
                 for p in [*conf_files(root), root.path(DEBIAN_MODULES)])
    return "\n".join(lines)


def learned_order(settings: Settings) -> LearnedOrder:
    """The daemon's LearnedOrder: the state directory under its root, its kernel."""
    from kmodd.root import running_kernel_version
    root = settings.root_obj
    version = settings.version or running_kernel_version(root)

    def listed() -> list[str]:
        from kmodd.daemon.boot_lists import listed_modules
        return [m.name for m in listed_modules(root)[0]]

    return LearnedOrder(root.state_dir / LEARNED_FILE, version, root.sys,
                        stamp=lambda: config_stamp(settings, version),
                        cmdline=lambda: read_cmdline(root),
                        listed=listed if settings.modules_load else None)


def start_head_start(settings: Settings, kernel: Kernel, order: LearnedOrder | None = None
                     ) -> tuple[EarlyLoads | None, str]:
    """Start inserting what the last boot's coldplug loaded for devices still
    present (kmodd.kernel.early); (None, why not) when there is nothing to do.
    ``order``: the daemon's own (its coldplug then reads the file no more)."""
    if not (settings.head_start and settings.coldplug):
        return None, "off"
    order = order or learned_order(settings)
    modules = order.head_start()
    if not modules:
        return None, order.head_start_note
    return EarlyLoads(kernel, modules, workers=settings.max_workers).start(), ""
