"""An in-process store, for unit tests and examples only: it forgets everything on exit
and is shared by nothing but the threads of one process. Its clock is the local one."""

from __future__ import annotations

import threading
import time

from .._record import Claimed, Outcome, Record, State, StoreStats
from .._rules import claimable, is_takeover, outcome_of, purgeable
from .base import Store, count_states

_IN_PROGRESS = State.IN_PROGRESS
_time = time.time

#: An in-progress record is kept as a plain tuple and made a `Record` only when read: a
#: claim then costs a tuple instead of a frozen dataclass (about 1 µs less), and most
#: claims are completed before anyone reads them. Completed and failed records are kept
#: as `Record`s, ready for duplicates.
_Lease = tuple[str | None, str, float, float, float]  # fingerprint, token, lease_until,
#                                                      created_at, expires_at


def _as_record(namespace: str, key: str, entry: Record | _Lease) -> Record:
    if type(entry) is not tuple:
        return entry  # type: ignore[return-value]
    fingerprint, token, lease_until, created_at, expires_at = entry
    return Record(namespace, key, _IN_PROGRESS, fingerprint, None, token, lease_until,
                  created_at, None, expires_at)


class MemoryStore(Store):
    """A dict behind a lock. Each operation is atomic under the lock."""

    may_fail_transiently = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]  # only clock= is accepted
        # (namespace, key) -> a Record, or an in-progress record as a `_Lease` tuple
        self._records: dict[tuple[str, str], Record | _Lease] = {}
        self._lock = threading.Lock()

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
        """Rule CLAIMABLE, under the lock."""
        slot = (namespace, key)
        with self._lock:
            if now is None:
                now = _time()
            entry = self._records.get(slot)
            taken_over = False
            if entry is not None:
                record = _as_record(namespace, key, entry)
                if not claimable(record, now):
                    return outcome_of(record, token, now)
                taken_over = is_takeover(record, now)
            lease_until = now + lease
            self._records[slot] = (fingerprint, token, lease_until, now, now + ttl)
            return Claimed(token, lease_until, taken_over)

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
        """Rule FENCED, under the lock."""
        slot = (namespace, key)
        with self._lock:
            if now is None:
                now = _time()
            entry = self._records.get(slot)
            if entry is None:
                return False
            if type(entry) is tuple:  # in progress: the common case
                if entry[1] != token:
                    return False
                fingerprint, created_at, completed_at = entry[0], entry[3], now
            else:  # completed before (with this token: harmless)
                record: Record = entry  # type: ignore[assignment]
                if record.token != token:
                    return False
                fingerprint, created_at = record.fingerprint, record.created_at
                completed_at = record.completed_at or now
            self._records[slot] = Record(
                namespace, key, state, fingerprint, result, token, None,
                created_at, completed_at, now + ttl,
            )
            return True

    def _release(self, namespace: str, key: str, token: str) -> bool:
        """Rule FENCED, under the lock."""
        with self._lock:
            entry = self._records.get((namespace, key))
            if type(entry) is not tuple or entry[1] != token:  # not ours, or not in progress
                return False
            del self._records[namespace, key]
            return True

    def _renew(
        self, namespace: str, key: str, token: str, now: float | None, lease: float
    ) -> float | None:
        """Rule FENCED, under the lock."""
        with self._lock:
            entry = self._records.get((namespace, key))
            if type(entry) is not tuple or entry[1] != token:  # not ours, or not in progress
                return None
            lease_until = (_time() if now is None else now) + lease
            fingerprint, _, _, created_at, expires_at = entry
            self._records[namespace, key] = (
                fingerprint, token, lease_until, created_at, expires_at)
            return lease_until

    def _get(self, namespace: str, key: str) -> Record | None:
        with self._lock:
            entry = self._records.get((namespace, key))
        return None if entry is None else _as_record(namespace, key, entry)

    def _purge(
        self, now: float, older_than: float | None, namespace: str | None, batch: int
    ) -> int:
        """Rule PURGEABLE, one step under the lock per batch, so claims interleave."""
        created_before = None if older_than is None else now - older_than
        total = 0
        while True:
            with self._lock:
                doomed = []
                for (ns, key), entry in self._records.items():
                    if (namespace is None or ns == namespace) and purgeable(
                            _as_record(ns, key, entry), now, created_before):
                        doomed.append((ns, key))
                        if len(doomed) == batch:
                            break
                for slot in doomed:
                    del self._records[slot]
            total += len(doomed)
            if len(doomed) < batch:
                return total

    def _stats(self, now: float, namespace: str | None) -> StoreStats:
        with self._lock:
            records = [_as_record(ns, key, entry) for (ns, key), entry in self._records.items()
                       if namespace is None or ns == namespace]
        return count_states(records, now)

    def __len__(self) -> int:
        return len(self._records)
