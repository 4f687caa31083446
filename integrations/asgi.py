"""``Idempotency-Key`` for any ASGI 3 application (Starlette, FastAPI, ...).

::

    app = IdempotencyMiddleware(app, RedisStore(url, use_asyncio=True))      # lease mode
    app = IdempotencyMiddleware(app, SqlStore(async_engine), transactional=True)

A covered request (POST/PATCH with the header) is read whole (up to ``max_body``), its
key claimed through the core's flow, the endpoint run with the body replayed to it and
its response buffered, then stored (or not, see the storage policy in
`idempotent.integrations._http`) and sent. In transactional mode the endpoint gets the
session of the transaction that also records the key and the response
(`session_of(scope)`, or the FastAPI dependency in `idempotent.integrations.fastapi`);
they commit together once the response is complete, before the client sees it.

Non-HTTP scopes (websocket, lifespan) and uncovered methods pass straight through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from idempotent.stores import Store

from ._http import (
    Exchange,
    HttpPolicy,
    NotStored,
    Problem,
    Request,
    Response,
    TooLarge,
    body_too_large,
    content_length,
    header_identity,
    problem_for,
    ran_unstored,
    response_too_large,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The scope key holding a transactional request's session (an ``AsyncSession``).
SESSION_KEY = "idempotent.session"


def session_of(scope: Scope) -> Any:
    """The session of a transactional request (Starlette: ``session_of(request.scope)``):
    its writes commit with the key and the response. It must not be committed or rolled
    back by the endpoint (`idempotent.TransactionEnded`); raise to roll back."""
    try:
        return scope[SESSION_KEY]
    except KeyError:
        raise LookupError(
            "no idempotent session in this request: the route is not behind "
            "IdempotencyMiddleware(transactional=True), or the request has no "
            "Idempotency-Key") from None


class _Disconnected(Exception):  # the client left while sending its body
    pass


class IdempotencyMiddleware:
    """ASGI middleware (pure ASGI 3). ``store`` and the keyword options are those of
    `HttpPolicy` (or pass a ready ``policy=``). In lease mode the store must be an
    asyncio one (``RedisStore(url, use_asyncio=True)``, a `SqlStore` on an async engine)
    or a `MemoryStore`; transactional mode needs a `SqlStore` on an async engine."""

    def __init__(self, app: ASGIApp, store: Store | None = None, *,
                 policy: HttpPolicy | None = None, **options: Any) -> None:
        if policy is None:
            if store is None:
                raise TypeError("IdempotencyMiddleware needs a store (or a policy=)")
            policy = HttpPolicy(store, **options)
        elif store is not None or options:
            raise TypeError("give either policy= or a store and options, not both")
        self.app = app
        self.policy = policy
        if policy.transactional:
            async def handle_tx(ex: Exchange, *, session: Any) -> Any:
                return await self._run(ex, session)
            self._handle = policy.decorate(handle_tx)
        else:
            async def handle(ex: Exchange) -> Any:
                return await self._run(ex, None)
            self._handle = policy.decorate(handle)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.policy.methods:
            await self.app(scope, receive, send)
            return
        request = Request(
            scope["method"], scope.get("path", ""),
            scope.get("query_string", b"").decode("latin-1"),
            [(n.decode("latin-1").lower(), v.decode("latin-1"))
             for n, v in scope.get("headers", ())],
            scope)
        try:
            ex = self.policy.exchange(request)
            if ex is None:
                await self.app(scope, receive, send)
                return
            ex.body = await self._read_body(request, receive)
        except Problem as problem:
            await _send(send, problem.response())
            return
        except _Disconnected:
            return  # nothing claimed, nothing stored: the client retries
        ex.extra.update(scope=scope, receive=receive, send=send)
        try:
            value = await self._handle(ex)
        except NotStored as unstored:
            if not unstored.sent and unstored.response is not None:
                await _send(send, unstored.response)
            return
        except TooLarge:
            await _send(send, response_too_large(self.policy.max_response).response())
            return
        except Exception as exc:
            if ran_unstored(self.policy, ex, exc):
                assert ex.response is not None
                await _send(send, ex.response)  # what happened, though not stored
                return
            answer = problem_for(exc)
            if answer is None:
                raise  # the endpoint's own error: the server answers 500, key released
            await _send(send, answer.response())
            return
        if ex.ran and ex.response is not None:
            await _send(send, ex.response)
        else:
            await _send(send, Response.replay(value))

    async def _read_body(self, request: Request, receive: Receive) -> bytes:
        """The whole body (chunked bodies to the end); 413 over ``max_body``."""
        limit = self.policy.max_body
        declared = content_length(request.headers)
        if declared is not None and declared > limit:
            raise body_too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, ex: Exchange, session: Any) -> Any:
        """The handler the core runs once per key: the endpoint, its response captured."""
        ex.ran = True
        scope: Scope = ex.extra["scope"]
        receive: Receive = ex.extra["receive"]
        policy = self.policy
        if session is not None:
            scope = {**scope, SESSION_KEY: session}
        body_sent = False

        async def replayed() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": ex.body, "more_body": False}
            return await receive()

        capture = _Capture(policy.max_response, None if policy.transactional
                           else ex.extra["send"])
        await self.app(scope, replayed, capture)
        response = Response(capture.status, capture.headers, b"".join(capture.chunks))
        if not capture.complete:  # the endpoint returned without finishing its response
            raise NotStored(response if capture.status else None, capture.streaming)
        return policy.outcome(ex, response, capture.streaming)


class _Capture:
    """An ASGI ``send`` that buffers the response; over ``limit`` (or for an event
    stream) it forwards everything to ``passthrough`` (lease mode) or raises `TooLarge`
    (transactional mode: nothing may reach the client before the commit)."""

    def __init__(self, limit: int, passthrough: Send | None) -> None:
        self.limit, self.passthrough = limit, passthrough
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.raw_headers: Any = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.streaming = False
        self.complete = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.raw_headers = message.get("headers", ())
            self.headers = [(n.decode("latin-1").lower(), v.decode("latin-1"))
                            for n, v in self.raw_headers]
            if self.passthrough is not None and any(
                    n == "content-type" and v.startswith("text/event-stream")
                    for n, v in self.headers):
                await self._stream()
            return
        if kind != "http.response.body":
            if self.streaming and self.passthrough is not None:
                await self.passthrough(message)
            return
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if self.streaming:
            assert self.passthrough is not None
            await self.passthrough(message)
        else:
            self.size += len(chunk)
            self.chunks.append(chunk)
            if self.size > self.limit:
                if self.passthrough is None:
                    raise TooLarge
                await self._stream(more)
        if not more:
            self.complete = True

    async def _stream(self, more: bool = True) -> None:
        """Switch to pass-through: the start and what was buffered go out now."""
        assert self.passthrough is not None
        self.streaming = True
        await self.passthrough({"type": "http.response.start", "status": self.status,
                                "headers": list(self.raw_headers)})
        if self.chunks:
            await self.passthrough({"type": "http.response.body",
                                    "body": b"".join(self.chunks), "more_body": more})
            self.chunks = []


_FRAMING = frozenset({"content-length", "transfer-encoding"})


async def _send(send: Send, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status,
                "headers": [(n.encode("latin-1"), v.encode("latin-1"))
                            for n, v in response.headers if n not in _FRAMING]
                + [(b"content-length", str(len(response.body)).encode())]})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


def idempotent_app(store: Store | None = None, **options: Any) -> Callable[[ASGIApp], ASGIApp]:
    """The per-route form: a decorator for one ASGI app or endpoint (e.g. a Starlette
    ``Route``'s app), with `HttpPolicy`'s options. Each decorated app has its own policy;
    give each a ``namespace=`` of its own when they share a store."""

    def wrap(app: ASGIApp) -> ASGIApp:
        return IdempotencyMiddleware(app, store, **options)

    return wrap


__all__ = ["SESSION_KEY", "HttpPolicy", "IdempotencyMiddleware", "header_identity",
           "idempotent_app", "session_of"]
