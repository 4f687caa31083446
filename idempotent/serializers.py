"""How a handler's result is stored and handed back to duplicates.

JSON by default. A store shared by many services must never become a way to run code,
so nothing here unpickles; a user who wants another format passes an object with
``dumps``/``loads``.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from ._canonical import one_shot
from .exceptions import ResultNotSerializable


class Serializer(Protocol):
    """Turns a result into bytes and back. ``dumps`` raises ``TypeError``/``ValueError``."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# Built once (``json.dumps`` with options builds an encoder per call); thread-safe.
_encode = one_shot(json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False))


class JSONSerializer:
    """Results as compact UTF-8 JSON; a duplicate gets the JSON round trip of the result
    (tuples come back as lists). NaN and infinities are refused, as JSON has none."""

    def dumps(self, value: Any) -> bytes:
        return _encode(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


def encode_result(serializer: Serializer, value: Any, *, namespace: str, key: str) -> bytes:
    """``serializer.dumps(value)``, with its failure turned into `ResultNotSerializable`."""
    try:
        return serializer.dumps(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # too deep too
        raise ResultNotSerializable(
            f"the result of {namespace!r} for key {key!r} cannot be stored "
            f"({type(value).__qualname__}): {exc}; nothing was recorded",
            namespace=namespace,
            key=key,
        ) from exc
