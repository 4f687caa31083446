"""The store interface: a base class that owns the public methods.

A store does atomic storage operations and nothing else; what they mean (when a record
may be claimed, taken over, purged; what a duplicate gets) is written once in
`idempotent._rules`. Subclasses fill in the ``_private`` methods, each of which must be
atomic on its own and implement the rule its docstring names.

**Time is the store's.** The public methods pass ``now=None`` to the subclass, which then
decides with its own clock (PostgreSQL ``clock_timestamp()``, Redis ``TIME`` inside the
script, the local clock for SQLite and memory), and durations (``lease``, ``ttl``) rather
than deadlines, so a worker whose clock runs ahead cannot take over a live lease. A
``clock=`` given to the store (tests only) is read here and passed as ``now``.

Every method here is synchronous. ``async def`` handlers reach them through SQLAlchemy's
greenlet bridge, so the record state machine exists once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from .._keys import check_text
from .._record import Outcome, Record, State, StateCount, StoreStats
from .._rules import claimable, outcome_of, purgeable
from ..exceptions import LeaseLost

# Module constants: reading an enum member off its class costs ~70 ns in Python 3.11.
_IN_PROGRESS = State.IN_PROGRESS
_urandom = os.urandom

#: How long keys are remembered unless told otherwise: 7 days.
DEFAULT_TTL = 7 * 24 * 3600.0
#: How long a lease-mode claim holds a key before another worker may take it over.
DEFAULT_LEASE = 30.0
#: The shortest lease a handler may ask for: below it, one slow round trip or a GC pause
#: outlasts the lease and another worker takes over a live handler.
MIN_LEASE = 1.0

__all__ = [
    "DEFAULT_LEASE", "DEFAULT_TTL", "MIN_LEASE", "Store", "check_durations", "claimable",
    "count_states", "new_token", "outcome_of", "purgeable",
]


def new_token() -> str:
    """A fencing token: 128 random bits, hex. (``os.urandom(16).hex()`` measures cheaper
    than ``secrets.token_hex(16)``, which calls it through two more Python frames.)"""
    return os.urandom(16).hex()


def check_durations(lease: float | None, ttl: float) -> None:
    """Refuse a lease or ttl no store can honour (checked where a handler is declared)."""
    if not ttl > 0:  # also refuses NaN
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    if lease is not None and not (MIN_LEASE <= lease < float("inf")):
        raise ValueError(
            f"lease must be at least {MIN_LEASE} s and finite, not {lease!r}: a shorter one "
            "lets a slow round trip hand a live handler's key to another worker"
        )


class Store:
    """Base of every store. ``clock`` (epoch seconds) is for tests only: None, the
    default, lets the store decide time on its own clock."""

    #: True when the store can run a handler's writes in the same transaction as the key.
    transactional = False
    #: Largest result (bytes) the store holds, or None for no limit of its own.
    max_result_bytes: int | None = None

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock

    def now(self) -> float:
        """The store's time, epoch seconds (the injected clock if there is one)."""
        clock = self.clock
        return clock() if clock is not None else self._now()

    # -- lease mode ------------------------------------------------------------------
    def claim(
        self,
        namespace: str,
        key: str,
        *,
        fingerprint: str | None,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
        token: str | None = None,
    ) -> Outcome:
        """Claim ``key`` for ``lease`` seconds, atomically (rule CLAIMABLE).

        Returns `Claimed` (a new key, an expired record, or a lease that ran out:
        ``taken_over``), `Completed` (already processed, or kept as failed) or
        `InProgress` (another worker's lease is live). ``token`` (default: a new one)
        lets a retried claim whose reply was lost find its own record: a claim with the
        token that holds the key is `Claimed` again.
        """
        if (type(key) is not str or type(namespace) is not str or "\x00" in key
                or not key.isascii() or "\x00" in namespace or not namespace.isascii()):
            check_text("namespace", namespace)  # the slow path: say which is wrong
            check_text("key", key)
        clock = self.clock
        if token is None:
            token = _urandom(16).hex()  # new_token(), inline: a frame less per claim
        for _ in range(8):  # a record released between our two reads: look again
            outcome = self._claim(namespace, key, fingerprint, token,
                                  None if clock is None else clock(), lease, ttl)
            if outcome is not None:
                return outcome
        raise RuntimeError(f"claim of {namespace}/{key} kept racing with release")

    def complete(
        self,
        namespace: str,
        key: str,
        token: str,
        result: bytes | None,
        *,
        ttl: float = DEFAULT_TTL,
        state: State = State.COMPLETED,
    ) -> None:
        """Store ``result`` and mark the key done, only while ``token`` owns it (rule
        FENCED); it is then remembered ``ttl`` seconds.

        Raises `LeaseLost` when another worker took the key over: its record is left
        untouched. Completing twice with the same token is harmless.
        """
        clock = self.clock
        if not self._complete(namespace, key, token, result, state,
                              None if clock is None else clock(), ttl):
            raise LeaseLost(
                f"{namespace}: lease on key {key!r} was lost; result not stored",
                namespace=namespace,
                key=key,
            )

    def release(self, namespace: str, key: str, token: str) -> bool:
        """Forget a claim so a redelivery can run; False when the token no longer owns it
        (rule FENCED)."""
        return self._release(namespace, key, token)

    def renew(self, namespace: str, key: str, token: str, lease: float) -> float:
        """Extend a live lease to the store's ``now + lease`` (rule FENCED); returns the
        new deadline or raises `LeaseLost`."""
        clock = self.clock
        until = self._renew(namespace, key, token, None if clock is None else clock(), lease)
        if until is None:
            raise LeaseLost(
                f"{namespace}: lease on key {key!r} was lost before renewal",
                namespace=namespace,
                key=key,
            )
        return until

    def wait_change(self, namespace: str, key: str, timeout: float) -> bool | None:
        """Block up to ``timeout`` seconds for a signal that ``key``'s in-progress record
        was completed or released (rule WAKE). True when signalled, or when the record
        is already no longer in progress; False when ``timeout`` passed; None when the
        store has no signal, and the caller polls (the default)."""
        return None

    def signal_change(self, namespace: str, key: str) -> None:
        """Rule WAKE for a store whose complete and release do not signal by themselves:
        wake the waiters of ``key``. Called by handlers that have ``wait=``, after they
        completed or released the key; the default does nothing (Redis' scripts signal
        on their own; stores without a signal are polled)."""

    def get(self, namespace: str, key: str) -> Record | None:
        """The record of ``key``, or None."""
        check_text("namespace", namespace)
        check_text("key", key)
        return self._get(namespace, key)

    def claim_many(
        self,
        namespace: str,
        keys: Iterable[str],
        *,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
    ) -> dict[str, Outcome]:
        """Claim several keys; the base does one claim per key, stores may batch."""
        return {k: self.claim(namespace, k, fingerprint=None, lease=lease, ttl=ttl) for k in keys}

    # -- operations (the CLI's inspect / purge / stats) ---------------------------------
    def purge(
        self,
        *,
        older_than: float | None = None,
        namespace: str | None = None,
        batch: int = 1000,
    ) -> int:
        """Delete records no longer needed, at most ``batch`` per atomic step; returns how
        many were deleted.

        Deleted: every record past its ``expires_at``; with ``older_than`` (seconds), also
        every record created more than ``older_than`` ago. Never deleted: an in-progress
        record whose lease is live (``lease_until > now``). ``namespace`` limits the purge
        to one namespace. Safe while workers run and while another purge runs: each step
        re-checks these conditions atomically as it deletes.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if older_than is not None and older_than < 0:
            raise ValueError("older_than must not be negative")
        if namespace is not None:
            check_text("namespace", namespace)
        return self._purge(self.now(), older_than, namespace, batch)

    def stats(self, namespace: str | None = None) -> StoreStats:
        """Counts per namespace and state (of one ``namespace`` if given), and the oldest
        in-progress record."""
        return self._stats(self.now(), namespace)

    # -- for subclasses ----------------------------------------------------------------
    # ``now`` is the injected test clock's time, or None: the store's own clock decides.
    def _now(self) -> float:
        """The store's own clock (one round trip for a server)."""
        return time.time()

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
        """Rule CLAIMABLE: insert an in-progress record (lease deadline ``now + lease``,
        expiry ``now + ttl``), or take over a claimable one (``taken_over=True`` when it
        was another worker's lease), or report the live one (`InProgress` with the store's
        ``now``); None only if the record vanished between two reads."""
        raise NotImplementedError

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
        """Rule FENCED: store the result and ``state``, expiry ``now + ttl``."""
        raise NotImplementedError

    def _release(self, namespace: str, key: str, token: str) -> bool:
        """Rule FENCED: delete the in-progress record ``token`` owns."""
        raise NotImplementedError

    def _renew(
        self, namespace: str, key: str, token: str, now: float | None, lease: float
    ) -> float | None:
        """Rule FENCED: move the lease deadline to ``now + lease``; the new deadline, or
        None when ``token`` no longer owns an in-progress record."""
        raise NotImplementedError

    def _get(self, namespace: str, key: str) -> Record | None:
        raise NotImplementedError

    def _purge(
        self, now: float, older_than: float | None, namespace: str | None, batch: int
    ) -> int:
        """Rule PURGEABLE (also created before ``now - older_than`` when given), in steps
        of at most ``batch``, each step atomic; return the total deleted."""
        raise NotImplementedError

    def _stats(self, now: float, namespace: str | None) -> StoreStats:
        raise NotImplementedError


def count_states(records: Iterable[Record], now: float) -> StoreStats:
    """`StoreStats` of ``records``, for stores that can list them (memory)."""
    counts: dict[tuple[str, State], list[int]] = {}
    oldest: Record | None = None
    for r in records:
        slot = counts.setdefault((r.namespace, r.state), [0, 0])
        slot[0] += 1
        slot[1] += r.expires_at <= now
        if r.state is _IN_PROGRESS and (oldest is None or r.created_at < oldest.created_at):
            oldest = r
    return StoreStats(
        tuple(
            StateCount(ns, state, n, expired)
            for (ns, state), (n, expired) in sorted(counts.items(), key=lambda kv: (
                kv[0][0], kv[0][1].value))
        ),
        oldest,
    )
