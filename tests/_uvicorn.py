"""A real HTTP server as a subprocess for the HTTP tests: uvicorn (ASGI) or a threaded
wsgiref server (WSGI, `tests/_http_wsgi_server.py`), on a free loopback port, the bind
checked, stopped (or SIGKILLed) by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _servers import HOST, START_TIMEOUT, _stop_process, free_port

TESTS = Path(__file__).resolve().parent


class HttpServer:
    """``python -m uvicorn <app>`` (``kind="asgi"``) or the wsgiref runner
    (``kind="wsgi"``), with ``env`` added to the environment."""

    def __init__(self, app: str, env: dict[str, str], *, kind: str = "asgi",
                 cwd: Path = TESTS) -> None:
        self.app, self.env, self.kind, self.cwd = app, env, kind, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = b""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> HttpServer:
        for _ in range(5):
            self.port = free_port()
            if self.kind == "asgi":
                cmd = [sys.executable, "-m", "uvicorn", self.app, "--host", HOST, "--port",
                       str(self.port), "--workers", "1", "--log-level", "warning",
                       "--no-access-log"]
            else:
                cmd = [sys.executable, str(TESTS / "_http_wsgi_server.py"), self.app, HOST,
                       str(self.port)]
            env = {**os.environ, **self.env,
                   "PYTHONPATH": os.pathsep.join([str(self.cwd), str(TESTS),
                                                  os.environ.get("PYTHONPATH", "")])}
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT)
            if self._wait_bound():
                return self
            self._drain()
            if b"address already in use" not in self.log.lower():
                raise RuntimeError(f"server did not start:\n{self.log.decode(errors='replace')}")
        raise RuntimeError("no free port after 5 attempts")

    def _wait_bound(self) -> bool:
        """True once our process accepts connections on the port; False if it died."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not listen within the deadline")

    def _drain(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            if self.proc.poll() is None:
                _stop_process(self.proc, signal.SIGTERM, 10)
            self.log += self.proc.stdout.read()
            self.proc.stdout.close()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL by PID, as a crash."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._drain()

    def stop(self) -> None:
        self._drain()

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
