"""Alembic migrations, shipped inside the package (``Database.upgrade`` runs them).

This file makes the directory a package so ``env.py`` is installed with it.
"""
