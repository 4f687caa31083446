"""The HTTP ``Idempotency-Key`` layer shared by the ASGI and WSGI integrations.

What is written once here: how the header is read (a structured-field string or a bare
token), how a request becomes a key, a scope and a fingerprint, what is stored (the
storage policy), what is replayed (the header allow-list), the error bodies
(``application/problem+json``), and the decorated handler that runs each request through
the core's one flow (`idempotent.idempotent`: lease mode, or transactional mode with the
endpoint's session). The servers' modules (`idempotent.integrations.asgi`,
`idempotent.integrations.wsgi`) only move bytes.

Follows draft-ietf-httpapi-idempotency-key-header-06 (February 2025), the newest revision
read: a required key missing → 400, the key reused with another payload → 422, the first
request still in flight → 409; a retry after completion gets the first response.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from idempotent import (
    AlreadyInProgress,
    IdempotencyKeyConflict,
    LeaseLost,
    ResultNotStored,
    StoreUnavailable,
    idempotent,
)
from idempotent.stores import Store

#: The draft revision implemented.
DRAFT = "draft-ietf-httpapi-idempotency-key-header-06"
#: The header name, as the draft spells it.
HEADER = "Idempotency-Key"
#: Added to every replayed response.
REPLAYED = "Idempotent-Replayed"
#: Longest key accepted (characters), as Stripe's; longer → 400.
MAX_KEY = 255
#: How long a key is remembered by default: 24 hours (the draft asks for an expiry the
#: documentation states; Stripe keeps keys at least 24 h).
DEFAULT_TTL = 24 * 3600.0
#: Default lease (lease mode): a request running longer keeps it by the heartbeat.
DEFAULT_LEASE = 30.0
#: Largest request body read (bytes); larger → 413, nothing stored.
DEFAULT_MAX_BODY = 1024 * 1024
#: Largest response buffered for storage (bytes); larger ones stream (lease mode).
DEFAULT_MAX_RESPONSE = 1024 * 1024
#: Methods the layer covers unless told otherwise (the draft's).
DEFAULT_METHODS = ("POST", "PATCH")
#: Response headers a replay repeats (lower case), besides the user's ``replay_headers``.
REPLAY_HEADERS = frozenset({
    "content-type", "content-language", "content-disposition", "content-encoding",
    "location", "etag", "last-modified", "link", "cache-control", "vary",
})
#: Never stored nor replayed, even if asked: per-response or per-client headers.
NEVER_REPLAYED = frozenset({
    "set-cookie", "date", "server", "content-length", "transfer-encoding", "connection",
    "retry-after", "ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining",
    "ratelimit-reset", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
})
#: Where the problem ``type`` URIs point; the docs (docs/http.md) define each one.
PROBLEM_BASE = "https://idempotent-py.readthedocs.io/en/latest/http/#"

Identity = Callable[["Request"], "str | None"]
_DEFAULT: Any = object()  # retry= not given: the decorator's default policy


def default_storable(status: int) -> bool:
    """The storage policy: 2xx and 4xx responses are stored (a retry gets them); 5xx
    and 429 are not (the key is released, so a retry runs again)."""
    return 200 <= status < 300 or (400 <= status < 500 and status != 429)


# -- errors of the layer's own (never stored) -------------------------------------------
class Problem(Exception):
    """One of the layer's own error responses (``application/problem+json``, RFC 9457).
    ``kind`` is the fragment of its ``type`` URI."""

    def __init__(self, status: int, kind: str, title: str, detail: str,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.headers = list(headers)

    def response(self) -> Response:
        body = json.dumps({"type": PROBLEM_BASE + self.kind, "title": self.title,
                           "status": self.status, "detail": self.detail}).encode()
        return Response(self.status, [("content-type", "application/problem+json"),
                                      *self.headers], body)


def _bad_key(detail: str) -> Problem:
    return Problem(400, "invalid-key", "Invalid Idempotency-Key", detail)


def body_too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", "Request body too large",
                   f"the request body is over {limit} bytes; nothing was processed or stored")


def response_too_large(limit: int) -> Problem:
    return Problem(500, "response-too-large", "Response too large to store",
                   f"the response is over {limit} bytes, the most a transactional request "
                   "can store; its writes were rolled back, nothing was stored")


def ran_unstored(policy: HttpPolicy, exchange: Exchange, exc: Exception) -> bool:
    """Lease mode: the endpoint ran and answered, then the store failed to take its
    response (`StoreUnavailable` from the complete). The effect happened: the client gets
    that response, not an error that would say nothing ran (the key stays claimed until
    its lease ends; the record never says done). Transactional mode never: there a store
    fault rolled the endpoint's writes back."""
    return (not policy.transactional and exchange.ran and exchange.response is not None
            and isinstance(exc, StoreUnavailable))


def problem_for(exc: Exception) -> Problem | None:
    """The response for an error of the core, or None when it is not one of ours."""
    if isinstance(exc, IdempotencyKeyConflict):
        return Problem(422, "key-reused", "Idempotency-Key reused",
                       "this Idempotency-Key was first used with another request (method, "
                       "path, query or body differ); nothing was processed")
    if isinstance(exc, AlreadyInProgress):
        after = max(1, math.ceil(exc.retry_after))
        return Problem(409, "in-progress", "Request in progress",
                       "the first request with this Idempotency-Key is still being "
                       "processed; retry later", [("retry-after", str(after))])
    if isinstance(exc, ResultNotStored):
        return Problem(409, "response-not-stored", "Response not stored",
                       "the first request with this Idempotency-Key was processed, but its "
                       "response could not be stored; it is not processed again")
    if isinstance(exc, LeaseLost):
        return Problem(500, "lease-lost", "Lease lost",
                       "this request ran past its lease and another request with the same "
                       "Idempotency-Key took the key over; its response was not stored")
    if isinstance(exc, StoreUnavailable):
        return Problem(503, "store-unavailable", "Idempotency store unavailable",
                       "the idempotency store did not answer; the request was not "
                       "completed (nothing was committed); retry it", [("retry-after", "1")])
    return None


# -- requests and responses ----------------------------------------------------------------
@dataclass(slots=True)
class Request:
    """What the layer, and an ``identity`` callable, see of a request. ``headers`` has
    lower-case names and latin-1 values, repeated headers kept apart (ASGI) or as the
    WSGI server joined them; ``raw`` is the ASGI scope or the WSGI environ."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    raw: Any

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)


@dataclass(slots=True)
class Response:
    """A complete response: status, headers (lower-case names), body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def stored(self, allowed: Collection[str]) -> dict[str, Any]:
        """The JSON value stored for a replay: status, allow-listed headers, body
        (base64, so any bytes survive byte for byte)."""
        return {"status": self.status,
                "headers": [[n, v] for n, v in self.headers if n in allowed],
                "body": base64.b64encode(self.body).decode("ascii")}

    @classmethod
    def replay(cls, value: Any) -> Response:
        """The response a duplicate gets from a stored value, marked as a replay."""
        headers = [(str(n), str(v)) for n, v in value["headers"]]
        headers.append((REPLAYED.lower(), "true"))
        return cls(int(value["status"]), headers, base64.b64decode(value["body"]))


class NotStored(Exception):  # a signal to the core, not an error
    """Raised by the handler for a response that is not stored (a 5xx, a 429, a
    streamed response): the core releases the key (lease mode) or rolls the endpoint's
    writes back (transactional), and the response still goes to the client."""

    def __init__(self, response: Response | None, sent: bool = False) -> None:
        super().__init__("response not stored")
        self.response = response
        self.sent = sent


class TooLarge(Exception):
    """A transactional response over ``max_response``: it cannot be stored, and it must
    not reach the client before its writes commit; the writes roll back."""


# -- the header ------------------------------------------------------------------------------
def parse_key(values: list[str]) -> str | None:
    """The key of the ``Idempotency-Key`` header values, or None when absent.

    Accepted: a structured-field string (``"abc"``, RFC 8941 §3.3.3: printable ASCII,
    ``\\"`` and ``\\\\`` escapes) and, as clients often send, a bare token (printable
    ASCII without spaces, quotes, commas or backslashes). Refused (400): empty, longer
    than `MAX_KEY`, repeated (two header lines, or a comma-joined list), or malformed."""
    if not values:
        return None
    if len(values) > 1:
        raise _bad_key("the Idempotency-Key header was sent more than once")
    raw = values[0].strip(" \t")
    if raw.startswith('"'):
        key = _sf_string(raw)
    else:
        if "," in raw:
            raise _bad_key("the Idempotency-Key header holds a list; send one key")
        if any(not 0x21 <= ord(c) <= 0x7E or c in '"\\' for c in raw):
            raise _bad_key("a bare Idempotency-Key must be printable ASCII without spaces, "
                           "quotes or backslashes (or send it as a quoted string)")
        key = raw
    if not key:
        raise _bad_key("the Idempotency-Key is empty")
    if len(key) > MAX_KEY:
        raise _bad_key(f"the Idempotency-Key is {len(key)} characters, over {MAX_KEY}")
    return key


def _sf_string(raw: str) -> str:
    out: list[str] = []
    i, end = 1, len(raw)
    while i < end:
        c = raw[i]
        if c == "\\":
            if i + 1 >= end or raw[i + 1] not in '"\\':
                raise _bad_key("bad escape in the quoted Idempotency-Key")
            out.append(raw[i + 1])
            i += 2
            continue
        if c == '"':
            if i != end - 1:
                raise _bad_key("text after the quoted Idempotency-Key (one key only)")
            return "".join(out)
        if not 0x20 <= ord(c) <= 0x7E:
            raise _bad_key("the quoted Idempotency-Key must be printable ASCII")
        out.append(c)
        i += 1
    raise _bad_key("the quoted Idempotency-Key has no closing quote")


def header_identity(name: str) -> Identity:
    """An ``identity`` callable: the SHA-256 of header ``name`` (an API key, a bearer
    token), None when the header is absent. Hashed, so the store never holds the
    secret."""
    lower = name.lower()

    def identity(request: Request) -> str | None:
        value = request.header(lower)
        if not value:
            return None
        return hashlib.sha256(value.encode("latin-1")).hexdigest()

    return identity


# -- one request ----------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class Exchange:
    """One request through the layer: its key, scope and fingerprint, its body, and, once
    the endpoint ran, its response. ``run`` is set by the server module."""

    request: Request
    key: str
    identity: str | None
    body: bytes = b""
    ran: bool = False
    response: Response | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 over method, path, query and the whole body."""
        r = self.request
        h = hashlib.sha256()
        for part in (r.method.encode(), r.path.encode("utf-8", "surrogateescape"),
                     r.query.encode("latin-1", "replace")):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        h.update(self.body)
        return h.hexdigest()


class HttpPolicy:
    """The settings of the layer, shared by the ASGI and WSGI middlewares and the
    per-route forms.

    * ``store``: any store. Lease mode (default): the key is claimed with a lease,
      renewed by a heartbeat while the endpoint runs. ``transactional=True`` (a
      `SqlStore`): the endpoint gets a session (see the server modules) whose
      transaction also records the key and the response; they commit together once the
      response is complete.
    * ``methods``: the methods covered (default POST and PATCH); others pass through.
    * ``required``: a covered request without the header → 400 (False: passes through).
    * ``identity``: a callable over the `Request` giving the client's identity (e.g.
      `header_identity`); keys are scoped by it and a request without one → 401.
    * ``wait``: seconds a duplicate waits for the first response before 409 (lease mode;
      transactional duplicates wait on the key's row lock, the store's lock_timeout).
    * ``ttl``, ``lease``: seconds a key is remembered (default 24 h) / a lease holds.
    * ``max_body``: request body limit (→ 413); ``max_response``: largest response
      stored (larger: streamed and not stored in lease mode, 500 in transactional).
    * ``replay_headers``: more response headers to replay; ``storable``: the storage
      policy over the status (default `default_storable`); ``namespace``: the store
      namespace (one per API; default ``"http"``).
    * ``retry``: the tenacity policy for transient store faults (default: the
      decorator's `idempotent.transient_retry()`); when it gives up, 503.
    """

    def __init__(
        self,
        store: Store,
        *,
        transactional: bool = False,
        methods: Iterable[str] = DEFAULT_METHODS,
        required: bool = True,
        identity: Identity | None = None,
        wait: float | None = None,
        ttl: float = DEFAULT_TTL,
        lease: float = DEFAULT_LEASE,
        max_body: int = DEFAULT_MAX_BODY,
        max_response: int = DEFAULT_MAX_RESPONSE,
        replay_headers: Iterable[str] = (),
        storable: Callable[[int], bool] = default_storable,
        namespace: str = "http",
        retry: Any = _DEFAULT,
    ) -> None:
        extra = {h.lower() for h in replay_headers}
        if extra & NEVER_REPLAYED:
            raise ValueError(f"these headers are never replayed: {sorted(extra & NEVER_REPLAYED)}")
        if transactional and not store.transactional:
            raise TypeError(f"transactional=True needs a SqlStore, not {type(store).__name__}")
        if transactional and wait is not None:
            raise TypeError("wait= is for lease mode; a transactional duplicate waits on the "
                            "key's row lock, up to the SqlStore's lock_timeout")
        if max_body < 0 or max_response < 0:
            raise ValueError("max_body and max_response must not be negative")
        self.store = store
        self.transactional = transactional
        self.methods = frozenset(m.upper() for m in methods)
        self.required = required
        self.identity = identity
        self.wait = wait
        self.ttl = ttl
        self.lease = lease
        self.max_body = max_body
        self.max_response = max_response
        self.allowed = REPLAY_HEADERS | extra
        self.storable = storable
        self.namespace = namespace
        self.retry = retry

    def exchange(self, request: Request) -> Exchange | None:
        """The exchange of a covered request, None to pass it through (not covered, or
        no key and none required); raises `Problem` for a bad or missing key or a
        missing identity."""
        if request.method not in self.methods:
            return None
        key = parse_key([v for n, v in request.headers if n == "idempotency-key"])
        if key is None:
            if not self.required:
                return None
            raise Problem(400, "missing-key", "Idempotency-Key required",
                          f"{request.method} {request.path} needs an Idempotency-Key header")
        ident = None
        if self.identity is not None:
            ident = self.identity(request)
            if not ident:
                raise Problem(401, "identity-required", "Client identity required",
                              "keys are scoped by the client's identity, and this request "
                              "has none; nothing was processed")
        return Exchange(request, key, ident)

    def outcome(self, exchange: Exchange, response: Response, sent: bool = False
                ) -> dict[str, Any]:
        """What the handler returns to the core (stored), or raises `NotStored`."""
        exchange.response = response
        if sent or not self.storable(response.status):
            raise NotStored(response, sent)
        return response.stored(self.allowed)

    def decorate(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler(exchange[, session=])`` through the core's one flow."""
        return idempotent(
            self.store,
            key=lambda ex: ex.key,
            scope=(lambda ex: ex.identity) if self.identity is not None else None,
            fingerprint=lambda ex: ex.fingerprint(),
            namespace=self.namespace,
            ttl=self.ttl,
            lease=None if self.transactional else self.lease,
            wait=None if self.transactional else self.wait,
            optimistic=False,  # a duplicate waits on the key's row lock, never runs too
            **({} if self.retry is _DEFAULT else {"retry": self.retry}),
        )(handler)


def content_length(headers: Iterable[tuple[str, str]]) -> int | None:
    """The declared Content-Length, None if absent; a malformed one → 400."""
    for n, v in headers:
        if n == "content-length":
            if not v.strip().isdigit():  # int() would take "-5", "+5", "1_0"
                raise Problem(400, "bad-content-length", "Bad Content-Length",
                              "the Content-Length header is not a non-negative integer; "
                              "nothing was processed")
            return int(v)
    return None


__all__ = [
    "DEFAULT_MAX_BODY", "DEFAULT_MAX_RESPONSE", "DEFAULT_METHODS", "DEFAULT_TTL", "DRAFT",
    "HEADER", "MAX_KEY", "NEVER_REPLAYED", "PROBLEM_BASE", "REPLAYED", "REPLAY_HEADERS",
    "Exchange", "HttpPolicy", "Identity", "NotStored", "Problem", "Request", "Response",
    "TooLarge", "body_too_large", "default_storable", "header_identity", "parse_key",
    "problem_for", "ran_unstored", "response_too_large",
]
