"""One hot organization through HTTP: many clients at once, coalesced by the sidecar's
group commit (CONSUME_COALESCE, on by default): every answer its own, the balance
exact, replays and refusals per request."""

from __future__ import annotations

import asyncio
import decimal
import json
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from accounts import admin
from hotpath.client import HotPath, fingerprint
from ledger.store import Ledger
from tests.conftest import Org

Client = TestClient[Any, Any]
CLIENTS = 8  # HTTP clients, each with its own connections
PER_CLIENT = 25  # concurrent requests each


def exact(text: str) -> Any:
    return json.loads(text, parse_float=decimal.Decimal)


async def metric(client: Client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def burst(
    client: Client, key: str, bodies: list[tuple[dict[str, Any], str | None]]
) -> list[tuple[int, Any, bool]]:
    """Send every body at once, spread over CLIENTS sessions; (status, body, replayed) each."""
    sessions = [aiohttp.ClientSession() for _ in range(CLIENTS)]
    url = client.make_url("/api/credits/use")

    async def one(n: int, body: dict[str, Any], idem: str | None) -> tuple[int, Any, bool]:
        headers = {"Authorization": f"Bearer {key}"}
        if idem is not None:
            headers["Idempotency-Key"] = idem
        async with sessions[n % CLIENTS].post(url, json=body, headers=headers) as r:
            return r.status, exact(await r.text()), r.headers.get("Idempotent-Replayed") == "true"

    try:
        return await asyncio.gather(*(one(n, b, k) for n, (b, k) in enumerate(bodies)))
    finally:
        for s in sessions:
            await s.close()


async def test_many_clients_of_one_organization_exact_balance(
    client: Client, ledger: Ledger, hot: HotPath, org: Org
) -> None:
    """200 requests at once for 100 credits: exactly 100 are charged, 100 refused with
    402, each told so, and the balance is zero, not below."""
    grouped_before = await metric(client, "credits_consume_grouped_total")
    answers = await burst(client, org.admin_key, [({"action": "generate_content"}, None)] * (CLIENTS * PER_CLIENT))
    statuses = [s for s, _, _ in answers]
    assert statuses.count(200) == 100 and statuses.count(402) == 100
    ids = [b["id"] for s, b, _ in answers if s == 200]
    assert len(set(ids)) == 100
    assert sorted(b["balance"] for s, b, _ in answers if s == 200) == list(range(100))
    assert all(b["error"]["code"] == "insufficient_credits" for s, b, _ in answers if s == 402)
    r = await client.get("/api/credits/balance", headers={"Authorization": f"Bearer {org.admin_key}"})
    assert exact(await r.text())["available"] == 0
    assert await metric(client, "credits_consume_grouped_total") > grouped_before  # they were coalesced


async def test_each_request_keeps_its_idempotency_key(client: Client, ledger: Ledger, hot: HotPath, org: Org) -> None:
    """Every key sent four times at once, one body of another key reusing it: each key
    charges once, its copies replay its answer, the reuse is a 409."""
    await admin.grant(ledger, hot, org.id, amount=1_000_000, source="admin", reason="load")
    bodies: list[tuple[dict[str, Any], str | None]] = []
    for k in range(40):
        bodies += [({"action": "tool_call", "units": 1 + k % 3}, f"hot-{k}")] * 4
    bodies.append(({"action": "tool_call", "units": 7}, "hot-0"))  # the same key, another body
    answers = await burst(client, org.admin_key, bodies)
    by_key: dict[str, list[tuple[int, Any, bool]]] = {}
    for (_, key), answer in zip(bodies[:-1], answers[:-1], strict=True):
        assert key is not None
        by_key.setdefault(key, []).append(answer)
    charged = decimal.Decimal(0)
    for k, copies in by_key.items():
        assert {s for s, _, _ in copies} == {200}, k
        assert len({b["id"] for _, b, _ in copies}) == 1
        assert [replayed for _, _, replayed in copies].count(False) == 1  # the first; the rest say so
        charged += copies[0][1]["credits"]
    assert answers[-1][0] == 409 and answers[-1][1]["error"]["code"] == "idempotency_conflict"
    assert charged == sum(decimal.Decimal("0.1") * (1 + k % 3) for k in range(40))
    r = await client.get("/api/credits/balance", headers={"Authorization": f"Bearer {org.admin_key}"})
    assert exact(await r.text())["available"] == 1100 - charged


async def test_a_batch_items_key_retried_alone_at_use_replays(
    client: Client, hot: HotPath, redis: aioredis.Redis, org: Org
) -> None:
    """A batch item's key shares the namespace of /use: retried alone, it replays a whole
    answer (its record keeps the balance after it); so does a record from before items
    kept one (the answer then says the balance now)."""
    h = {"Authorization": f"Bearer {org.admin_key}"}
    r = await client.post(
        "/api/credits/use/batch", json={"items": [{"action": "tool_call", "idempotency_key": "it-1"}]}, headers=h
    )
    item = exact(await r.text())["results"][0]
    r = await client.post("/api/credits/use", json={"action": "tool_call"}, headers={**h, "Idempotency-Key": "it-1"})
    body = exact(await r.text())
    assert r.status == 200 and r.headers.get("Idempotent-Replayed") == "true"
    assert (body["id"], body["credits"], body["balance"]) == (
        item["id"],
        decimal.Decimal("0.1"),
        decimal.Decimal("99.9"),
    )
    fp = fingerprint("use", "tool_call", 1, "", None)
    old = fp.encode() + b"\n" + msgspec.msgpack.encode({"id": "b" * 32, "credits": 100})
    await redis.set(hot.legacy_idempotency_key(org.id, "it-old"), old, px=60_000)
    r = await client.post("/api/credits/use", json={"action": "tool_call"}, headers={**h, "Idempotency-Key": "it-old"})
    body = exact(await r.text())
    assert r.status == 200 and body["id"] == "b" * 32 and body["balance"] == decimal.Decimal("99.9")
