"""Persistence: the platform database (SQLAlchemy + Alembic) and object storage.

Knows nothing of flows; the model library knows nothing of it.
"""
