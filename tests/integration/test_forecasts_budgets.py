"""Forecasts and budgets against real Redis and Postgres: when credits run out at the
recent rate, a low-balance alert as "N days left", soft department budgets that alert
once per period and keep charging (hard ones still refuse), across a cold load."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config
from hotpath.client import HotPath
from ledger.forecast import MIN_ELAPSED_S, RecentSpend
from ledger.settlement import AlertStore, Settlement
from ledger.store import Ledger
from lua import Status
from settler.alerts import Alerts, verify
from settler.stream import PartitionSettler
from tests.conftest import Org
from tests.integration.test_alerts import Receiver, receiver  # noqa: F401 - a fixture

CREDIT = 1000
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


def test_runs_out_at_the_recent_rate() -> None:
    idle = RecentSpend(0, None)
    assert idle.runs_out_at(100 * CREDIT, NOW) is None and idle.days_left(100 * CREDIT, NOW) is None
    # 48 credits over the 2 hours since the first spend: 24 an hour, so 96 last 4 hours.
    spend = RecentSpend(48 * CREDIT, NOW - dt.timedelta(hours=2))
    assert spend.runs_out_at(96 * CREDIT, NOW) == NOW + dt.timedelta(hours=4)
    assert spend.days_left(96 * CREDIT, NOW) == decimal.Decimal("0.17")
    assert spend.runs_out_at(0, NOW) == NOW  # nothing left: now
    # A first burst reads over at least MIN_ELAPSED_S, not as an infinite rate.
    burst = RecentSpend(10 * CREDIT, NOW)
    assert burst.runs_out_at(10 * CREDIT, NOW) == NOW + dt.timedelta(seconds=MIN_ELAPSED_S)


@pytest.fixture
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


async def spend_50_and_settle(
    hot: HotPath, settlement: Settlement, redis: aioredis.Redis, org: Org, alerts: Alerts
) -> None:
    """50 credits within the hour, settled by a settler that checks the alerts of what
    it settled (as the settler service does)."""
    ps = PartitionSettler(redis, settlement, hot, hot.partition(org.id), consumer="days", on_settled=alerts.check)
    assert await ps.acquire()
    try:
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=50)
        await ps.settle_once(block_ms=1)
    finally:
        await ps.release()


async def test_days_left_count_down_to_minus_the_credit_line(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    receiver: tuple[Receiver, str],  # noqa: F811
) -> None:
    """The same spend as below, on a credit line of 100 million credits: charges stop at
    minus the limit, so years are left, not an hour, and no alert is sent. (The rate is
    measured from the start of the hour, at least MIN_ELAPSED_S: 50 credits in a minute
    at most, 72,000 a day, and 30 days of that are 2.16 million.)"""
    rec, url = receiver
    assert MIN_ELAPSED_S == 60
    await admin.set_credit_limit(ledger, hot, org.id, limit=100_000_000 * CREDIT)
    await ledger.set_alert(org.id, threshold=0, webhook_url=url, days_left=decimal.Decimal(30))
    store = AlertStore(settlement)
    async with aiohttp.ClientSession() as http:
        alerts = Alerts(store, hot, http)
        await spend_50_and_settle(hot, settlement, redis, org, alerts)
        assert await alerts.check([org.id]) == 0
    assert rec.received == []


async def test_days_left_alert(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    receiver: tuple[Receiver, str],  # noqa: F811
) -> None:
    rec, url = receiver
    secret = await ledger.set_alert(org.id, threshold=0, webhook_url=url, days_left=decimal.Decimal(30))
    assert (await ledger.alert(org.id)).days_left == 30  # type: ignore[union-attr]
    store = AlertStore(settlement)
    async with aiohttp.ClientSession() as http:
        alerts = Alerts(store, hot, http)
        assert await alerts.check([org.id]) == 0  # idle: no forecast, no alert
        # 50 credits within the hour: the other 50 last less than an hour at that rate.
        await spend_50_and_settle(hot, settlement, redis, org, alerts)
    assert len(rec.received) == 1
    _, body, header = rec.received[0]
    assert verify(secret, body, header)
    event = json.loads(body)
    assert event["type"] == "balance.low" and event["days_left_threshold"] == 30
    assert 0 <= event["days_left"] < 1
    runs_out = dt.datetime.fromisoformat(event["runs_out_at"].replace("Z", "+00:00"))
    assert dt.datetime.now(dt.UTC) < runs_out < dt.datetime.now(dt.UTC) + dt.timedelta(hours=1, minutes=1)
    spend = await store.recent_spend(org.id)
    assert spend.credits == 50 * CREDIT


async def test_soft_budget_alerts_once_and_keeps_charging(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    receiver: tuple[Receiver, str],  # noqa: F811
) -> None:
    rec, url = receiver
    await ledger.set_alert(org.id, threshold=0, webhook_url=url)
    soft = await admin.create_department(ledger, hot, org.id, "research")
    hard = await admin.create_department(ledger, hot, org.id, "support")
    await admin.set_department_limit(
        ledger, hot, org.id, soft.id, limit=10 * CREDIT, period="month", mode="soft", alert_percent=80
    )
    await admin.set_department_limit(ledger, hot, org.id, hard.id, limit=10 * CREDIT, period="month")
    with pytest.raises(admin.AdminError):
        await admin.set_department_limit(ledger, hot, org.id, hard.id, limit=1, period="month", alert_percent=50)

    async def use(dept: str, units: int) -> Status:
        result = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=units, department_id=dept)
        return result.status

    async with aiohttp.ClientSession() as http:
        alerts = Alerts(AlertStore(settlement), hot, http)
        ps = PartitionSettler(redis, settlement, hot, hot.partition(org.id), consumer="soft", on_settled=alerts.check)
        assert await ps.acquire()
        try:
            assert await use(soft.id, 7) is Status.OK
            await ps.settle_once(block_ms=1)
            assert rec.received == []  # 70 %: under the alert
            assert await use(soft.id, 2) is Status.OK
            await ps.settle_once(block_ms=1)
            assert len(rec.received) == 1  # 90 %: the alert
            # Past the limit: a soft budget keeps charging, and does not alert again.
            assert await use(soft.id, 5) is Status.OK
            await ps.settle_once(block_ms=1)
            assert len(rec.received) == 1
            # A hard budget refuses what would pass it, as before.
            assert await use(hard.id, 11) is Status.DEPARTMENT_LIMIT
            # After a cold load (the cache rebuilt from the ledger) the same holds.
            await hot.evict(org.id)
            assert await use(soft.id, 1) is Status.OK
            assert await use(hard.id, 11) is Status.DEPARTMENT_LIMIT
            await ps.settle_once(block_ms=1)
        finally:
            await ps.release()
    event = json.loads(rec.received[0][1])
    assert event["type"] == "department.budget_alert" and event["department_id"] == soft.id
    assert (event["limit"], event["spent"], event["alert_percent"], event["mode"]) == (10, 9, 80, "soft")
    async with ledger.tenant(org.id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM department_budget_alerts") == 1
    balance = await hot.balance(org.id, department_id=soft.id)
    assert balance.payload["dept"]["spent"] == 15 * CREDIT
