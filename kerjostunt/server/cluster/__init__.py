"""Several server instances on one PostgreSQL (docs/cluster.rst).

``node.py`` is one instance's part (lease, broadcasts, relays), ``view.py``
what it knows of the others, ``legs.py`` the two ends of a call leg that
crosses instances, ``envelope.py`` what the instances say over NOTIFY. The
database side (presence rows, the LISTEN/NOTIFY connections) is in
``store/presence.py`` and ``store/channels.py``.
"""

from kerjostunt.server.cluster.node import ClusterCalls, ClusterNode, NodeSettings

__all__ = ["ClusterCalls", "ClusterNode", "NodeSettings"]
