"""Redis store (lease mode), on redis-py: sync or ``redis.asyncio``, standalone or Cluster.

Every operation is one Lua script (`_redis_scripts`), so each is atomic and costs one
round trip: ``EVALSHA``, and ``EVAL`` once if the server does not know the script yet
(a restarted or new node). The scripts implement the rules of `idempotent._rules`:
``claim`` and ``claim_many`` rule CLAIMABLE, ``complete``, ``release`` and ``renew`` rule
FENCED, ``purge`` rule PURGEABLE, and every one that reads the time rule STORE TIME: the
time is Redis' own ``TIME``, read inside the script, and callers send durations (lease,
ttl), never deadlines, so no worker's clock decides whether a lease is live. REPLAY is
`idempotent._rules`' own, from the record a claim returns. A clock given to the store
(tests only) is sent as ``now`` instead.

A record is one hash under ``<prefix>:<namespace length>:<namespace>:<key>`` (the length
makes the name unambiguous whatever the namespace holds); the whole name is hashed to a
cluster slot (or its first ``{...}`` hash tag, as Redis does, if a key holds one), so
records spread over the nodes. A batch claim groups its keys by slot: one script call for
a standalone server, one call per slot (pipelined, one round trip per node) on a cluster.
A prefix with a hash tag (``prefix="{idem}"``) keeps every record in one slot, so a batch
is one call on a cluster too, at the cost of one node holding all records.

Redis' native expiry only removes records after their deadline (see `_redis_scripts`).
The first operation of a store reads the server's ``maxmemory-policy`` once and refuses
any policy but ``noeviction`` (`EvictionPolicyError`), unless ``allow_eviction=True``: an
evicted completed key would run its handler again.

With a ``redis.asyncio`` client the methods stay synchronous and await the client inside
SQLAlchemy's greenlet bridge, as ``@idempotent`` runs ``async def`` handlers; call them
from a ``greenlet_spawn``-ed function when using the store directly.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._keys import check_text
from .._record import (
    Claimed,
    Completed,
    InProgress,
    Outcome,
    Record,
    State,
    StateCount,
    StoreStats,
)
from .._rules import NOT_STORED_PREFIX
from ..exceptions import EvictionPolicyError, IncompatibleRecord, ResultNotSerializable
from . import _redis_scripts as lua
from .base import DEFAULT_LEASE, DEFAULT_TTL, Store, new_token

try:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.retry
    import redis.cluster
    import redis.retry
    from redis.crc import key_slot
    from redis.exceptions import MaxConnectionsError, NoScriptError, ResponseError
    from sqlalchemy.exc import MissingGreenlet
    from sqlalchemy.util import await_only
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RedisStore needs redis-py: pip install 'idempotent-py[redis]'"
    ) from exc

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - redis[hiredis] is what the extra installs
    _hiredis_pack = None

__all__ = [
    "DEFAULT_SOCKET_TIMEOUT", "MAX_KEY_LENGTH", "EvictionPolicyError", "RedisStore",
    "ReplicaAckTimeout",
]

log = logging.getLogger("idempotent")

#: Longest namespace or key (characters) the store takes; the decorator hashes anything
#: over 128 characters to ``sha256:<hex>`` (71), so only direct callers can exceed it.
MAX_KEY_LENGTH = 200
#: Default largest result a record holds (bytes); the server's ``proto-max-bulk-len``
#: (512 MiB by default) must be larger.
DEFAULT_MAX_RESULT_BYTES = 16 * 1024 * 1024
#: ``socket_connect_timeout`` and ``socket_timeout`` (seconds) of a client made from a URL,
#: unless its options give their own: a blackholed connection cannot hang a call forever.
DEFAULT_SOCKET_TIMEOUT = 5.0


class ReplicaAckTimeout(redis.exceptions.TimeoutError, TimeoutError):
    """A complete with ``wait_replicas`` was acknowledged by fewer replicas than asked
    within ``wait_timeout_ms``. The record is written on the primary (a failover before
    the replicas catch up could still lose it); the error is transient, so a retry policy
    completes again (harmless with the same token) and waits again."""

    def __init__(self, message: str, *, acknowledged: int = 0, wanted: int = 0):
        super().__init__(message)
        self.acknowledged = acknowledged
        self.wanted = wanted

_STATES = {b"i": State.IN_PROGRESS, b"c": State.COMPLETED, b"f": State.FAILED}
_CODES = {State.COMPLETED: b"c", State.FAILED: b"f", State.IN_PROGRESS: b"i"}
_FIELDS = (b"v", b"s", b"f", b"r", b"t", b"l", b"c", b"d", b"e")
_CLAIMED, _TAKEN_OVER, _FOUND, _BUSY = lua.CLAIMED, lua.TAKEN_OVER, lua.FOUND, lua.BUSY
_ASYNC_CLIENTS = (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)
_CLUSTER_CLIENTS = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
_GLOB_SPECIAL = b"*?[]\\"
#: A "result not stored" marker (`idempotent._rules.not_stored`: the prefix and at most
#: 500 bytes of reason) is stored whatever max_result_bytes says, up to this size.
_MARKER_MAX = 1024


class _Script:
    """A script's text and SHA-1 (what ``EVALSHA`` names it by)."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


_CLAIM = _Script(lua.CLAIM)
_CLAIM_MANY = _Script(lua.CLAIM_MANY)
_COMPLETE = _Script(lua.COMPLETE)
_RELEASE = _Script(lua.RELEASE)
_RENEW = _Script(lua.RENEW)
_PURGE = _Script(lua.PURGE)
_WATCH = _Script(lua.WATCH)
_SCRIPTS = (_CLAIM, _CLAIM_MANY, _COMPLETE, _RELEASE, _RENEW, _PURGE, _WATCH)


#: Added to a native expiry (milliseconds): the grace, and 1 for int()'s rounding down,
#: so Redis never removes a record before its deadline.
_GRACE_MS = lua.GRACE_MS + 1


#: The longest native expiry set (100 years): beyond it Redis refuses ``PEXPIRE`` (and a
#: Lua error would leave a half-written record).
_MAX_MS = 100 * 365 * 86400 * 1000


def _ms(seconds: float) -> int:
    """A native expiry (milliseconds, relative) for a deadline ``seconds`` away, within
    what ``PEXPIRE`` takes (a deadline in the past still keeps the record 1 ms)."""
    if seconds >= _MAX_MS / 1000:  # also an infinite ttl: remembered for ever
        return _MAX_MS
    return min(max(int(seconds * 1000) + _GRACE_MS, 1), _MAX_MS)


#: `_ms` of the few leases and ttls a process uses, remembered (60 ns against 290).
_keep_ms = functools.lru_cache(maxsize=256)(_ms)


class _Connections:
    """Script calls on pooled connections that stay out of the pool between calls.

    ``client.execute_command`` checks a connection out of the pool and back in around
    every command, and records redis-py's metrics on the way: about 20 µs of CPU per
    command here, against 15 for the round trip itself on the connection. This keeps
    the connections it has used in a deque instead: a call pops one (or checks a new one
    out of the pool when every one is busy), sends the command, reads the reply and
    pushes the connection back. ``deque.pop``/``append`` are atomic, so each connection
    serves one thread at a time, and there are never more connections than concurrent
    calls. A failed round trip is retried by the connection's own ``Retry`` as
    ``execute_command`` does (disconnect, then again), and a connection that redis-py
    asks to reconnect is reconnected. Used only for a sync standalone client that
    `RedisStore` made from a URL itself, without redis-py's metrics enabled (a client
    someone passed may be configured or watched in ways this does not know about).

    A connection goes back with nothing left to read, or disconnected: anything raised
    during a round trip (a ``KeyboardInterrupt``, a signal handler's exception such as
    Celery's ``SoftTimeLimitExceeded``, a timeout) between the send and the end of the
    reply disconnects it, so the next caller never reads another call's reply. Only a
    server's error reply that was read whole (``NOSCRIPT``, which the next call follows
    on the same connection) keeps the connection as it is.
    """

    __slots__ = ("idle", "pid", "pool", "reconnects")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.idle: deque[Any] = deque()
        self.pid = os.getpid()
        # redis-py 7+ may ask for a reconnection (server maintenance notifications)
        self.reconnects = hasattr(pool.connection_class, "should_reconnect")

    def _take(self) -> Any:
        if self.pid != os.getpid():  # forked: the parent's connections are not ours
            self.idle, self.pid = deque(), os.getpid()
        try:
            return self.idle.pop()
        except IndexError:
            return self.pool.get_connection()

    def _keep(self, conn: Any) -> None:
        if self.reconnects and conn.should_reconnect():
            # disconnect only: redis-py connects again on the next send, and a connect
            # failing here would hide this call's own result (a claim already made)
            conn.disconnect()
        self.idle.append(conn)

    def _discard(self, conn: Any) -> None:
        """Back to the deque disconnected: whatever reply was on its way is dropped with
        the socket; the next send connects again."""
        try:
            conn.disconnect()
        finally:
            self.idle.append(conn)

    def execute(self, *args: Any) -> Any:
        conn = self._take()
        try:
            reply = conn.retry.call_with_retry(
                lambda: _roundtrip(conn, args), lambda _error: conn.disconnect())
        except NoScriptError:
            self._keep(conn)  # a whole error reply was read: nothing is left unread
            raise
        except BaseException:
            self._discard(conn)
            raise
        self._keep(conn)
        return reply

    def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands sent together on one connection, every reply read (an error
        reply as its exception, in its place): one round trip."""
        conn = self._take()
        try:
            replies: list[Any] = conn.retry.call_with_retry(
                lambda: _roundtrips(conn, commands), lambda _error: conn.disconnect())
        except BaseException:
            self._discard(conn)
            raise
        self._keep(conn)
        return replies

    def clear(self) -> None:
        """Give the kept connections back to the pool (after it disconnected them all),
        so its count of connections in use stays right."""
        idle = self.idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:  # another thread took the last one meanwhile
                break
            self.pool.release(conn)


def _roundtrip(conn: Any, args: tuple[Any, ...]) -> Any:
    conn.send_command(*args)
    return conn.read_response()  # raises the server's error replies (NoScriptError...)


def _roundtrips(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except ResponseError as exc:  # read whole: the next reply follows
            replies.append(exc)
    return replies


class _Loop:
    """The kept connections of one event loop (a ``redis.asyncio`` connection works on
    the loop it connected on only), and how many this store made there."""

    __slots__ = ("count", "idle", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: deque[Any] = deque()
        self.count = 0


class _AsyncConnections:
    """`_Connections` for a ``redis.asyncio`` client: a script call is ONE coroutine
    (awaited once through the greenlet bridge) that pops a kept connection of the running
    event loop (or makes one, connected lazily), writes the packed command, reads the
    reply and pushes the connection back.

    Against ``execute_command`` this skips, per call: the pool's lock, checkout and
    release (and redis-py's metrics calls on the way), the pure-Python command packer
    (hiredis packs instead, as the sync client does), and ``send_packed_command``'s
    ``asyncio.wait_for``, which makes a Task per write on Python < 3.12: the write goes
    to the transport directly, and only a write the kernel did not take whole (a large
    result) waits for the drain, within ``socket_timeout``. The read is the connection's
    own ``read_response`` (``socket_timeout``, error replies raised, disconnect on any
    error). A failed round trip is retried by the connection's own ``Retry`` (the URL
    client's: one immediate reconnect), and a connection redis-py asks to reconnect is
    reconnected.

    The connections are the store's (``pool.make_connection()``; at most the pool's
    ``max_connections`` per loop), not the pool's, so a connection of a loop that has
    ended is never handed to another: each event loop gets its own deque, and the
    connections of a closed loop (or of the parent, after a fork) are closed without it.
    A connection goes back with nothing left to read, or disconnected: anything raised
    between the write and the end of the reply (a ``CancelledError`` too) disconnects
    it. An error reply that was read whole (``NOSCRIPT``, a script error) keeps it.
    """

    __slots__ = ("current", "loops", "pid", "pool", "reconnects")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.current: _Loop | None = None
        self.loops: dict[asyncio.AbstractEventLoop, _Loop] = {}
        self.pid = os.getpid()
        self.reconnects = hasattr(pool.connection_class, "should_reconnect")

    def _here(self) -> _Loop:
        loop = asyncio.get_running_loop()
        current = self.current  # one read: another thread's loop may replace it
        if current is not None and current.loop is loop and self.pid == os.getpid():
            return current
        return self._switch(loop)

    def _switch(self, loop: asyncio.AbstractEventLoop) -> _Loop:
        if self.pid != os.getpid():
            # forked: the parent's connections (and loops) are not ours; left untouched,
            # since closing them here would also reach into the parent's selector
            self.loops, self.pid = {}, os.getpid()
        for old in [old for old in self.loops.values() if old.loop.is_closed()]:
            _close_all(old)
            del self.loops[old.loop]
        here = self.loops.get(loop)
        if here is None:
            here = self.loops[loop] = _Loop(loop)
        self.current = here
        return here

    def _take(self, here: _Loop) -> Any:
        try:
            return here.idle.pop()
        except IndexError:
            if here.count >= self.pool.max_connections:
                raise MaxConnectionsError("Too many connections") from None
            here.count += 1
            return self.pool.make_connection()  # connects on its first round trip

    async def _keep(self, here: _Loop, conn: Any) -> None:
        if self.reconnects and conn.should_reconnect():
            await self._discard(here, conn)  # connects again on its next round trip
        else:
            here.idle.append(conn)

    async def _discard(self, here: _Loop, conn: Any) -> None:
        """Back to the deque disconnected (whatever reply was on its way is dropped with
        the socket), or, if even that fails, closed and forgotten."""
        kept = False
        try:
            await conn.disconnect(nowait=True)
            kept = True
        except Exception:  # pragma: no cover - disconnect swallows the socket's errors
            log.debug("idempotent: dropping a Redis connection that failed to disconnect",
                      exc_info=True)
        finally:
            if kept:
                here.idle.append(conn)
            else:
                here.count -= 1
                _close_now(conn)

    async def _run(self, conn: Any, packed: Any) -> Any:
        return await conn.retry.call_with_retry(
            lambda: _around_trip(conn, packed), lambda _error: conn.disconnect())

    async def evalsha(self, script: _Script, numkeys: int, args: tuple[Any, ...]) -> Any:
        """``EVALSHA``, and ``EVAL`` after NOSCRIPT on the same connection, in one
        coroutine: the hot path of every store operation."""
        return await self._command(("EVALSHA", script.sha, numkeys, *args), script)

    async def execute(self, *args: Any) -> Any:
        """One command (a first argument with a space is split: ``"SCRIPT LOAD"``)."""
        if " " in args[0]:
            args = (*args[0].split(), *args[1:])
        return await self._command(args, None)

    async def _command(self, command: tuple[Any, ...], script: _Script | None) -> Any:
        """One round trip on a kept connection of this loop (an ``EVALSHA`` that meets
        NOSCRIPT sends ``script`` as ``EVAL`` on the same connection): the connection
        goes back unless the round trip was interrupted."""
        here = self._here()
        conn = self._take(here)
        try:
            try:
                reply = await self._run(conn, _pack(conn, command))
            except NoScriptError:  # read whole: the connection goes on
                if script is None:
                    raise
                reply = await self._run(conn, _pack(conn, ("EVAL", script.text, *command[2:])))
        except ResponseError:  # an error reply read whole: nothing is left unread
            await self._keep(here, conn)
            raise
        except BaseException:
            await self._discard(here, conn)
            raise
        await self._keep(here, conn)
        return reply

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands written together on one connection, every reply read (an
        error reply as its exception, in its place): one round trip."""
        here = self._here()
        conn = self._take(here)
        try:
            packed = b"".join(_pack(conn, command) for command in commands)
            replies: list[Any] = await conn.retry.call_with_retry(
                lambda: _around_trips(conn, packed, len(commands)),
                lambda _error: conn.disconnect())
        except BaseException:
            await self._discard(here, conn)
            raise
        await self._keep(here, conn)
        return replies

    async def aclear(self) -> None:
        """Disconnect the kept connections of the running loop, close those of closed
        loops (another thread's live loop keeps its own)."""
        loop = asyncio.get_running_loop()
        for old in list(self.loops.values()):
            if old.loop is loop:
                idle, old.idle = old.idle, deque()
                old.count -= len(idle)
                await asyncio.gather(*(conn.disconnect() for conn in idle),
                                     return_exceptions=True)
            elif old.loop.is_closed():
                _close_all(old)
                del self.loops[old.loop]


def _pack(conn: Any, command: tuple[Any, ...]) -> bytes:
    if _hiredis_pack is not None:
        return _hiredis_pack(command)
    return b"".join(conn.pack_command(*command))  # pragma: no cover - without hiredis


async def _connected(conn: Any) -> Any:
    """The connection's stream writer, connecting first if it has none."""
    if conn._writer is None:
        await conn.connect()
    elif conn.health_check_interval:
        await conn.check_health()
    return conn._writer


async def _write(conn: Any, packed: bytes) -> None:
    writer = conn._writer
    if writer is None or conn.health_check_interval:
        writer = await _connected(conn)
    writer.write(packed)
    if writer.transport.get_write_buffer_size():  # the kernel did not take it all
        try:
            await asyncio.wait_for(writer.drain(), conn.socket_timeout)
        except asyncio.TimeoutError:
            await conn.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            raise redis.exceptions.ConnectionError(
                f"Error while writing to socket: {exc}") from exc


async def _around_trip(conn: Any, packed: bytes) -> Any:
    await _write(conn, packed)
    return await conn.read_response()  # raises the server's error replies (NoScriptError...)


async def _around_trips(conn: Any, packed: bytes, count: int) -> list[Any]:
    await _write(conn, packed)
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:  # read whole: the next reply follows
            replies.append(exc)
    return replies


def _close_all(here: _Loop) -> None:
    idle, here.idle = here.idle, deque()
    here.count = 0
    for conn in idle:
        _close_now(conn)


def _close_now(conn: Any) -> None:
    """Close a connection's socket without awaiting anything, also when its loop is
    closed (``asyncio.run`` ended), which can no longer do it itself."""
    writer = getattr(conn, "_writer", None)
    conn._reader = conn._writer = None
    if writer is None:
        return
    transport = writer.transport
    try:
        transport.abort()  # marks it closing; its loop closes the socket soon
    except RuntimeError:  # the loop is closed: close the socket ourselves
        sock = getattr(transport, "_sock", None)  # asyncio's selector transports
        if sock is not None:
            sock.close()
            transport._sock = None  # closed: nothing left for its __del__ to warn about


class RedisStore(Store):
    """Records in Redis, each operation one atomic Lua script and one round trip.

    ``url_or_client``: a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL (ACL user
    and password as ``redis://user:password@host``), or a client: ``redis.Redis``,
    ``redis.asyncio.Redis``, ``redis.cluster.RedisCluster`` or its asyncio twin. A URL
    makes a ``redis.Redis`` (``cluster=True``: a ``RedisCluster``; ``use_asyncio=True``:
    the asyncio variant), with ``client_options`` passed to its ``from_url``; unless they
    give their own, it gets ``socket_connect_timeout`` and ``socket_timeout`` of
    `DEFAULT_SOCKET_TIMEOUT` (5 s; ``None`` turns a timeout off), so a blackholed
    connection cannot hang a claim or a renewal, and a standalone one reconnects once at
    once and leaves further attempts to the decorator's retry policy (``retry=``). Clients
    must not decode responses. With a sync standalone client made from a URL, the scripts
    run on connections the store keeps out of the pool between calls (`_Connections`;
    about 20 µs of client CPU less per command than ``execute_command``); a client passed
    in is used as it is.

    **Time is Redis'.** Lease liveness, takeovers, deadlines and expiry are decided inside
    the scripts on the server's ``TIME`` (on a cluster, the clock of the node holding the
    record); ``clock=`` replaces it, for tests only.

    **Eviction.** The first operation reads the server's ``maxmemory-policy`` (``CONFIG
    GET``; ``INFO memory`` where CONFIG is refused, as on managed services; a warning if
    neither can be read) and refuses any policy but ``noeviction`` with
    `EvictionPolicyError`: an evicted completed key would run its handler again.
    ``allow_eviction=True`` skips the check, for a store used as a cache.

    **Failover.** Redis replicates asynchronously: a primary that fails over can lose
    writes it had acknowledged, a completed record among them (its redelivery then runs
    again) or a claim (two workers can then hold the key). ``wait_replicas=N`` makes
    `complete` send ``WAIT N wait_timeout_ms`` in the same round trip as its script and
    raise `ReplicaAckTimeout` (transient: retry policies retry it) when fewer replicas
    acknowledged; ``wait_timeout_ms`` must be shorter than ``socket_timeout``. It narrows
    the window, it does not close it (``WAIT`` is not consensus); claims do not wait.

    ``prefix`` starts every key name. ``max_result_bytes`` bounds a stored result: a
    larger one is refused by `complete` with `ResultNotSerializable`, and the record is
    left as it was (still in progress, still the caller's token): in lease mode the
    handler's effect has happened, so the caller completes the key with a "result not
    stored" marker instead of letting a redelivery run again. ``load_scripts()``
    preloads the scripts (and checks the eviction policy).
    """

    max_result_bytes: int

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "idem",
        clock: Callable[[], float] | None = None,
        cluster: bool = False,
        use_asyncio: bool = False,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        allow_eviction: bool = False,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        **client_options: Any,
    ) -> None:
        super().__init__(clock=clock)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("prefix must be a non-empty str")
        if max_result_bytes < 0:
            raise ValueError("max_result_bytes must not be negative")
        if type(wait_replicas) is not int or wait_replicas < 0:
            raise ValueError(f"wait_replicas must be an int >= 0, not {wait_replicas!r}")
        if wait_replicas and (type(wait_timeout_ms) is not int or wait_timeout_ms < 1):
            raise ValueError(
                f"wait_timeout_ms must be a positive int, not {wait_timeout_ms!r} "
                "(WAIT with 0 would block until the replicas answer, however long)")
        self._direct: _Connections | _AsyncConnections | None = None
        if isinstance(url_or_client, str):
            client = _client_from_url(url_or_client, cluster, use_asyncio, client_options)
            timeout = _socket_timeout(client)
            if wait_replicas and timeout is not None and wait_timeout_ms >= timeout * 1000:
                raise ValueError(
                    f"wait_timeout_ms={wait_timeout_ms} must be shorter than the client's "
                    f"socket_timeout ({timeout} s), or every waiting complete times out")
            if (type(client) is redis.Redis and client.connection is None
                    and not _redis_metrics_enabled()):
                self._direct = _Connections(client.connection_pool)
            elif (type(client) is redis.asyncio.Redis and client.connection is None
                    and type(client.connection_pool) is redis.asyncio.ConnectionPool
                    and not _redis_metrics_enabled()
                    and _async_connections_known(client.connection_pool)):
                self._direct = _AsyncConnections(client.connection_pool)
        elif client_options or cluster or use_asyncio:
            raise TypeError("cluster=, use_asyncio= and client options go with a URL only")
        else:
            client = url_or_client
        if not isinstance(client, (redis.Redis, redis.cluster.RedisCluster, *_ASYNC_CLIENTS)):
            raise TypeError(
                "RedisStore takes a redis:// URL or a redis-py client, not "
                f"{type(client).__qualname__}"
            )
        if _decodes(client):
            raise ValueError("RedisStore needs a client with decode_responses=False")
        if wait_replicas and isinstance(client, redis.asyncio.cluster.RedisCluster):
            raise TypeError("wait_replicas= needs a standalone client or a sync RedisCluster")
        self.client: Any = client
        self.prefix = prefix
        #: Largest result `complete` stores (bytes); public, so callers can check first.
        self.max_result_bytes = max_result_bytes
        self.allow_eviction = allow_eviction
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        #: True for ``redis.asyncio`` clients: ``@idempotent`` then wants ``async def``.
        self.is_async = isinstance(client, _ASYNC_CLIENTS)
        self.is_cluster = isinstance(client, _CLUSTER_CLIENTS)
        self._prefix = prefix.encode("utf-8", "surrogatepass") + b":"
        self._heads: dict[str, bytes] = {}
        self._wait: Callable[[Any], Any] = _await_only if self.is_async else _same
        # the eviction policy: True once accepted (or not to be checked); the refusal
        # once found, raised again by every later operation without asking again
        self._policy_ok = allow_eviction
        self._policy_refused: tuple[str, str] | None = None

    def __repr__(self) -> str:
        kind = ("async " if self.is_async else "") + ("cluster" if self.is_cluster else "")
        return f"<RedisStore prefix={self.prefix!r} {kind}{self.client!r}>"

    def load_scripts(self) -> None:
        """``SCRIPT LOAD`` every script (on every primary of a cluster), so that the first
        calls skip the NOSCRIPT round trip, and check the eviction policy; optional, e.g.
        at worker start-up."""
        if not self._policy_ok:
            self._check_policy()
        # on the connection the scripts will run on, when the store keeps its own
        execute = self.client.execute_command if self._direct is None else self._direct.execute
        for script in _SCRIPTS:
            self._wait(execute("SCRIPT LOAD", script.text))

    def close(self) -> None:
        """Close the client's connections (with an asyncio client: inside the greenlet
        bridge, or use `aclose`)."""
        if self.is_async:
            self._wait(self._aclose())
        else:
            if self.is_cluster:
                # a command sent to every primary (the eviction-policy check) leaves
                # connections that RedisCluster.close() alone does not disconnect
                self.client.disconnect_connection_pools()
            self.client.close()
            if isinstance(self._direct, _Connections):
                self._direct.clear()

    async def aclose(self) -> None:
        """Close an asyncio client's connections."""
        if not self.is_async:
            raise TypeError("aclose() is for a store with a redis.asyncio client; use close()")
        await self._aclose()

    async def _aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            if isinstance(self._direct, _AsyncConnections):
                await self._direct.aclear()

    # -- the eviction policy --------------------------------------------------------------
    def _check_policy(self) -> None:
        """Accept the server's ``maxmemory-policy`` (once) or raise `EvictionPolicyError`."""
        if self._policy_refused is None:
            found = self._read_policies()
            if found is None:
                log.warning(
                    "idempotent: could not read the Redis maxmemory-policy (CONFIG GET and "
                    "INFO memory both refused); make sure it is noeviction: an evicting "
                    "server forgets completed keys and their redeliveries run again")
                self._policy_ok = True
                return
            bad = {where: policy for where, policy in found.items() if policy != "noeviction"}
            if not bad:
                self._policy_ok = True
                return
            where = ", ".join(f"{p!r}" + (f" on {w}" if w else "") for w, p in bad.items())
            self._policy_refused = (where, next(iter(bad.values())))
        where, policy = self._policy_refused
        raise EvictionPolicyError(
            f"Redis maxmemory-policy is {where}: the server may evict idempotency records "
            "under memory pressure, and a redelivery of an evicted completed key runs its "
            "handler again. Set maxmemory-policy noeviction (CONFIG SET maxmemory-policy "
            "noeviction, or your provider's parameter group), or make the store with "
            "RedisStore(..., allow_eviction=True) if re-runs are acceptable (a cache); "
            "nothing was written",
            policy=policy,
        )

    def _read_policies(self) -> dict[str, str] | None:
        """``{node: policy}`` (node ``""`` for a standalone server), or None if the server
        lets us read neither ``CONFIG GET maxmemory-policy`` nor ``INFO memory``."""
        if isinstance(self._direct, _AsyncConnections):
            return self._read_policies_direct(self._direct)
        client = self.client
        options = {"target_nodes": client.PRIMARIES} if self.is_cluster else {}
        for command, arg, field in (("config_get", "maxmemory-policy", "maxmemory-policy"),
                                    ("info", "memory", "maxmemory_policy")):
            try:
                found = _policies(self._wait(getattr(client, command)(arg, **options)), field)
            except ResponseError:  # refused (ACL, a renamed or disabled command)
                continue
            if found:
                return found
        return None

    def _read_policies_direct(self, direct: _AsyncConnections) -> dict[str, str] | None:
        """`_read_policies` on the store's own connections (raw replies)."""
        for command, arg in (("CONFIG GET", "maxmemory-policy"), ("INFO", "memory")):
            try:
                reply = self._wait(direct.execute(command, arg))
            except ResponseError:
                continue
            if isinstance(reply, list):  # CONFIG GET, RESP2: [name, value, ...]
                reply = dict(zip(reply[::2], reply[1::2], strict=False))
            elif isinstance(reply, bytes):  # INFO: "name:value" lines
                reply = dict(line.split(b":", 1) for line in reply.splitlines()
                             if b":" in line and not line.startswith(b"#"))
            found = _policies(reply, "maxmemory-policy" if command != "INFO"
                              else "maxmemory_policy")
            if found:
                return found
        return None

    # -- key names ------------------------------------------------------------------------
    def key_name(self, namespace: str, key: str) -> bytes:
        """The Redis key of a record: ``<prefix>:<len(namespace)>:<namespace>:<key>``,
        UTF-8. A key or namespace a claim refuses (empty, too long, not a str, a NUL, a
        lone surrogate) is refused here too, so complete, release and renew refuse it."""
        head = self._heads.get(namespace)
        if head is None:
            head = self._head(namespace)
        if (type(key) is not str or not key or len(key) > MAX_KEY_LENGTH
                or not key.isascii() or "\x00" in key):
            _check_text("key", key)
        return head + key.encode()

    def _head(self, namespace: str) -> bytes:
        _check_text("namespace", namespace)
        ns = namespace.encode()
        head = b"%s%d:%s:" % (self._prefix, len(ns), ns)
        if len(self._heads) < 10_000:  # namespaces are few; never grow without bound
            self._heads[namespace] = head
        return head

    def _split(self, name: bytes) -> tuple[str, str] | None:
        """(namespace, key) of a key name, or None if it is not exactly one this store
        writes: ``<prefix>:<n>:<namespace>:<key>`` with ``n`` the namespace's length in
        bytes (decimal, no sign, no leading zero), namespace and key valid UTF-8 of 1 to
        `MAX_KEY_LENGTH` characters without NUL. (Names are read with ``surrogatepass``:
        an older version stored lone surrogates.) Purge and stats skip every other name,
        so a store whose prefix merely starts with this one's (``idem:orders`` beside
        ``idem``) is never touched; see `_scan` for the prefixes that stay apart."""
        prefix = self._prefix
        if not name.startswith(prefix):
            return None
        size, colon, rest = name[len(prefix):].partition(b":")
        if (not colon or not size.isdigit() or not size.isascii() or size[:1] == b"0"
                or len(size) > 4):
            return None
        n = int(size)
        if len(rest) < n + 2 or rest[n:n + 1] != b":":
            return None
        try:
            namespace = rest[:n].decode("utf-8", "surrogatepass")
            key = rest[n + 1:].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
        for text in (namespace, key):
            if len(text) > MAX_KEY_LENGTH or "\x00" in text:
                return None
        return namespace, key

    # -- running scripts ----------------------------------------------------------------
    def _eval(self, script: _Script, numkeys: int, *args: Any) -> Any:
        """One script call: ``EVALSHA``, or ``EVAL`` (which caches it) after NOSCRIPT."""
        if not self._policy_ok:
            self._check_policy()
        direct = self._direct
        if type(direct) is _AsyncConnections:  # one coroutine, EVAL after NOSCRIPT in it
            return _await_only(direct.evalsha(script, numkeys, args))
        execute = self.client.execute_command if direct is None else direct.execute
        try:
            reply = execute("EVALSHA", script.sha, numkeys, *args)
            return _await_only(reply) if self.is_async else reply
        except NoScriptError:
            return self._wait(execute("EVAL", script.text, numkeys, *args))

    def _eval_each(self, calls: list[tuple[_Script, int, tuple[Any, ...]]]) -> list[Any]:
        """Several script calls in one pipeline (one round trip per node); the ones the
        server did not know are sent again as ``EVAL``."""
        if len(calls) == 1:
            script, numkeys, args = calls[0]
            return [self._eval(script, numkeys, *args)]
        replies = self._pipeline([("EVALSHA", s.sha, n, *a) for s, n, a in calls])
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            redo = self._pipeline([("EVAL", calls[i][0].text, calls[i][1], *calls[i][2])
                                   for i in again])
            for i, r in zip(again, redo, strict=True):
                replies[i] = r
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not self._policy_ok:
            self._check_policy()
        pipe = (self.client.pipeline() if self.is_cluster
                else self.client.pipeline(transaction=False))
        for command in commands:
            pipe.execute_command(*command)
        return list(self._wait(pipe.execute(raise_on_error=False)))

    def _eval_and_wait(self, namespace: str, key: str, name: bytes, script: _Script,
                       args: tuple[Any, ...]) -> Any:
        """One script call on ``name`` followed by ``WAIT wait_replicas wait_timeout_ms``
        on the same connection, sent together: one round trip. Raises `ReplicaAckTimeout`
        when the script wrote (1) and fewer replicas acknowledged."""
        if not self._policy_ok:
            self._check_policy()
        wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        replies = self._together(name, [("EVALSHA", script.sha, 1, name, *args), wait])
        if isinstance(replies[0], NoScriptError):
            replies = self._together(name, [("EVAL", script.text, 1, name, *args), wait])
        for r in replies:
            if isinstance(r, Exception):
                raise r
        done, acknowledged = replies
        if done == 1 and acknowledged < self.wait_replicas:
            wanted = self.wait_replicas
            raise ReplicaAckTimeout(
                f"{namespace}: key {key!r} completed on the primary, but {acknowledged} of "
                f"{wanted} replica{'s' if wanted != 1 else ''} acknowledged it within "
                f"{self.wait_timeout_ms} ms; a failover now could lose it",
                acknowledged=acknowledged, wanted=wanted)
        return done

    def _together(self, name: bytes, commands: list[tuple[Any, ...]]) -> list[Any]:
        """``commands`` on one connection to the node of ``name``, in one round trip."""
        if self._direct is not None:
            return list(self._wait(self._direct.execute_many(commands)))
        if self.is_cluster:  # WAIT counts the replicas of the node the script wrote on
            node = self.client.get_node_from_key(name)
            pipe = node.redis_connection.pipeline(transaction=False)
        else:
            pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(self._wait(pipe.execute(raise_on_error=False)))

    def _by_slot(self, names: list[bytes]) -> list[list[int]]:
        """Indexes of ``names`` grouped so each group can go in one script call."""
        if not self.is_cluster:
            return [list(range(len(names)))]
        groups: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(key_slot(name), []).append(i)
        return list(groups.values())

    # -- time -----------------------------------------------------------------------------
    def _now(self) -> float:
        """Redis' ``TIME``: one round trip (on a cluster, one node's clock)."""
        execute = self.client.execute_command if self._direct is None else self._direct.execute
        seconds, micro = self._wait(execute("TIME"))
        return float(f"{int(seconds)}.{int(micro):06d}")  # as the scripts read it

    # -- lease mode ---------------------------------------------------------------------
    def _claim(
        self,
        namespace: str,
        key: str,
        fingerprint: str | None,
        token: str,
        now: float | None,
        lease: float,
        ttl: float,
    ) -> Outcome | None:
        """One ``EVALSHA`` (rule CLAIMABLE on Redis' time): claim, take over, or report
        the record, atomically."""
        name = self.key_name(namespace, key)
        keep = _keep_ms(ttl if ttl > lease else lease)
        if fingerprint is None:
            reply = self._eval(_CLAIM, 1, name, "" if now is None else now, token, lease, ttl,
                               keep)
        else:
            reply = self._eval(_CLAIM, 1, name, "" if now is None else now, token, lease, ttl,
                               keep, fingerprint)
        if reply[0] == _CLAIMED:  # the common case first
            return Claimed(token, float(reply[1]))
        return self._outcome(namespace, key, token, reply)

    def _outcome(self, namespace: str, key: str, token: str, reply: list[Any]) -> Outcome:
        code = reply[0]
        if code == _CLAIMED:
            return Claimed(token, float(reply[1]))
        if code == _TAKEN_OVER:
            return Claimed(token, float(reply[1]), True)
        if code == _FOUND:
            return Completed(_record(namespace, key, reply))
        if code == _BUSY:
            return InProgress(_record(namespace, key, reply), float(reply[10]))
        raise self._bad_record(namespace, key, code, reply[1])

    def claim_many(
        self,
        namespace: str,
        keys: Iterable[str],
        *,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
    ) -> dict[str, Outcome]:
        """Claim several keys of one namespace in one round trip (one script call on a
        standalone server; on a cluster one call per slot, pipelined: one round trip per
        node). Each key's claim is atomic (rule CLAIMABLE, on the time of the node that
        holds it); the batch as a whole is not a transaction."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        names = [self.key_name(namespace, k) for k in unique]
        clock = self.clock
        now: Any = "" if clock is None else clock()
        keep = _keep_ms(ttl if ttl > lease else lease)
        tokens = [new_token() for _ in unique]
        groups = self._by_slot(names)
        calls = [
            (_CLAIM_MANY, len(group),
             (*(names[i] for i in group), now, lease, ttl, keep, *(tokens[i] for i in group)))
            for group in groups
        ]
        out: dict[str, Outcome] = {}
        for group, replies in zip(groups, self._eval_each(calls), strict=True):
            for i, reply in zip(group, replies, strict=True):
                out[unique[i]] = self._outcome(namespace, unique[i], tokens[i], reply)
        return {k: out[k] for k in unique}

    def _complete(
        self,
        namespace: str,
        key: str,
        token: str,
        result: bytes | None,
        state: State,
        now: float | None,
        ttl: float,
    ) -> bool:
        """One ``EVALSHA`` (rule FENCED): stores the result only while ``token`` owns the
        key, expiry Redis' now + ``ttl``; with ``wait_replicas``, ``WAIT`` in the same
        round trip. A result over ``max_result_bytes`` raises `ResultNotSerializable`
        and touches nothing: the record stays in progress, the token's. A "result not
        stored" marker (`idempotent._rules.not_stored`, at most about 530 bytes) is
        stored whatever the limit (up to 1 KiB): it is what completes such a key."""
        name = self.key_name(namespace, key)
        if result is not None:
            size = len(result)
            if size > self.max_result_bytes and not (
                    size <= _MARKER_MAX and result.startswith(NOT_STORED_PREFIX)):
                raise self._too_big(namespace, key, size)
        if self.wait_replicas:
            args: tuple[Any, ...] = (token, _CODES[state], "" if now is None else now, ttl,
                                     _keep_ms(ttl))
            done = self._eval_and_wait(namespace, key, name, _COMPLETE,
                                       args if result is None else (*args, result))
        elif result is None:
            done = self._eval(_COMPLETE, 1, name, token, _CODES[state],
                              "" if now is None else now, ttl, _keep_ms(ttl))
        else:  # the common case: one call, no tuple built on the way
            done = self._eval(_COMPLETE, 1, name, token, _CODES[state],
                              "" if now is None else now, ttl, _keep_ms(ttl), result)
        return done == 1 or self._owned(namespace, key, done)

    def _too_big(self, namespace: str, key: str, size: int) -> ResultNotSerializable:
        return ResultNotSerializable(
            f"{namespace}: result for key {key!r} is {size:,} bytes, over the store's "
            f"max_result_bytes={self.max_result_bytes:,}; not stored, and the claim is "
            "left as it was (still in progress, still this token's)",
            namespace=namespace,
            key=key,
        )

    def _release(self, namespace: str, key: str, token: str) -> bool:
        """One ``EVALSHA`` (rule FENCED): deletes the in-progress record ``token`` owns."""
        done = self._eval(_RELEASE, 1, self.key_name(namespace, key), token)
        return self._owned(namespace, key, done)

    def _renew(
        self, namespace: str, key: str, token: str, now: float | None, lease: float
    ) -> float | None:
        """One ``EVALSHA`` (rule FENCED): moves the lease deadline to Redis' now +
        ``lease`` (the native expiry only if the lease would outlive ``expires_at``)."""
        done = self._eval(_RENEW, 1, self.key_name(namespace, key), token,
                          "" if now is None else now, lease, _keep_ms(lease))
        if type(done) is bytes:
            return float(done)
        self._owned(namespace, key, done)  # raises for a record of another format
        return None

    def _owned(self, namespace: str, key: str, code: int) -> bool:
        if code < 0:
            raise self._bad_record(namespace, key, code, None)
        return code == 1

    def wait_change(self, namespace: str, key: str, timeout: float) -> bool | None:
        """Rule WAKE: subscribe to the record's name, then mark the record as waited for
        (`WATCH`, which also says whether it is still in progress: a change before the
        subscription is not missed), then wait up to ``timeout`` for the message that
        `COMPLETE` or `RELEASE` then publish. A connection of its own for the call, closed
        before it returns. None (poll) for an asyncio cluster client (redis-py has no
        pub/sub there) or a user without pub/sub rights (ACL channels)."""
        if self.is_async and self.is_cluster:
            return None
        name = self.key_name(namespace, key)
        deadline = time.monotonic() + timeout
        pubsub = self.client.pubsub()
        try:
            self._wait(pubsub.subscribe(name))
            if self._eval(_WATCH, 1, name) != 1:
                return True
            while (left := deadline - time.monotonic()) > 0:
                message = self._wait(pubsub.get_message(ignore_subscribe_messages=True,
                                                        timeout=left))
                if message is not None:
                    return True
            return False
        except redis.exceptions.NoPermissionError:  # (its reply may come with a message)
            return None
        finally:
            self._wait(pubsub.aclose()) if self.is_async else pubsub.close()

    def _get(self, namespace: str, key: str) -> Record | None:
        """One ``HMGET``."""
        return self._read(namespace, key, self.key_name(namespace, key))

    def _read(self, namespace: str, key: str, name: bytes) -> Record | None:
        if not self._policy_ok:
            self._check_policy()
        try:
            reply = self._wait(self.client.execute_command("HMGET", name, *_FIELDS))
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            raise self._bad_record(namespace, key, lua.WRONG_TYPE, str(exc), name) from exc
        version = reply[0]
        if version is None:
            if any(field is not None for field in reply):  # a record without a version
                raise self._bad_record(namespace, key, lua.BAD_VERSION, b"", name)
            return None
        if version != lua.FORMAT_VERSION.encode():
            raise self._bad_record(namespace, key, lua.BAD_VERSION, version, name)
        return _record(namespace, key, [None, *reply])

    def _bad_record(self, namespace: str, key: str, code: int, detail: Any,
                    name: bytes | None = None) -> IncompatibleRecord:
        if name is None:
            name = self.key_name(namespace, key)
        if code == lua.BAD_VERSION:
            found = (f"format version {detail.decode(errors='replace')!r}" if detail
                     else "no format version")
            why = (f"holds a record with {found}; this idempotent reads and writes version "
                   f"{lua.FORMAT_VERSION!r}. Upgrade idempotent, or delete the key")
        else:
            text = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
            why = f"is not an idempotent record ({text or 'wrong type'})"
        return IncompatibleRecord(
            f"{namespace}: Redis key {name!r} for key {key!r} {why}; nothing was changed",
            namespace=namespace,
            key=key,
        )

    # -- operations (SCAN, never KEYS) ---------------------------------------------------
    def _pattern(self, namespace: str | None) -> bytes:
        """The SCAN pattern: ``<prefix>:[1-9]*`` (a record's name always has the length
        of its namespace there), or ``<prefix>:<n>:<namespace>:*`` for one namespace."""
        if namespace is None:
            return bytes(_glob_escape(self._prefix)) + b"[1-9]*"
        return bytes(_glob_escape(self._head(namespace))) + b"*"

    def _scan(self, namespace: str | None, batch: int) -> Iterator[list[bytes]]:
        """This store's record names (of one namespace), ``batch`` at a time. A record
        that lives through the whole scan is seen at least once (SCAN's promise).

        A name the pattern matches is kept only if `_split` reads it back exactly (and,
        for one namespace, as that namespace); anything else is skipped, never purged nor
        counted. So two stores on one database stay apart when neither prefix is the
        other's followed by ``:<digits>`` and then ``:`` or its end: ``idem`` beside
        ``idem:orders``, ``idem:v2``, ``idem:5x``, ``idem2`` or ``{idem}`` is safe;
        ``idem`` beside ``idem:12`` or ``idem:3:x`` is not (their names can be the very
        same Redis keys, for every operation, not only a scan: do not use such pairs)."""
        found: Any = self.client.scan_iter(match=self._pattern(namespace), count=batch)
        names: list[bytes] = []
        split = self._split
        for name in _iterate(found) if self.is_async else found:
            parts = split(name)
            if parts is None or (namespace is not None and parts[0] != namespace):
                continue
            names.append(name)
            if len(names) >= batch:
                yield names
                names = []
        if names:
            yield names

    def _purge(
        self, now: float, older_than: float | None, namespace: str | None, batch: int
    ) -> int:
        """SCAN this store's names (`_scan`: never another store's, whatever prefix it
        shares), and per ``batch`` names one script call per slot (pipelined)
        that re-checks each record and deletes it atomically (rule PURGEABLE, on the time
        of the node that holds it, read by the script itself unless a clock is injected).
        Native expiry removes most records before a purge sees them."""
        when: Any = "" if self.clock is None else now
        args: tuple[Any, ...] = (when,) if older_than is None else (when, older_than)
        total = 0
        for names in self._scan(namespace, batch):
            calls = [(_PURGE, len(g), (*(names[i] for i in g), *args))
                     for g in self._by_slot(names)]
            total += sum(self._eval_each(calls))
        return total

    def _stats(self, now: float, namespace: str | None) -> StoreStats:
        """SCAN this store's names (`_scan`); per batch one pipelined ``HMGET`` per
        record (a reply that is not a record of this format is skipped); expired means
        past ``now``, the store's time when the walk began."""
        counts: dict[tuple[str, State], list[int]] = {}
        oldest: tuple[float, str, str, bytes] | None = None
        version = lua.FORMAT_VERSION.encode()
        for names in self._scan(namespace, 500):
            replies = self._pipeline([("HMGET", n, b"v", b"s", b"c", b"e") for n in names])
            for name, reply in zip(names, replies, strict=True):
                parts = self._split(name)
                if parts is None or isinstance(reply, Exception) or reply[0] != version:
                    continue
                ns, key = parts
                state = _STATES[reply[1]]
                slot = counts.setdefault((ns, state), [0, 0])
                slot[0] += 1
                slot[1] += float(reply[3]) <= now
                if state is State.IN_PROGRESS and (oldest is None or float(reply[2]) < oldest[0]):
                    oldest = (float(reply[2]), ns, key, name)
        rows = tuple(StateCount(ns, st, n, expired)
                     for (ns, st), (n, expired) in sorted(counts.items(),
                                                          key=lambda i: (i[0][0], i[0][1].value)))
        record = None if oldest is None else self._read(oldest[1], oldest[2], oldest[3])
        return StoreStats(rows, record)


# -- helpers ----------------------------------------------------------------------------------
def _record(namespace: str, key: str, r: list[Any]) -> Record:
    """A `Record` from a script reply: [code, v, s, f, r, t, l, c, d, e]."""
    f, t, lease, done = r[3], r[5], r[6], r[8]
    return Record(
        namespace, key, _STATES[r[2]],
        None if f is None else f.decode("utf-8", "surrogatepass"),
        r[4],
        None if t is None else t.decode(),
        None if lease is None else float(lease),
        float(r[7]),
        None if done is None else float(done),
        float(r[9]),
    )


def _check_text(what: str, value: Any) -> None:
    """Refuse what a record name cannot be: not a str, empty, too long, or text that the
    base store refuses (a NUL, a lone surrogate: `InvalidIdempotencyKey`)."""
    if not isinstance(value, str):
        raise TypeError(f"a {what} must be str, not {type(value).__qualname__}")
    if not value:
        raise ValueError(f"a {what} must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise ValueError(
            f"a {what} of {len(value)} characters is over the store's limit of "
            f"{MAX_KEY_LENGTH}; hash it (as @idempotent does for anything over 128)"
        )
    check_text(what, value)


def _policies(reply: Any, field: str) -> dict[str, str]:
    """``{node: policy}`` from a ``CONFIG GET``/``INFO`` reply (a mapping, or on a
    cluster a mapping of node name to one), ``field`` looked up as str or bytes."""
    out: dict[str, str] = {}
    if not isinstance(reply, dict):
        return out
    for name in (field, field.encode()):
        if name in reply:
            value = reply[name]
            out[""] = value.decode() if isinstance(value, bytes) else str(value)
            return out
    for node, sub in reply.items():
        for where, policy in _policies(sub, field).items():
            out[where or (node.decode() if isinstance(node, bytes) else str(node))] = policy
    return out


def _socket_timeout(client: Any) -> float | None:
    """The ``socket_timeout`` a client made from a URL connects with."""
    if isinstance(client, _CLUSTER_CLIENTS):
        kwargs = getattr(client, "nodes_manager", None)
        kwargs = getattr(kwargs, "connection_kwargs", None) or getattr(
            client, "connection_kwargs", {})
    else:
        kwargs = client.connection_pool.connection_kwargs
    value = kwargs.get("socket_timeout")
    return None if value is None else float(value)


def _glob_escape(raw: bytes) -> bytearray:
    out = bytearray()
    for b in raw:
        if b in _GLOB_SPECIAL:
            out.append(0x5C)  # backslash
        out.append(b)
    return out


def _decodes(client: Any) -> bool:
    get = getattr(client, "get_encoder", None) or client.connection_pool.get_encoder
    return bool(get().decode_responses)


def _client_from_url(url: str, cluster: bool, use_asyncio: bool, options: dict[str, Any]) -> Any:
    # timeouts unless the user's options say otherwise (redis-py before 8 has none)
    options = {"socket_connect_timeout": DEFAULT_SOCKET_TIMEOUT,
               "socket_timeout": DEFAULT_SOCKET_TIMEOUT, **options, "decode_responses": False}
    if cluster:
        cls: Any = redis.asyncio.cluster.RedisCluster if use_asyncio else redis.cluster.RedisCluster
        return cls.from_url(url, **options)
    if "retry" not in options:
        # One immediate reconnect (a pooled connection gone stale after a server restart);
        # backing off and giving up is the decorator's tenacity policy's job, not a second
        # retry loop's inside the client (redis-py's default makes up to 10 attempts).
        from redis.backoff import NoBackoff

        retry_cls: Any = redis.asyncio.retry.Retry if use_asyncio else redis.retry.Retry
        options["retry"] = retry_cls(NoBackoff(), 1)
    cls = redis.asyncio.Redis if use_asyncio else redis.Redis
    return cls.from_url(url, **options)


def _async_connections_known(pool: Any) -> bool:
    """Does this redis-py's asyncio connection look as `_AsyncConnections` expects (a
    stream writer it connects, ``read_response``, a ``Retry``)?"""
    try:
        conn = pool.make_connection()
    except Exception:  # pragma: no cover - a connection class that wants more
        return False
    return (hasattr(conn, "_writer") and conn._writer is None and hasattr(conn, "retry")
            and hasattr(conn, "read_response") and hasattr(conn, "connect")
            and hasattr(pool, "max_connections"))


def _redis_metrics_enabled() -> bool:
    """Are redis-py's own metrics (OpenTelemetry, redis-py 7.1+) being recorded?"""
    try:
        from redis.observability.recorder import is_enabled
    except ImportError:  # an older redis-py: no metrics to keep
        return False
    try:
        return bool(is_enabled())
    except Exception:  # cannot tell: keep every command on the client's own path
        return True


def _same(value: Any) -> Any:
    return value


def _await_only(awaitable: Any) -> Any:
    try:
        return await_only(awaitable)
    except MissingGreenlet as exc:
        raise TypeError(
            "a RedisStore with a redis.asyncio client is used by @idempotent on async def "
            "handlers; to call its methods yourself, run them in "
            "sqlalchemy.util.greenlet_spawn(store.claim, ...)"
        ) from exc


def _iterate(agen: Any) -> Iterator[Any]:
    """An async iterator walked from inside the greenlet bridge."""
    while True:
        try:
            yield _await_only(agen.__anext__())
        except StopAsyncIteration:
            return
