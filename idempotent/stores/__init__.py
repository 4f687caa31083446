"""Dedup stores: SQL (SQLAlchemy), in-memory; Redis comes with its own extra."""

from .base import DEFAULT_LEASE, DEFAULT_TTL, Store
from .memory import MemoryStore
from .sql import SqlStore, Transaction

__all__ = ["DEFAULT_LEASE", "DEFAULT_TTL", "MemoryStore", "SqlStore", "Store", "Transaction"]
