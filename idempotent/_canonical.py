"""A canonical JSON encoding of payloads, and the SHA-256 fingerprint built on it.

Two payloads that mean the same (dict order, tuple vs list, a dataclass vs its dict) give
the same bytes; anything that cannot be encoded deterministically is refused, never
guessed at with ``repr``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Set
from typing import Any


def _default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, decimal.Decimal):
        return {"$decimal": str(obj)}
    if isinstance(obj, (dt.datetime, dt.date, dt.time)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Set):
        return sorted(canonical_json(x) for x in obj)
    model_dump = getattr(obj, "model_dump", None)  # pydantic v2
    if callable(model_dump):
        return model_dump(mode="json")
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise TypeError(
        f"cannot fingerprint a {type(obj).__qualname__}: pass fingerprint= (field names "
        "or a callable returning JSON-compatible data), or fingerprint=False"
    )


def one_shot(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """``encoder.encode``, made cheaper for the hot path (same text, same errors).

    ``JSONEncoder.encode`` builds a new C encoder on every call (about half its cost for a
    small dict), because the dict it uses to detect circular references is per call. The
    C encoder built here once skips that detection (its only state), so it serves every
    thread; a circular value then ends in `RecursionError`, and only then is the value
    encoded again by ``encoder.encode``, which raises the usual ``ValueError`` (and a
    merely very deep value raises `RecursionError` again, as it did).
    """
    make = getattr(json.encoder, "c_make_encoder", None)  # None without the C module
    if make is None or encoder.indent is not None:  # no C accelerator: nothing to gain
        return encoder.encode
    basestring = (json.encoder.encode_basestring_ascii if encoder.ensure_ascii
                  else json.encoder.encode_basestring)
    fast = make(None, encoder.default, basestring, None, encoder.key_separator,
                encoder.item_separator, encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)
    checked, join = encoder.encode, "".join

    def encode(obj: Any) -> str:
        try:
            return join(fast(obj, 0))
        except RecursionError:
            return checked(obj)

    return encode


# Built once: ``json.dumps`` with options builds an encoder per call. ``encode`` keeps
# no state between calls, so one encoder serves every thread (and the recursion of
# `_default` for sets).
_encode = one_shot(json.JSONEncoder(
    default=_default,
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=False,
))


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: sorted keys, no spaces, UTF-8 kept as is."""
    return _encode(obj)


def fingerprint(payload: Any) -> str:
    """SHA-256 (hex) of the canonical encoding of ``payload``."""
    return hashlib.sha256(_encode(payload).encode()).hexdigest()
