"""A Kafka consumer process for the SIGKILL and SIGSTOP tests (``tests/test_kafka_chaos.py``).

Run as ``python tests/_kafka_worker.py '<json spec>'``. The spec: ``bootstrap``, ``url``
(PostgreSQL), ``topic``, ``group``, ``worker`` (the name its ledger rows carry),
``batch_size``, ``key`` (business-key dedup on the ``payment-id`` header), ``strategy``
(the assignor), ``stop`` (a path: the worker closes and exits 0 once it exists),
``status`` (a path: the outcome as JSON, written at exit), and for the zombie test
``hold`` (a path): the first batch's handler writes its rows, then writes ``holding`` to
``status`` and waits, inside its open transaction, until ``hold`` exists.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kafka import FAST_GROUP, QUIET
from _kafka_payments import apply_batch
from idempotent.integrations.kafka import (
    PositionFenced,
    TransactionalConsumer,
    header,
)

from idempotent import SqlStore


def main(spec: dict[str, Any]) -> int:
    status = Path(spec["status"])
    store = SqlStore(spec["url"], connect_args={"application_name": "kafka-worker"})
    inner = apply_batch(spec["worker"])
    hold = spec.get("hold")

    def apply(messages: list[Any], connection: Any) -> None:
        nonlocal hold
        inner(messages, connection)
        if hold is not None:
            status.write_text(json.dumps({"holding": len(messages)}))
            while not os.path.exists(hold):
                time.sleep(0.02)
            hold = None

    apply.__qualname__ = inner.__qualname__
    conf = {"bootstrap.servers": spec["bootstrap"], "group.id": spec["group"],
            "auto.offset.reset": "earliest", **FAST_GROUP, **QUIET,
            "partition.assignment.strategy": spec.get("strategy", "range")}
    consumer = TransactionalConsumer(
        conf, store, [spec["topic"]], apply, decode=json.loads,
        key=header("payment-id") if spec.get("key") else None,
        batch_size=spec.get("batch_size", 100), batch_timeout=0.05)
    code = 0
    try:
        consumer.run(stop=lambda: os.path.exists(spec["stop"]))
        outcome: dict[str, Any] = {"stopped": True}
    except PositionFenced as exc:
        outcome = {"error": "PositionFenced", "topic": exc.topic, "partition": exc.partition,
                   "generation": exc.generation, "start": exc.start, "found": exc.found}
        code = 3
    finally:
        consumer.close()
        store.engine.dispose()
    status.write_text(json.dumps(outcome))
    return code


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
