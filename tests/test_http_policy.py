"""The HTTP layer's pure parts: the header grammar, the storage policy, the identity
helper and the settings it refuses (no server needed)."""

from __future__ import annotations

import hashlib

import pytest
from idempotent.integrations._http import (
    HttpPolicy,
    Problem,
    Request,
    default_storable,
    header_identity,
    parse_key,
)

from idempotent import MemoryStore


@pytest.mark.parametrize(("values", "key"), [
    ([], None), (["abc"], "abc"), (['"abc"'], "abc"), ([' "a b" '], "a b"),
    (['"a\\"b\\\\c"'], 'a"b\\c'), (["x" * 255], "x" * 255), (['"' + "y" * 255 + '"'], "y" * 255),
])
def test_parse_key_accepts(values: list[str], key: str | None) -> None:
    """Bare tokens and structured-field strings (with their two escapes)."""
    assert parse_key(values) == key


@pytest.mark.parametrize("values", [
    [""], ['""'], ["x" * 256], ["a", "a"], ["a,b"], ['"a" "b"'], ['"open'], ['"\\x"'],
    ["caf\u00e9"], ['"tab\there"'], ["a b"], ['a"b'],
])
def test_parse_key_refuses(values: list[str]) -> None:
    """Empty, too long, repeated, a list, malformed, non-ASCII: a 400 problem."""
    with pytest.raises(Problem) as info:
        parse_key(values)
    assert info.value.status == 400 and info.value.kind == "invalid-key"


def test_storage_policy() -> None:
    """2xx and 4xx are stored; 429, 1xx, 3xx and 5xx are not."""
    assert [s for s in (100, 200, 201, 204, 301, 400, 404, 409, 422, 429, 500, 503)
            if default_storable(s)] == [200, 201, 204, 400, 404, 409, 422]


def test_header_identity_hashes() -> None:
    """The identity is the SHA-256 of the header, never the secret; None without it."""
    ident = header_identity("Authorization")
    req = Request("POST", "/", "", [("authorization", "Bearer s3cret")], None)
    assert ident(req) == hashlib.sha256(b"Bearer s3cret").hexdigest()
    assert ident(Request("POST", "/", "", [], None)) is None


def test_policy_refusals() -> None:
    """Headers that must never be replayed, transactional without a SqlStore, wait= in
    transactional mode: refused where the middleware is built."""
    with pytest.raises(ValueError, match="never replayed"):
        HttpPolicy(MemoryStore(), replay_headers=["Set-Cookie"])
    with pytest.raises(TypeError, match="SqlStore"):
        HttpPolicy(MemoryStore(), transactional=True)


def test_problem_body() -> None:
    """A problem is application/problem+json with type, title, status and detail."""
    response = Problem(409, "in-progress", "T", "D", [("retry-after", "2")]).response()
    assert response.status == 409
    assert ("content-type", "application/problem+json") in response.headers
    assert b'"type": "https://idempotent-py.readthedocs.io/en/latest/http/#in-progress"' in (
        response.body)


def test_wait_refused_in_transactional_mode(sqlite_url: str) -> None:
    """A transactional duplicate waits on the row lock: ``wait=`` there is refused."""
    from idempotent import SqlStore

    store = SqlStore(sqlite_url)
    try:
        with pytest.raises(TypeError, match="lock_timeout"):
            HttpPolicy(store, transactional=True, wait=5)
    finally:
        store.engine.dispose()


@pytest.mark.parametrize("value", ["-5", "+5", "1_0", "abc", ""])
def test_bad_content_length(value: str) -> None:
    """A Content-Length that is not a non-negative integer: 400, before any read."""
    from idempotent.integrations._http import content_length

    with pytest.raises(Problem) as info:
        content_length([("content-length", value)])
    assert info.value.status == 400 and info.value.kind == "bad-content-length"
    assert content_length([("content-length", "12")]) == 12
    assert content_length([]) is None
