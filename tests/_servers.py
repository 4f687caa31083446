"""Throwaway database servers for the test suite.

``PostgresServer`` runs a private PostgreSQL cluster (initdb into a temp dir,
then ``postgres`` started directly with ``subprocess.Popen`` so we own its PID)
listening on 127.0.0.1 on a free port and on a unix socket in the temp dir.
``RedisServer`` does the same for ``redis-server``.

Both stop by PID (``stop()``, the context manager, an ``atexit`` hook, and on
Linux a parent-death signal so even a SIGKILLed pytest doesn't leave them
running) and delete their temp dir.

When running as root, PostgreSQL refuses to start, so the temp dir is chowned
to the ``postgres`` OS user and initdb/postgres run as that user.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds for a server to accept connections
STOP_TIMEOUT = 30.0  # seconds for a graceful shutdown before SIGKILL
PORT_ATTEMPTS = 5  # fresh ports to try if the one we picked got taken meanwhile
_POLL = 0.05  # interval between readiness checks (always bounded by a deadline)


class ServerError(RuntimeError):
    """A test server could not be found, started or queried."""


class _PortTaken(ServerError):
    """The server could not bind the port we picked (someone else took it)."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))


def find_pg_bin() -> Path:
    """Directory holding ``initdb`` and ``postgres``.

    Order: ``$IDEMPOTENT_PG_BIN``, the highest ``/usr/lib/postgresql/*/bin``, ``PATH``.
    """
    env = os.environ.get("IDEMPOTENT_PG_BIN")
    if env:
        d = Path(env)
        if not ((d / "initdb").is_file() and (d / "postgres").is_file()):
            raise ServerError(f"IDEMPOTENT_PG_BIN={env!r} has no initdb and postgres")
        return d
    for c in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        d = Path(c)
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    found = shutil.which("initdb")
    if found:
        for d in (Path(found).parent, Path(found).resolve().parent):
            if (d / "postgres").is_file():
                return d
    raise ServerError(
        "PostgreSQL server binaries (initdb, postgres) not found: run the suite via "
        "scripts/test.sh (it installs them) or set IDEMPOTENT_PG_BIN"
    )


def _tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _traversable(path: Path, uid: int, gid: int) -> bool:
    """Whether user uid/gid can reach ``path`` (x bit on it and every ancestor)."""
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _make_tempdir(prefix: str, owner: pwd.struct_passwd | None) -> Path:
    """mkdtemp in a short dir the server's user can reach (unix socket paths max ~107)."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 60 or (
        owner is not None and not _traversable(base, owner.pw_uid, owner.pw_gid)
    ):
        base = Path("/tmp")
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if owner is not None:
        os.chown(d, owner.pw_uid, owner.pw_gid)
    return d


_libc: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """preexec_fn: the child gets ``sig`` when the process that started it dies.

    Runs in the child after subprocess switched user/group (so the setting
    survives the credential change). Linux only; elsewhere atexit must do.
    Note: "parent" is the *thread* that spawned the server, so start servers
    from the main thread (pytest fixtures do).
    """
    if _libc is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # parent already gone before prctl
            os.kill(os.getpid(), int(sig))

    return preexec


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig`` to proc by PID, wait up to ``timeout``, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- PostgreSQL


DEFAULT_PG_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    "fsync": "on",  # realistic commit cost for benchmarks; override if needed
    "max_connections": "100",
    "shared_buffers": "128MB",
}


class _Server:
    """What every private server shares: a temp dir, a free port, a process we own by PID,
    start with a retry when the port was taken meanwhile, stop by PID."""

    host = HOST
    #: the signal that shuts the server down cleanly
    stop_signal = signal.SIGTERM

    def __init__(self, start_timeout: float) -> None:
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServerError("server not started")
        return self._port

    @property
    def pid(self) -> int:
        """PID of the server process."""
        if self._proc is None:
            raise ServerError("server not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def tmpdir(self) -> Path:
        if self._dir is None:
            raise ServerError("server not started")
        return self._dir

    def _pick_port(self) -> int:
        return free_port()

    def _spawn_on_free_port(self, spawn: Callable[[int], None]) -> None:
        """``spawn(port)`` until one is not taken meanwhile (it raises _PortTaken)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                spawn(self._pick_port())
                return
            except _PortTaken:
                self._proc = None
                if attempt == PORT_ATTEMPTS - 1:
                    raise

    def stop(self) -> None:
        """Shut down by PID (``stop_signal``, SIGKILL after a deadline); remove the temp dir."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_process(proc, self.stop_signal, STOP_TIMEOUT)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PostgresServer(_Server):
    """A private PostgreSQL server on 127.0.0.1:<free port> with a database ``idem``.

    ``settings`` are extra/overriding ``-c name=value`` server settings.
    Use ``start()``/``stop()`` or ``with PostgresServer() as pg: ...``.
    """

    user = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown

    def __init__(
        self,
        settings: Mapping[str, str | int] | None = None,
        *,
        dbname: str = "idem",
        bin_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.settings = {**DEFAULT_PG_SETTINGS, **{k: str(v) for k, v in (settings or {}).items()}}
        self.dbname = dbname
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        super().__init__(start_timeout)

    # ---- public properties

    @property
    def datadir(self) -> Path:
        return self.tmpdir / "data"

    @property
    def sockdir(self) -> Path:
        """Directory of the unix socket (``host=`` for libpq)."""
        return self.tmpdir

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``idem`` database."""
        return self.url_for(self.dbname)

    @property
    def dsn(self) -> str:
        """libpq/psycopg conninfo of the ``idem`` database."""
        return self.dsn_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy (psycopg 3 driver) URL of database ``dbname``."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def dsn_for(self, dbname: str) -> str:
        """psycopg conninfo string of database ``dbname`` over TCP."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    # ---- lifecycle

    def start(self) -> PostgresServer:
        """initdb, start postgres, wait until it accepts connections, create the db."""
        if self._proc is not None:
            raise ServerError("server already started")
        bin_dir = self.bin_dir or find_pg_bin()
        owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if owner is None:
            creds: dict[str, Any] = {}
        else:
            creds = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        atexit.register(self.stop)
        try:
            self._dir = _make_tempdir("idem-pg-", owner)
            self._initdb(bin_dir, creds)
            self._spawn_on_free_port(lambda port: self._spawn(bin_dir, creds, port))
            self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self, bin_dir: Path, creds: dict[str, Any]) -> None:
        cmd = [
            str(bin_dir / "initdb"),
            "-D", str(self.datadir),
            "-A", "trust",
            "-U", self.user,
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.tmpdir,
            timeout=120,
            check=False,
            **creds,
        )
        if res.returncode != 0:
            out = res.stdout.decode("utf-8", "replace")[-3000:]
            raise ServerError(f"initdb failed ({res.returncode}):\n{out}")

    def _spawn(self, bin_dir: Path, creds: dict[str, Any], port: int) -> None:
        cmd = [
            str(bin_dir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(port),
            "-k", str(self.sockdir),
        ]  # fmt: skip
        for name, value in self.settings.items():
            cmd += ["-c", f"{name}={value}"]
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,  # terminal ^C goes to pytest, which stops us
                preexec_fn=_die_with_parent(signal.SIGINT),
                **creds,
            )
        self._port = port
        self._wait_ready(log_offset)

    def _wait_ready(self, log_offset: int) -> None:
        """Wait until *our* postmaster answers on 127.0.0.1:port, or fail fast.

        We only connect once our postmaster's lock file says "ready" (written
        after it bound its sockets), so we never wait on a stranger's port.
        """
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        want = os.path.realpath(self.datadir)
        last: Exception | str = "postmaster.pid not ready"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                log = _tail(self.log_path, log_offset)
                if "Address already in use" in log:
                    raise _PortTaken(f"port {self._port} taken:\n{log}")
                raise ServerError(f"postgres exited with code {rc} during startup; log:\n{log}")
            if self._lockfile_ready():
                try:
                    with psycopg.connect(
                        self.dsn_for("postgres"), connect_timeout=5, autocommit=True
                    ) as conn:
                        row = conn.execute("SHOW data_directory").fetchone()
                    if row is not None and os.path.realpath(row[0]) == want:
                        return
                    last = f"{self.host}:{self._port} is served from {row}, not {want}"
                except psycopg.OperationalError as e:
                    last = e
            if time.monotonic() > deadline:
                raise ServerError(
                    f"postgres (pid {self._proc.pid}) not accepting connections on "
                    f"{self.host}:{self._port} after {self.start_timeout}s; last error: {last}\n"
                    f"log:\n{_tail(self.log_path, log_offset)}"
                )
            time.sleep(_POLL)

    def _lockfile_ready(self) -> bool:
        """postmaster.pid names our PID and port and has status "ready"."""
        assert self._proc is not None
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self._proc.pid)
            and lines[3].strip() == str(self._port)
            and lines[7].strip() == "ready"
        )

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid} port={self._port}" if self._proc else "stopped"
        return f"<PostgresServer {state}>"

    # ---- psql-free helpers (psycopg, autocommit)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection (autocommit by default) to ``dbname``."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn_for(dbname), **kwargs)

    def execute(
        self,
        query: str | sql.Composable,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows ([] if none)."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str) -> None:
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop ``name``, terminating any sessions still connected to it."""
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def terminate_backends(
        self,
        *,
        application_name: str | None = None,
        pid: int | None = None,
        dbname: str | None = None,
        timeout: float = 10.0,
    ) -> list[int]:
        """``pg_terminate_backend`` the client sessions matching all given filters.

        At least one filter is required. Waits (up to ``timeout``) until the
        backends are gone, so the victims' next query is sure to fail.
        Returns the PIDs of the terminated backends, sorted.
        """
        if application_name is None and pid is None and dbname is None:
            raise ValueError("give application_name, pid and/or dbname")
        rows = self.execute(
            """
            SELECT pid FROM pg_stat_activity
            WHERE pid <> pg_backend_pid()
              AND backend_type = 'client backend'
              AND (%(app)s::text IS NULL OR application_name = %(app)s::text)
              AND (%(pid)s::int IS NULL OR pid = %(pid)s::int)
              AND (%(db)s::text IS NULL OR datname = %(db)s::text)
            """,
            {"app": application_name, "pid": pid, "db": dbname},
        )
        # A separate statement: in one query the planner may call
        # pg_terminate_backend before the filters (even on our own session).
        rows = self.execute(
            "SELECT p FROM unnest(%s::int[]) AS p WHERE pg_terminate_backend(p)",
            [[r[0] for r in rows]],
        )
        pids = sorted(r[0] for r in rows)
        deadline = time.monotonic() + timeout
        while pids:
            left = self.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
            )[0][0]
            if left == 0:
                break
            if time.monotonic() > deadline:
                raise ServerError(f"backends {pids} still alive after {timeout}s")
            time.sleep(_POLL)
        return pids


# --------------------------------------------------------------------------- Redis


def find_redis_server() -> str:
    """Path of ``redis-server`` (``$IDEMPOTENT_REDIS_SERVER`` overrides PATH)."""
    env = os.environ.get("IDEMPOTENT_REDIS_SERVER")
    found = env if env else shutil.which("redis-server")
    if not found or not os.access(found, os.X_OK):
        raise ServerError(
            "redis-server not found: run the suite via scripts/test.sh (it installs it) "
            "or set IDEMPOTENT_REDIS_SERVER"
        )
    return found


def _resp(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisServer(_Server):
    """A private ``redis-server`` on 127.0.0.1:<free port>, no persistence.

    ``extra_args`` are appended to the command line (e.g. ``["--maxmemory", "64mb"]``).
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        super().__init__(start_timeout)
        self.extra_args = list(extra_args)
        self.binary = binary

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "redis.log"

    @property
    def url(self) -> str:
        """redis-py URL of database 0."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def start(self) -> RedisServer:
        if self._proc is not None:
            raise ServerError("server already started")
        binary = self.binary or find_redis_server()
        atexit.register(self.stop)
        try:
            self._dir = _make_tempdir("idem-redis-", None)
            self._spawn_on_free_port(lambda port: self._spawn(binary, port))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, binary: str, port: int) -> None:
        cmd = [
            binary,
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.tmpdir),
            "--daemonize", "no",
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGTERM),
            )
        self._port = port
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                text = _tail(self.log_path, log_offset)
                if "Address already in use" in text:
                    raise _PortTaken(f"port {port} taken:\n{text}")
                raise ServerError(f"redis-server exited with code {rc} during startup:\n{text}")
            try:
                # PING must answer, and INFO must name our process (not a stranger's).
                # A short timeout: a stranger on the port may never answer;
                # then our server fails to bind and exits, seen by poll() above.
                if self.command("PING", timeout=0.5) == b"+PONG\r\n" and (
                    f"process_id:{self._proc.pid}\r\n".encode()
                    in self.command("INFO", "server", timeout=0.5)
                ):
                    return
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                raise ServerError(
                    f"redis-server (pid {self._proc.pid}) not answering on {self.host}:{port} "
                    f"after {self.start_timeout}s; last error: {last}\n"
                    f"log:\n{_tail(self.log_path, log_offset)}"
                )
            time.sleep(_POLL)

    def restart(self, *, kill: bool = False) -> None:
        """Stop the server by PID (SIGKILL if ``kill``, else a clean shutdown) and start it
        again on the same port, with the same checks as `start`. Its data is gone (no
        persistence), as after a crash of a cache-only Redis, unless ``extra_args`` turned
        persistence on (``--appendonly yes``)."""
        self.crash(kill=kill)
        self.revive()

    def crash(self, *, kill: bool = True) -> None:
        """Stop the server by PID (SIGKILL unless ``kill=False``) and leave it down, its
        port and directory kept for `revive` (an AOF in ``extra_args`` survives)."""
        proc = self._proc
        if proc is None:
            raise ServerError("server not started")
        _stop_process(proc, signal.SIGKILL if kill else self.stop_signal, STOP_TIMEOUT)
        self._proc = None

    def revive(self) -> None:
        """Start a crashed server again on the same port, with the checks of `start`.
        Call it from the main thread: the server dies with the thread that started it."""
        if self._proc is not None:
            raise ServerError("server is running")
        if self._port is None or self._dir is None:
            raise ServerError("server never started")
        self._spawn(self.binary or find_redis_server(), self._port)

    def command(self, *args: str | bytes, timeout: float = 5.0) -> bytes:
        """Send one command over a new connection; return the raw RESP reply."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            # QUIT makes the server close the connection after both replies.
            s.sendall(_resp(*args) + _resp("QUIT"))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        reply = b"".join(chunks)
        if not reply.endswith(b"+OK\r\n"):
            raise ConnectionError(f"truncated redis reply: {reply[-200:]!r}")
        return reply[: -len(b"+OK\r\n")]

    def __enter__(self) -> RedisServer:
        return self.start()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid} port={self._port}" if self._proc else "stopped"
        return f"<RedisServer {state}>"


# --------------------------------------------------------------------------- Redis Cluster


def find_redis_cli() -> str:
    """Path of ``redis-cli`` (``$IDEMPOTENT_REDIS_CLI`` overrides PATH)."""
    env = os.environ.get("IDEMPOTENT_REDIS_CLI")
    found = env if env else shutil.which("redis-cli")
    if not found or not os.access(found, os.X_OK):
        raise ServerError("redis-cli not found (needed to build a Redis Cluster)")
    return found


CLUSTER_BUS_OFFSET = 10000  # Redis listens for its cluster bus on port + 10000


class _ClusterNode(RedisServer):
    """A redis-server with cluster mode on; its port and its bus port were both free."""

    def _pick_port(self) -> int:
        for _ in range(100):
            port = free_port()
            if port + CLUSTER_BUS_OFFSET > 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((self.host, port + CLUSTER_BUS_OFFSET))
                except OSError:
                    continue
            return port
        raise ServerError("no free port pair (port, port + 10000) for a cluster node")


class RedisCluster:
    """A private Redis Cluster of ``masters`` nodes on 127.0.0.1 (no replicas, no
    persistence), built with ``redis-cli --cluster create``; stops its nodes by PID.

    ``url`` is a redis:// URL of one node (``redis.cluster.RedisCluster.from_url``
    discovers the others); ``nodes`` are the `RedisServer` objects.
    """

    def __init__(self, masters: int = 3, *, start_timeout: float = START_TIMEOUT) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.start_timeout = start_timeout
        self.nodes: list[RedisServer] = []

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self) -> RedisCluster:
        if self.nodes:
            raise ServerError("cluster already started")
        atexit.register(self.stop)
        try:
            for _ in range(self.masters):
                node = _ClusterNode(
                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "5000"],
                    start_timeout=self.start_timeout,
                )
                self.nodes.append(node)
                node.start()
            self._create()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cmd = [find_redis_cli(), "--cluster", "create",
               *(f"{self.host}:{n.port}" for n in self.nodes),
               "--cluster-replicas", "0", "--cluster-yes"]
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=self.start_timeout, check=False)
        if res.returncode != 0 or b"[OK] All 16384 slots covered" not in res.stdout:
            out = (res.stdout + res.stderr).decode("utf-8", "replace")[-3000:]
            raise ServerError(f"redis-cli --cluster create failed ({res.returncode}):\n{out}")

    def _wait_ok(self) -> None:
        """Until every node says ``cluster_state:ok`` and knows all the others."""
        deadline = time.monotonic() + self.start_timeout
        want = f"cluster_known_nodes:{self.masters}\r\n".encode()
        while True:
            infos = [n.command("CLUSTER", "INFO") for n in self.nodes]
            if all(b"cluster_state:ok\r\n" in i and want in i for i in infos):
                return
            if time.monotonic() > deadline:
                raise ServerError(f"cluster not ok after {self.start_timeout}s: {infos[0]!r}")
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop every node by PID and remove their temp dirs."""
        atexit.unregister(self.stop)
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster ports={self.ports if self.nodes else 'stopped'}>"
