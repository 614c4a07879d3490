"""What a module file says about itself: ``.modinfo``, vermagic and signature.

pyelftools finds the sections; the ``.modinfo`` strings are split here, the
way kmod's ``kmod_elf_get_strings`` does it.  pyelftools is imported on first
use only, so code paths that never inspect a module do not pay for it.
"""

from __future__ import annotations

import io
import os

from kmodd.modfile import ModuleFileError, read_module_image
from kmodd.modfile.signature import SignatureInfo, read_signature
from kmodd.record import dataclass, field
from kmodd.resolution.names import modname_normalize

__all__ = ["ModuleFileError", "ModuleInfo", "Param", "merge_params", "modinfo_from_image",
           "modinfo_strings", "read_modinfo", "vermagic"]

_ELF_MAGIC = b"\x7fELF"
_THIS_MODULE = ".gnu.linkonce.this_module"
# Offset of ``name`` in struct module: after ``enum module_state`` (padded) and a
# ``struct list_head`` — 8 + 16 on 64-bit, 4 + 8 on 32-bit.
_THIS_MODULE_NAME_OFFSET = {64: 24, 32: 12}
_MODULE_NAME_LEN = 56


@dataclass(frozen=True)
class Param:
    """A module parameter, merged from its ``parm=`` and ``parmtype=`` entries."""

    name: str
    type: str | None = None
    description: str | None = None


@dataclass
class ModuleInfo:
    filename: str
    name: str
    # Every .modinfo entry in section order: what modinfo prints, unfiltered.
    fields: list[tuple[str, str]] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)
    softdep: list[str] = field(default_factory=list)
    vermagic: str | None = None
    license: str | None = None
    description: str | None = None
    author: list[str] = field(default_factory=list)
    firmware: list[str] = field(default_factory=list)
    intree: bool = False
    retpoline: bool = False
    parm: list[Param] = field(default_factory=list)   # in order of first appearance
    signature: SignatureInfo | None = None

    @property
    def sig_id(self) -> str | None:
        return self.signature.id_type if self.signature else None

    @property
    def signer(self) -> str | None:
        return self.signature.signer if self.signature else None

    @property
    def sig_key(self) -> str | None:
        return self.signature.key_id_hex if self.signature else None

    @property
    def sig_hashalgo(self) -> str | None:
        return self.signature.hash_algo if self.signature else None

    def info_list(self) -> list[tuple[str, str]]:
        """Key/value pairs in the order ``kmod_module_get_info`` lists them:
        the .modinfo entries, then sig_id, signer, sig_key, sig_hashalgo, signature."""
        out = list(self.fields)
        sig = self.signature
        if sig is not None:
            out += [("sig_id", sig.id_type), ("signer", sig.signer),
                    ("sig_key", sig.key_id_hex), ("sig_hashalgo", sig.hash_algo),
                    ("signature", sig.signature_hex)]
        return out


def _find_sections(image: bytes, path: str | os.PathLike[str] | None,
                   names: tuple[str, ...]) -> tuple[int, dict[str, bytes]]:
    """(ELF class, {section name: contents}) for those of ``names`` the image has."""
    if not image.startswith(_ELF_MAGIC):
        raise ModuleFileError(path, "not an ELF file (bad magic), not a kernel module")
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(image))
        header = elf.header
        if header["e_shoff"] + header["e_shnum"] * header["e_shentsize"] > len(image):
            raise ModuleFileError(path, "truncated ELF file: section headers past the end")
        found: dict[str, bytes] = {}
        for name in names:
            section = elf.get_section_by_name(name)
            if section is None:
                continue
            if section["sh_type"] == "SHT_NOBITS":
                found[name] = b""
                continue
            start, size = section["sh_offset"], section["sh_size"]
            if start + size > len(image):
                raise ModuleFileError(path, f"truncated ELF file: {name} runs past the end")
            found[name] = image[start:start + size]
        return elf.elfclass, found
    except ModuleFileError:
        raise
    except ELFError as e:
        raise ModuleFileError(path, f"corrupt ELF file: {e}") from e
    except Exception as e:
        # pyelftools raises struct/construct/index errors on garbage headers;
        # callers must see one clear error naming the file, not a traceback.
        raise ModuleFileError(path, f"corrupt ELF file: {type(e).__name__}: {e}") from e


def modinfo_strings(section: bytes) -> list[tuple[str, str]]:
    """Split a ``.modinfo`` section into (key, value) pairs, as kmod does.

    Entries are NUL-terminated, separated by runs of NUL padding; an entry
    without ``=`` is a key with an empty value.
    """
    out: list[tuple[str, str]] = []
    for raw in section.split(b"\0"):
        if not raw:
            continue
        key, _, value = raw.decode("utf-8", errors="replace").partition("=")
        out.append((key, value))
    return out


def merge_params(fields: list[tuple[str, str]]) -> list[Param]:
    """Parameters from ``parm=name:description`` and ``parmtype=name:type`` entries,
    in order of first appearance; an entry without ``:`` is skipped, as modinfo does."""
    params: dict[str, Param] = {}
    for key, value in fields:
        if key not in ("parm", "parmtype"):
            continue
        pname, colon, rest = value.partition(":")
        if not colon:
            continue
        old = params.get(pname, Param(pname))
        params[pname] = (Param(pname, old.type, rest) if key == "parm"
                         else Param(pname, rest, old.description))
    return list(params.values())


def _this_module_name(elfclass: int, section: bytes | None) -> str | None:
    if not section:
        return None
    offset = _THIS_MODULE_NAME_OFFSET.get(elfclass)
    if offset is None or len(section) < offset + 1:
        return None
    raw = section[offset:offset + _MODULE_NAME_LEN].split(b"\0", 1)[0]
    return raw.decode("utf-8", errors="replace") or None


def modinfo_from_image(image: bytes, filename: str) -> ModuleInfo:
    """ModuleInfo of an already decompressed module image."""
    elfclass, sections = _find_sections(image, filename, (".modinfo", _THIS_MODULE))
    if ".modinfo" not in sections:
        raise ModuleFileError(filename, "ELF file without a .modinfo section, not a kernel module")
    fields = modinfo_strings(sections[".modinfo"])
    info = ModuleInfo(filename=filename, name="", fields=fields)
    name_field: str | None = None
    for key, value in fields:
        if key == "alias":
            info.aliases.append(value)
        elif key == "depends":
            info.depends.extend(d for d in value.split(",") if d)
        elif key == "softdep":
            info.softdep.append(value)
        elif key == "vermagic" and info.vermagic is None:
            info.vermagic = value
        elif key == "license" and info.license is None:
            info.license = value
        elif key == "description" and info.description is None:
            info.description = value
        elif key == "author":
            info.author.append(value)
        elif key == "firmware":
            info.firmware.append(value)
        elif key == "intree":
            info.intree = value == "Y"
        elif key == "retpoline":
            info.retpoline = value == "Y"
        elif key == "name" and name_field is None:
            name_field = value
    info.parm = merge_params(fields)
    info.name = (name_field or _this_module_name(elfclass, sections.get(_THIS_MODULE))
                 or modname_normalize(filename))
    info.signature = read_signature(image)
    return info


def read_modinfo(path: str | os.PathLike[str]) -> ModuleInfo:
    """Everything ``modinfo`` shows for a module file (``.ko``, ``.ko.xz``, ``.ko.gz``,
    ``.ko.zst``).  Raises ModuleFileError for anything that is not a module."""
    return modinfo_from_image(read_module_image(path), os.fspath(path))


def vermagic(path: str | os.PathLike[str]) -> str | None:
    """The module's ``vermagic=`` string (None if it has none), without the rest of modinfo."""
    image = read_module_image(path)
    _, sections = _find_sections(image, path, (".modinfo",))
    section = sections.get(".modinfo")
    if section is None:
        raise ModuleFileError(path, "ELF file without a .modinfo section, not a kernel module")
    # Search the raw bytes: cheaper than splitting every entry.
    at = section.find(b"vermagic=")
    while at > 0 and section[at - 1] != 0:
        at = section.find(b"vermagic=", at + 1)
    if at < 0:
        return None
    end = section.find(b"\0", at)
    return section[at + 9:end if end >= 0 else len(section)].decode("utf-8", errors="replace")
