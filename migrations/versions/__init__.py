"""Revisions of idempotent's Alembic history (branch ``idempotent``)."""
