"""kerjostunt: TCP NAT traversal for peer-to-peer groups."""

__version__ = "0.1.0"
