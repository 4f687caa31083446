"""Keys, for integrations and users who build keys themselves: how a key is read from a
message, made text, scoped, and how a payload becomes canonical JSON. The same functions
``@idempotent`` uses, so a key built here is the key the decorator stores."""

from __future__ import annotations

from ._canonical import canonical_json
from ._keys import MAX_KEY_LENGTH, KeySpec, as_key_text, check_text, extractor, fit, scoped

__all__ = [
    "MAX_KEY_LENGTH",
    "KeySpec",
    "as_key_text",
    "canonical_json",
    "check_text",
    "extractor",
    "fit",
    "scoped",
]
