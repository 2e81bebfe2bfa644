"""The body size limit holds whichever way a body is read: whole on arrival (small
bodies, handlers.arrived_body) or streamed (request.read())."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from core.config import Config
from meter.app import create_app
from tests.conftest import Org


async def test_a_small_limit_refuses_a_body_that_arrived_whole(migrated: Config, org: Org) -> None:
    headers = {"Authorization": f"Bearer {org.admin_key}"}
    async with TestClient(TestServer(create_app(replace(migrated, max_body_bytes=64)))) as client:
        fits = b'{"action": "tool_call"}'
        r = await client.post("/api/credits/use", data=fits, headers=headers)
        assert r.status == 200, await r.text()
        too_big = b'{"action": "tool_call", "metadata": {"note": "' + b"x" * 64 + b'"}}'
        for path in ("/api/credits/use", "/api/credits/use/batch", "/api/credits/reserve"):
            r = await client.post(path, data=too_big, headers=headers)
            body: dict[str, Any] = await r.json()
            assert r.status == 413 and body["error"]["code"] == "payload_too_large", (path, body)
        # Streamed in pieces, the same answer.
        r = await client.post("/api/credits/use", data=io.BytesIO(too_big * 100), headers=headers)
        assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
        r = await client.get("/api/credits/balance", headers=headers)
        assert (await r.json())["balance"] == 99.9  # only the one that fitted was charged
