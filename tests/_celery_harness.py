"""Real ``celery worker -P prefork`` processes for the Celery tests and the benchmark.

A `Worker` is a ``celery -A _celery_app worker`` subprocess started in its own session,
so its pool children share its process group: `Worker.kill` SIGKILLs that group (the
worker and every child it forked, all processes this harness started), `Worker.stop`
asks for a warm shutdown and SIGKILLs the group after a deadline. Configuration goes
through environment variables (see ``tests/_celery_app.py``).

`wait_until` polls a condition with a deadline; `Broker` reads the redis-server's queue
and unacked set, so a test can wait for "everything acked".
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import redis

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
T = TypeVar("T")


class ConditionTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def wait_until(check: Callable[[], T], timeout: float, what: str, *, poll: float = 0.1,
               describe: Callable[[], str] | None = None) -> T:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f" ({describe()})" if describe is not None else ""
            raise ConditionTimeout(f"not within {timeout:.0f}s: {what}{extra}")
        time.sleep(poll)


def worker_env(**values: str | float | int | None) -> dict[str, str]:
    """The environment of a worker: ours, the import paths, and ``IDEMPOTENT_CELERY_*``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for name, value in values.items():
        var = f"IDEMPOTENT_CELERY_{name.upper()}"
        if value is None:
            env.pop(var, None)
        else:
            env[var] = str(value)
    return env


class Worker:
    """One ``celery worker`` process group that this harness started and owns."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path, *,
                 concurrency: int = 2, queues: str = "celery", app: str = "_celery_app",
                 extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.concurrency = concurrency
        self.queues = queues
        self.app = app
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Worker:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-P", "prefork", "-c", str(self.concurrency), "-Q", self.queues,
            "-n", f"{self.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.starts += 1
        return self

    def children(self) -> list[int]:
        """PIDs of the worker's pool children (from /proc)."""
        if self.proc is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                found.append(int(entry.name))
        return sorted(found)

    def ready(self) -> bool:
        """Whether the current start has logged that it is ready (it consumes)."""
        return b" ready." in self.current_log()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the worker logs that it is ready (its consumer polls the broker)."""
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited: {self.log_tail()}")
            return self.ready()
        wait_until(ready, timeout, f"worker {self.name} ready", describe=self.log_tail)

    def current_log(self) -> bytes:
        """The log of the current start only."""
        try:
            text = self.log_path.read_bytes()
        except OSError:
            return b""
        return text.rsplit(b"\n==== start ", 1)[-1]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.current_log().decode("utf-8", "replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the worker and its pool children (its process group), and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM to the worker), then SIGKILL the group after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind, if any
        self.proc.wait(30)


class Broker:
    """What the redis broker holds: ready messages and delivered-but-unacked ones."""

    def __init__(self, url: str, queues: tuple[str, ...] = ("celery",)) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.queues = queues

    def counts(self) -> dict[str, int]:
        """Ready messages in the queues and unacked ones (held by workers or waiting on an
        ETA); -1 where the broker does not answer (it is restarting)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for q in self.queues:
                pipe.llen(q)
            pipe.hlen("unacked").zcard("unacked_index")
            *ready, unacked, index = pipe.execute()
        except redis.RedisError:
            return {"ready": -1, "unacked": -1, "unacked_index": -1}
        return {"ready": sum(map(int, ready)), "unacked": int(unacked),
                "unacked_index": int(index)}

    def empty(self) -> bool:
        return all(v == 0 for v in self.counts().values())

    def close(self) -> None:
        self.client.close()


def log_count(workers: list[Worker], needle: str) -> int:
    """How many lines of all the workers' logs (every start) contain ``needle``."""
    total = 0
    for w in workers:
        with contextlib.suppress(OSError):
            total += sum(needle in line for line in
                         w.log_path.read_text("utf-8", "replace").splitlines())
    return total


def ledger_database(pg_server: Any, prefix: str) -> tuple[str, str]:
    """A new database on ``pg_server`` holding the example ledger tables and the records
    table; returns its name and SQLAlchemy URL (the caller drops it)."""
    import uuid

    import sqlalchemy as sa
    from _celery_app import metadata

    from idempotent import SqlStore

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    url: str = pg_server.url_for(name)
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    SqlStore(engine).create_schema()
    engine.dispose()
    return name, url


def payments_rows(engine: Any, task: str | None = None) -> dict[str, list[int]]:
    """payment_id -> the cents of each ledger row (two entries: applied twice)."""
    import sqlalchemy as sa
    from _celery_app import ledger

    q = sa.select(ledger.c.payment_id, ledger.c.cents)
    if task is not None:
        q = q.where(ledger.c.task == task)
    out: dict[str, list[int]] = {}
    with engine.connect() as c:
        for pid, cents in c.execute(q):
            out.setdefault(pid, []).append(int(cents))
    return out
