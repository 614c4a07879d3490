"""Resolution: what a name or alias means, as libkmod and modprobe compute it.

Pure lookups, no threads, no syscalls: names and alias patterns, the module
indexes (text and kmod's binary tries) and their cache, modprobe.d and the
kernel command line, and the load plans built from them.  Imports nothing
from the layers above (modfile, kernel, daemon, cli).
"""
