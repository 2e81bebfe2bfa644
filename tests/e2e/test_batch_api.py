"""POST /use/batch through HTTP: every item's result, in order, from the script's
compact answer (only failures and replays are named there); replays byte for byte."""

from __future__ import annotations

import decimal
import json
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from hotpath.client import HotPath
from tests.conftest import Org

Client = TestClient[Any, Any]
BATCH = "/api/credits/use/batch"


def headers(org: Org, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {org.admin_key}", **extra}


async def post(client: Client, org: Org, body: Any, **extra: str) -> tuple[int, bytes]:
    r = await client.post(BATCH, json=body, headers=headers(org, **extra))
    return r.status, await r.read()


async def batch_events(redis: aioredis.Redis, hot: HotPath, org_id: str) -> list[dict[str, Any]]:
    rows = await redis.xrange(hot.stream_key(hot.partition(org_id)))
    events = [msgspec.msgpack.decode(f[b"d"]) for _, f in rows if f[b"o"].decode() == org_id]
    return [item for e in events if e["t"] == "use_batch" for item in e["ev"]]


async def test_mixed_items_in_order_with_ids_matching_the_ledger_feed(
    client: Client, org: Org, hot: HotPath, redis: aioredis.Redis
) -> None:
    items = [
        {"action": "tool_call"},
        {"action": "tool_call"},
        {"action": "nope"},
        {"action": "tool_call", "units": 2},
        {"action": "llm_output_tokens", "units": 500, "metadata": {"model": "m"}},
        {"action": "tool_call"},
        {"action": "generate_content", "units": 1000},  # more than is left
        {"action": "tool_call"},
    ]
    status, raw = await post(client, org, {"items": items})
    assert status == 200
    body = json.loads(raw, parse_float=decimal.Decimal)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert [r["ok"] for r in results] == [True, True, False, True, True, True, False, True]
    assert results[2]["error"]["code"] == "unknown_action" and results[2]["id"] is None
    assert results[6]["error"]["code"] == "insufficient_credits"
    assert "needs 1000" in results[6]["error"]["message"]
    credits = [r["credits"] for r in results]
    assert credits == [
        decimal.Decimal("0.1"),
        decimal.Decimal("0.1"),
        None,
        decimal.Decimal("0.2"),
        decimal.Decimal("1"),
        decimal.Decimal("0.1"),
        None,
        decimal.Decimal("0.1"),
    ]
    assert body["balance"] == 100 - sum(c for c in credits if c is not None)
    ids = [r["id"] for r in results if r["ok"]]
    assert len(set(ids)) == len(ids)
    events = await batch_events(redis, hot, org.id)
    assert [e["id"] for e in events] == ids  # the response's ids are the ledger's event ids
    assert [e["amt"] for e in events] == [100, 100, 200, 1000, 100, 100]
    assert events[3]["m"] == '{"model":"m"}'


async def test_request_key_replays_the_same_bytes(client: Client, org: Org) -> None:
    body = {"items": [{"action": "tool_call"}, {"action": "nope"}, {"action": "web_search", "units": 3}]}
    status, first = await post(client, org, body, **{"Idempotency-Key": "batch-1"})
    assert status == 200
    status, again = await post(client, org, body, **{"Idempotency-Key": "batch-1"})
    assert status == 200 and again == first
    balance = json.loads(first)["balance"]
    r = await client.get("/api/credits/balance", headers=headers(org))
    assert (await r.json())["balance"] == balance  # charged once
    status, conflict = await post(client, org, {"items": [{"action": "tool_call"}]}, **{"Idempotency-Key": "batch-1"})
    assert status == 409 and json.loads(conflict)["error"]["code"] == "idempotency_conflict"


async def test_item_keys_replay_inside_a_new_batch(client: Client, org: Org) -> None:
    status, first = await post(
        client,
        org,
        {"items": [{"action": "tool_call", "idempotency_key": "k-1"}, {"action": "tool_call"}]},
    )
    assert status == 200
    first_results = json.loads(first)["results"]
    status, second = await post(
        client,
        org,
        {
            "items": [
                {"action": "tool_call"},
                {"action": "tool_call", "idempotency_key": "k-1"},  # replays the first call's item
                {"action": "web_search", "idempotency_key": "k-1b"},
            ]
        },
    )
    assert status == 200
    results = json.loads(second)["results"]
    assert [r["ok"] for r in results] == [True, True, True]
    assert results[1]["id"] == first_results[0]["id"]
    assert results[0]["id"] != results[2]["id"]
    status, third = await post(
        client,
        org,
        {"items": [{"action": "web_search", "idempotency_key": "k-1"}, {"action": "tool_call"}]},  # other parameters
    )
    conflict = json.loads(third)["results"]
    assert [r["ok"] for r in conflict] == [False, True]
    assert conflict[0]["error"]["code"] == "idempotency_conflict"
    r = await client.get("/api/credits/balance", headers=headers(org))
    # 0.1 + 0.1, then 0.1 + web_search (not the replay), then 0.1 (not the conflict)
    web_search = results[2]["credits"]
    assert (await r.json())["balance"] == round(100 - 0.4 - web_search, 3)


async def test_atomic_batch_names_the_failing_item(client: Client, org: Org) -> None:
    items = [{"action": "tool_call"}] * 5 + [{"action": "nope"}] + [{"action": "tool_call"}] * 5
    status, raw = await post(client, org, {"items": items, "atomic": True})
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == "unknown_action" and err["param"] == "$.items[5].action"
    r = await client.get("/api/credits/balance", headers=headers(org))
    assert (await r.json())["balance"] == 100


async def test_a_thousand_alike_items(client: Client, org: Org) -> None:
    status, raw = await post(client, org, {"items": [{"action": "tool_call", "units": 1}] * 1000})
    assert status == 200
    body = json.loads(raw, parse_float=decimal.Decimal)
    assert all(r["ok"] and r["credits"] == decimal.Decimal("0.1") for r in body["results"])
    assert [r["index"] for r in body["results"]] == list(range(1000))
    assert len({r["id"] for r in body["results"]}) == 1000
    assert body["balance"] == 0
    status, raw = await post(client, org, {"items": [{"action": "tool_call"}, {"action": "tool_call"}]})
    results = json.loads(raw)["results"]
    assert [r["error"]["code"] for r in results] == ["insufficient_credits"] * 2
