"""Every 503 tells the truth (issue 8, item 3): when Redis stalls with a charge already
written, the sidecar cannot know whether it ran, so it answers `outcome_unknown` and
names the Idempotency-Key to retry with (one it assigned, when the request had none); a
retry with that key returns the first result and charges nothing more. When the charge
was never written (Redis unreachable), the 503 says nothing was charged, and nothing was.

Redis is reached through a TCP proxy (tests/proxy.py) that can hold every byte, as a
paused Redis does, or refuse connections; the shared server itself is never paused."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.config import Config
from hotpath.client import HotPath
from hotpath.servers import RedisConnections
from meter.app import create_app
from tests.conftest import Org
from tests.proxy import Proxy

M = "/api/credits"
REPLY_TIMEOUT_S = 0.5
Client = TestClient[Any, Any]


@pytest.fixture
async def proxy(migrated: Config, redis_connections: RedisConnections) -> AsyncIterator[Proxy]:
    if redis_connections.cluster is not None:
        pytest.skip(
            "the proxy fronts one server; a cluster client goes to the servers its slot map names"
            " (tests/integration/test_cluster.py kills a primary instead)"
        )
    assert migrated.redis_url is not None
    target = urllib.parse.urlsplit(migrated.redis_url)
    p = Proxy(target.hostname or "127.0.0.1", target.port or 6379)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def stalling_client(migrated: Config, proxy: Proxy) -> AsyncIterator[Client]:
    assert migrated.redis_url is not None
    db = urllib.parse.urlsplit(migrated.redis_url).path or "/0"
    config = dataclasses.replace(migrated, redis_url=proxy.url(path=db), redis_timeout_s=REPLY_TIMEOUT_S)
    async with TestClient(TestServer(create_app(config))) as c:
        yield c


async def balance(hot: HotPath, org: Org) -> int:
    return int((await hot.balance(org.id)).payload["balance"])


async def eventually(hot: HotPath, org: Org, expected: int) -> None:
    for _ in range(200):
        if await balance(hot, org) == expected:
            return
        await asyncio.sleep(0.05)
    assert await balance(hot, org) == expected


def headers(org: Org, key: str | None = None) -> dict[str, str]:
    h = {"Authorization": f"Bearer {org.admin_key}"}
    if key is not None:
        h["Idempotency-Key"] = key
    return h


async def test_a_stalled_charge_is_unknown_and_its_retry_charges_once(
    stalling_client: Client, proxy: Proxy, hot: HotPath, org: Org
) -> None:
    body = json.dumps({"action": "web_search", "units": 2})
    first = await stalling_client.post(f"{M}/use", data=body, headers=headers(org))
    assert first.status == 200  # cached and connected
    before = await balance(hot, org)
    proxy.pause()
    stalled = await stalling_client.post(f"{M}/use", data=body, headers=headers(org))
    assert stalled.status == 503
    error = (await stalled.json())["error"]
    assert error["code"] == "outcome_unknown"
    assert "may have been charged" in error["message"] and "nothing was charged" not in error["message"]
    assigned = stalled.headers["Idempotency-Key"]
    assert assigned.startswith("auto_")
    proxy.resume()  # Redis reads what was written and runs it
    await eventually(hot, org, before - 1000)  # 2 x 0.5 credits
    retry = await stalling_client.post(f"{M}/use", data=body, headers=headers(org, assigned))
    assert retry.status == 200 and retry.headers.get("Idempotent-Replayed") == "true"
    assert (await retry.json())["credits"] == 1
    assert await balance(hot, org) == before - 1000  # charged once
    reused = await stalling_client.post(
        f"{M}/use", data=json.dumps({"action": "web_search", "units": 3}), headers=headers(org, assigned)
    )
    assert reused.status == 409  # an assigned key is a key like any other


async def test_a_stalled_batch_with_its_own_key_is_unknown_and_replays(
    stalling_client: Client, proxy: Proxy, hot: HotPath, org: Org
) -> None:
    body = json.dumps({"items": [{"action": "web_search"}, {"action": "tool_call", "units": 3}]})
    assert (await stalling_client.get(f"{M}/balance", headers=headers(org))).status == 200
    before = await balance(hot, org)
    proxy.pause()
    stalled = await stalling_client.post(f"{M}/use/batch", data=body, headers=headers(org, "batch-1"))
    assert stalled.status == 503 and (await stalled.json())["error"]["code"] == "outcome_unknown"
    assert stalled.headers["Idempotency-Key"] == "batch-1"
    proxy.resume()
    await eventually(hot, org, before - 800)
    retry = await stalling_client.post(f"{M}/use/batch", data=body, headers=headers(org, "batch-1"))
    assert retry.status == 200 and retry.headers.get("Idempotent-Replayed") == "true"
    assert await balance(hot, org) == before - 800


async def test_a_charge_that_never_reached_redis_says_nothing_was_charged(
    stalling_client: Client, proxy: Proxy, hot: HotPath, org: Org
) -> None:
    assert (await stalling_client.get(f"{M}/balance", headers=headers(org))).status == 200
    before = await balance(hot, org)
    proxy.refuse()
    for path, body in (
        (f"{M}/use", {"action": "web_search"}),
        (f"{M}/reserve", {"amount": 5, "ttl_seconds": 60}),
        (f"{M}/use/batch", {"items": [{"action": "web_search"}]}),
    ):
        refused = await stalling_client.post(path, data=json.dumps(body), headers=headers(org))
        assert refused.status == 503, path
        error = (await refused.json())["error"]
        assert error["code"] == "unavailable" and "nothing was charged" in error["message"], error
    proxy.restore()
    await asyncio.sleep(0.2)
    assert await balance(hot, org) == before
