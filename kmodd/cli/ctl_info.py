"""``kmodctl info``: show what a module file says about itself, like ``modinfo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kmodd.cli.common import add_tree_options, tree_from_args
from kmodd.modfile import MODULE_SUFFIXES
from kmodd.modfile.elf import ModuleFileError, ModuleInfo, Param, merge_params, read_modinfo
from kmodd.resolution.names import modname_normalize

PROG = "kmodctl info"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("modules", nargs="+", metavar="MODULE|PATH",
                        help="module name, alias or path to a module file")
    add_tree_options(parser, blacklist=False)
    parser.add_argument("-F", "--field", metavar="FIELD", default=None,
                        help="print only this field's values, one per line")
    parser.add_argument("-0", "--null", action="store_true",
                        help="end each output line with NUL instead of newline")


# ---------------------------------------------------------------------------
# Finding modules by name


def _builtin_fields(moddir: Path, name: str) -> list[tuple[str, str]]:
    """A builtin module's entries in ``modules.builtin.modinfo`` (``name.key=value\\0``)."""
    try:
        data = (moddir / "modules.builtin.modinfo").read_bytes()
    except OSError:
        return []
    prefix = modname_normalize(name).encode() + b"."
    out = []
    for raw in data.split(b"\0"):
        if raw.startswith(prefix):
            key, _, value = raw[len(prefix):].decode("utf-8", errors="replace").partition("=")
            out.append((key, value))
    return out


def _is_path(arg: str) -> bool:
    # modinfo takes an argument as a file only if it exists and ends like a module;
    # anything with a slash is clearly meant as a path too, so a typo in it gets
    # "no such file" rather than "module not found".
    return "/" in arg or (arg.endswith(MODULE_SUFFIXES) and os.path.isfile(arg))


# ---------------------------------------------------------------------------
# Output


def _param_lines(params: Iterable[Param], *, field_only: bool) -> list[str]:
    # modinfo keeps parameters on a list it prepends to, so they come out last first.
    lines = []
    for p in reversed(list(params)):
        if p.description is None:
            # "-F parm" shows "name: (type)"; the full listing shows "name:type".
            lines.append(f"{p.name}: ({p.type})" if field_only else f"{p.name}:{p.type}")
        elif p.type is not None:
            lines.append(f"{p.name}:{p.description} ({p.type})")
        else:
            lines.append(f"{p.name}:{p.description}")
    return lines


def _key_line(key: str, value: str) -> str:
    # printf("%s:%-*s%s", key, 15 - keylen, "", value): a negative width is a
    # left-justified positive one, so long keys still get |15 - len| spaces.
    return f"{key}:{' ' * abs(15 - len(key))}{value}"


def _text_lines(filename: str, name: str | None, entries: list[tuple[str, str]],
                params: list[Param], field: str | None) -> list[str]:
    if field is not None:
        if field == "filename":
            return [filename]
        if field == "parm":
            return _param_lines(params, field_only=True)
        out = [name] if field == "name" and name is not None and filename == "(builtin)" else []
        return out + [v for k, v in entries if k == field]
    lines = [_key_line("name", name)] if filename == "(builtin)" and name is not None else []
    lines.append(_key_line("filename", filename))
    lines += [_key_line(k, v) for k, v in entries if k not in ("parm", "parmtype")]
    lines += [_key_line("parm", line) for line in _param_lines(params, field_only=False)]
    return lines


def _json_module(info: ModuleInfo) -> dict[str, Any]:
    sig = info.signature
    return {
        "filename": info.filename, "name": info.name, "builtin": False,
        "aliases": info.aliases, "depends": info.depends, "softdep": info.softdep,
        "vermagic": info.vermagic, "license": info.license,
        "description": info.description, "author": info.author, "firmware": info.firmware,
        "intree": info.intree, "retpoline": info.retpoline,
        "parm": [{"name": p.name, "type": p.type, "description": p.description}
                 for p in info.parm],
        "signature": None if sig is None else {
            "sig_id": sig.id_type, "signer": sig.signer,
            "sig_key": sig.key_id.hex(":").upper(), "sig_hashalgo": sig.hash_algo,
        },
        "fields": [list(kv) for kv in info.fields],
    }


def _json_builtin(name: str, entries: list[tuple[str, str]]) -> dict[str, Any]:
    return {"filename": None, "name": name, "builtin": True,
            "parm": [{"name": p.name, "type": p.type, "description": p.description}
                     for p in merge_params(entries)],
            "fields": [list(kv) for kv in entries]}


# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    root, version = tree_from_args(args)
    moddir = root.modules_dir(version)
    resolver: Any = None
    status = 0
    end = "\0" if args.null else "\n"
    results: list[dict[str, Any]] = []

    def emit(lines: list[str]) -> None:
        if lines:
            sys.stdout.write(end.join(lines) + end)

    def show_file(path: str) -> bool:
        try:
            info = read_modinfo(path)
        except ModuleFileError as e:
            print(f"{PROG}: ERROR: {e}", file=sys.stderr)
            return False
        if args.json:
            results.append(_json_module(info))
        else:
            emit(_text_lines(info.filename, info.name, info.info_list(), info.parm, args.field))
        return True

    for arg in args.modules:
        if _is_path(arg):
            # Like kmod's path_make_absolute_cwd: cwd + "/" + arg, not normalised.
            if not show_file(arg if arg.startswith("/") else f"{os.getcwd()}/{arg}"):
                status = 1
            continue
        if resolver is None:
            # Imported here: a path argument needs neither indexes nor configuration.
            from kmodd.resolution.index import IndexCorrupt
            from kmodd.resolution.resolve import open_resolver
            resolver = open_resolver(root, version, args.config)
        try:
            # modinfo looks arguments up like modprobe (kmod_module_new_from_lookup):
            # configuration aliases, module names, modules.alias, builtin modules.
            names = resolver.lookup(arg)
            found = [(name, resolver.tree.dep_path(name)) for name in names]
        except (IndexCorrupt, OSError) as e:   # the message names the damaged file
            print(f"{PROG}: ERROR: {e}", file=sys.stderr)
            status = 1
            continue
        if not found:
            print(f"{PROG}: ERROR: module {arg} not found in {moddir}", file=sys.stderr)
            status = 1
        for name, path in found:
            if path is not None:
                status |= 0 if show_file(path) else 1
            else:
                # Builtin, or known only from an install command: modinfo shows
                # "(builtin)" and whatever modules.builtin.modinfo has for it.
                _show_builtin(args, moddir, name, results, emit)
    if args.json:
        print(json.dumps(results, indent=2))
    return status


def _show_builtin(args: argparse.Namespace, moddir: Path, name: str,
                  results: list[dict[str, Any]], emit: Any) -> None:
    entries = _builtin_fields(moddir, name)
    if args.json:
        results.append(_json_builtin(name, entries))
    else:
        emit(_text_lines("(builtin)", name, entries, merge_params(entries), args.field))
