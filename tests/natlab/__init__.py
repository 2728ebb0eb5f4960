"""The NAT lab: network namespaces, veth pairs and nftables NATs, with link
delays made in userspace.  See docs/nat-lab.rst."""

from .lab import Host, Lab, LabError, NATSpec, lab_unavailable, sweep_stale

__all__ = ["Host", "Lab", "LabError", "NATSpec", "lab_unavailable", "sweep_stale"]
