"""Forecasts and budgets through HTTP: runs_out_at in GET /balance, soft department
budgets in PUT/GET /limits, and the days-left alert in the portal."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.config import Config
from hotpath.client import HotPath
from ledger.settlement import Settlement
from ledger.store import Ledger
from settler.stream import PartitionSettler
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures", "tests.e2e.portal_support")

from tests.e2e.billing_fixtures import Client  # noqa: E402
from tests.e2e.portal_support import browser, portal_link  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures",)

M = "/api/credits"


async def request(client: Client, method: str, path: str, org: Org, body: Any = None) -> tuple[int, Any]:
    r = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {org.admin_key}"})
    text = await r.text()
    return r.status, json.loads(text) if text else None


async def settle(migrated: Config, redis: aioredis.Redis, hot: HotPath, org: Org) -> None:
    settlement = await Settlement.connect(migrated.settler_dsn())
    try:
        ps = PartitionSettler(redis, settlement, hot, hot.partition(org.id), consumer="forecast-e2e")
        assert await ps.acquire()
        try:
            await ps.settle_once(block_ms=1)
        finally:
            await ps.release()
    finally:
        await settlement.close()


async def test_runs_out_at_follows_the_recent_spend(
    client: Client, org: Org, other_org: Org, migrated: Config, redis: aioredis.Redis, hot: HotPath
) -> None:
    status, idle = await request(client, "GET", f"{M}/balance", other_org)
    assert status == 200 and idle["runs_out_at"] is None  # nothing spent lately
    status, _ = await request(client, "POST", f"{M}/use", org, {"action": "generate_content", "units": 40})
    assert status == 200
    await settle(migrated, redis, hot, org)
    status, body = await request(client, "GET", f"{M}/balance", org)
    assert status == 200 and body["available"] == 60
    runs_out = dt.datetime.fromisoformat(body["runs_out_at"].replace("Z", "+00:00"))
    now = dt.datetime.now(dt.UTC)
    # 40 credits since the start of this hour: the other 60 last at most 1.5 hours.
    assert now < runs_out <= now + dt.timedelta(hours=1, minutes=31)


async def test_soft_budgets_through_the_api(client: Client, org: Org, ledger: Ledger) -> None:
    status, dept = await request(client, "POST", f"{M}/departments", org, {"name": "labs"})
    assert status == 201
    limits = f"{M}/departments/{dept['id']}/limits"
    status, view = await request(client, "PUT", limits, org, {"limit": 5, "period": "month", "mode": "soft"})
    assert status == 200, view
    assert (view["mode"], view["alert_percent"], view["limit"], view["remaining"]) == ("soft", 80, 5, 5)
    for _ in range(3):  # 6 credits against a soft budget of 5: all charged
        status, used = await request(
            client, "POST", f"{M}/use", org, {"action": "generate_content", "units": 2, "department_id": dept["id"]}
        )
        assert status == 200, used
    status, view = await request(client, "GET", limits, org)
    assert (view["spent"], view["remaining"], view["mode"]) == (6, 0, "soft")
    status, bal = await request(client, "GET", f"{M}/balance?department_id={dept['id']}", org)
    assert bal["department"]["mode"] == "soft" and bal["department"]["limit"] == 5
    # Back to hard: the next charge past the limit is refused.
    status, view = await request(client, "PUT", limits, org, {"limit": 7, "period": "month"})
    assert (view["mode"], view["alert_percent"]) == ("hard", None)
    status, refused = await request(
        client, "POST", f"{M}/use", org, {"action": "generate_content", "units": 2, "department_id": dept["id"]}
    )
    assert status == 402 and refused["error"]["code"] == "department_limit_exceeded"
    for bad, param in (
        ({"limit": 5, "period": "month", "alert_percent": 50}, "$.alert_percent"),
        ({"limit": None, "period": "month", "mode": "soft"}, "$.limit"),
        ({"limit": 5, "period": "month", "mode": "soft", "alert_percent": 0}, "$.alert_percent"),
        ({"limit": 5, "period": "month", "mode": "lenient"}, "$.mode"),
    ):
        status, err = await request(client, "PUT", limits, org, bad)
        assert status == 400 and err["error"]["param"] == param, err


async def test_days_left_alert_in_the_portal(billing_client: Client, org: Org, ledger: Ledger) -> None:
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, html, _ = await b.post("/portal/alerts", {"days_left": "7", "url": "http://127.0.0.1:9/hook"})
        assert status == 200 and "whsec_" in html
        status, html, _ = await b.get("/portal/alerts")
        assert "fewer than 7.00 days" in html
        status, html, _ = await b.post("/portal/alerts", {"days_left": "0.001", "url": "http://127.0.0.1:9/hook"})
        assert status == 400
    alert = await ledger.alert(org.id)
    assert alert is not None and alert.threshold == 0 and alert.days_left == 7
