"""examples/fastapi_payments and examples/flask_payments run as their READMEs say: the
exports, the server command (uvicorn; Flask's threaded server) on a free loopback port,
then the client, whose output is the README's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _servers import free_port
from _uvicorn import HttpServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _blocks(example: str) -> list[str]:
    text = (EXAMPLES / example / "README.md").read_text()
    return [b for _, b in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)]


def _exports(block: str, port: int, **values: str) -> dict[str, str]:
    env = dict(re.findall(r"^export (\w+)=(\S+)$", block, flags=re.M))
    env = {k: re.sub(r":\d{4}\b", f":{port}", v) for k, v in env.items()}
    if "PORT" in env:
        env["PORT"] = str(port)
    env.update(values)
    return env


def _run_example(example: str, env_values: dict[str, str], tmp: Path) -> None:
    exports, server_cmd, client_cmd, expected = _blocks(example)
    port = free_port()
    env = _exports(exports, port, **env_values)
    work = tmp / example
    shutil.copytree(EXAMPLES / example, work)
    cmd = re.sub(r"--port \d+", f"--port {port}", server_cmd.strip())
    argv = cmd.split()
    assert argv[0] in ("uvicorn", "python")
    server = _Command([sys.executable, "-m", "uvicorn", *argv[1:]] if argv[0] == "uvicorn"
                      else [sys.executable, *argv[1:]], env, work, port).start()
    try:
        out = subprocess.run([sys.executable, *client_cmd.split()[1:]], cwd=work,
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=120, check=True).stdout
    finally:
        server.stop()
    assert out == expected


class _Command(HttpServer):
    """A README's server command, started and checked like the test servers."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, port: int) -> None:
        super().__init__("", env, cwd=cwd)
        self.argv, self.fixed_port = argv, port

    def start(self) -> HttpServer:
        import subprocess as sp

        self.port = self.fixed_port
        self.proc = sp.Popen(self.argv, cwd=self.cwd, env={**os.environ, **self.env},
                             stdout=sp.PIPE, stderr=sp.STDOUT)
        if not self._wait_bound():
            self._drain()
            raise RuntimeError(self.log.decode(errors="replace"))
        return self


def test_fastapi_example(pg_server: Any, tmp_path: Path) -> None:
    """FastAPI + PostgreSQL, transactional: 50 payments sent 100 times → 50 rows, exact
    cents."""
    pg_server.create_database("example_fastapi")
    try:
        url = pg_server.url_for("example_fastapi").replace("+psycopg://", "+psycopg_async://")
        _run_example("fastapi_payments", {"DATABASE_URL": url}, tmp_path)
    finally:
        pg_server.drop_database("example_fastapi")


def test_flask_example(tmp_path: Path) -> None:
    """Flask + SQLite, transactional: the same client, the same ledger."""
    _run_example("flask_payments", {}, tmp_path)
