"""``kmodd``: the daemon's entry point.  Parses settings, picks the kernel, runs the service.

Up to the head start's first insert (kmodd.daemon.learned.start_head_start)
only what settings, kernel and head start need is imported: logging, typing
and the service come after it, while the kernel runs the first inits
(tests/unit/test_head_start.py holds the path to that).
"""

from __future__ import annotations

import sys

from kmodd.daemon.settings import Settings, SettingsError, parse_settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging

    from kmodd.kernel.protocol import Kernel
    from kmodd.resolution.resolve import Resolver


def make_kernel(settings: Settings) -> Kernel:
    if settings.kernel.startswith("sim:"):
        from pathlib import Path

        from kmodd.kernel.sim import SimKernel
        return SimKernel(Path(settings.kernel[4:]), keep_images=False)
    from kmodd.kernel.real import RealKernel
    return RealKernel(settings.root_obj)


def resolver_factory(settings: Settings) -> Resolver:
    from kmodd.resolution.resolve import open_resolver
    from kmodd.root import running_kernel_version
    root = settings.root_obj
    version = settings.version or running_kernel_version(root)
    return open_resolver(root, version, list(settings.modprobe_config)
                         if settings.modprobe_config is not None else None)


def _setup_logging(settings: Settings) -> logging.Logger:
    """Logging as the settings say; the daemon's own logger."""
    import logging

    level = {"notice": logging.INFO}.get(settings.log_level,
                                         getattr(logging, settings.log_level.upper()))
    try:
        from kmodd.journal import setup_logging
        setup_logging(settings.journal, level=level)
    except ImportError:
        logging.basicConfig(level=level, format="%(name)s: %(levelname)s: %(message)s")
    return logging.getLogger("kmodd")


def _dump_stacks_on_sigusr2() -> None:
    """``kill -USR2 $(pidof kmodd)``: every thread's stack to stderr (the journal
    under systemd), for a daemon that stopped answering.  faulthandler writes
    from the signal handler itself, so it works while the event loop is stuck."""
    import contextlib
    import faulthandler
    import signal

    # stderr with no descriptor (an embedding that captures it): no dump.
    with contextlib.suppress(AttributeError, ValueError, OSError):
        faulthandler.register(signal.SIGUSR2, file=sys.stderr.fileno(), all_threads=True)


def main(argv: list[str] | None = None) -> int:
    try:
        settings, source = parse_settings(argv)
        if source.show:
            print(source.describe())
            return 0
    except SettingsError as exc:
        print(f"kmodd: {exc}", file=sys.stderr)
        return 2
    try:
        kernel = make_kernel(settings)
    except Exception as exc:
        _setup_logging(settings).error("cannot start: %s", exc)
        return 1
    # Before anything else is imported: the kernel's inits run meanwhile.
    from kmodd.daemon.learned import learned_order, start_head_start
    learned = learned_order(settings)
    early, no_head_start = start_head_start(settings, kernel, learned)
    log = _setup_logging(settings)
    _dump_stacks_on_sigusr2()
    from kmodd.daemon.service import Service
    try:
        service = Service(settings, kernel, resolver_factory, settings_source=source,
                          early=early, no_head_start=no_head_start, learned=learned)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        return service.run()
    except Exception as exc:
        log.exception("fatal: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
