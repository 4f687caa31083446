"""librdkafka's mock Kafka cluster for the tests: a real protocol endpoint on loopback.

`MockKafka` holds the cluster (an ``AdminClient`` with ``test.mock.num.brokers``) in this
process; its bootstrap address, read back from ``list_topics()``, serves other processes
while the holder lives. Topics are created on first use with 4 partitions. The mock
implements produce/fetch, consumer groups (join, sync, heartbeats, session timeouts) and
offset commits; not broker transactions or ``read_committed`` (no test relies on them).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from _celery_harness import wait_until as _wait_until
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

PARTITIONS = 4
QUIET = {"log_level": 2}  # errors only: the mock logs every disconnect as a notice
#: Fast group membership for tests: a SIGKILLed or SIGSTOPped member leaves after 3 s.
FAST_GROUP = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 300}


class MockKafka:
    """A one-broker mock cluster owned by this process; ``bootstrap`` is its address."""

    def __init__(self) -> None:
        self._admin: AdminClient | None = AdminClient(
            {"test.mock.num.brokers": "1", **QUIET})
        metadata = self._admin.list_topics(timeout=10)
        brokers = list(metadata.brokers.values())
        if not brokers:
            raise RuntimeError("the mock cluster reported no broker")
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
        if not all(b.host == "127.0.0.1" for b in brokers):
            raise RuntimeError(f"the mock cluster is not on loopback: {self.bootstrap}")

    def close(self) -> None:
        self._admin = None

    def __enter__(self) -> MockKafka:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def producer(self, **conf: Any) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, "acks": "all", **QUIET, **conf})

    def consumer_config(self, group: str, **conf: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "group.id": group,
                "auto.offset.reset": "earliest", **FAST_GROUP, **QUIET, **conf}

    def produce(self, topic: str, messages: Iterable[dict[str, Any]]) -> None:
        """Produce each ``{"value", "key", "headers", "partition"}`` and wait for every
        acknowledgement (an error raises)."""
        failed: list[Any] = []
        p = self.producer()
        try:
            for m in messages:
                p.produce(topic, value=m.get("value"), key=m.get("key"),
                          headers=m.get("headers"), partition=m.get("partition", 0),
                          on_delivery=lambda err, _m: failed.append(err) if err else None)
                p.poll(0)
            left = p.flush(30)
        finally:
            del p
        if left or failed:
            raise KafkaException(failed[0] if failed else "produce: messages left unsent")

    def end_offsets(self, topic: str) -> dict[int, int]:
        """The high watermark of each partition."""
        with self._probe() as c:
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10,
                                               cached=False)[1]
                    for p in range(PARTITIONS)}

    def read_all(self, topic: str, expected: int, deadline: float = 30.0) -> list[Any]:
        """Every message of ``topic`` (from the start, all partitions) once ``expected``
        are there; fails after ``deadline`` seconds with fewer."""
        out: list[Any] = []
        with self._probe() as c:
            c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
            end = time.monotonic() + deadline
            while len(out) < expected and time.monotonic() < end:
                for m in c.consume(500, 0.2):
                    if m.error() is None:
                        out.append(m)
        assert len(out) >= expected, f"{topic}: {len(out)} of {expected} messages"
        return out

    def commit_offsets(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        """Overwrite ``group``'s Kafka committed offsets, as a member of the group (the mock
        refuses a commit from outside a group it knows: UNKNOWN_MEMBER_ID)."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group,
                      "enable.auto.commit": False, **FAST_GROUP, **QUIET})
        try:
            c.subscribe([topic])
            end = time.monotonic() + 30
            while len(c.assignment()) < PARTITIONS:
                assert time.monotonic() < end, "the probe never got the partitions"
                c.poll(0.1)
            c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                     asynchronous=False)
        finally:
            c.close()

    def committed(self, group: str, topic: str) -> dict[int, int]:
        with self._probe(group) as c:
            tps = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
            return {tp.partition: tp.offset for tp in tps}

    @contextmanager
    def _probe(self, group: str = "probe") -> Iterator[Consumer]:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group,
                      "enable.auto.commit": False, **QUIET})
        try:
            yield c
        finally:
            c.close()


def partition_of(payment_id: str) -> int:
    """The partition of a payment: stable, so its duplicates land in one partition."""
    return zlib.crc32(payment_id.encode()) % PARTITIONS


def wait_until(predicate: Any, deadline: float, what: str, step: float = 0.1) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``deadline`` s
    (the suite's `_celery_harness.wait_until`)."""
    _wait_until(predicate, deadline, what, poll=step)
