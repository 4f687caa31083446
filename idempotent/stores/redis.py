"""Redis store (lease mode). Placeholder: being written for issue 4."""

from __future__ import annotations

from typing import Any

from .base import Store


class RedisStore(Store):
    """Not yet implemented."""

    def __init__(self, url_or_client: Any, **options: Any) -> None:
        raise NotImplementedError("RedisStore is not written yet")
