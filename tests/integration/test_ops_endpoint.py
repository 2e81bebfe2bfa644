"""The settler's ops endpoint: reconciliation over HTTP, behind OPS_TOKEN."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.config import Config
from hotpath.client import HotPath
from settler.http import create_app
from settler.service import Settler
from tests.conftest import Org

TOKEN = "ops-" + "t" * 40


@pytest.fixture
async def ops(migrated: Config) -> AsyncIterator[TestClient[Any, Any]]:
    settler = await Settler.open(replace(migrated, ops_token=TOKEN))
    async with TestClient(TestServer(create_app(settler))) as client:
        yield client
    await settler.close()


async def test_reconcile_report_and_repair(ops: TestClient[Any, Any], hot: HotPath, org: Org) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await ops.get("/api/admin/reconcile")).status == 401
    assert (await ops.get("/api/admin/reconcile", headers={"Authorization": "Bearer wrong"})).status == 401
    await hot.balance(org.id)  # cached
    r = await ops.get(f"/api/admin/reconcile?organization_id={org.id}", headers=auth)
    report = await r.json()
    assert r.status == 200 and (report["checked"], report["drifts"], report["lagging"]) == (1, [], [])
    assert report["quarantined"] == {} and report["clean"] is True
    await hot.redis.hincrby(hot.org_keys(org.id)[0], "bal", 2500)  # drift behind the ledger's back
    r = await ops.get(f"/api/admin/reconcile?organization_id={org.id}", headers=auth)
    drifts = (await r.json())["drifts"]
    assert [(d["organization_id"], d["difference"]) for d in drifts] == [(org.id, 2.5)]
    r = await ops.post(f"/api/admin/reconcile?organization_id={org.id}", headers=auth)
    assert r.status == 200 and (await r.json())["repaired"]["difference"] == 2.5
    r = await ops.get(f"/api/admin/reconcile?organization_id={org.id}", headers=auth)
    assert (await r.json())["drifts"] == []
    assert (await ops.post("/api/admin/reconcile?organization_id=nope", headers=auth)).status == 400
    metrics = await (await ops.get("/metrics")).text()
    assert "credits_settlement_lag_seconds" in metrics
