"""FastAPI forms of the ASGI ``Idempotency-Key`` layer: a route class for per-route use,
and the dependency that gives a transactional endpoint its session.

::

    router = APIRouter(route_class=idempotent_route(store, transactional=True))

    @router.post("/payments")
    async def pay(p: Payment, session: AsyncSession = Depends(idempotency_session)):
        session.add(Ledger(...))          # commits with the key and the response

For the whole app, `idempotent.integrations.asgi.IdempotencyMiddleware` with
``app.add_middleware`` does the same for every covered route.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from idempotent.stores import Store

from .asgi import IdempotencyMiddleware, Receive, Scope, Send, session_of


def idempotency_session(request: Request) -> Any:
    """A FastAPI dependency: the ``AsyncSession`` whose transaction records this
    request's key and response; use it for the endpoint's writes, never commit it."""
    return session_of(request.scope)


def idempotent_route(store: Store, **options: Any) -> type[APIRoute]:
    """An ``APIRoute`` class (``APIRouter(route_class=...)``) that puts each route of the
    router behind its own `IdempotencyMiddleware` (the options of `HttpPolicy`); the
    routes share one policy, so one ``namespace``."""
    from ._http import HttpPolicy

    policy = HttpPolicy(store, **options)

    class IdempotentRoute(APIRoute):
        # ``handle`` is wrapped, not ``self.app``: FastAPI runs an included router's
        # routes through an app of its own, but every request of the route passes here
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._idempotent = IdempotencyMiddleware(super().handle, policy=policy)

        async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
            await self._idempotent(scope, receive, send)

    return IdempotentRoute


__all__ = ["idempotency_session", "idempotent_route"]
