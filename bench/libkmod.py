"""libkmod in-process through ctypes: the reference kmodd's resolution is measured against."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence

_P = ctypes.c_void_p


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("kmod") or "libkmod.so.2"
    lib = ctypes.CDLL(name)
    lib.kmod_new.restype = _P
    lib.kmod_new.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
    lib.kmod_unref.argtypes = [_P]
    lib.kmod_unref.restype = _P
    lib.kmod_load_resources.argtypes = [_P]
    lib.kmod_load_resources.restype = ctypes.c_int
    lib.kmod_module_new_from_lookup.argtypes = [_P, ctypes.c_char_p, ctypes.POINTER(_P)]
    lib.kmod_module_new_from_lookup.restype = ctypes.c_int
    lib.kmod_list_next.argtypes = [_P, _P]
    lib.kmod_list_next.restype = _P
    lib.kmod_module_get_module.argtypes = [_P]
    lib.kmod_module_get_module.restype = _P
    lib.kmod_module_get_name.argtypes = [_P]
    lib.kmod_module_get_name.restype = ctypes.c_char_p
    lib.kmod_module_unref.argtypes = [_P]
    lib.kmod_module_unref.restype = _P
    lib.kmod_module_unref_list.argtypes = [_P]
    lib.kmod_module_unref_list.restype = ctypes.c_int
    return lib


class LibKmod:
    """A kmod context on one module directory (``moddir`` = lib/modules/VERSION).

    ``config`` lists modprobe.d paths; None means libkmod's defaults, an empty
    list means no configuration at all.
    """

    def __init__(self, moddir: str, config: Sequence[str] | None = None,
                 load_resources: bool = True) -> None:
        self.lib = _lib()
        self._cfg = None
        cfg_arg = None
        if config is not None:
            arr = (ctypes.c_char_p * (len(config) + 1))()
            for i, c in enumerate(config):
                arr[i] = c.encode()
            arr[len(config)] = None
            self._cfg = arr          # keep alive for the context's lifetime
            cfg_arg = arr
        self.ctx = self.lib.kmod_new(moddir.encode(), cfg_arg)
        if not self.ctx:
            raise OSError(f"kmod_new failed for {moddir}")
        if load_resources:
            self.lib.kmod_load_resources(self.ctx)

    def lookup(self, alias: str) -> list[str]:
        """Module names kmod_module_new_from_lookup returns, in its order."""
        lib = self.lib
        head = _P()
        err = lib.kmod_module_new_from_lookup(self.ctx, alias.encode(), ctypes.byref(head))
        if err < 0 or not head:
            return []
        names = []
        node = head.value
        while node:
            mod = lib.kmod_module_get_module(node)
            names.append(lib.kmod_module_get_name(mod).decode())
            lib.kmod_module_unref(mod)
            node = lib.kmod_list_next(head, node)
        lib.kmod_module_unref_list(head)
        return names

    def lookup_only(self, aliases: Sequence[str]) -> int:
        """The timed loop: one lookup per alias, lists released; returns how many resolved."""
        lib = self.lib
        ctx = self.ctx
        new = lib.kmod_module_new_from_lookup
        unref = lib.kmod_module_unref_list
        found = 0
        for a in aliases:
            head = _P()
            new(ctx, a.encode(), ctypes.byref(head))
            if head:
                found += 1
                unref(head)
        return found

    def close(self) -> None:
        if self.ctx:
            self.lib.kmod_unref(self.ctx)
            self.ctx = None
