"""Reading the ledger through HTTP: usage, summaries, transactions, cursor pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from core.config import Config
from ledger.settlement import Settlement
from meter.appkeys import HOT, REDIS
from settler.stream import PartitionSettler
from tests.conftest import Org

Client = TestClient[Any, Any]


@pytest.fixture(scope="session")
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


async def settle(client: Client, settlement: Settlement, org: str) -> None:
    hot = client.app[HOT]
    ps = PartitionSettler(client.app[REDIS], settlement, hot, hot.partition(org), consumer="e2e")
    assert await ps.acquire()
    try:
        for _ in range(100):
            if await ps.settle_once(block_ms=1) == 0:
                return
        raise AssertionError("did not drain")
    finally:
        await ps.release()


def h(org: Org) -> dict[str, str]:
    return {"Authorization": f"Bearer {org.admin_key}"}


async def test_usage_pages_filters_summary_and_transactions(
    client: Client, settlement: Settlement, org: Org, other_org: Org
) -> None:
    r = await client.post("/api/credits/departments", json={"name": "r"}, headers=h(org))
    dept_id = (await r.json())["id"]
    for i in range(5):
        r = await client.post("/api/credits/use", json={"action": "web_search", "metadata": {"i": i}}, headers=h(org))
        assert r.status == 200
    r = await client.post(
        "/api/credits/use", json={"action": "generate_content", "units": 2, "department_id": dept_id}, headers=h(org)
    )
    assert r.status == 200
    await settle(client, settlement, org.id)

    r = await client.get("/api/credits/usage?limit=4", headers=h(org))
    page1 = await r.json()
    assert r.status == 200 and len(page1["data"]) == 4 and page1["has_more"] is True
    assert page1["data"][0]["action"] == "generate_content" and page1["data"][0]["credits"] == 2
    assert page1["data"][0]["department_id"] == dept_id
    r = await client.get(f"/api/credits/usage?limit=4&starting_after={page1['data'][-1]['id']}", headers=h(org))
    page2 = await r.json()
    assert len(page2["data"]) == 2 and page2["has_more"] is False
    ids = [e["id"] for e in page1["data"] + page2["data"]]
    assert len(set(ids)) == 6
    assert sorted(e["metadata"]["i"] for e in page1["data"] + page2["data"] if e["action"] == "web_search") == [
        0,
        1,
        2,
        3,
        4,
    ]

    r = await client.get("/api/credits/usage?action=web_search", headers=h(org))
    assert {e["action"] for e in (await r.json())["data"]} == {"web_search"}
    r = await client.get(f"/api/credits/usage?department_id={dept_id}", headers=h(org))
    assert [e["action"] for e in (await r.json())["data"]] == ["generate_content"]
    r = await client.get("/api/credits/usage?from=2099-01-01T00:00:00Z", headers=h(org))
    assert (await r.json())["data"] == []

    r = await client.get("/api/credits/usage/summary?group_by=action", headers=h(org))
    summary = await r.json()
    assert summary["data"] == [
        {"key": "generate_content", "events": 1, "units": 2, "credits": 2},
        {"key": "web_search", "events": 5, "units": 5, "credits": 2.5},
    ]
    assert summary["total_credits"] == 4.5
    r = await client.get("/api/credits/usage/summary?group_by=day", headers=h(org))
    assert len((await r.json())["data"]) == 1

    r = await client.get("/api/credits/transactions", headers=h(org))
    tx = await r.json()
    assert [t["type"] for t in tx["data"]] == ["usage", "grant"]
    assert tx["data"][0]["amount"] == -4.5 and tx["data"][0]["balance_after"] == 95.5
    r = await client.get("/api/credits/transactions?type=grant&limit=1", headers=h(org))
    grants = await r.json()
    assert [t["type"] for t in grants["data"]] == ["grant"] and grants["has_more"] is False
    r = await client.get(f"/api/credits/transactions?starting_after={tx['data'][0]['id']}", headers=h(org))
    assert [t["type"] for t in (await r.json())["data"]] == ["grant"]

    # Another organization sees none of it, even with a cursor that names it.
    r = await client.get("/api/credits/usage", headers=h(other_org))
    assert (await r.json())["data"] == []
    r = await client.get(f"/api/credits/usage?starting_after={ids[0]}", headers=h(other_org))
    assert r.status == 404
    r = await client.get("/api/credits/transactions?type=usage", headers=h(other_org))
    assert (await r.json())["data"] == []


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/api/credits/usage?limit=0", "limit"),
        ("/api/credits/usage?limit=101", "limit"),
        ("/api/credits/usage?limit=ten", "limit"),
        ("/api/credits/usage?from=yesterday", "from"),
        ("/api/credits/usage?from=2026-01-01T00:00:00", "from"),
        ("/api/credits/usage?department_id=x", "department_id"),
        ("/api/credits/usage?action=Bad!", "action"),
        ("/api/credits/usage?colour=red", "colour"),
        ("/api/credits/usage/summary?group_by=week", "group_by"),
        ("/api/credits/transactions?type=gift", "type"),
        ("/api/credits/transactions?starting_after=abc", "starting_after"),
    ],
)
async def test_bad_query_parameters_name_the_field(client: Client, org: Org, path: str, param: str) -> None:
    r = await client.get(path, headers=h(org))
    body = await r.json()
    assert r.status == 400, body
    assert body["error"]["code"] == "invalid_request" and body["error"]["param"] == param


async def test_a_capture_is_usage_over_http(client: Client, settlement: Settlement, org: Org) -> None:
    r = await client.post("/api/credits/reserve", json={"amount": 10, "ttl_seconds": 600, "action": "analyze_data"},
                          headers=h(org))  # fmt: skip
    hold = await r.json()
    assert r.status == 200, hold
    r = await client.post("/api/credits/release", json={"reservation_id": hold["id"], "used": 4.5}, headers=h(org))
    assert r.status == 200
    r = await client.post("/api/credits/use", json={"action": "web_search"}, headers=h(org))
    assert r.status == 200
    await settle(client, settlement, org.id)

    r = await client.get("/api/credits/usage", headers=h(org))
    events = (await r.json())["data"]
    assert [(e["kind"], e["action"]) for e in events] == [("use", "web_search"), ("capture", "analyze_data")]
    assert (events[1]["id"], events[1]["units"], events[1]["credits"]) == (hold["id"], 1, 4.5)
    r = await client.get("/api/credits/usage/summary?group_by=api_key", headers=h(org))
    summary = await r.json()
    assert summary["data"] == [{"key": org.admin_key_id, "events": 2, "units": 2, "credits": 5}]
    assert summary["total_credits"] == 5
    r = await client.get("/api/credits/usage/summary?group_by=hour", headers=h(org))
    assert r.status == 200 and (await r.json())["data"][0]["key"].endswith(":00:00Z")
