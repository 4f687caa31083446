"""Where a message's key comes from, and how it is made fit for storage.

Keys are scoped (by tenant or client identity, when given) and keys longer than the
column are replaced by their SHA-256, never truncated: two long keys that share a prefix
stay two keys.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ._canonical import canonical_json
from .exceptions import InvalidIdempotencyKey, MissingIdempotencyKey

#: Longest key or namespace (in characters) stored as is; longer ones are hashed.
MAX_KEY_LENGTH = 128
_HASH_PREFIX = "sha256:"

KeySpec = str | Callable[..., Any]


def check_text(what: str, value: str) -> None:
    """Refuse text that a store cannot hold exactly: a NUL (PostgreSQL refuses or cuts
    it) or a lone surrogate (not encodable as UTF-8). ``what``: key, namespace, scope."""
    if type(value) is not str:
        raise TypeError(f"a {what} must be str, not {type(value).__qualname__}")
    if "\x00" in value:
        raise InvalidIdempotencyKey(
            f"the {what} {value!r} contains a NUL character, which stores cannot hold "
            "exactly; refused, nothing was recorded")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidIdempotencyKey(
                f"the {what} {value!r} is not valid Unicode text (a lone surrogate at "
                f"{exc.start}); refused, nothing was recorded") from None


def fit(value: str) -> str:
    """``value`` if it fits the column, else ``sha256:<hex>`` of it."""
    if len(value) <= MAX_KEY_LENGTH:
        return value
    return _HASH_PREFIX + hashlib.sha256(value.encode("utf-8")).hexdigest()


def as_key_text(value: Any) -> str | None:
    """The text of a raw key value, or ``None`` when there is no usable key."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):  # a bool is an int, but never a key
        raise TypeError("an idempotency key cannot be a bool")
    if isinstance(value, (int, uuid.UUID)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex() or None
    if isinstance(value, (tuple, list)):
        return canonical_json(list(value)) if value else None
    raise TypeError(
        f"an idempotency key must be str, int, UUID, bytes or a tuple of them, "
        f"not {type(value).__qualname__}"
    )


def scoped(key: str, scope: str | None) -> str:
    """The key as stored: unambiguous when a scope (tenant, client) is given."""
    if scope is None:
        return fit(key)
    return fit(canonical_json([scope, key]))


def extractor(spec: KeySpec) -> Callable[..., Any]:
    """A function over the handler's ``(*args, **kwargs)`` that returns the raw key.

    A string names an item (mapping) or attribute of the first argument; a callable is
    called with the handler's arguments, minus the ``session``/``connection`` the
    decorator passes in.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError("key= must be a non-empty item/attribute name or a callable")
    name = spec

    def by_name(*args: Any, **kwargs: Any) -> Any:
        if not args:
            return kwargs.get(name)
        message = args[0]
        if isinstance(message, Mapping):
            return message.get(name)
        return getattr(message, name, None)

    return by_name


def missing(namespace: str, spec: KeySpec) -> MissingIdempotencyKey:
    """The error for a message whose key is absent or empty."""
    where = f"{spec!r} of the message" if isinstance(spec, str) else "the key function"
    return MissingIdempotencyKey(
        f"{namespace}: no idempotency key ({where} gave nothing); the handler did not run "
        "and nothing was recorded",
        namespace=namespace,
    )
