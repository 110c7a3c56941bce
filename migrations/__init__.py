"""Alembic environment and versions of the results database (applied on open)."""
