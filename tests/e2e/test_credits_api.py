"""The credits API through HTTP: contract, errors, auth, isolation."""

from __future__ import annotations

import decimal
import io
import time
import uuid
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient

from accounts import admin
from api.auth import issue_jwt
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import JWT_SECRET, Org

Client = TestClient[Any, Any]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client: Client, path: str, key: str, body: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    r = await client.post(path, json=body, headers={**auth(key), **headers})
    return r.status, await r.json()


async def get(client: Client, path: str, key: str) -> tuple[int, dict[str, Any]]:
    r = await client.get(path, headers=auth(key))
    return r.status, await r.json()


async def available(client: Client, key: str) -> decimal.Decimal:
    r = await client.get("/api/credits/balance", headers=auth(key))
    body = await r.json(loads=lambda s: __import__("json").loads(s, parse_float=decimal.Decimal))
    return decimal.Decimal(body["available"])


def assert_error(status: int, body: dict[str, Any], want_status: int, code: str, param: str | None = None) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message", "param"}
    assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


# -- the happy path -------------------------------------------------------------------
async def test_balance_shape(client: Client, org: Org) -> None:
    status, body = await get(client, "/api/credits/balance", org.admin_key)
    assert status == 200
    assert body["organization_id"] == org.id
    assert (body["balance"], body["reserved"], body["available"]) == (100, 0, 100)
    assert [g["source"] for g in body["grants"]] == ["signup_bonus"]
    assert body["grants"][0]["expires_at"] is None


async def test_use_charges_and_replays(client: Client, org: Org) -> None:
    status, body = await post(
        client,
        "/api/credits/use",
        org.admin_key,
        {"action": "llm_output_tokens", "units": 1500},
        **{"Idempotency-Key": "u1"},
    )
    assert status == 200
    assert body["credits"] == 3 and body["balance"] == 97 and body["action"] == "llm_output_tokens"
    again = await client.post(
        "/api/credits/use",
        json={"action": "llm_output_tokens", "units": 1500},
        headers={**auth(org.admin_key), "Idempotency-Key": "u1"},
    )
    assert again.status == 200 and await again.json() == body
    status, conflict = await post(
        client,
        "/api/credits/use",
        org.admin_key,
        {"action": "llm_output_tokens", "units": 1},
        **{"Idempotency-Key": "u1"},
    )
    assert_error(status, conflict, 409, "idempotency_conflict")
    assert await available(client, org.admin_key) == 97


async def test_a_replayed_answer_says_so(client: Client, org: Org) -> None:
    """The stored first result of a key comes back with Idempotent-Replayed: true; a
    first answer never carries it."""
    hdrs = {**auth(org.admin_key)}

    async def twice(path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        first = await client.post(path, json=body, headers={**hdrs, "Idempotency-Key": key})
        assert first.status in (200, 201), await first.text()
        assert "Idempotent-Replayed" not in first.headers
        again = await client.post(path, json=body, headers={**hdrs, "Idempotency-Key": key})
        assert again.status == first.status and await again.json() == await first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        return dict(await first.json())

    await twice("/api/credits/use", {"action": "tool_call"}, "r-use")
    await twice("/api/credits/use/batch", {"items": [{"action": "tool_call"}] * 3}, "r-batch")
    hold = await twice("/api/credits/reserve", {"amount": 5, "ttl_seconds": 60}, "r-hold")
    await twice("/api/credits/release", {"reservation_id": hold["id"], "used": 1}, "r-release")
    await twice("/api/credits/departments", {"name": "replayed"}, "r-dept")
    plain = await client.post("/api/credits/use", json={"action": "tool_call"}, headers=hdrs)
    assert plain.status == 200 and "Idempotent-Replayed" not in plain.headers
    # once each: a use (0.1), a batch of three (0.3), a capture (1), the plain use (0.1)
    assert await available(client, org.admin_key) == decimal.Decimal("98.5")


async def test_fractional_credits_are_exact_numbers(client: Client, org: Org) -> None:
    r = await client.post(
        "/api/credits/use", json={"action": "llm_input_tokens", "units": 125}, headers=auth(org.admin_key)
    )
    text = await r.text()
    assert '"credits":0.125' in text and '"balance":99.875' in text


# -- bad input: every field, nothing charged ------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "$.action"),
        ({"action": 5}, "$.action"),
        ({"action": "Bad Action!"}, "$.action"),
        ({"action": "x" * 65}, "$.action"),
        ({"action": "tool_call", "units": 0}, "$.units"),
        ({"action": "tool_call", "units": -1}, "$.units"),
        ({"action": "tool_call", "units": 1.5}, "$.units"),
        ({"action": "tool_call", "units": "3"}, "$.units"),
        ({"action": "tool_call", "units": 10**12}, "$.units"),
        ({"action": "tool_call", "department_id": "not-a-uuid"}, "$.department_id"),
        ({"action": "tool_call", "metadata": {"nested": {"a": 1}}}, "$.metadata[...]"),
        ({"action": "tool_call", "metadata": {f"k{i}": i for i in range(33)}}, "$.metadata"),
        ({"action": "tool_call", "metadata": []}, "$.metadata"),
        ({"action": "tool_call", "surprise": 1}, "$.surprise"),
    ],
)
async def test_use_rejects_each_bad_field(client: Client, org: Org, body: dict[str, Any], param: str) -> None:
    status, err = await post(client, "/api/credits/use", org.admin_key, body)
    assert_error(status, err, 400, "invalid_request", param)
    assert await available(client, org.admin_key) == 100


async def test_malformed_json_and_unknown_action(client: Client, org: Org) -> None:
    r = await client.post("/api/credits/use", data=b"{not json", headers=auth(org.admin_key))
    assert_error(r.status, await r.json(), 400, "invalid_request")
    status, err = await post(client, "/api/credits/use", org.admin_key, {"action": "teleport"})
    assert_error(status, err, 400, "unknown_action", "$.action")
    assert await available(client, org.admin_key) == 100


async def test_insufficient_credits_is_402(client: Client, org: Org) -> None:
    status, err = await post(client, "/api/credits/use", org.admin_key, {"action": "image_generation", "units": 21})
    assert_error(status, err, 402, "insufficient_credits")
    assert await available(client, org.admin_key) == 100


async def test_oversized_body_and_batch_are_413(client: Client, org: Org) -> None:
    huge = b'{"action": "tool_call", "metadata": {"a": "' + b"x" * (3 * 1024 * 1024) + b'"}}'
    r = await client.post("/api/credits/use", data=io.BytesIO(huge), headers=auth(org.admin_key))
    assert_error(r.status, await r.json(), 413, "payload_too_large")
    status, err = await post(
        client, "/api/credits/use/batch", org.admin_key, {"items": [{"action": "tool_call"}] * 5001}
    )
    assert_error(status, err, 413, "payload_too_large", "$.items")
    assert await available(client, org.admin_key) == 100


async def test_idempotency_key_too_long(client: Client, org: Org) -> None:
    status, err = await post(
        client, "/api/credits/use", org.admin_key, {"action": "tool_call"}, **{"Idempotency-Key": "k" * 256}
    )
    assert_error(status, err, 400, "invalid_request", "Idempotency-Key")


# -- batch ------------------------------------------------------------------------------
async def test_batch_best_effort_and_atomic(client: Client, org: Org) -> None:
    items = [{"action": "analyze_data", "units": 30}, {"action": "nope"}, {"action": "analyze_data", "units": 30}]
    status, body = await post(client, "/api/credits/use/batch", org.admin_key, {"items": items})
    assert status == 200
    assert [r["ok"] for r in body["results"]] == [True, False, False]
    assert body["results"][1]["error"]["code"] == "unknown_action"
    assert body["results"][2]["error"]["code"] == "insufficient_credits"
    assert body["balance"] == 40
    atomic = [{"action": "analyze_data", "units": 10}, {"action": "analyze_data", "units": 15}]
    status, err = await post(client, "/api/credits/use/batch", org.admin_key, {"items": atomic, "atomic": True})
    assert_error(status, err, 402, "insufficient_credits")
    assert err["error"]["param"] == "$.items[1]"
    assert await available(client, org.admin_key) == 40


async def test_batch_validation_names_the_item(client: Client, org: Org) -> None:
    status, err = await post(
        client,
        "/api/credits/use/batch",
        org.admin_key,
        {"items": [{"action": "tool_call"}, {"action": "tool_call", "units": 0}]},
    )
    assert_error(status, err, 400, "invalid_request", "$.items[1].units")
    dup = [{"action": "tool_call", "idempotency_key": "a"}, {"action": "tool_call", "idempotency_key": "a"}]
    status, err = await post(client, "/api/credits/use/batch", org.admin_key, {"items": dup})
    assert_error(status, err, 400, "invalid_request", "$.items[1].idempotency_key")
    status, err = await post(client, "/api/credits/use/batch", org.admin_key, {"items": []})
    assert_error(status, err, 400, "invalid_request", "$.items")
    assert await available(client, org.admin_key) == 100


# -- reservations -----------------------------------------------------------------------
async def test_reserve_release_cycle(client: Client, org: Org) -> None:
    status, hold = await post(client, "/api/credits/reserve", org.admin_key, {"amount": 50.5, "ttl_seconds": 600})
    assert status == 200 and hold["amount"] == 50.5 and hold["available"] == 49.5
    assert hold["expires_at"].endswith("Z")
    status, rel = await post(
        client, "/api/credits/release", org.admin_key, {"reservation_id": hold["id"], "used": 12.25}
    )
    assert status == 200
    assert (rel["used"], rel["released"], rel["balance"], rel["available"]) == (12.25, 38.25, 87.75, 87.75)
    status, err = await post(client, "/api/credits/release", org.admin_key, {"reservation_id": hold["id"]})
    assert_error(status, err, 409, "reservation_closed", "$.reservation_id")
    status, err = await post(client, "/api/credits/release", org.admin_key, {"reservation_id": "nope"})
    assert_error(status, err, 404, "not_found", "$.reservation_id")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount": 0.0001, "ttl_seconds": 10}, "$.amount"),
        ({"amount": 0, "ttl_seconds": 10}, "$.amount"),
        ({"amount": -1, "ttl_seconds": 10}, "$.amount"),
        ({"amount": "lots", "ttl_seconds": 10}, "$.amount"),
        ({"amount": 1, "ttl_seconds": 0}, "$.ttl_seconds"),
        ({"amount": 1, "ttl_seconds": 10**9}, "$.ttl_seconds"),
        ({"amount": 1}, "$.ttl_seconds"),
        ({"amount": 1, "ttl_seconds": 5, "action": "NOPE"}, "$.action"),
    ],
)
async def test_reserve_rejects_each_bad_field(client: Client, org: Org, body: dict[str, Any], param: str) -> None:
    status, err = await post(client, "/api/credits/reserve", org.admin_key, body)
    assert_error(status, err, 400, "invalid_request", param)
    assert await available(client, org.admin_key) == 100


async def test_reserve_rejects_huge_amounts(client: Client, org: Org) -> None:
    for raw in (b'{"amount": 1e400, "ttl_seconds": 10}', b'{"amount": 1e13, "ttl_seconds": 10}'):
        r = await client.post("/api/credits/reserve", data=raw, headers=auth(org.admin_key))
        assert_error(r.status, await r.json(), 400, "invalid_request", "$.amount")


async def test_release_rejects_bad_used(client: Client, org: Org) -> None:
    _, hold = await post(client, "/api/credits/reserve", org.admin_key, {"amount": 5, "ttl_seconds": 60})
    for used, param in ((6, "$.used"), (-1, "$.used"), (0.0005, "$.used")):
        status, err = await post(
            client, "/api/credits/release", org.admin_key, {"reservation_id": hold["id"], "used": used}
        )
        assert_error(status, err, 400, "invalid_request", param)
    status, _ = await post(client, "/api/credits/release", org.admin_key, {"reservation_id": hold["id"], "used": 5})
    assert status == 200


# -- authentication, roles, isolation ---------------------------------------------------
async def test_missing_bad_and_revoked_credentials(client: Client, ledger: Ledger, hot: HotPath, org: Org) -> None:
    r = await client.get("/api/credits/balance")
    assert_error(r.status, await r.json(), 401, "unauthenticated")
    status, err = await get(client, "/api/credits/balance", "ck_nope")
    assert_error(status, err, 401, "unauthenticated")
    key = await admin.create_key(ledger, hot, org.id, role="agent")
    assert (await get(client, "/api/credits/balance", key.secret))[0] == 200
    await admin.revoke_key(ledger, hot, org.id, key.id)
    status, err = await post(client, "/api/credits/use", key.secret, {"action": "tool_call"})
    assert_error(status, err, 401, "unauthenticated")


async def test_jwt_for_the_frontend(client: Client, org: Org) -> None:
    token = issue_jwt(JWT_SECRET, organization_id=org.id, subject="user-1", role="admin")
    status, body = await get(client, "/api/credits/balance", token)
    assert status == 200 and body["organization_id"] == org.id
    expired = jwt.encode(
        {"sub": "u", "org": org.id, "role": "admin", "exp": int(time.time()) - 3600}, JWT_SECRET, algorithm="HS256"
    )
    assert_error(*(await get(client, "/api/credits/balance", expired)), 401, "unauthenticated")
    forged = issue_jwt("another-secret-" + "y" * 40, organization_id=org.id, subject="u", role="admin")
    assert_error(*(await get(client, "/api/credits/balance", forged)), 401, "unauthenticated")
    bad_role = jwt.encode(
        {"sub": "u", "org": org.id, "role": "root", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256"
    )
    assert_error(*(await get(client, "/api/credits/balance", bad_role)), 401, "unauthenticated")


async def test_agent_cannot_administer(client: Client, ledger: Ledger, hot: HotPath, org: Org) -> None:
    agent = await admin.create_key(ledger, hot, org.id, role="agent")
    r = await client.put("/api/credits/costs/tool_call", json={"credits": 0}, headers=auth(agent.secret))
    assert_error(r.status, await r.json(), 403, "forbidden")
    status, err = await post(client, "/api/credits/departments", agent.secret, {"name": "x"})
    assert_error(status, err, 403, "forbidden")
    assert (await get(client, "/api/credits/costs", agent.secret))[0] == 200


async def test_one_organization_cannot_touch_another(client: Client, org: Org, other_org: Org) -> None:
    _, hold = await post(client, "/api/credits/reserve", org.admin_key, {"amount": 10, "ttl_seconds": 60})
    status, err = await post(
        client, "/api/credits/release", other_org.admin_key, {"reservation_id": hold["id"], "used": 10}
    )
    assert_error(status, err, 404, "not_found")
    _, dept = await post(client, "/api/credits/departments", org.admin_key, {"name": "a-team"})
    status, err = await get(client, f"/api/credits/departments/{dept['id']}/limits", other_org.admin_key)
    assert_error(status, err, 404, "not_found")
    r = await client.put(
        f"/api/credits/departments/{dept['id']}/limits",
        json={"limit": 1, "period": "day"},
        headers=auth(other_org.admin_key),
    )
    assert_error(r.status, await r.json(), 404, "not_found")
    status, err = await post(
        client, "/api/credits/use", other_org.admin_key, {"action": "tool_call", "department_id": dept["id"]}
    )
    assert_error(status, err, 404, "not_found", "$.department_id")
    _, depts = await get(client, "/api/credits/departments", other_org.admin_key)
    assert depts["data"] == []
    # The org's own hold is intact.
    status, rel = await post(client, "/api/credits/release", org.admin_key, {"reservation_id": hold["id"], "used": 10})
    assert status == 200 and rel["balance"] == 90


# -- costs and departments ----------------------------------------------------------------
async def test_cost_change_takes_effect_on_next_consume(client: Client, org: Org) -> None:
    _, costs = await get(client, "/api/credits/costs", org.admin_key)
    assert {c["action"] for c in costs["data"]} >= {"generate_content", "llm_output_tokens"}
    r = await client.put(
        "/api/credits/costs/generate_content",
        json={"credits": 2.5, "description": "pricier"},
        headers=auth(org.admin_key),
    )
    assert r.status == 200 and (await r.json())["credits"] == 2.5
    status, body = await post(client, "/api/credits/use", org.admin_key, {"action": "generate_content"})
    assert body["credits"] == 2.5
    r = await client.put(
        "/api/credits/costs/new_action", json={"credits": 0.001, "unit": "char"}, headers=auth(org.admin_key)
    )
    assert r.status == 200
    status, body = await post(client, "/api/credits/use", org.admin_key, {"action": "new_action", "units": 7})
    assert status == 200 and body["credits"] == 0.007
    r = await client.put("/api/credits/costs/Bad", json={"credits": 1}, headers=auth(org.admin_key))
    assert_error(r.status, await r.json(), 400, "invalid_request", "action")
    r = await client.put("/api/credits/costs/x", json={"credits": -1}, headers=auth(org.admin_key))
    assert_error(r.status, await r.json(), 400, "invalid_request", "$.credits")


async def test_department_limits_over_http(client: Client, ledger: Ledger, hot: HotPath, org: Org) -> None:
    status, dept = await post(
        client, "/api/credits/departments", org.admin_key, {"name": "research"}, **{"Idempotency-Key": "d1"}
    )
    assert status == 201
    status, again = await post(
        client, "/api/credits/departments", org.admin_key, {"name": "research"}, **{"Idempotency-Key": "d1"}
    )
    assert status == 201 and again == dept
    status, err = await post(client, "/api/credits/departments", org.admin_key, {"name": "research"})
    assert_error(status, err, 409, "conflict")
    r = await client.put(
        f"/api/credits/departments/{dept['id']}/limits",
        json={"limit": 5, "period": "week"},
        headers=auth(org.admin_key),
    )
    lim = await r.json()
    assert r.status == 200 and lim["limit"] == 5 and lim["period"] == "week" and lim["spent"] == 0
    assert lim["period_start"] < lim["period_end"]
    scoped = await admin.create_key(ledger, hot, org.id, role="agent", department_id=dept["id"])
    status, _ = await post(client, "/api/credits/use", scoped.secret, {"action": "generate_content", "units": 4})
    assert status == 200
    status, err = await post(client, "/api/credits/use", scoped.secret, {"action": "generate_content", "units": 2})
    assert_error(status, err, 402, "department_limit_exceeded")
    other = str(uuid.uuid4())
    status, err = await post(
        client, "/api/credits/use", scoped.secret, {"action": "generate_content", "department_id": other}
    )
    assert_error(status, err, 403, "forbidden", "$.department_id")
    status, lim = await get(client, f"/api/credits/departments/{dept['id']}/limits", org.admin_key)
    assert (lim["spent"], lim["remaining"]) == (4, 1)
    status, bal = await get(client, f"/api/credits/balance?department_id={dept['id']}", org.admin_key)
    assert bal["department"] == {
        "id": dept["id"],
        "limit": 5,
        "period": "week",
        "spent": 4,
        "remaining": 1,
        "mode": "hard",  # (soft budgets: tests/e2e/test_forecasts_api.py)
        "alert_percent": None,
    }
    r = await client.put(
        f"/api/credits/departments/{dept['id']}/limits",
        json={"limit": None, "period": "month"},
        headers=auth(org.admin_key),
    )
    assert (await r.json())["limit"] is None
    r = await client.put(
        f"/api/credits/departments/{dept['id']}/limits",
        json={"limit": 1, "period": "year"},
        headers=auth(org.admin_key),
    )
    body = await r.json()
    assert_error(r.status, body, 400, "invalid_request", "$.period")
    assert body["error"]["message"] == "Invalid enum value 'year': expected one of day, week, month"


async def test_enum_errors_list_the_valid_values(client: Client, org: Org) -> None:
    status, body = await get(client, "/api/credits/usage/summary?group_by=week", org.admin_key)
    assert_error(status, body, 400, "invalid_request", "group_by")
    assert body["error"]["message"].endswith("expected one of action, department, day, hour, api_key")
    status, body = await get(client, "/api/credits/transactions?type=gift", org.admin_key)
    assert_error(status, body, 400, "invalid_request", "type")
    assert "grant, usage, reservation_capture, expiration, adjustment, refund" in body["error"]["message"]
    status, body = await post(client, "/api/credits/use", org.admin_key, {"action": "tool_call", "units": "many"})
    assert_error(status, body, 400, "invalid_request", "$.units")
    assert "expected one of" not in body["error"]["message"]  # not an enumeration


async def test_a_viewer_token_reads_but_never_spends(client: Client, org: Org) -> None:
    viewer = issue_jwt(JWT_SECRET, organization_id=org.id, subject="v", role="viewer")
    status, body = await get(client, "/api/credits/balance", viewer)
    assert status == 200 and body["available"] == 100
    for path, payload in (
        ("/api/credits/use", {"action": "tool_call"}),
        ("/api/credits/use/batch", {"items": [{"action": "tool_call"}]}),
        ("/api/credits/reserve", {"amount": 1, "ttl_seconds": 60}),
        ("/api/credits/release", {"reservation_id": "r-1"}),
    ):
        status, body = await post(client, path, viewer, payload)
        assert_error(status, body, 403, "forbidden")
    status, body = await post(client, "/api/credits/departments", viewer, {"name": "x"})
    assert_error(status, body, 403, "forbidden")
    assert await available(client, org.admin_key) == 100


async def test_rate_limited_is_429_with_retry_after(client: Client, ledger: Ledger, hot: HotPath, org: Org) -> None:
    key = await admin.create_key(ledger, hot, org.id, role="agent", rate_limit_per_s=0.5, rate_limit_burst=2)
    codes = []
    for _ in range(3):
        r = await client.post("/api/credits/use", json={"action": "tool_call"}, headers=auth(key.secret))
        codes.append(r.status)
        if r.status == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == "rate_limited"
    assert codes == [200, 200, 429]


# -- operational endpoints ---------------------------------------------------------------
async def test_health_ready_metrics_openapi(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"] == {"redis": "ok", "postgres": "ok", "scripts": "ok"}
    metrics = await (await client.get("/metrics")).text()
    assert "credits_http_requests_total" in metrics
    doc = await (await client.get("/api/openapi.json")).json()
    for path in (
        "/api/credits/balance",
        "/api/credits/use",
        "/api/credits/use/batch",
        "/api/credits/reserve",
        "/api/credits/release",
        "/api/credits/costs",
        "/api/credits/costs/{action}",
        "/api/credits/departments",
        "/api/credits/departments/{department_id}/limits",
    ):
        assert path in doc["paths"], path
    assert doc["components"]["schemas"]["ReserveRequest"]["properties"]["amount"]["type"] == "number"
    r = await client.get("/api/credits/nothing-here")
    assert_error(r.status, await r.json(), 404, "not_found")


async def test_the_api_reference_is_browsable_at_docs(client: Client) -> None:
    from api.reference import SWAGGER_UI_VERSION

    r = await client.get("/docs")
    page = await r.text()
    assert r.status == 200 and r.content_type == "text/html"
    assert 'data-openapi="/api/openapi.json"' in page
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert "<script>" not in page  # nothing inline: the policy allows none
    bundle = f"/docs/assets/swagger-ui-{SWAGGER_UI_VERSION}/swagger-ui-bundle.js"
    assert bundle in page
    for asset in (bundle, f"/docs/assets/swagger-ui-{SWAGGER_UI_VERSION}/swagger-ui.css", "/docs/assets/reference.js"):
        r = await client.get(asset)
        assert r.status == 200, asset
        assert "immutable" in r.headers["Cache-Control"]
    assert "validatorUrl: null" in await (await client.get("/docs/assets/reference.js")).text()
    r = await client.get(f"/docs/assets/swagger-ui-{SWAGGER_UI_VERSION}/LICENSE")
    assert r.status == 200 and "Apache License" in await r.text()
    assert (await client.get("/docs/assets/../meter/app.py")).status == 404
    assert (await client.get("/docs/assets/nothing.js")).status == 404
