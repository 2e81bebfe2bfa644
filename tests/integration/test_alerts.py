"""Low-balance and recovered alerts: signed webhooks to a real local receiver, once per
crossing, retried until the receiver accepts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from accounts import admin
from core.config import Config
from hotpath.client import HotPath
from ledger.settlement import AlertStore, Settlement
from ledger.store import Ledger
from settler.alerts import SIGNATURE_HEADER, Alerts, verify
from settler.stream import PartitionSettler
from tests.conftest import Org

CREDIT = 1000


class Receiver:
    def __init__(self) -> None:
        self.received: list[tuple[float, bytes, str]] = []
        self.fail_next = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500)
        self.received.append((time.monotonic(), body, request.headers[SIGNATURE_HEADER]))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    server = TestServer(app)
    await server.start_server()
    yield r, str(server.make_url("/hook"))
    await server.close()


@pytest.fixture
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


async def test_low_then_recovered_signed_and_once(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    receiver: tuple[Receiver, str],
) -> None:
    rec, url = receiver
    secret = await ledger.set_alert(org.id, threshold=90 * CREDIT, webhook_url=url)
    async with aiohttp.ClientSession() as http:
        alerts = Alerts(AlertStore(settlement), hot, http)
        ps = PartitionSettler(redis, settlement, hot, hot.partition(org.id), consumer="alerts", on_settled=alerts.check)
        assert await ps.acquire()
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=5)
        await ps.settle_once(block_ms=1)
        assert rec.received == []  # 95 available: above the threshold
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=10)
        await ps.settle_once(block_ms=1)
        assert len(rec.received) == 1  # sent by the settlement of the batch that crossed it
        _, body, header = rec.received[0]
        assert verify(secret, body, header)
        assert not verify("whsec_wrong", body, header)
        event = json.loads(body)
        assert (event["type"], event["available"], event["threshold"]) == ("balance.low", 85, 90)
        # Still low: no second alert, however often it is checked.
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
        await ps.settle_once(block_ms=1)
        await alerts.check()
        assert len(rec.received) == 1
        await admin.grant(ledger, hot, org.id, amount=20 * CREDIT, reason="top-up")
        await alerts.check([org.id])
        assert [json.loads(b)["type"] for _, b, _ in rec.received] == ["balance.low", "balance.recovered"]
        await ps.release()


async def test_failed_delivery_is_retried(
    hot: HotPath, ledger: Ledger, settlement: Settlement, org: Org, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    await ledger.set_alert(org.id, threshold=150 * CREDIT, webhook_url=url)
    rec.fail_next = 1
    async with aiohttp.ClientSession() as http:
        alerts = Alerts(AlertStore(settlement), hot, http)
        assert await alerts.check([org.id]) == 1
        assert rec.received == []
        async with settlement.pool.acquire() as conn:
            await conn.execute("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE delivered_at IS NULL")
        for _ in range(20):
            if await alerts.deliver_due():
                break
            await asyncio.sleep(0.1)
        assert len(rec.received) == 1
        async with settlement.pool.acquire() as conn:
            row: Any = await conn.fetchrow(
                "SELECT attempts, delivered_at, last_error FROM webhook_deliveries WHERE organization_id = $1::uuid",
                org.id,
            )
        assert row["attempts"] == 2 and row["delivered_at"] is not None and row["last_error"] == "HTTP 500"


async def test_alert_read_test_event_and_delete(
    ledger: Ledger, hot: HotPath, settlement: Settlement, org: Org, other_org: Org, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    assert await ledger.alert(org.id) is None
    with pytest.raises(LookupError):
        await admin.send_test_alert(ledger, org.id)  # no alert: nothing to send to
    secret = await ledger.set_alert(org.id, threshold=5 * CREDIT, webhook_url=url)
    cfg = await ledger.alert(org.id)
    assert cfg is not None and (cfg.threshold, cfg.webhook_url, cfg.state) == (5 * CREDIT, url, "ok")
    assert await ledger.alert(other_org.id) is None  # one organization's alert only
    event_id = await admin.send_test_alert(ledger, org.id)
    async with aiohttp.ClientSession() as http:
        alerts = Alerts(AlertStore(settlement), hot, http)
        assert await alerts.deliver_due() >= 1
    [(_, body, header)] = [r for r in rec.received if json.loads(r[1])["id"] == event_id]
    assert verify(secret, body, header)
    assert json.loads(body)["type"] == "alert.test" and json.loads(body)["organization_id"] == org.id
    assert not await ledger.delete_alert(other_org.id)
    assert await ledger.delete_alert(org.id)
    assert await ledger.alert(org.id) is None
    assert not await ledger.delete_alert(org.id)


async def test_api_keys_list_without_secrets_with_last_use(
    ledger: Ledger, hot: HotPath, settlement: Settlement, redis: aioredis.Redis, org: Org, other_org: Org
) -> None:
    agent = await admin.create_key(ledger, hot, org.id, role="agent", name="worker", cap=50 * CREDIT)
    await admin.revoke_key(ledger, hot, org.id, org.admin_key_id)
    keys = {k.id: k for k in await ledger.api_keys(org.id)}
    assert set(keys) == {agent.id, org.admin_key_id}
    assert keys[agent.id].prefix == agent.secret[:10] and agent.secret not in repr(keys[agent.id])
    assert (keys[agent.id].role, keys[agent.id].name, keys[agent.id].cap) == ("agent", "worker", 50 * CREDIT)
    assert keys[agent.id].last_used_at is None and keys[org.admin_key_id].revoked_at is not None
    assert [k.id for k in await ledger.api_keys(org.id, include_revoked=False)] == [agent.id]
    assert org.admin_key_id not in {k.id for k in await ledger.api_keys(other_org.id)}
    await hot.consume(org.id, agent.id, action="web_search", units=1)
    ps = PartitionSettler(redis, settlement, hot, hot.partition(org.id), consumer="keys-test")
    used = None
    for _ in range(600):  # another test's settler may hold the partition's lease (15 s) or settle it first
        if await ps.acquire():
            await ps.settle_once(block_ms=10)
        used = {k.id: k for k in await ledger.api_keys(org.id)}[agent.id]
        if used.last_used_at is not None:
            break
        await asyncio.sleep(0.05)
    await ps.release()
    assert used is not None and used.last_used_at is not None
