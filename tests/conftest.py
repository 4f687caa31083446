"""Shared pytest fixtures: private database servers and per-test database URLs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from _servers import PostgresServer, RedisCluster, RedisServer

_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL server (127.0.0.1, free port) for the whole session."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped (FORCE) after the test."""
    name = f"test_{next(_db_numbers)}"
    pg_server.create_database(name)
    try:
        yield pg_server.url_for(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a SQLite database file in the test's tmp_path."""
    return f"sqlite:///{tmp_path}/idem.db"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server (127.0.0.1, free port, no persistence) for the session."""
    with RedisServer() as server:
        yield server


#: The database number of `redis_url` (db 0 stays for brokers and other users).
REDIS_STORE_DB = 9


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of a database of the session redis-server, flushed before and after the test."""
    import redis

    url = redis_server.url_for(REDIS_STORE_DB)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        yield url
        client.flushdb()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private 3-master Redis Cluster (127.0.0.1, free ports) for the whole session."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> Iterator[str]:
    """URL of one node of the session cluster, every node flushed before the test."""
    for node in redis_cluster.nodes:
        node.command("FLUSHALL")
    yield redis_cluster.url


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url
