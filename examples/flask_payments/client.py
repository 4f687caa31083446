"""Sends 50 payments to the API, each 1 to 3 times with the same Idempotency-Key (some of
the copies at the same time, as a client retrying after a timeout would), then prints
what the ledger holds."""

from __future__ import annotations

import os
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

BASE = os.environ.get("API_URL", "http://127.0.0.1:8000")
rng = random.Random(7)
run = uuid.uuid4().hex[:8]
payments = [(f"{run}-{i}", rng.randint(100, 9_999)) for i in range(50)]
sends = [(key, cents) for key, cents in payments for _ in range(rng.randint(1, 3))]
rng.shuffle(sends)


def send(item: tuple[str, int]) -> int:
    key, cents = item
    with httpx.Client(base_url=BASE, timeout=30) as client:
        for _ in range(20):  # 409: the first copy is still running; retry, as clients do
            r = client.post("/payments", json={"account": "acct-1", "cents": cents},
                            headers={"Idempotency-Key": key})
            if r.status_code != 409:
                return r.status_code
    return r.status_code


with ThreadPoolExecutor(8) as pool:
    codes = list(pool.map(send, sends))
totals = httpx.get(f"{BASE}/ledger").json()
print(f"requests sent: {len(sends)}, all answered 201: {set(codes) == {201}}")
print(f"payments: {len(payments)}, ledger rows: {totals['rows']}")
print(f"cents expected: {sum(c for _, c in payments)}, in the ledger: {totals['cents']}")
