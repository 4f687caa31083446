"""Send payments to Kafka, each one several times (a producer that retries its sends
without idempotence: the same payment at new offsets).

    python producer.py --count 200 --copies 3

Reads the broker address from KAFKA_BOOTSTRAP (default 127.0.0.1:9092).
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

from confluent_kafka import Producer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topic", default="payments")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--copies", type=int, default=3)
    args = ap.parse_args()
    producer = Producer({"bootstrap.servers": os.environ.get("KAFKA_BOOTSTRAP",
                                                             "127.0.0.1:9092"),
                         "acks": "all", "log_level": 2})
    failed: list[object] = []
    total = 0
    for i in range(args.count):
        payment = {"payment_id": f"pay-{i}", "account": f"acct-{i % 7}", "cents": 100 + i}
        for _ in range(args.copies):
            producer.produce(
                args.topic, json.dumps(payment).encode(),
                key=payment["account"].encode(),
                headers=[("payment-id", payment["payment_id"].encode())],
                # keyed by account, as a real producer would: its copies share a partition
                partition=zlib.crc32(payment["account"].encode()) % 4,
                on_delivery=lambda err, _msg: failed.append(err) if err else None)
            total += 1
        producer.poll(0)
    left = producer.flush(30)
    if left or failed:
        raise SystemExit(f"{left} unsent, {len(failed)} failed: {failed[:1]}")
    print(f"sent {total} messages for {args.count} payments")


if __name__ == "__main__":
    main()
