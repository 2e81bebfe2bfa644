"""Test fixtures. Servers come from REDIS_URL and DATABASE_URL when both are set (a
fresh database is created on that server for the session); otherwise the suite starts
the embedded servers itself, exactly as a fresh machine would.

TEST_REDIS=cluster: Redis is a real 3-master cluster (one replica each) the suite forms
itself (ops.embedded_cluster), and REDIS_URL names its first master; Postgres is still
DATABASE_URL when set, else the embedded one. The `redis_cluster` fixture gives a test
the cluster's handle (to kill, pause, fail over or migrate); it skips in other modes.

Tiers: tests/unit (no servers), tests/integration (real Redis and Postgres),
tests/e2e (HTTP against the sidecar), tests/faults (a model of the money against the
real scripts, and crashes and outages of servers the suite starts for itself). Pick one
with `-m unit|integration|e2e|faults`.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core import config as config_module
from core.config import Config
from hotpath.client import HotPath
from hotpath.servers import RedisConnections, open_redis
from ledger.migrate import migrate
from ledger.store import Ledger

if TYPE_CHECKING:
    from ops.embedded_cluster import EmbeddedCluster

JWT_SECRET = "test-secret-" + "x" * 40
REDIS_MODES = ("", "cluster")  # TEST_REDIS: unset (one server), or "cluster"


def pytest_configure(config: pytest.Config) -> None:
    _redis_mode()  # a wrong TEST_REDIS stops the run before any test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = pathlib.Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "e2e", "faults"):
            item.add_marker(getattr(pytest.mark, tier))


@dataclass(frozen=True)
class Servers:
    redis_url: str
    database_url: str  # owner URL of this session's own database
    embedded: bool
    cluster: EmbeddedCluster | None = None  # TEST_REDIS=cluster: the cluster behind redis_url


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _redis_mode() -> str:
    mode = os.environ.get("TEST_REDIS", "").strip().lower()
    if mode not in REDIS_MODES:
        raise pytest.UsageError(f"TEST_REDIS={mode!r}: use 'cluster', or leave it unset for one Redis server")
    return mode


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    redis_url = os.environ.get("REDIS_URL")
    database_url = os.environ.get("DATABASE_URL")
    if _redis_mode() == "cluster":
        yield from _with_cluster(database_url)
        return
    if redis_url and database_url:
        yield from _fresh_database(redis_url, database_url, embedded=False)
        return
    from ops.embedded import EmbeddedServers

    with tempfile.TemporaryDirectory(prefix="credits-test-") as tmp:
        embedded = EmbeddedServers(pathlib.Path(tmp))
        urls = embedded.start()
        try:
            yield from _fresh_database(urls.redis_url, urls.database_url, embedded=True)
        finally:
            embedded.stop()


def _with_cluster(database_url: str | None) -> Iterator[Servers]:
    """A 3-master cluster of the session's own (REDIS_URL, when set, is not used)."""
    from ops.embedded import EmbeddedServers
    from ops.embedded_cluster import EmbeddedCluster

    with tempfile.TemporaryDirectory(prefix="credits-test-cluster-") as tmp:
        cluster = EmbeddedCluster(pathlib.Path(tmp) / "cluster", masters=3, replicas_per_master=1)
        redis_url = cluster.start()[0]
        try:
            if database_url:
                yield from _fresh_database(redis_url, database_url, embedded=False, cluster=cluster)
                return
            # Postgres embedded as in the default mode (its Valkey is started too, unused).
            embedded = EmbeddedServers(pathlib.Path(tmp) / "servers")
            urls = embedded.start()
            try:
                yield from _fresh_database(redis_url, urls.database_url, embedded=True, cluster=cluster)
            finally:
                embedded.stop()
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> EmbeddedCluster:
    """The session's cluster (TEST_REDIS=cluster), to inject faults into; skips otherwise
    (before any server starts). Its methods block: from a test, call them through
    asyncio.to_thread."""
    if _redis_mode() != "cluster":
        pytest.skip("needs TEST_REDIS=cluster")
    servers: Servers = request.getfixturevalue("servers")
    assert servers.cluster is not None
    return servers.cluster


def _fresh_database(
    redis_url: str, database_url: str, *, embedded: bool, cluster: EmbeddedCluster | None = None
) -> Iterator[Servers]:
    import asyncio

    name = f"credits_test_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield Servers(
            redis_url=redis_url,
            database_url=_with_database(database_url, name),
            embedded=embedded,
            cluster=cluster,
        )
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def config(servers: Servers) -> Config:
    # A key prefix of its own: several test sessions may share one Redis database.
    prefix = f"t{uuid.uuid4().hex[:8]}"
    base = config_module.load({"JWT_SECRET": JWT_SECRET, "RATE_LIMIT_PER_S": "0", "REDIS_KEY_PREFIX": prefix})
    return replace(base, redis_url=servers.redis_url, database_url=servers.database_url)


@pytest.fixture(scope="session")
async def migrated(config: Config) -> Config:
    assert config.database_url is not None
    await migrate(config.database_url, app_password=config.app_db_password, settler_password=config.settler_db_password)
    return config


@pytest.fixture(scope="session")
async def ledger(migrated: Config) -> AsyncIterator[Ledger]:
    led = await Ledger.connect(migrated.app_dsn(), min_size=2, max_size=20)
    yield led
    await led.close()


@pytest.fixture(scope="session")
async def redis_connections(config: Config) -> AsyncIterator[RedisConnections]:
    """As the services open Redis: one server, or a cluster (asked of the server)."""
    assert config.redis_url is not None
    connections = await open_redis(config.redis_url, max_connections=200)
    yield connections
    await connections.close()


@pytest.fixture
async def pipelined(config: Config) -> AsyncIterator[RedisConnections]:
    """Connections as the sidecar opens them: script calls over auto-pipelined ones."""
    assert config.redis_url is not None
    connections = await open_redis(config.redis_url, pipelined=True, max_connections=50)
    yield connections
    await connections.close()


@pytest.fixture(scope="session")
def redis(redis_connections: RedisConnections) -> aioredis.Redis:
    return redis_connections.redis


@pytest.fixture(scope="session")
async def hot(redis_connections: RedisConnections, ledger: Ledger, config: Config) -> HotPath:
    path = HotPath.using(redis_connections, ledger, config)
    await path.start()
    return path


@dataclass(frozen=True)
class Org:
    id: str
    admin_key: str
    admin_key_id: str


@pytest.fixture
async def org(ledger: Ledger) -> Org:
    org_id, key = await admin.create_organization(ledger, f"org-{uuid.uuid4().hex[:6]}")
    return Org(id=org_id, admin_key=key.secret, admin_key_id=key.id)


@pytest.fixture
async def other_org(ledger: Ledger) -> Org:
    org_id, key = await admin.create_organization(ledger, f"other-{uuid.uuid4().hex[:6]}")
    return Org(id=org_id, admin_key=key.secret, admin_key_id=key.id)
