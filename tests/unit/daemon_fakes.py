"""Fakes shared by the daemon-core tests: a resolver over a small module graph,
module files for :class:`SimKernel`, a loader that can be held at a gate."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from kmodd.kernel.loader import Loader, StepResult
from kmodd.kernel.sim import SimKernel
from kmodd.resolution.plan import ModuleStep, Plan, Role


class GraphResolver:
    """Resolves aliases to modules of ``graph`` (module -> hard deps) like Resolver.plan."""

    def __init__(self, moddir: Path, graph: Mapping[str, Iterable[str]], *,
                 aliases: Mapping[str, Iterable[str]] | None = None,
                 blacklist: Iterable[str] = (), builtin: Iterable[str] = (),
                 softdeps: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None
                 ) -> None:
        self.moddir = moddir
        self.graph = {k: tuple(v) for k, v in graph.items()}
        self.aliases = {k: tuple(v) for k, v in (aliases or {}).items()}
        self.blacklist = set(blacklist)
        self.builtin = set(builtin)
        self.softdeps = dict(softdeps or {})
        self.removes: dict[str, str] = {}     # modprobe.d remove: pattern -> command
        self.calls = 0
        self._lock = threading.Lock()
        moddir.mkdir(parents=True, exist_ok=True)
        for name in self.graph:
            (moddir / f"{name}.ko").write_bytes(b"\x7fELF" + name.encode())

    def remove_command(self, module: str) -> str | None:
        # A pattern, as Resolver.remove_command matches them (first match wins).
        return next((cmd for pat, cmd in self.removes.items()
                     if fnmatch.fnmatchcase(module, pat)), None)

    def blacklisted(self, module: str) -> bool:
        return module in self.blacklist

    def path(self, name: str) -> str:
        return str(self.moddir / f"{name}.ko")

    def _add(self, name: str, role: Role, steps: list[ModuleStep], seen: set[str]) -> None:
        if name in seen:
            return
        seen.add(name)
        pre, post = self.softdeps.get(name, ((), ()))
        for p in pre:
            self._add(p, Role.SOFTDEP_PRE, steps, seen)
        for dep in self.graph.get(name, ()):
            self._add(dep, Role.DEPENDENCY, steps, seen)
        steps.append(ModuleStep(name, None if name in self.builtin else self.path(name),
                                builtin=name in self.builtin, deps=self.graph.get(name, ()),
                                role=role))
        for p in post:
            self._add(p, Role.SOFTDEP_POST, steps, seen)

    def plan(self, request: str, *, extra_options: str = "",
             blacklist_all: bool = False) -> Plan:
        with self._lock:
            self.calls += 1
        if request in self.graph or request in self.builtin:
            names: tuple[str, ...] = (request,)
        else:
            names = self.aliases.get(request, ())
            if not names:
                return Plan(request, ())
        # modprobe: the blacklist applies to aliases always, to names only with -b.
        kept = tuple(n for n in names if n not in self.blacklist or
                     (not blacklist_all and n == request))
        dropped = tuple(n for n in names if n not in kept)
        if not kept:
            return Plan(request, (), blacklisted=dropped)
        steps: list[ModuleStep] = []
        seen: set[str] = set()
        for name in kept:
            self._add(name, Role.TARGET, steps, seen)
        return Plan(request, kept, tuple(steps), blacklisted=dropped)


def sim_kernel(tmp: Path, graph: Mapping[str, Iterable[str]], **kwargs: object) -> SimKernel:
    return SimKernel(tmp, deps={k: tuple(v) for k, v in graph.items()}, **kwargs)  # type: ignore[arg-type]


class GatedLoader:
    """A real Loader whose loads of ``gated`` modules wait for ``release()``.

    ``entered[name]`` is set when a gated load begins, so tests wait on events
    instead of sleeping.
    """

    def __init__(self, kernel: SimKernel, gated: Iterable[str] = (), *,
                 barrier: threading.Barrier | None = None,
                 barrier_modules: Iterable[str] = ()) -> None:
        self.inner = Loader(kernel, coming_timeout=5.0)
        self.gated = set(gated)
        self.gate = threading.Event()
        self.entered: dict[str, threading.Event] = {n: threading.Event() for n in self.gated}
        self.barrier = barrier
        self.barrier_modules = set(barrier_modules)
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def release(self) -> None:
        self.gate.set()

    def load_step(self, step: ModuleStep) -> StepResult:
        with self._lock:
            self.calls.append(step.name)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if step.name in self.gated:
                self.entered[step.name].set()
                if not self.gate.wait(10):
                    raise RuntimeError("gate never opened")
            if self.barrier is not None and step.name in self.barrier_modules:
                self.barrier.wait(10)
            return self.inner.load_step(step)
        finally:
            with self._lock:
                self.active -= 1

    def unload(self, name: str, *, remove_command: str | None = None,
               force: bool = False) -> StepResult:
        return self.inner.unload(name, remove_command=remove_command, force=force)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
