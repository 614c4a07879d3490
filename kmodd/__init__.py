"""kmodd: an on-demand Linux kernel-module loader.

The engine lives in this package, one module per concern; ``kmodd.cli``
holds the thin front ends (``kmodd``, ``kmodctl``, ``kmodd-request``).

``kmodd.__version__`` comes from pyproject.toml, the one place the version is
written: read from the source tree when running from a checkout, else from
the installed distribution's metadata.  Computed on first use only, so
importing the package costs nothing.
"""

from __future__ import annotations


def version() -> str:
    """The version of kmodd (pyproject.toml's ``project.version``)."""
    # pathlib only here: every front end imports this package first.
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        with pyproject.open("rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "kmodd" and isinstance(project.get("version"), str):
            return str(project["version"])
    except (OSError, ValueError):
        pass
    from importlib import metadata

    try:
        return metadata.version("kmodd")
    except metadata.PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
