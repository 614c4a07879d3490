"""The kernel as an interface: a real implementation and a simulated one."""
