"""A private moto server (SQS's real HTTP API) for the SQS tests, and boto3 helpers.

``MotoServer`` runs ``python -m moto.server`` as a subprocess on 127.0.0.1, on a free
port, so consumer processes of other tests can reach it and a busy pytest process does
not slow it down. The bind is checked (the process must be alive and answer on our
port; a port taken meanwhile is retried with another), it is stopped by PID (SIGTERM,
then SIGKILL), and on Linux it dies with the process that started it.

Every client uses dummy credentials and the server's ``endpoint_url``: real boto3 calls,
over HTTP, signed as for AWS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from _celery_harness import wait_until as wait_until  # re-exported for the SQS tests
from _servers import HOST, PORT_ATTEMPTS, START_TIMEOUT, ServerError, free_port
from _servers import _die_with_parent as die_with_parent
from _servers import _stop_process as stop_process

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class MotoServer:
    """``moto.server`` on 127.0.0.1: ``endpoint`` is its URL; `stop` ends it by PID."""

    def __init__(self, start_timeout: float = START_TIMEOUT) -> None:
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.tmpdir = Path(tempfile.mkdtemp(prefix="idem-moto-"))
        self.log_path = self.tmpdir / "moto.log"

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise ServerError("moto server not started")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError("moto server not started")
        return self.proc.pid

    def start(self) -> MotoServer:
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent(signal.SIGTERM))
            self.port = port
            if self._wait_ready():
                return self
            stop_process(self.proc, signal.SIGKILL, 10)
            if b"in use" not in self.log_path.read_bytes():
                break
        raise ServerError(f"moto server did not start:\n{self.log_path.read_text()[-2000:]}")

    def _wait_ready(self) -> bool:
        """True once our process answers on our port; False if it died (port taken)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as r:
                    ok = r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                ok = False
            if ok and self.proc.poll() is None:  # ours answered, not someone else's
                return True
            time.sleep(0.05)
        raise ServerError(f"moto server not ready in {self.start_timeout}s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)
            self.proc = None
        with contextlib.suppress(OSError):
            for p in self.tmpdir.iterdir():
                p.unlink()
            self.tmpdir.rmdir()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **config: Any) -> Any:
        """A boto3 SQS client of this server (close it)."""
        return sqs_client(self.endpoint, **config)

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and ``boto3.client("sqs")``) here."""
        return {"AWS_ENDPOINT_URL_SQS": self.endpoint, "AWS_DEFAULT_REGION": REGION,
                "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"]}


def sqs_client(endpoint: str, **config: Any) -> Any:
    """A boto3 SQS client of ``endpoint`` with dummy credentials (close it)."""
    import boto3
    from botocore.config import Config

    return boto3.client("sqs", endpoint_url=endpoint, region_name=REGION,
                        config=Config(**config) if config else None, **CREDENTIALS)


def make_queue(client: Any, *, dlq: bool = False, max_receive: int | None = None,
               visibility: int = 30, fifo: bool = False) -> tuple[str, str | None]:
    """A fresh queue (unique name), and its dead-letter queue when ``dlq``; with
    ``max_receive`` the queue gets a redrive policy to that queue."""
    name = f"q-{uuid.uuid4().hex[:12]}"
    suffix = ".fifo" if fifo else ""
    dlq_url = None
    attrs: dict[str, str] = {"VisibilityTimeout": str(visibility)}
    if fifo:
        attrs["FifoQueue"] = "true"
    if dlq or max_receive is not None:
        dlq_url = client.create_queue(QueueName=f"{name}-dlq{suffix}",
                                      Attributes={"FifoQueue": "true"} if fifo else {}
                                      )["QueueUrl"]
        if max_receive is not None:
            arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
            import json

            attrs["RedrivePolicy"] = json.dumps({
                "deadLetterTargetArn": arn["Attributes"]["QueueArn"],
                "maxReceiveCount": str(max_receive)})
    url = client.create_queue(QueueName=name + suffix, Attributes=attrs)["QueueUrl"]
    return url, dlq_url


def queue_counts(client: Any, url: str) -> tuple[int, int]:
    """(visible, in flight) message counts of a queue."""
    a = client.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                      "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def drain(client: Any, url: str, *, wait: int = 0) -> list[dict[str, Any]]:
    """Every message now visible in a queue (received, not deleted)."""
    out: list[dict[str, Any]] = []
    while True:
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=wait, VisibilityTimeout=600,
                                       MessageAttributeNames=["All"],
                                       MessageSystemAttributeNames=["All"])
        got = reply.get("Messages", [])
        if not got:
            return out
        out.extend(got)


def count_calls(client: Any) -> dict[str, int]:
    """A live count of the client's API calls by operation (botocore's event hooks)."""
    calls: dict[str, int] = {}

    def before_call(model: Any, **_: Any) -> None:
        calls[model.name] = calls.get(model.name, 0) + 1

    client.meta.events.register("before-call.sqs.*", before_call)
    return calls


def worker_env(server: MotoServer, **values: Any) -> dict[str, str]:
    """The environment of a consumer script: ours, import paths, boto3's endpoint."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, **server.env()}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root / "tests"), str(root), *filter(None, [env.get("PYTHONPATH")])])
    for name, value in values.items():
        env[f"IDEM_SQS_{name.upper()}"] = str(value)
    return env


class Feeder:
    """Sends bodies (JSON-encoded unless str) 10 a call from a thread, keeping at most
    ``backlog`` messages in the queue: moto's receive and delete cost grows with the
    queue's length (it scans every message), a real queue's does not. ``ids`` are the
    MessageIds sent, in order; `join` waits for the last send and re-raises its error."""

    def __init__(self, client: Any, url: str, bodies: list[Any], *, backlog: int = 100,
                 timeout: float = 300) -> None:
        import json
        import threading

        self.client, self.url, self.backlog, self.timeout = client, url, backlog, timeout
        self.bodies = [b if isinstance(b, str) else json.dumps(b) for b in bodies]
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sqs-feeder", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            for i in range(0, len(self.bodies), 10):
                while sum(queue_counts(self.client, self.url)) >= self.backlog:
                    if time.monotonic() > deadline:
                        raise AssertionError("the consumers stopped taking messages")
                    time.sleep(0.05)
                entries = [{"Id": str(j), "MessageBody": b}
                           for j, b in enumerate(self.bodies[i:i + 10])]
                reply = self.client.send_message_batch(QueueUrl=self.url, Entries=entries)
                if reply.get("Failed"):
                    raise AssertionError(f"send failed: {reply['Failed']}")
                self.ids.extend(r["MessageId"] for r in
                                sorted(reply["Successful"], key=lambda r: int(r["Id"])))
        except BaseException as exc:
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self) -> list[str]:
        self.thread.join(self.timeout)
        if self.error is not None:
            raise self.error
        assert not self.thread.is_alive(), "the feeder did not finish"
        return self.ids
