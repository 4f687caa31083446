"""A private RabbitMQ node for the AMQP tests: Debian's ``rabbitmq-server`` as a plain
process on 127.0.0.1, free ports, its own ``epmd``.

`RabbitServer` starts ``epmd`` itself (in the foreground, on a free port, so this module
owns its PID and never touches another user's ``epmd``), then ``rabbitmq-server`` in a
session of its own (the shell script, the Erlang VM and its helper processes share that
process group, all started here). It is ready when its log says the AMQP listener started
on our port and a real AMQP handshake succeeds. `stop` shuts the group down by its id
(SIGTERM, SIGKILL after a deadline), then ``epmd`` by its PID, and removes the temp dir;
`restart` kills the node (SIGKILL, or a clean stop) and starts it again on the same port
with the same data directory, so durable queues and persistent messages survive, as on a
production broker.

The pytest fixture ``rabbit`` (in each test module: ``from _rabbitmq import rabbit``) is
session-scoped: one node for every AMQP test module.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _servers import HOST, ServerError, _die_with_parent, free_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_TIMEOUT = 90.0  # seconds: ~8 s on an idle 2-core machine, much more under load
STOP_TIMEOUT = 30.0
_POLL = 0.1
DEFAULT_ADVANCED = "[{rabbit, [{channel_tick_interval, 500}]}]."


class RabbitServer:
    """One RabbitMQ node (and its ``epmd``) that this process started and owns.

    ``advanced`` is the text of the node's ``advanced.config`` (Erlang terms), e.g.
    ``[{rabbit, [{consumer_timeout, 2000}]}].``; `set_env` changes a setting of the running
    node. Default: the channels check their consumers' ack timeout every half second
    (``channel_tick_interval``; RabbitMQ's default is a minute), so a test of
    ``consumer_timeout`` takes seconds.
    """

    def __init__(self, advanced: str = DEFAULT_ADVANCED, *,
                 start_timeout: float = START_TIMEOUT) -> None:
        self.advanced = advanced
        self.start_timeout = start_timeout
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.dist_port = 0
        self.epmd_port = 0
        self.starts = 0

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """The AMQP URL of the node (guest may log in from the loopback)."""
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @property
    def nodename(self) -> str:
        return f"idem{self.port}@localhost"

    @property
    def pid(self) -> int:
        """PID of the ``rabbitmq-server`` script, the leader of the node's process group."""
        if self._proc is None:
            raise ServerError("rabbitmq not started")
        return self._proc.pid

    @property
    def tmpdir(self) -> Path:
        if self._dir is None:
            raise ServerError("rabbitmq not started")
        return self._dir

    def _env(self) -> dict[str, str]:
        t = self.tmpdir
        env = dict(os.environ)
        env.update({
            "HOME": str(t),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(t / "mnesia"),
            "RABBITMQ_LOG_BASE": str(t / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(t / "plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(t / "advanced.config"),
            "ERL_EPMD_ADDRESS": HOST,
            "ERL_EPMD_PORT": str(self.epmd_port),
        })
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RabbitServer:
        if self._proc is not None:
            raise ServerError("rabbitmq already started")
        if not os.access(RABBITMQ_SERVER, os.X_OK):
            raise ServerError(f"{RABBITMQ_SERVER} not found: install rabbitmq-server")
        atexit.register(self.stop)
        try:
            self._dir = Path(tempfile.mkdtemp(prefix="idem-rmq-", dir="/tmp"))
            (self._dir / "plugins").write_text("[].\n")
            (self._dir / "advanced.config").write_text(self.advanced + "\n")
            self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
            self._start_epmd()
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_epmd(self) -> None:
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", HOST],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent(signal.SIGTERM),
        )

    def log_text(self) -> str:
        """The node's logs, all of them (every start)."""
        texts = []
        for p in sorted((self.tmpdir / "log").glob("*.log")):
            with contextlib.suppress(OSError):
                texts.append(p.read_text("utf-8", "replace"))
        with contextlib.suppress(OSError):
            texts.append((self.tmpdir / "out.log").read_text("utf-8", "replace"))
        return "\n".join(texts)

    def _spawn(self) -> None:
        self.starts += 1
        marker = f"started TCP listener on {HOST}:{self.port}"
        seen = self.log_text().count(marker)
        with open(self.tmpdir / "out.log", "ab") as out:
            self._proc = subprocess.Popen(
                [RABBITMQ_SERVER], env=self._env(), cwd=self.tmpdir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent(signal.SIGTERM),
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise ServerError(f"rabbitmq-server exited with {rc}:\n{self._tail()}")
            if self.log_text().count(marker) > seen and self._handshake():
                return
            if time.monotonic() > deadline:
                raise ServerError(f"rabbitmq on port {self.port} not ready after "
                                  f"{self.start_timeout}s:\n{self._tail()}")
            time.sleep(_POLL)

    def _handshake(self) -> bool:
        import pika

        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.url + "?socket_timeout=2"))
        except Exception:
            return False
        conn.close()
        return True

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _stop_node(self, sig: int) -> None:
        """``sig`` to the node's process group (the script, the VM, its helpers: all ours),
        wait until the group is empty, SIGKILL what is left after a deadline."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if not self._group_gone(proc, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self._group_gone(proc, STOP_TIMEOUT)

    @staticmethod
    def _group_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            proc.poll()  # reap the script when it exits
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(10)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL)

    def restart(self, *, kill: bool = True) -> None:
        """Stop the node (SIGKILL of its process group if ``kill``, else SIGTERM) and start
        it again on the same ports and data directory, with the checks of `start`."""
        self._stop_node(signal.SIGKILL if kill else signal.SIGTERM)
        self._spawn()

    def stop(self) -> None:
        """Stop the node and our ``epmd`` by their ids; remove the temp dir."""
        atexit.unregister(self.stop)
        self._stop_node(signal.SIGTERM)
        epmd, self._epmd = self._epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(10)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait(10)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RabbitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def set_env(self, key: str, value: str) -> None:
        """``application:set_env(rabbit, key, value)`` on the running node (``value`` an
        Erlang term); channels opened afterwards see it (``consumer_timeout``)."""
        subprocess.run(
            [RABBITMQCTL, "-n", self.nodename, "-q", "eval",
             f"application:set_env(rabbit, {key}, {value})."],
            env=self._env(), capture_output=True, timeout=60, check=True)

    def queue_counts(self, name: str) -> tuple[int, int]:
        """(ready, unacked) messages of queue ``name``, from ``rabbitmqctl`` (a second or
        two); (-1, -1) when the node does not answer."""
        try:
            out = subprocess.run(
                [RABBITMQCTL, "-n", self.nodename, "-q", "list_queues", "--no-table-headers",
                 "name", "messages_ready", "messages_unacknowledged"],
                env=self._env(), capture_output=True, timeout=60, check=True, text=True,
            ).stdout
        except (subprocess.SubprocessError, OSError):
            return -1, -1
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == name:
                return int(parts[1]), int(parts[2])
        return 0, 0

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid} port={self.port}" if self._proc else "stopped"
        return f"<RabbitServer {state}>"


_shared: RabbitServer | None = None
_users = 0


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitServer]:
    """One private RabbitMQ node for the whole session, shared by every AMQP test module
    (each imports this fixture, so each has its own session-scoped copy of it: they share
    one node through a count of users, and the last one out stops it)."""
    global _shared, _users
    if _shared is None:
        _shared = RabbitServer().start()
    _users += 1
    server = _shared
    try:
        yield server
    finally:
        _users -= 1
        if _users == 0:
            _shared = None
            server.stop()
