"""Entitlements through HTTP: the plans' typed features, an organization's features and
usage, checks from the cache alone or with a charge, and a plan change (through billing
and localstripe) that the next check sees at once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from accounts import admin, entitlements
from hotpath.client import HotPath
from ledger.entitlements import EntitlementStore, Feature
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")

from tests.e2e.billing_fixtures import Client, StripeDriver, call, with_card  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures",)

E = "/api/credits"


async def request(
    client: Client, method: str, path: str, key: str, body: Any = None, **headers: str
) -> tuple[int, Any, dict[str, str]]:
    r = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}", **headers})
    text = await r.text()
    return r.status, json.loads(text) if text else None, dict(r.headers)


def features(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["feature"]: f for f in body["data"]}


async def test_plans_list_their_typed_features(billing_client: Client, org: Org) -> None:
    status, plans = await call(billing_client, "GET", "/api/billing/plans", org, role="agent")
    assert status == 200
    by_id = {p["id"]: {f["feature"]: f for f in p["entitlements"]} for p in plans["data"]}
    assert by_id["starter"]["api_access"] == {
        "feature": "api_access",
        "type": "boolean",
        "enabled": False,
        "limit": None,
        "value": None,
    }
    assert by_id["starter"]["projects"]["limit"] == 1
    assert by_id["professional"]["api_access"]["enabled"] is True and by_id["professional"]["projects"]["limit"] == 5
    assert by_id["enterprise"]["projects"] == {
        "feature": "projects",
        "type": "limit",
        "enabled": None,
        "limit": None,  # unlimited
        "value": None,
    }
    assert by_id["enterprise"]["custom_integrations"]["enabled"] is True
    assert {f["feature"] for f in plans["free_entitlements"]} == {"api_access", "projects", "custom_integrations"}


async def test_free_defaults_usage_and_checks(client: Client, org: Org, ledger: Ledger, hot: HotPath) -> None:
    status, body, _ = await request(client, "GET", f"{E}/entitlements", org.admin_key)
    assert status == 200 and body["plan_id"] is None
    assert features(body)["api_access"] == {
        "feature": "api_access",
        "type": "boolean",
        "source": "free",
        "enabled": False,
        "limit": None,
        "usage": None,
        "remaining": None,
        "value": None,
    }
    assert features(body)["projects"]["limit"] == 1 and features(body)["projects"]["usage"] == 0
    status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "api_access"})
    assert status == 200
    assert (body["allowed"], body["reason"], body["type"], body["enabled"]) == (False, "disabled", "boolean", False)
    status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "projects"})
    assert (body["allowed"], body["limit"], body["usage"], body["remaining"]) == (True, 1, 0, 1)

    # One project: counted once however often the request is retried.
    path = f"{E}/entitlements/projects/usage"
    first = await request(client, "POST", path, org.admin_key, {"delta": 1}, **{"Idempotency-Key": "p1"})
    again = await request(client, "POST", path, org.admin_key, {"delta": 1}, **{"Idempotency-Key": "p1"})
    assert first[0] == again[0] == 200
    assert first[1] == again[1] == {"feature": "projects", "delta": 1, "usage": 1, "limit": 1, "remaining": 0}
    assert again[2].get("Idempotent-Replayed") == "true"
    conflict = await request(client, "POST", path, org.admin_key, {"delta": 2}, **{"Idempotency-Key": "p1"})
    assert conflict[0] == 409 and conflict[1]["error"]["code"] == "idempotency_conflict"
    # A second project passes the limit: refused, nothing counted.
    status, body, _ = await request(client, "POST", path, org.admin_key, {"delta": 1})
    assert status == 402 and body["error"]["code"] == "entitlement_limit_reached"
    status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "projects"})
    assert (body["allowed"], body["reason"], body["usage"], body["remaining"]) == (False, "limit_reached", 1, 0)
    # Usage is counted for limit features only; an unknown feature is not found.
    status, body, _ = await request(client, "POST", f"{E}/entitlements/api_access/usage", org.admin_key, {"delta": 1})
    assert status == 400 and body["error"]["param"] == "feature"
    status, body, _ = await request(client, "POST", f"{E}/entitlements/warp_drive/usage", org.admin_key, {"delta": 1})
    assert status == 404
    status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "warp_drive"})
    assert (body["allowed"], body["reason"]) == (False, "not_included")
    status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "Bad Name"})
    assert status == 400 and body["error"]["param"] == "$.feature"


async def test_a_check_with_an_action_charges_only_when_allowed(
    client: Client, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    agent = await admin.create_key(ledger, hot, org.id, role="agent")
    body = {"feature": "api_access", "action": "generate_content", "units": 3}
    status, refused, _ = await request(client, "POST", f"{E}/check", agent.secret, body)
    assert status == 200 and (refused["allowed"], refused["reason"], refused["charge"]) == (False, "disabled", None)
    assert (await hot.balance(org.id)).payload["available"] == 100_000
    status, allowed, _ = await request(client, "POST", f"{E}/check", agent.secret, {**body, "feature": "projects"})
    assert status == 200 and allowed["allowed"] is True
    assert allowed["charge"]["credits"] == 3 and allowed["charge"]["available"] == 97
    # Not enough credits: refused with the reason, nothing charged.
    big = {"feature": "projects", "action": "generate_content", "units": 1000}
    status, poor, _ = await request(client, "POST", f"{E}/check", agent.secret, big)
    assert status == 200 and (poor["allowed"], poor["reason"], poor["charge"]) == (False, "insufficient_credits", None)
    assert (await hot.balance(org.id)).payload["available"] == 97_000
    unknown = {**body, "feature": "projects", "action": "no_such"}  # (the gate answers first: a feature it allows)
    status, err, _ = await request(client, "POST", f"{E}/check", agent.secret, unknown)
    assert status == 400 and err["error"]["code"] == "unknown_action"


async def test_many_agents_checking_and_charging_at_once(client: Client, org: Org) -> None:
    """Forty concurrent check-and-charge calls of 3 credits against 100: 33 charged."""
    body = {"feature": "projects", "action": "generate_content", "units": 3}
    answers = await asyncio.gather(*(request(client, "POST", f"{E}/check", org.admin_key, body) for _ in range(40)))
    assert all(status == 200 for status, _, _ in answers)
    charged = [a for _, a, _ in answers if a["allowed"]]
    assert len(charged) == 33
    assert {a["reason"] for _, a, _ in answers if not a["allowed"]} == {"insufficient_credits"}


async def test_a_plan_change_is_seen_by_the_next_check(
    billing_client: Client,
    client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    redis: aioredis.Redis,
    hot: HotPath,
) -> None:
    async def api_access() -> dict[str, Any]:
        status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "api_access"})
        assert status == 200, body
        return dict(body)

    assert (await api_access())["allowed"] is False  # cached now: free defaults
    await with_card(billing_client, org, stripe_driver)
    status, sub = await call(billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"})
    assert status == 201, sub
    assert (await api_access())["allowed"] is False
    status, sub = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "professional"})
    assert status == 200, sub
    # No wait: billing pushed the new features when it saved the subscription.
    assert (await api_access())["allowed"] is True
    status, body, _ = await request(client, "GET", f"{E}/entitlements", org.admin_key)
    assert body["plan_id"] == "professional" and features(body)["projects"]["limit"] == 5
    assert await redis.hget(hot.entitlements_key(org.id), "plan") == b"professional"
    status, sub = await call(billing_client, "DELETE", "/api/billing/subscription", org)
    assert status == 200, sub
    assert (await api_access())["allowed"] is False  # cancelled now: the free defaults again


async def test_one_organizations_usage_and_overrides_never_reach_another(
    client: Client, org: Org, other_org: Org, ledger: Ledger, hot: HotPath
) -> None:
    """The organization is always the credential's: the same Idempotency-Key under two
    organizations is two records, one's usage and override never count for the other."""
    path = f"{E}/entitlements/projects/usage"
    mine = await request(client, "POST", path, org.admin_key, {"delta": 1}, **{"Idempotency-Key": "same"})
    theirs = await request(client, "POST", path, other_org.admin_key, {"delta": 1}, **{"Idempotency-Key": "same"})
    assert mine[0] == theirs[0] == 200 and mine[1]["usage"] == theirs[1]["usage"] == 1
    assert theirs[2].get("Idempotent-Replayed") != "true"  # not the other organization's answer
    await entitlements.set_override(
        EntitlementStore(ledger), hot, org.id, Feature("api_access", "boolean", enabled=True), reason="trial"
    )
    status, body, _ = await request(client, "POST", f"{E}/check", org.admin_key, {"feature": "api_access"})
    assert status == 200 and body["allowed"] is True
    status, body, _ = await request(client, "POST", f"{E}/check", other_org.admin_key, {"feature": "api_access"})
    assert status == 200 and body["allowed"] is False
    status, body, _ = await request(client, "GET", f"{E}/entitlements", other_org.admin_key)
    assert features(body)["api_access"]["source"] == "free" and features(body)["projects"]["usage"] == 1
