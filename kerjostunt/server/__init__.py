"""The STUNT server run by ``twistd kerjostunt``: signaling, registrar, calls,
probes, web, metrics and the operator's admin commands.

It reaches the database only through :mod:`kerjostunt.store`'s async API and
never imports :mod:`kerjostunt.client`.
"""
