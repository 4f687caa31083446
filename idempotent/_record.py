"""The record and the outcomes of a claim: plain values, shared by every store."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(str, enum.Enum):
    """Where a key is in its life: claimed and running, done, or kept as failed."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Record:
    """What a store remembers of one key. Times are epoch seconds."""

    namespace: str
    key: str
    state: State
    fingerprint: str | None
    result: bytes | None
    token: str | None
    lease_until: float | None
    created_at: float
    completed_at: float | None
    expires_at: float


# The outcomes are built once per claim: plain slotted classes, immutable by convention
# (a frozen dataclass is twice as slow to construct).
@dataclass(slots=True)
class Claimed:
    """The caller owns the key until ``lease_until``; ``token`` fences its later writes."""

    token: str
    lease_until: float
    taken_over: bool = False


@dataclass(slots=True)
class Completed:
    """The key was processed before (or kept as failed): ``record`` says how."""

    record: Record


@dataclass(slots=True)
class InProgress:
    """Another worker holds a live lease on the key until ``record.lease_until``;
    ``now`` is the store's time when the claim found it."""

    record: Record
    now: float


Outcome = Claimed | Completed | InProgress


@dataclass(frozen=True, slots=True)
class StateCount:
    """How many records of one namespace are in one state; ``expired`` of them are past
    their ``expires_at`` (treated as absent, awaiting a purge)."""

    namespace: str
    state: State
    count: int
    expired: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `Store.stats` reports: counts per namespace and state, sorted by namespace
    then state, and the in-progress record with the oldest ``created_at`` (or None)."""

    counts: tuple[StateCount, ...]
    oldest_in_progress: Record | None
