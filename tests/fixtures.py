"""Helpers for resolution tests: fixture module trees built with the real depmod,
kmod itself as the oracle (modprobe, libkmod through ctypes), and turning alias
patterns into concrete modaliases.

Expected values come from kmod wherever kmod can give them.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodd.resolution.config import ModprobeConfig, softdep_words

MODPROBE = shutil.which("modprobe") or "/usr/sbin/modprobe"
DEPMOD = shutil.which("depmod") or "/usr/sbin/depmod"
VERSION = "9.9.9-fixture"


def real_kernel_version() -> str:
    """The Debian kernel tree under test, discovered like the test bed does it
    (``testbed.initramfs.find_kernel``: ``$TESTBED_KERNEL_VERSION``, else the version
    linux-image-amd64 depends on, else the newest tree with a /boot/vmlinuz).  No test
    names a kernel version: Debian moves linux-image-amd64 every few weeks."""
    from testbed.initramfs import TestbedError, find_kernel

    try:
        kernel = find_kernel()
    except TestbedError as exc:
        raise RuntimeError(f"no Debian kernel tree to test against: {exc}") from None
    if not (kernel.moddir / "modules.dep").is_file():
        raise RuntimeError(f"{kernel.moddir}/modules.dep is missing: run depmod "
                           f"{kernel.version} or reinstall linux-image-amd64")
    return kernel.version


def real_moddir() -> Path:
    """/lib/modules/<kernel under test>."""
    return Path("/lib/modules") / real_kernel_version()


# ------------------------------------------------------------------ kmod oracles

def modprobe(*args: str, cmdline: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real modprobe; with ``cmdline``, inside a mount namespace whose
    /proc/cmdline says that (needs root, as the realtree tests have)."""
    argv = [MODPROBE, *args]
    if cmdline is not None:
        fd_path = _cmdline_file(cmdline)
        script = 'mount --bind "$1" /proc/cmdline && shift && exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, "sh", fd_path, *argv]
    # Bytes, decoded by hand: text mode would turn a '\r' in the output into a newline.
    res = subprocess.run(argv, capture_output=True, check=False,
                         env={**os.environ, "LC_ALL": "C", "MODPROBE_OPTIONS": ""})
    return subprocess.CompletedProcess(res.args, res.returncode,
                                       res.stdout.decode("utf-8", "surrogateescape"),
                                       res.stderr.decode("utf-8", "surrogateescape"))


_CMDLINE_FILES: dict[str, str] = {}


def _cmdline_file(cmdline: str) -> str:
    path = _CMDLINE_FILES.get(cmdline)
    if path is None:
        import tempfile
        fd, path = tempfile.mkstemp(prefix="kmodd-cmdline-")
        os.write(fd, cmdline.encode())
        os.close(fd)
        _CMDLINE_FILES[cmdline] = path
    return path


def modprobe_show_config(tree: Path | None, version: str, configs: Sequence[str],
                         cmdline: str | None = None) -> tuple[list[str], str]:
    """``modprobe -c``'s configuration part (lines) and its stderr."""
    args = [*(["-d", str(tree)] if tree else []), "-S", version]
    for c in configs:
        args += ["-C", c]
    res = modprobe(*args, "-c", cmdline=cmdline)
    out = res.stdout.split("\n# End of configuration files.")[0]
    return [ln for ln in out.split("\n") if ln], res.stderr


def render_config(cfg: ModprobeConfig) -> list[str]:
    """Our configuration in ``modprobe -c``'s layout (its softdep spacing included)."""
    order = ["blacklist", "install", "remove", "alias", "options", "softdep"]
    lines: list[str] = []
    for kind in order:
        for cmd, name, value in cfg.entries:
            if cmd != kind:
                continue
            if cmd == "blacklist":
                lines.append(f"blacklist {name}")
            elif cmd == "softdep":
                lines.append(f"softdep {name} {_softdep_text(value)}")
            else:
                lines.append(f"{cmd} {name} {value}")
    return lines


def _softdep_text(raw: str) -> str:
    """libkmod 30's softdep_to_char: it prints the buffer span from the first to
    the last pre name (post names parsed in between included), then glues
    "post:" and the post span to it."""
    tagged = softdep_words(raw)
    text = ""
    for mode in ("pre:", "post:"):
        idx = [i for i, (m, _) in enumerate(tagged) if m == mode]
        if idx:
            text += f"{mode} " + " ".join(w for _, w in tagged[idx[0]:idx[-1] + 1])
    return text


_BAD_LINE = re.compile(r"kmod_config_parse: (.*) line (\d+): ignoring bad line")


def kmod_bad_lines(stderr: str) -> set[tuple[str, int]]:
    """(file, line) of every line libkmod rejected, from its error log."""
    return {(m.group(1), int(m.group(2))) for m in _BAD_LINE.finditer(stderr)}


class LibKmod:
    """libkmod.so.2 in-process: the same lookups modprobe -R does, without a process each."""

    FILTER_BLACKLIST = 1

    def __init__(self, dirname: str | None = None, config_paths: Sequence[str] | None = None):
        lib = ctypes.CDLL("libkmod.so.2")
        self.lib = lib
        lib.kmod_new.restype = ctypes.c_void_p
        lib.kmod_new.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.kmod_module_new_from_lookup.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                    ctypes.POINTER(ctypes.c_void_p)]
        lib.kmod_list_next.restype = ctypes.c_void_p
        lib.kmod_list_next.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.kmod_module_get_module.restype = ctypes.c_void_p
        lib.kmod_module_get_module.argtypes = [ctypes.c_void_p]
        lib.kmod_module_get_name.restype = ctypes.c_char_p
        lib.kmod_module_get_name.argtypes = [ctypes.c_void_p]
        lib.kmod_module_unref.argtypes = [ctypes.c_void_p]
        lib.kmod_module_unref_list.argtypes = [ctypes.c_void_p]
        lib.kmod_module_apply_filter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                 ctypes.POINTER(ctypes.c_void_p)]
        lib.kmod_load_resources.argtypes = [ctypes.c_void_p]
        lib.kmod_unref.argtypes = [ctypes.c_void_p]
        paths = None
        if config_paths is not None:
            arr = (ctypes.c_char_p * (len(config_paths) + 1))()
            for i, p in enumerate(config_paths):
                arr[i] = p.encode()
            arr[len(config_paths)] = None
            self._paths = arr
            paths = ctypes.cast(arr, ctypes.c_void_p)
        self.ctx = lib.kmod_new(dirname.encode() if dirname else None, paths)
        if not self.ctx:
            raise RuntimeError("kmod_new failed")
        lib.kmod_load_resources(self.ctx)

    def _names(self, lst: int | None) -> list[str]:
        names: list[str] = []
        node = lst
        while node:
            mod = self.lib.kmod_module_get_module(node)
            names.append(self.lib.kmod_module_get_name(mod).decode())
            self.lib.kmod_module_unref(mod)
            node = self.lib.kmod_list_next(lst, node)
        return names

    def lookup(self, alias: str, *, blacklist: bool = False) -> list[str]:
        lst = ctypes.c_void_p(None)
        err = self.lib.kmod_module_new_from_lookup(self.ctx, alias.encode(), ctypes.byref(lst))
        if err < 0 or not lst.value:
            return []
        try:
            if not blacklist:
                return self._names(lst.value)
            out = ctypes.c_void_p(None)
            self.lib.kmod_module_apply_filter(self.ctx, self.FILTER_BLACKLIST, lst,
                                              ctypes.byref(out))
            try:
                return self._names(out.value)
            finally:
                self.lib.kmod_module_unref_list(out)
        finally:
            self.lib.kmod_module_unref_list(lst)

    def close(self) -> None:
        if self.ctx:
            self.lib.kmod_unref(self.ctx)
            self.ctx = None


# ------------------------------------------------------------------ modaliases

_SAMPLE = "Xy0_"


def instantiate(pattern: str, rng: random.Random) -> str:
    """A concrete string the fnmatch pattern matches: ``*`` becomes sample text,
    ``?`` one character, ``[...]`` one character of the class."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(rng.choice(["", "0", _SAMPLE, "v00001234", "A1b2"]))
        elif c == "?":
            out.append(rng.choice("0aZ9_"))
        elif c == "\\" and i < n:
            out.append(pattern[i])
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append("[")
                continue
            body = pattern[i:end]
            i = end + 1
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            chars = _class_chars(body)
            if negate:
                pool = [ch for ch in "0123456789abcdefABCDEF_xyz" if ch not in chars]
                out.append(rng.choice(pool or ["~"]))
            else:
                out.append(rng.choice(sorted(chars)) if chars else "")
        else:
            out.append(c)
    return "".join(out)


def _class_chars(body: str) -> set[str]:
    chars: set[str] = set()
    j = 0
    while j < len(body):
        if j + 2 < len(body) and body[j + 1] == "-":
            chars.update(chr(o) for o in range(ord(body[j]), ord(body[j + 2]) + 1))
            j += 3
        else:
            chars.add(body[j])
            j += 1
    return chars


def mutate(alias: str, rng: random.Random) -> str:
    """A near miss (or, by chance, another hit): one character changed, cut or added."""
    if not alias:
        return "x"
    pos = rng.randrange(len(alias))
    kind = rng.randrange(4)
    if kind == 0:
        return alias[:pos] + rng.choice("0Zq-_:*") + alias[pos + 1:]
    if kind == 1:
        return alias[:pos]
    if kind == 2:
        return alias + rng.choice(["x", "0", "-1", ":"])
    return alias.upper() if rng.random() < 0.5 else alias.replace("_", "-")


def read_alias_patterns(moddir: Path) -> list[tuple[str, str]]:
    """(pattern, module) from modules.alias as depmod wrote it (not read by kmodd's index)."""
    out = []
    for line in (moddir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            out.append((parts[1], parts[2]))
    return out


def read_module_names(moddir: Path) -> list[str]:
    names = []
    for line in (moddir / "modules.dep").read_text().splitlines():
        path = line.split(":", 1)[0]
        base = path.rsplit("/", 1)[-1]
        names.append(base.split(".", 1)[0].replace("-", "_"))
    return names


# ------------------------------------------------------------------ fixture trees

@dataclass
class FakeModule:
    """A tiny relocatable ELF that depmod treats as a module.

    ``exports`` land in ``__ksymtab_strings`` (depmod's fallback when there
    are no ``__crc_`` symbols); ``uses`` are undefined symbols, which depmod
    turns into modules.dep dependencies.
    """

    file: str                          # e.g. "foo-bar" -> kernel/<subdir>/foo-bar.ko
    aliases: Sequence[str] = ()
    exports: Sequence[str] = ()
    uses: Sequence[str] = ()
    softdep: str | None = None         # modinfo softdep=, which depmod copies to modules.softdep
    subdir: str = "drivers/misc"
    modinfo: Sequence[str] = field(default_factory=list)


def _c_string(parts: Iterable[str]) -> str:
    data = "".join(p + "\0" for p in parts)
    return '"' + "".join(f"\\x{b:02x}" for b in data.encode()) + '"'


def build_module(mod: FakeModule, dest: Path, workdir: Path) -> None:
    info = [f"alias={a}" for a in mod.aliases] + ["license=GPL"] + list(mod.modinfo)
    if mod.softdep:
        info.append(f"softdep={mod.softdep}")
    src = [
        f"static const char kmodd_modinfo[] __attribute__((section(\".modinfo\"), used, "
        f"aligned(1))) = {_c_string(info)};",
    ]
    if mod.exports:
        src.append(f"static const char kmodd_ksymtab[] __attribute__((section("
                   f"\"__ksymtab_strings\"), used, aligned(1))) = {_c_string(mod.exports)};")
        src += [f"int {sym}(void) {{ return 0; }}" for sym in mod.exports]
    for i, sym in enumerate(mod.uses):
        src.append(f"extern int {sym}(void); int kmodd_use_{i}(void) {{ return {sym}(); }}")
    c_file = workdir / f"{mod.file}.c"
    c_file.write_text("\n".join(src) + "\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-c", "-O0", "-fno-pic", "-o", str(dest), str(c_file)], check=True)


def build_tree(base: Path, modules: Sequence[FakeModule], *, version: str = VERSION,
               builtin: Sequence[tuple[str, Sequence[str]]] = ()) -> Path:
    """``base/lib/modules/VERSION`` with the modules and their indexes from ``depmod -b``.

    ``builtin`` lists (name, aliases) of modules built into the fake kernel:
    they go to modules.builtin and modules.builtin.modinfo, which depmod turns
    into the builtin indexes.
    """
    moddir = base / "lib/modules" / version
    work = base / "src"
    work.mkdir(parents=True, exist_ok=True)
    for mod in modules:
        build_module(mod, moddir / "kernel" / mod.subdir / f"{mod.file}.ko", work)
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / "modules.builtin").write_text(
        "".join(f"kernel/builtin/{name}.ko\n" for name, _ in builtin))
    modinfo = b"".join(f"{name}.alias={a}\0".encode() for name, aliases in builtin
                       for a in aliases)
    modinfo += b"".join(f"{name}.license=GPL\0".encode() for name, _ in builtin)
    (moddir / "modules.builtin.modinfo").write_bytes(modinfo)
    order = "".join(f"kernel/{m.subdir}/{m.file}.ko\n" for m in modules)
    (moddir / "modules.order").write_text(order)
    subprocess.run([DEPMOD, "-b", str(base), version], check=True, capture_output=True)
    return moddir


def write_conf(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path
