"""The daemon: the event loop, the request sources and the pool that serves them.

Request sources (uevents and coldplug, kernel requests, modules-load.d, the
control socket) feed the scheduler, which runs plans through the kernel
layer's loader; state, settings, autoclean and systemd integration around it.
Built on resolution, modfile and kernel; only the cli imports it.
"""
