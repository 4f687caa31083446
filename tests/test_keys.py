"""Keys and fingerprints: extraction, scoping, hashing of long keys, canonical payloads."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import uuid

import pytest

from idempotent import _keys
from idempotent._canonical import canonical_json, fingerprint


def test_item_and_attribute_names_read_the_first_argument() -> None:
    """A key name reads an item of a mapping or an attribute of an object."""

    class Msg:
        id = "m-1"

    assert _keys.extractor("id")({"id": "m-2"}) == "m-2"
    assert _keys.extractor("id")(Msg()) == "m-1"
    assert _keys.extractor("id")(id="kw") == "kw"
    assert _keys.extractor(lambda m, n: f"{m}:{n}")("a", 3) == "a:3"


@pytest.mark.parametrize("value", [None, "", b"", (), []])
def test_empty_keys_are_missing(value: object) -> None:
    """None and empty values are no key at all."""
    assert _keys.as_key_text(value) is None


def test_key_types() -> None:
    """Strings, ints, UUIDs, bytes and tuples become text; bools and floats are refused."""
    u = uuid.UUID(int=5)
    assert _keys.as_key_text(42) == "42"
    assert _keys.as_key_text(u) == str(u)
    assert _keys.as_key_text(b"\x01\xff") == "01ff"
    assert _keys.as_key_text(("topic", 3, 77)) == '["topic",3,77]'
    with pytest.raises(TypeError, match="bool"):
        _keys.as_key_text(True)
    with pytest.raises(TypeError, match="float"):
        _keys.as_key_text(1.5)


def test_long_keys_are_hashed_not_truncated() -> None:
    """Two long keys that share a long prefix stay two keys, each of fixed length."""
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    fa, fb = _keys.fit(a), _keys.fit(b)
    assert fa != fb
    assert fa.startswith("sha256:") and len(fa) == len("sha256:") + 64
    assert _keys.fit("short") == "short"
    assert _keys.fit("k" * _keys.MAX_KEY_LENGTH) == "k" * _keys.MAX_KEY_LENGTH


def test_scopes_keep_tenants_apart_unambiguously() -> None:
    """The same key in two scopes is two keys, and no scope/key split can collide."""
    assert _keys.scoped("k", "tenant-a") != _keys.scoped("k", "tenant-b")
    assert _keys.scoped("b:c", "a") != _keys.scoped("c", "a:b")
    assert _keys.scoped("k", None) == "k"


def test_fingerprint_is_canonical() -> None:
    """Key order, tuples vs lists and dataclasses vs dicts do not change the fingerprint."""

    @dataclasses.dataclass
    class Pay:
        account: str
        cents: int

    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": (1, 2), "a": 1})
    assert fingerprint(Pay("acc", 5)) == fingerprint({"cents": 5, "account": "acc"})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("x")) == 64


def test_canonical_encoding_of_common_types() -> None:
    """Decimals, datetimes, UUIDs, bytes and sets have one stable encoding."""
    payload = {
        "amount": decimal.Decimal("10.50"),
        "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "id": uuid.UUID(int=1),
        "raw": b"\x00\x01",
        "tags": {"b", "a"},
    }
    assert canonical_json(payload) == (
        '{"amount":{"$decimal":"10.50"},"at":"2026-01-02T03:04:05+00:00",'
        '"id":"00000000-0000-0000-0000-000000000001","raw":{"$bytes":"AAE="},'
        '"tags":["\\"a\\"","\\"b\\""]}'
    )


def test_unencodable_payloads_are_refused_with_a_hint() -> None:
    """A payload that cannot be encoded deterministically raises TypeError naming the fix."""
    with pytest.raises(TypeError, match="fingerprint="):
        fingerprint({"f": object()})
    with pytest.raises(ValueError):
        fingerprint(float("nan"))


def test_encodings_that_fingerprints_are_stored_under_never_change() -> None:
    """The canonical text of what was accepted before issue 15 (dataclasses, enums, plain
    objects with public attributes only, nested) is pinned: a change would make every
    stored record conflict after an upgrade."""
    import enum

    @dataclasses.dataclass
    class Pay:
        account: str
        cents: int
        _note: str = "n"

    class Kind(enum.Enum):
        CARD = "card"

    class Msg:
        def __init__(self) -> None:
            self.id = "m-1"
            self.pay = Pay("acc", 5)
            self.kind = Kind.CARD

    assert canonical_json(Pay("acc", 5)) == '{"_note":"n","account":"acc","cents":5}'
    assert canonical_json([Msg(), (1, 2)]) == (
        '[{"id":"m-1","kind":"card","pay":{"_note":"n","account":"acc","cents":5}},[1,2]]')
    mixed = [Msg(), (1, 2), {"d": decimal.Decimal("1.10"), "u": uuid.UUID(int=3),
                             "t": dt.date(2026, 1, 2), "b": b"\x01", "s": {3, 1},
                             "f": frozenset({"x"})}]
    # computed by the encoding of commit f4f447a (before issue 15's change)
    assert fingerprint(mixed) == (
        "7fc8171d7b311f09da3dacc822d675811c4f8ed20094676243369cb753ef23f7")


def test_private_attributes_and_slots_are_encoded() -> None:
    """Every attribute of a plain object counts, private and slotted (mangled names as
    Python stores them); unset slots are absent; C-level data is refused."""

    class Money:
        __slots__ = ("__cents", "currency")

        def __init__(self, cents: int) -> None:
            self.__cents = cents

    class Account:
        def __init__(self) -> None:
            self._balance = 3

    assert canonical_json(Money(5)) == '{"_Money__cents":5}'
    assert canonical_json(Account()) == '{"_balance":3}'
    assert fingerprint(Money(5)) != fingerprint(Money(6))
    with pytest.raises(TypeError, match=r"ValueError.*fingerprint="):
        fingerprint(ValueError("x"))
