"""Pure lookups and load plans, as libkmod 30 and modprobe compute them.

``Resolver.lookup`` follows ``kmod_module_new_from_lookup``; ``plan`` follows
``kmod_module_probe_insert_module`` / ``kmod_module_get_probe_list`` with the
flags modprobe passes.  Nothing here looks at the running kernel: like
``modprobe --show-depends`` a plan ignores what is already loaded.

libkmod hands out one module object per ``name`` or ``name\\alias`` key: an
object found through an alias remembers that alias (its options apply, the
alias-only blacklist applies) and the probe walk marks objects visited per
key.  :class:`_Mod` models exactly that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

from kmodd.record import dataclass, replace
from kmodd.resolution.config import ModprobeConfig, compile_glob, load_config
from kmodd.resolution.index import DepEntry, ModuleTree
from kmodd.resolution.names import alias_normalize_or_none, is_glob
from kmodd.resolution.plan import ModuleStep, Plan, Role
from kmodd.root import Root

V = TypeVar("V")
_RANK = {Role.SOFTDEP_PRE: 0, Role.SOFTDEP_POST: 0, Role.DEPENDENCY: 1, Role.TARGET: 2}
_Key = tuple[str, str | None]


class _Mod(NamedTuple):
    """A libkmod module object: ``alias`` is set when it was found through one.

    A tuple rather than a frozen dataclass: every lookup makes some, and a
    tuple is several times cheaper to build.
    """

    name: str
    alias: str | None = None
    builtin: bool = False            # found through a builtin index
    install: str | None = None       # install command found by the commands lookup

    @property
    def key(self) -> _Key:
        return (self.name, self.alias)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One line of a probe list, with what modprobe decides for it."""

    mod: _Mod
    step: ModuleStep
    raw_install: str | None          # the install command as written, for --show-depends


def _first_match(table: Mapping[str, V]) -> Callable[[str], V | None]:
    """libkmod's "first entry whose fnmatch pattern matches the module name"."""
    if not any(is_glob(k) for k in table):
        return lambda name: table.get(name)
    entries = [(compile_glob(k), v) for k, v in table.items()]

    def first(name: str) -> V | None:
        for match, value in entries:
            if match(name):
                return value
        return None
    return first


class Resolver:
    """Lookups and plans over one configuration and one module tree."""

    def __init__(self, config: ModprobeConfig, tree: ModuleTree) -> None:
        self.config = config
        self.tree = tree
        # Config aliases: plain patterns by string, wildcard ones as predicates,
        # each with its position so results keep the configuration's order.
        self._alias_plain: dict[str, list[tuple[int, str, str]]] = {}
        self._alias_glob: list[tuple[int, Callable[[str], bool], str, str]] = []
        for i, (pattern, module) in enumerate(config.aliases):
            if is_glob(pattern):
                self._alias_glob.append((i, compile_glob(pattern), pattern, module))
            else:
                self._alias_plain.setdefault(pattern, []).append((i, pattern, module))
        self._by_name, self._with_colon = self._lookup_chains()
        self._install_for = _first_match(config.install)
        self._remove_for = _first_match(config.remove)
        self._softdep_for = _first_match(config.softdeps)
        self._softdep_cache: dict[str, tuple[list[_Mod], list[_Mod]]] = {}
        # modules.dep entries met by plans; the tree does not change under a resolver.
        self._dep_cache: dict[str, DepEntry | None] = {}

    # -------------------------------------------------------------- lookups

    def _config_aliases(self, name: str) -> list[_Mod]:
        plain = self._alias_plain.get(name, ())
        if not self._alias_glob:
            return [_Mod(module, pattern) for _, pattern, module in plain]
        found = [(i, pattern, module) for i, match, pattern, module in self._alias_glob
                 if match(name)]
        if not found:
            return [_Mod(module, pattern) for _, pattern, module in plain]
        found.extend(plain)
        found.sort()
        return [_Mod(module, pattern) for _, pattern, module in found]

    # kmod_module_new_from_lookup's chain (libkmod-module.c): the first source
    # that answers wins.  One entry per kmod_lookup_alias_from_* function, in
    # kmod's order; sources the configuration leaves empty are not asked.
    # Module names never contain ':', so a modalias (or symbol:) chain leaves
    # out the sources keyed by module name: the hot path asks two or three.
    def _lookup_chains(self) -> tuple[tuple[Callable[[str], list[_Mod]], ...], ...]:
        config = self.config
        aliases = [self._config_aliases] if config.aliases else []         # ..._from_config
        commands = [self._from_commands] if config.install or config.remove else []
        by_name = (*aliases, self._from_moddep, *commands, self._from_aliases,
                   self._from_builtin, self._from_builtin_aliases)
        with_colon = (*aliases, self._from_symbols, *commands, self._from_aliases,
                      self._from_builtin_aliases)
        return by_name, with_colon

    def _from_moddep(self, name: str) -> list[_Mod]:
        return [_Mod(name)] if self.tree.dep_path(name) is not None else []

    def _from_symbols(self, name: str) -> list[_Mod]:
        if name.startswith("symbol:"):
            return [_Mod(m, name) for m in self.tree.symbol(name)]
        return []

    def _from_commands(self, name: str) -> list[_Mod]:
        install = self.config.install.get(name)
        if install is not None:
            return [_Mod(name, install=install)]
        return [_Mod(name)] if name in self.config.remove else []

    def _from_aliases(self, name: str) -> list[_Mod]:
        return [_Mod(m, name) for m in self.tree.alias(name)]

    def _from_builtin(self, name: str) -> list[_Mod]:
        return [_Mod(name, builtin=True)] if self.tree.is_builtin(name) else []

    def _from_builtin_aliases(self, name: str) -> list[_Mod]:
        return [_Mod(m, name, builtin=True) for m in self.tree.builtin_alias(name)]

    def _lookup(self, name: str) -> list[_Mod]:
        """``kmod_module_new_from_lookup`` on a normalised alias."""
        for source in self._with_colon if ":" in name else self._by_name:
            found = source(name)
            if found:
                return found
        return []

    def lookup(self, alias: str) -> list[str]:
        """Module names an alias or name resolves to, in kmod's order (``modprobe -R``).

        The hot path of ``kmodctl resolve -`` and of every uevent.
        """
        name = alias_normalize_or_none(alias)
        if name is None:
            return []
        return [mod.name for mod in self._lookup(name)]

    def resolve(self, alias: str, *, blacklist_all: bool = False) -> list[str]:
        """What ``kmodctl resolve`` prints: ``modprobe -R``, or with ``blacklist_all``
        only the modules udev (``KMOD_PROBE_APPLY_BLACKLIST``) would go on to load."""
        names = self.lookup(alias)
        if blacklist_all and names:
            blacklist = self.config.blacklist
            return [n for n in names if n not in blacklist]
        return names

    def blacklisted(self, module: str) -> bool:
        """Named by a blacklist line (modprobe.d or modprobe.blacklist=)."""
        return module in self.config.blacklist

    def remove_command(self, module: str) -> str | None:
        """The modprobe.d ``remove`` command for a module name (first matching pattern,
        ``kmod_module_get_remove_commands``), as written."""
        return self._remove_for(module)

    # -------------------------------------------------------------- plans

    def _softdeps(self, name: str) -> tuple[list[_Mod], list[_Mod]]:
        cached = self._softdep_cache.get(name)
        if cached is not None:
            return cached
        pre: list[_Mod] = []
        post: list[_Mod] = []
        soft = self._softdep_for(name)
        if soft is not None:
            for dep in soft.pre:
                norm = alias_normalize_or_none(dep)
                if norm is not None:
                    pre.extend(self._lookup(norm))
            for dep in soft.post:
                norm = alias_normalize_or_none(dep)
                if norm is not None:
                    post.extend(self._lookup(norm))
        self._softdep_cache[name] = (pre, post)
        return pre, post

    def _dep(self, name: str) -> DepEntry | None:
        try:
            return self._dep_cache[name]
        except KeyError:
            entry = self._dep_cache[name] = self.tree.dep(name)
            return entry

    def _probe_list(self, target: _Mod) -> list[tuple[_Mod, Role]]:
        """``kmod_module_get_probe_list``: softdeps pre, dependencies, module, softdeps post."""
        visited: set[_Key] = set()
        required: set[_Key] = set()
        out: list[tuple[_Mod, Role]] = []

        def fill(mod: _Mod, role: Role) -> None:
            pre, post = self._softdeps(mod.name)
            for m in pre:
                walk(m, False, Role.SOFTDEP_PRE)
            out.append((mod, role))
            for m in post:
                walk(m, False, Role.SOFTDEP_POST)

        def walk(mod: _Mod, req: bool, role: Role) -> None:
            if mod.key in visited:
                return
            visited.add(mod.key)
            entry = self._dep(mod.name)
            # libkmod prepends each modules.dep entry: the last listed comes first.
            deps = [_Mod(d) for d in reversed(entry.deps)] if entry is not None else []
            if req:
                required.add(mod.key)
                required.update(d.key for d in deps)
            for d in deps:
                fill(d, Role.DEPENDENCY if req else role)
            fill(mod, role)

        walk(target, True, Role.TARGET)
        result = []
        for mod, role in out:
            if mod.key == target.key:
                role = Role.TARGET
            elif mod.key in required:
                role = Role.DEPENDENCY
            result.append((mod, role))
        return result

    def _entries(self, target: _Mod, extra_options: str) -> list[_Entry]:
        cfg = self.config
        tree = self.tree
        entries: list[_Entry] = []
        for mod, role in self._probe_list(target):
            name = mod.name
            moptions = cfg.options_for(name, mod.alias)
            # module_options_concat: config options, a space, then the request's
            # options for the module asked for only.
            options = moptions + " " if moptions else ""
            if mod.key == target.key:
                options += extra_options
            raw = mod.install if mod.install is not None else self._install_for(name)
            pre, post = self._softdeps(name)
            # libkmod loads a module with softdeps directly, dropping its
            # install command (mod->ignorecmd, kmod bug #446), so
            # "install foo /bin/false" forbids nothing once foo has a softdep.
            # kmodd honours the command (a deliberate difference; the loader
            # says so at notice level); --show-depends still prints kmod's plan.
            kmod_drops = raw is not None and bool(pre or post)
            entry = self._dep(name)
            path = entry.path if entry is not None else None
            builtin = path is None and (mod.builtin or tree.is_builtin(name))
            step = ModuleStep(
                name=name, path=path, options=options, builtin=builtin,
                # As written: the loader substitutes the options shell-quoted.
                install_command=raw, kmod_ignores_install=kmod_drops,
                deps=entry.deps if entry is not None else (), role=role)
            entries.append(_Entry(mod, step, None if kmod_drops else raw))
        return entries

    def _targets(self, request: str, blacklist_all: bool
                 ) -> tuple[list[_Mod], list[str], bool]:
        """Lookup results split into (kept, blacklisted names, found at all)."""
        name = alias_normalize_or_none(request)
        found = self._lookup(name) if name is not None else []
        blacklist = self.config.blacklist
        kept: list[_Mod] = []
        dropped: list[str] = []
        for mod in found:
            # modprobe: KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY, plus
            # KMOD_PROBE_APPLY_BLACKLIST with -b (udev).
            if (blacklist_all or mod.alias is not None) and mod.name in blacklist:
                dropped.append(mod.name)
            else:
                kept.append(mod)
        return kept, dropped, bool(found)

    def plan(self, request: str, *, extra_options: str = "",
             blacklist_all: bool = False) -> Plan:
        """Everything a request loads, each module once, in modprobe's order.

        A module met again later (a second target that is a dependency of the
        first, say) is already loaded by then, as modprobe finds it.
        """
        kept, dropped, _ = self._targets(request, blacklist_all)
        steps: dict[str, ModuleStep] = {}
        for mod in kept:
            for entry in self._entries(mod, extra_options):
                step = entry.step
                first = steps.get(step.name)
                if first is None:
                    steps[step.name] = step
                elif _RANK[step.role] > _RANK[first.role]:
                    # Loaded where first met, but as required as its most
                    # demanding use: a target's failure must not pass as a softdep's.
                    steps[step.name] = replace(first, role=step.role)
        targets = tuple(dict.fromkeys(m.name for m in kept))
        return Plan(request=request, targets=targets, steps=tuple(steps.values()),
                    blacklisted=tuple(dict.fromkeys(dropped)))

    def show_depends(self, request: str, *, extra_options: str = "",
                     blacklist_all: bool = False) -> tuple[list[str], bool]:
        """The lines ``modprobe --show-depends [-b] REQUEST`` prints, and whether it resolved."""
        kept, _, found = self._targets(request, blacklist_all)
        lines: list[str] = []
        for mod in kept:
            for entry in self._entries(mod, extra_options):
                step = entry.step
                if entry.raw_install is not None:
                    lines.append(f"install {entry.raw_install} {step.options}")
                elif step.path is not None:
                    lines.append(f"insmod {step.path} {step.options}")
                elif step.builtin:
                    lines.append(f"builtin {step.name}")
        return lines, found


def open_resolver(root: Root, version: str, config_paths: Sequence[str] | None = None,
                  cmdline: str | None = None) -> Resolver:
    """A resolver for ``root``'s ``lib/modules/VERSION`` and its configuration."""
    # libkmod makes a relative module directory absolute (modprobe -d tree),
    # and the paths in a plan must not depend on a later working directory.
    moddir = root.modules_dir(version).absolute()
    tree = ModuleTree(moddir)
    config = load_config(root, moddir, config_paths, cmdline)
    return Resolver(config, tree)
