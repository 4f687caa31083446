"""The store interface: a base class that owns the public methods.

A store does atomic storage operations and nothing else; what they mean (when a record
may be taken over, what a duplicate gets) is decided in `idempotent._machine`. Subclasses
fill in the ``_private`` methods, each of which must be atomic on its own.

Every method here is synchronous. ``async def`` handlers reach them through SQLAlchemy's
greenlet bridge (`idempotent._bridge`), so the record state machine exists once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

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
from ..exceptions import LeaseLost

# Module constants: reading an enum member off its class costs ~70 ns in Python 3.11.
_IN_PROGRESS = State.IN_PROGRESS
_urandom = os.urandom

#: How long keys are remembered unless told otherwise: 7 days.
DEFAULT_TTL = 7 * 24 * 3600.0
#: How long a lease-mode claim holds a key before another worker may take it over.
DEFAULT_LEASE = 30.0


def new_token() -> str:
    """A fencing token: 128 random bits, hex. (``os.urandom(16).hex()`` measures cheaper
    than ``secrets.token_hex(16)``, which calls it through two more Python frames.)"""
    return os.urandom(16).hex()


class Store:
    """Base of every store. ``clock`` returns epoch seconds (tests inject their own)."""

    #: True when the store can run a handler's writes in the same transaction as the key.
    transactional = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    # -- lease mode ------------------------------------------------------------------
    def claim(
        self,
        namespace: str,
        key: str,
        *,
        fingerprint: str | None,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
    ) -> Outcome:
        """Claim ``key`` for ``lease`` seconds, atomically.

        Returns `Claimed` (a new key, an expired record, or a lease that ran out),
        `Completed` (already processed, or kept as failed) or `InProgress` (another
        worker's lease is live).
        """
        for _ in range(8):  # a record released between our two reads: look again
            now = self.clock()
            token = _urandom(16).hex()  # new_token(), inline: a frame less per claim
            outcome = self._claim(namespace, key, fingerprint, token, now, now + lease, now + ttl)
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
        """Store ``result`` and mark the key done, only while ``token`` owns it.

        Raises `LeaseLost` when another worker took the key over: its record is left
        untouched. Completing twice with the same token is harmless.
        """
        now = self.clock()
        if not self._complete(namespace, key, token, result, state, now, now + ttl):
            raise LeaseLost(
                f"{namespace}: lease on key {key!r} was lost; result not stored",
                namespace=namespace,
                key=key,
            )

    def release(self, namespace: str, key: str, token: str) -> bool:
        """Forget a claim so a redelivery can run; False when the token no longer owns it."""
        return self._release(namespace, key, token)

    def renew(self, namespace: str, key: str, token: str, lease: float) -> float:
        """Extend a live lease to ``now + lease``; returns the new deadline or raises
        `LeaseLost`."""
        until = self.clock() + lease
        if not self._renew(namespace, key, token, until):
            raise LeaseLost(
                f"{namespace}: lease on key {key!r} was lost before renewal",
                namespace=namespace,
                key=key,
            )
        return until

    def get(self, namespace: str, key: str) -> Record | None:
        """The record of ``key``, or None."""
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
        now = self.clock()
        created_before = None if older_than is None else now - older_than
        return self._purge(now, created_before, namespace, batch)

    def stats(self, namespace: str | None = None) -> StoreStats:
        """Counts per namespace and state (of one ``namespace`` if given), and the oldest
        in-progress record."""
        return self._stats(self.clock(), namespace)

    # -- for subclasses ----------------------------------------------------------------
    def _claim(
        self,
        namespace: str,
        key: str,
        fingerprint: str | None,
        token: str,
        now: float,
        lease_until: float,
        expires_at: float,
    ) -> Outcome | None:
        """Insert an in-progress record, or take over an expired one, or report the live
        one; None only if the record vanished between two reads."""
        raise NotImplementedError

    def _complete(
        self,
        namespace: str,
        key: str,
        token: str,
        result: bytes | None,
        state: State,
        now: float,
        expires_at: float,
    ) -> bool:
        raise NotImplementedError

    def _release(self, namespace: str, key: str, token: str) -> bool:
        raise NotImplementedError

    def _renew(self, namespace: str, key: str, token: str, lease_until: float) -> bool:
        raise NotImplementedError

    def _get(self, namespace: str, key: str) -> Record | None:
        raise NotImplementedError

    def _purge(
        self, now: float, created_before: float | None, namespace: str | None, batch: int
    ) -> int:
        """Delete purgeable records (see `purge`) in steps of at most ``batch``, each
        step atomic; return the total deleted."""
        raise NotImplementedError

    def _stats(self, now: float, namespace: str | None) -> StoreStats:
        raise NotImplementedError


def outcome_of(record: Record, token: str, now: float) -> Outcome:
    """What a claim that found ``record`` (after any takeover) means for the caller."""
    if record.state is not _IN_PROGRESS:
        return Completed(record)
    if record.token == token:
        lease_until = record.lease_until
        assert lease_until is not None
        return Claimed(token, lease_until)
    return InProgress(record)


def purgeable(record: Record, now: float, created_before: float | None) -> bool:
    """May `Store.purge` delete this record? Expired (or created before
    ``created_before``), and not an in-progress record whose lease is live."""
    if record.expires_at > now and (created_before is None or record.created_at >= created_before):
        return False
    return not (
        record.state is _IN_PROGRESS
        and record.lease_until is not None
        and record.lease_until > now
    )


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


def claimable(record: Record | None, now: float) -> bool:
    """May a new claim take this key? Absent, expired, or an in-progress lease that ran out."""
    if record is None or record.expires_at <= now:
        return True
    return (
        record.state is _IN_PROGRESS
        and record.lease_until is not None
        and record.lease_until <= now
    )
