"""Dedup stores: SQL (SQLAlchemy), in-memory, and Redis (with the ``redis`` extra).

`RedisStore` is imported on first use, so ``import idempotent`` never needs redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import DEFAULT_LEASE, DEFAULT_TTL, Store
from .memory import MemoryStore
from .sql import SqlStore, Transaction

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "MemoryStore",
    "RedisStore",
    "SqlStore",
    "Store",
    "Transaction",
    "open_store",
]


def open_store(url: str, **options: Any) -> Store:
    """The store for ``url``: ``redis://``, ``rediss://`` or ``unix://`` → `RedisStore`;
    anything else is a SQLAlchemy URL → `SqlStore`."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url, **options)
    return SqlStore(url, **options)


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
