"""A canonical JSON encoding of payloads, and the SHA-256 fingerprint built on it.

Two payloads that mean the same (dict order, tuple vs list, a dataclass vs its dict) give
the same bytes; anything that cannot be encoded deterministically is refused, never
guessed at with ``repr``.

What each value becomes (these encodings are stored in every record's fingerprint, so they
never change between versions):

* JSON's own types as JSON; a mapping as an object, a sequence as an array;
* a dataclass: its fields (``dataclasses.fields``); a pydantic v2 model:
  ``model_dump(mode="json")``;
* ``bytes``: ``{"$bytes": base64}``; ``Decimal``: ``{"$decimal": str}``; datetime, date
  and time: ISO 8601; ``UUID``: its text; an ``Enum``: its value; a set: its members'
  canonical texts, sorted;
* any other object of a class written in Python: an object of EVERY attribute it holds,
  private ones (``_cents``) included: those of its ``__dict__`` and the ``__slots__`` that
  are set. An object with public attributes only encodes as it always did; one with a
  private attribute now includes it (before issue 15 such payloads gave one fingerprint for
  different data, and a reused key replayed instead of raising a conflict).

Refused with a `TypeError` that names the type and says to pass ``fingerprint=`` (field
names, or a callable returning JSON-compatible data), because their data is not in their
attributes or is not theirs to fingerprint: an object with neither ``__dict__`` nor slots
(``object()``), an instance of a type written in C or of a class derived from one (files
and other ``io`` objects, generators, functions, exceptions, sockets, locks...),
``email.message.Message`` (headers and payload are kept in private structures with
policies and defects; fingerprint ``m.as_bytes()`` or the fields that matter) and
``pathlib`` paths (their slots are caches; fingerprint ``str(path)``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import json
import sys
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
    return _attributes(obj)


#: ``type.__flags__`` bit of a class made at run time (every class written in Python).
_HEAPTYPE = 1 << 9


def _refuse(obj: Any, why: str) -> TypeError:
    return TypeError(
        f"cannot fingerprint a {type(obj).__module__}.{type(obj).__qualname__}: {why}; "
        "pass fingerprint= (field names or a callable returning JSON-compatible data), "
        "or fingerprint=False"
    )


def _attributes(obj: Any) -> dict[Any, Any]:
    """Every attribute of a plain object (``__dict__`` and set slots), or a TypeError for
    an object whose data the attributes do not hold (see the module docstring)."""
    cls = type(obj)
    for base in cls.__mro__[:-1]:  # every class but object
        if not base.__flags__ & _HEAPTYPE:
            raise _refuse(obj, f"its data is kept by {base.__qualname__}, a type written "
                               "in C, not in attributes")
    message = sys.modules.get("email.message")
    if message is not None and isinstance(obj, message.Message):
        raise _refuse(obj, "a message keeps its headers and payload in private structures "
                           "(fingerprint m.as_bytes(), or the fields that matter)")
    pathlib = sys.modules.get("pathlib")
    if pathlib is not None and isinstance(obj, pathlib.PurePath):
        raise _refuse(obj, "a path's slots are caches (fingerprint str(path))")
    has_dict = hasattr(obj, "__dict__")
    out: dict[Any, Any] = dict(vars(obj)) if has_dict else {}
    slotted = False
    for base in cls.__mro__[:-1]:
        slots = base.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            slotted = True
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{base.__name__.lstrip('_')}{name}"  # as Python mangles it
            try:
                out[name] = base.__dict__[name].__get__(obj, cls)
            except (AttributeError, KeyError):  # a slot not set: no attribute
                continue
    if not has_dict and not slotted:
        raise _refuse(obj, "it has no attributes (no __dict__, no __slots__)")
    return out


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
