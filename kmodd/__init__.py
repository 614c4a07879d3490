"""kmodd: an on-demand kernel module loader.

The engine lives in this package, one module per concern; ``kmodd.cli``
holds the thin front ends (``kmodd``, ``kmodctl``, ``kmodd-request``).
"""

__version__ = "0.1.0"
