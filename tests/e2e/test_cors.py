"""CORS: browsers on the origins in CORS_ORIGINS may call both APIs; no origin by default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing.app import create_app as create_billing
from billing.config import BillingConfig
from core.config import Config
from meter.app import create_app as create_meter
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")  # imported below, registered as a plugin
from tests.e2e.billing_fixtures import bearer  # noqa: E402 - after the rewrite registration

pytest_plugins = ("tests.e2e.billing_fixtures",)

APP = "https://app.example.test"
Client = TestClient[Any, Any]


@pytest.fixture
async def cors_meter(migrated: Config) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_meter(replace(migrated, cors_origins=(APP,))))) as client:
        yield client


@pytest.fixture
async def cors_billing(migrated: Config, billing_config: BillingConfig) -> AsyncIterator[Client]:
    config = replace(migrated, cors_origins=(APP,))
    billing = replace(billing_config, catalog_sync_on_start=False)
    async with TestClient(TestServer(create_billing(config, billing))) as client:
        yield client


def preflight(method: str, origin: str = APP) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }


async def test_a_listed_origin_gets_preflight_and_answers(cors_meter: Client, org: Org) -> None:
    r = await cors_meter.options("/api/credits/use", headers=preflight("POST"))
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Idempotency-Key" in r.headers["Access-Control-Allow-Headers"]
    r = await cors_meter.post(
        "/api/credits/use",
        json={"action": "tool_call"},
        headers={"Origin": APP, "Authorization": f"Bearer {org.admin_key}", "Idempotency-Key": "c-1"},
    )
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
    assert "Idempotent-Replayed" in r.headers["Access-Control-Expose-Headers"]
    # Errors carry the headers too, so the page can read the error shape.
    r = await cors_meter.get("/api/credits/balance", headers={"Origin": APP})
    assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == APP


async def test_other_origins_get_nothing(cors_meter: Client, org: Org) -> None:
    r = await cors_meter.options("/api/credits/use", headers=preflight("POST", "https://evil.example.test"))
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await cors_meter.get(
        "/api/credits/balance",
        headers={"Origin": "https://evil.example.test", "Authorization": f"Bearer {org.admin_key}"},
    )
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_no_origin_is_allowed_by_default(client: Client, org: Org) -> None:
    r = await client.options("/api/credits/use", headers=preflight("POST"))
    assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers
    r = await client.get("/api/credits/balance", headers={"Origin": APP, "Authorization": f"Bearer {org.admin_key}"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_billing_answers_listed_origins(cors_billing: Client, org: Org) -> None:
    r = await cors_billing.options("/api/billing/purchase-credits", headers=preflight("POST"))
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == APP
    r = await cors_billing.get("/api/billing/plans", headers={"Origin": APP, **bearer(org)})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
    r = await cors_billing.get("/api/billing/plans", headers={"Origin": "https://other.example.test", **bearer(org)})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_cors_origins_are_checked_at_start() -> None:
    from core import config as config_module
    from core.config import ConfigError

    loaded = config_module.load({"CORS_ORIGINS": "https://a.example.test, http://localhost:5173"})
    assert loaded.cors_origins == ("https://a.example.test", "http://localhost:5173")
    assert config_module.load({}).cors_origins == ()
    for bad in ("*", "a.example.test", "https://a.example.test/path", "ftp://x.test"):
        with pytest.raises(ConfigError, match="CORS_ORIGINS"):
            config_module.load({"CORS_ORIGINS": bad})
