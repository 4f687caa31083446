"""examples/kafka_payments/README.md runs as written: its commands, against librdkafka's
mock cluster and a PostgreSQL database this test starts, print what the page says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _kafka import MockKafka

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kafka_payments"


def blocks() -> list[str]:
    text = (EXAMPLE / "README.md").read_text()
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture
def kafka() -> Iterator[MockKafka]:
    with MockKafka() as cluster:
        yield cluster


def test_the_example_runs_as_written(kafka: MockKafka, pg_url: str) -> None:
    """The exports name the two variables the test sets; the commands print the page's
    lines; a second run of the consumer applies nothing twice."""
    exports, commands = blocks()
    names = re.findall(r"^export (\w+)=", exports, flags=re.M)
    assert names == ["KAFKA_BOOTSTRAP", "DATABASE_URL"]
    env = {**os.environ, "KAFKA_BOOTSTRAP": kafka.bootstrap, "DATABASE_URL": pg_url,
           "PYTHONPATH": os.pathsep.join([str(EXAMPLE.parent.parent), os.environ.get(
               "PYTHONPATH", "")])}
    text = (EXAMPLE / "README.md").read_text()
    outputs = []
    for line in [*commands.strip().splitlines(), commands.strip().splitlines()[-1]]:
        assert line.startswith("python ")
        argv = [sys.executable, *line.split()[1:]]
        done = subprocess.run(argv, cwd=EXAMPLE, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.strip().splitlines()[-1])
    sent, first, again = outputs
    assert f"`{sent}`" in text and sent == "sent 600 messages for 200 payments"
    assert f"`{first}`" in text and first == "ledger: 200 rows, 200 payments, 39900 cents"
    assert again == first
