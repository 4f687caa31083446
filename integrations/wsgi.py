"""``Idempotency-Key`` for any WSGI application (Flask, Django, ...).

::

    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, RedisStore(url))        # Flask
    application = IdempotencyMiddleware(get_wsgi_application(), SqlStore(engine),
                                        transactional=True)                   # Django

The same layer as `idempotent.integrations.asgi` (`idempotent.integrations._http`), for
synchronous servers: the body is read whole (up to ``max_body``, chunked bodies to the
end) and given to the app again as ``wsgi.input``; the app's response is read whole and
closed before it is stored and sent. In transactional mode the app gets the session of
the transaction that records the key and the response as ``environ["idempotent.session"]``
(`session_of(environ)`; Flask: ``session_of(request.environ)``).
"""

from __future__ import annotations

import http
import io
from collections.abc import Callable, Iterable, Iterator
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

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: The environ key holding a transactional request's session (a SQLAlchemy ``Session``).
SESSION_KEY = "idempotent.session"
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_CHUNK = 64 * 1024


def session_of(environ: Environ) -> Any:
    """The session of a transactional request: its writes commit with the key and the
    response. Never commit or roll it back in the view (`idempotent.TransactionEnded`);
    raise to roll back."""
    try:
        return environ[SESSION_KEY]
    except KeyError:
        raise LookupError(
            "no idempotent session in this request: the app is not behind "
            "IdempotencyMiddleware(transactional=True), or the request has no "
            "Idempotency-Key") from None


class _Streamed(Exception):  # the response outgrew max_response: it streams, unstored
    def __init__(self, status: str, headers: list[tuple[str, str]], head: list[bytes],
                 rest: Iterator[bytes], close: Callable[[], None] | None) -> None:
        super().__init__("streamed")
        self.status, self.headers, self.head, self.rest, self.close = (
            status, headers, head, rest, close)


class IdempotencyMiddleware:
    """WSGI middleware. ``store`` and the keyword options are those of `HttpPolicy` (or
    a ready ``policy=``); the store is a sync one (``RedisStore(url)``, a `SqlStore` on
    a sync engine, `MemoryStore`)."""

    def __init__(self, app: WSGIApp, store: Store | None = None, *,
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
            def handle_tx(ex: Exchange, *, session: Any) -> Any:
                return self._run(ex, session)
            self._handle = policy.decorate(handle_tx)
        else:
            def handle(ex: Exchange) -> Any:
                return self._run(ex, None)
            self._handle = policy.decorate(handle)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in self.policy.methods:
            return self.app(environ, start_response)
        request = Request(method, _path(environ), environ.get("QUERY_STRING", ""),
                          _headers(environ), environ)
        try:
            ex = self.policy.exchange(request)
            if ex is None:
                return self.app(environ, start_response)
            ex.body = self._read_body(request, environ)
        except Problem as problem:
            return _respond(start_response, problem.response())
        ex.extra["start_response"] = start_response
        try:
            value = self._handle(ex)
        except NotStored as unstored:
            assert unstored.response is not None
            return _respond(start_response, unstored.response)
        except _Streamed as streamed:
            start_response(streamed.status, streamed.headers)
            return _chain(streamed.head, streamed.rest, streamed.close)
        except TooLarge:
            return _respond(start_response,
                            response_too_large(self.policy.max_response).response())
        except Exception as exc:
            if ran_unstored(self.policy, ex, exc):
                assert ex.response is not None
                return _respond(start_response, ex.response)  # happened, though not stored
            answer = problem_for(exc)
            if answer is None:
                raise  # the app's own error: the server answers 500, key released
            return _respond(start_response, answer.response())
        if ex.ran and ex.response is not None:
            return _respond(start_response, ex.response)
        return _respond(start_response, Response.replay(value))

    def _read_body(self, request: Request, environ: Environ) -> bytes:
        """The whole body: ``CONTENT_LENGTH`` bytes, or to the end of a chunked one."""
        limit = self.policy.max_body
        declared = content_length(request.headers)
        stream = environ.get("wsgi.input") or io.BytesIO()
        if declared is not None:
            if declared > limit:
                raise body_too_large(limit)
            body = stream.read(declared) if declared else b""
            if len(body) < declared:  # the client left before sending its whole body
                raise Problem(400, "incomplete-body", "Incomplete body",
                              f"the body ended after {len(body)} of {declared} bytes; "
                              "nothing was processed")
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            if not environ.get("wsgi.input_terminated"):
                # the server does not decode chunked bodies (wsgiref): reading would
                # block on the raw socket, or read chunk framing as the body
                raise Problem(411, "length-required", "Length Required",
                              "this server cannot read a chunked request body; send a "
                              "Content-Length")
            chunks, size = [], 0
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise body_too_large(limit)
                chunks.append(chunk)
            body = b"".join(chunks)
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return body

    def _run(self, ex: Exchange, session: Any) -> Any:
        """The handler the core runs once per key: the app, its response read whole."""
        ex.ran = True
        environ: Environ = ex.request.raw
        if session is not None:
            environ[SESSION_KEY] = session
        policy = self.policy
        started: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                    ) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return written.append

        written: list[bytes] = []
        result = self.app(environ, capture)
        chunks = written
        size = sum(map(len, chunks))
        it = iter(result)
        close = getattr(result, "close", None)
        try:
            for chunk in it:
                chunks.append(chunk)
                size += len(chunk)
                if size > policy.max_response:
                    if policy.transactional:
                        raise TooLarge
                    status, headers = started
                    raise _Streamed(status, headers, chunks, it, close)
        except _Streamed:
            raise  # closed by the response iterator once sent
        except BaseException:
            if close is not None:
                close()
            raise
        if close is not None:
            close()
        status, headers = started
        response = Response(int(status.split(" ", 1)[0]),
                            [(n.lower(), v) for n, v in headers], b"".join(chunks))
        return policy.outcome(ex, response)


def _chain(head: list[bytes], rest: Iterator[bytes], close: Callable[[], None] | None
           ) -> Iterator[bytes]:
    try:
        yield from head
        yield from rest
    finally:
        if close is not None:
            close()


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    try:
        phrase = http.HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Status"
    status = f"{response.status} {phrase}"
    headers = [(n, v) for n, v in response.headers if n not in _FRAMING]
    headers.append(("content-length", str(len(response.body))))
    start_response(status, headers)
    return [response.body]


def _path(environ: Environ) -> str:
    raw = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    # PEP 3333: native strings of latin-1 bytes; the path's bytes are UTF-8
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")


def _headers(environ: Environ) -> list[tuple[str, str]]:
    out = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            out.append((name[5:].replace("_", "-").lower(), value))
    if "CONTENT_LENGTH" in environ and environ["CONTENT_LENGTH"] != "":
        out.append(("content-length", environ["CONTENT_LENGTH"]))
    if environ.get("CONTENT_TYPE"):
        out.append(("content-type", environ["CONTENT_TYPE"]))
    return out


__all__ = ["SESSION_KEY", "HttpPolicy", "IdempotencyMiddleware", "header_identity", "session_of"]
