"""An in-process store, for unit tests and examples only: it forgets everything on exit
and is shared by nothing but the threads of one process."""

from __future__ import annotations

import threading

from .._record import Claimed, Outcome, Record, State, StoreStats
from .base import Store, claimable, count_states, outcome_of, purgeable

_IN_PROGRESS = State.IN_PROGRESS


class MemoryStore(Store):
    """A dict behind a lock. Each operation is atomic under the lock."""

    may_fail_transiently = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]  # only clock= is accepted
        self._records: dict[tuple[str, str], Record] = {}
        self._lock = threading.Lock()

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
        with self._lock:
            record = self._records.get((namespace, key))
            if record is None or claimable(record, now):
                self._records[namespace, key] = Record(
                    namespace, key, _IN_PROGRESS, fingerprint, None, token,
                    lease_until, now, None, expires_at,
                )
                return Claimed(token, lease_until)
            return outcome_of(record, token, now)

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
        with self._lock:
            record = self._records.get((namespace, key))
            if record is None or record.token != token:
                return False
            self._records[namespace, key] = Record(
                namespace, key, state, record.fingerprint, result, token, None,
                record.created_at, record.completed_at or now, expires_at,
            )
            return True

    def _release(self, namespace: str, key: str, token: str) -> bool:
        with self._lock:
            record = self._records.get((namespace, key))
            if record is None or record.token != token or record.state is not _IN_PROGRESS:
                return False
            del self._records[namespace, key]
            return True

    def _renew(self, namespace: str, key: str, token: str, lease_until: float) -> bool:
        with self._lock:
            record = self._records.get((namespace, key))
            if record is None or record.token != token or record.state is not _IN_PROGRESS:
                return False
            self._records[namespace, key] = Record(
                namespace, key, _IN_PROGRESS, record.fingerprint, record.result, token,
                lease_until, record.created_at, record.completed_at, record.expires_at,
            )
            return True

    def _get(self, namespace: str, key: str) -> Record | None:
        with self._lock:
            return self._records.get((namespace, key))

    def _purge(
        self, now: float, created_before: float | None, namespace: str | None, batch: int
    ) -> int:
        total = 0
        while True:  # one step under the lock per batch, so claims interleave
            with self._lock:
                doomed = []
                for (ns, key), record in self._records.items():
                    if (namespace is None or ns == namespace) and purgeable(
                            record, now, created_before):
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
            records = [r for r in self._records.values()
                       if namespace is None or r.namespace == namespace]
        return count_states(records, now)

    def __len__(self) -> int:
        return len(self._records)
