"""The client subcommands of ``kerjostunt``: echo-server, echo-client, peers, join, netcheck."""
