"""/metrics counts every answer, error statuses included."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import Org

Client = TestClient[Any, Any]


async def requests_total(client: Client, route: str, status: int) -> float:
    text = await (await client.get("/metrics")).text()
    pattern = rf'^credits_http_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_error_statuses_are_counted(client: Client, org: Org) -> None:
    headers = {"Authorization": f"Bearer {org.admin_key}"}
    route = "/api/credits/use"
    before = {status: await requests_total(client, route, status) for status in (200, 400, 402)}
    r = await client.post(route, json={"action": "generate_content", "units": 0}, headers=headers)
    assert r.status == 400
    r = await client.post(route, json={"action": "generate_content", "units": 1000}, headers=headers)
    assert r.status == 402
    r = await client.post(route, json={"action": "generate_content"}, headers=headers)
    assert r.status == 200
    for status in (200, 400, 402):
        assert await requests_total(client, route, status) == before[status] + 1, status


async def test_unknown_routes_are_counted(client: Client) -> None:
    before = await requests_total(client, "unmatched", 404)
    assert (await client.get("/no/such/thing")).status == 404
    assert await requests_total(client, "unmatched", 404) == before + 1


async def test_unknown_paths_and_methods_in_the_error_shape(client: Client) -> None:
    before = await requests_total(client, "unmatched", 405)
    r = await client.delete("/api/credits/use")
    body = await r.json()
    assert r.status == 405 and body["error"]["code"] == "method_not_allowed"
    assert body["error"]["message"] == "DELETE is not allowed on /api/credits/use"
    assert await requests_total(client, "unmatched", 405) == before + 1
    r = await client.post("/api/nothing/here", json={})
    body = await r.json()
    assert r.status == 404 and body["error"] == {
        "type": "invalid_request_error",
        "code": "not_found",
        "message": "no such endpoint: POST /api/nothing/here",
        "param": None,
    }
    assert (await client.head("/healthz")).status == 200
