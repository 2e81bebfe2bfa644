"""The usage audit (settler/anomalies.py) on generated traffic: a week of steady hourly
spend with noise, then a known spike, per organization and per API key; it fires on
the spike, stays quiet on steady traffic, on a new key without a baseline and below the
floor; the finding is sent once as the organization's signed webhook; operators decide
it (audited). And once through the real path: charges settled into the rollup."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from accounts import audited
from core.config import Config
from hotpath.client import HotPath
from ledger.operators import Actor
from ledger.settlement import AlertStore, Settlement
from ledger.store import Ledger
from lua import Status
from settler.alerts import Alerts, verify
from settler.anomalies import AnomalyDetector, Method, anomalies, hour_of
from tests.conftest import Org
from tests.integration.test_alerts import Receiver, receiver  # noqa: F401
from tests.integration.test_settlement import drain, settler

CREDIT = 1000
NOW = dt.datetime(2026, 6, 1, 12, 40, tzinfo=dt.UTC)  # a fixed past hour: no other test's traffic is there
HOUR = hour_of(NOW)
METHOD = Method(factor=5.0, baseline_hours=7 * 24, min_history_hours=24, min_credits=10 * CREDIT)


@pytest.fixture
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


@pytest.fixture
async def console_pool(migrated: Config) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(migrated.console_dsn(), min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


async def traffic(config: Config, org: str, credential: str, per_hour: dict[dt.datetime, int]) -> None:
    """Generated traffic, as settlement rolls it up (usage_hourly)."""
    conn = await asyncpg.connect(config.database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.organization_id', $1, true)", org)
            await conn.executemany(
                "INSERT INTO usage_hourly (organization_id, hour, action, department_id, credential_id, events, units,"
                " credits) VALUES ($1, $2, 'generate_content', NULL, $3, 1, 1, $4)",
                [(uuid.UUID(org), hour, credential, credits) for hour, credits in per_hour.items() if credits > 0],
            )
    finally:
        await conn.close()


def steady(mean: int, *, hours: int = 7 * 24, seed: int = 1, until: dt.datetime = HOUR) -> dict[dt.datetime, int]:
    """`hours` hours before `until` of spend around `mean` (±40%), some hours quiet."""
    rng = random.Random(seed)
    out = {}
    for i in range(1, hours + 1):
        quiet = rng.random() < 0.15
        out[until - dt.timedelta(hours=i)] = 0 if quiet else int(mean * rng.uniform(0.6, 1.4))
    return out


def mine(found: list, org: Org) -> list[tuple[str, str | None]]:  # type: ignore[type-arg]
    return sorted((f.scope, f.credential_id) for f in found if f.organization_id == org.id)


async def test_steady_traffic_raises_nothing(migrated: Config, settlement: Settlement, org: Org) -> None:
    key = str(uuid.uuid4())
    await traffic(migrated, org.id, key, {**steady(20 * CREDIT, seed=2), HOUR: int(20 * CREDIT * 1.4)})
    detector = AnomalyDetector(settlement.pool, METHOD)
    assert mine(await detector.findings(HOUR), org) == []
    assert mine(await detector.findings(HOUR - dt.timedelta(hours=1)), org) == []


async def test_a_spike_is_found_per_organization_and_per_key_and_sent_once(
    migrated: Config,
    settlement: Settlement,
    ledger: Ledger,
    hot: HotPath,
    console_pool: asyncpg.Pool,
    org: Org,
    receiver: tuple[Receiver, str],  # noqa: F811
) -> None:
    rec, url = receiver
    secret = await ledger.set_alert(org.id, threshold=1 * CREDIT, webhook_url=url)
    steady_key, spiking_key, new_key = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    await traffic(migrated, org.id, steady_key, {**steady(15 * CREDIT, seed=3), HOUR: 15 * CREDIT})
    await traffic(migrated, org.id, spiking_key, {**steady(5 * CREDIT, seed=4), HOUR: 400 * CREDIT})
    await traffic(  # a key two hours old: no baseline of its own yet, whatever it spends
        migrated, org.id, new_key, {HOUR - dt.timedelta(hours=2): CREDIT, HOUR: 300 * CREDIT}
    )
    detector = AnomalyDetector(settlement.pool, METHOD)
    found = await detector.findings(HOUR)
    assert mine(found, org) == [("api_key", spiking_key), ("organization", None)]
    by_scope = {f.scope: f for f in found if f.organization_id == org.id}
    assert by_scope["organization"].spend == 715 * CREDIT
    assert 15 * CREDIT < by_scope["organization"].baseline < 25 * CREDIT  # ~20 an hour, the quiet hours in
    assert by_scope["api_key"].baseline_hours == 7 * 24

    assert await detector.scan(NOW) == 2
    assert await detector.scan(NOW) == 0  # once per subject and hour
    listed = await anomalies(console_pool, organization_id=org.id)
    assert sorted(a.scope for a in listed) == ["api_key", "organization"] and {a.state for a in listed} == {"open"}

    async with aiohttp.ClientSession() as http:
        assert await Alerts(AlertStore(settlement), hot, http).deliver_due() >= 2
    events = [json.loads(body) for _, body, _ in rec.received]
    assert all(verify(secret, body, header) for _, body, header in rec.received)
    mine_events = sorted((e for e in events if e["organization_id"] == org.id), key=lambda e: e["anomaly"]["scope"])
    assert [e["type"] for e in mine_events] == ["usage.anomaly", "usage.anomaly"]
    key_event = mine_events[0]["anomaly"]
    assert key_event["scope"] == "api_key" and key_event["api_key_id"] == spiking_key
    assert key_event["spend"] == 400 and key_event["hour"] == "2026-06-01T12:00:00Z"
    assert key_event["threshold_factor"] == 5.0

    # An operator acknowledges one and dismisses the other; both on record.
    ops = Actor.cli(None)
    key_finding = next(a for a in listed if a.scope == "api_key")
    org_finding = next(a for a in listed if a.scope == "organization")
    assert await audited.decide_anomaly(ledger, ops, org.id, key_finding.id, state="acknowledged", note="batch job")
    assert await audited.decide_anomaly(ledger, ops, org.id, org_finding.id, state="dismissed")
    assert not await audited.decide_anomaly(ledger, ops, org.id, org_finding.id, state="dismissed")
    states = {a.scope: (a.state, a.decided_by) for a in await anomalies(console_pool, organization_id=org.id)}
    assert states == {"api_key": ("acknowledged", ops.label), "organization": ("dismissed", ops.label)}
    assert await detector.scan(NOW) == 0  # a decided finding is not raised again for that hour


async def test_below_the_floor_nothing_is_a_spike(migrated: Config, settlement: Settlement, org: Org) -> None:
    key = str(uuid.uuid4())
    await traffic(migrated, org.id, key, {**steady(CREDIT // 2, seed=5), HOUR: 45 * CREDIT})  # 90x, under 5 x 10
    assert mine(await AnomalyDetector(settlement.pool, METHOD).findings(HOUR), org) == []
    looser = Method(factor=3.0, baseline_hours=7 * 24, min_history_hours=24, min_credits=10 * CREDIT)
    assert mine(await AnomalyDetector(settlement.pool, looser).findings(HOUR), org) == [
        ("api_key", key),
        ("organization", None),
    ]


async def test_charges_settled_into_the_rollup_raise_a_finding(
    migrated: Config, settlement: Settlement, redis: aioredis.Redis, hot: HotPath, org: Org
) -> None:
    """The real path for the current hour: a day of generated history at 2 credits an
    hour, then 60 credits of real charges this hour, settled by a real settler."""
    now = dt.datetime.now(dt.UTC)
    await traffic(migrated, org.id, org.admin_key_id, steady(2 * CREDIT, hours=48, seed=6, until=hour_of(now)))
    detector = AnomalyDetector(settlement.pool, METHOD)
    assert mine(await detector.findings(hour_of(now)), org) == []
    result = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=60)
    assert result.status is Status.OK, result
    await drain(settler(redis, settlement, hot, org.id))
    found = await detector.findings(hour_of(dt.datetime.now(dt.UTC)))
    assert mine(found, org) == [("api_key", org.admin_key_id), ("organization", None)]
