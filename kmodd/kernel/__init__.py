"""The kernel as an interface: a real implementation and a simulated one.

``protocol`` is the interface, ``real`` and ``sim`` its two implementations,
``errors`` and ``netlink`` what they read back; ``loader`` and ``commands``
execute load plans against any of them, as modprobe does.
"""
