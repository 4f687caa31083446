"""Alembic migrations for the idempotency records table."""
