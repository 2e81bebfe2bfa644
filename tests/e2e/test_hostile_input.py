"""Hostile and broken input at both services' edges: every text that would reach
Postgres is checked first (no NUL, bounded lengths, bounded metadata), credentials that
are not even text are refused as such, and nothing is charged or written on the way."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from accounts import admin
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")

from tests.e2e.billing_fixtures import Client, call  # noqa: E402 - after the rewrite registration

pytest_plugins = ("tests.e2e.billing_fixtures",)

M = "/api/credits"


def auth(org: Org) -> dict[str, str]:
    return {"Authorization": f"Bearer {org.admin_key}"}


async def post(client: Client, path: str, org: Org, body: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(path, data=json.dumps(body), headers={**auth(org), **headers})
    return response.status, await response.json()


async def available(hot: HotPath, org: Org) -> int:
    return int((await hot.balance(org.id)).payload["available"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (f"{M}/use", {"action": "web_search", "metadata": {"note": "a\u0000b"}}, "$.metadata.note"),
        (f"{M}/use", {"action": "web_search", "metadata": {"n\u0000te": "ab"}}, '$.metadata["n\\u0000te"]'),
        (f"{M}/use", {"action": "web_search", "metadata": {"note": "x" * 501}}, "$.metadata.note"),
        (f"{M}/use", {"action": "web_search", "metadata": {"": "empty key"}}, '$.metadata[""]'),
        (f"{M}/use", {"action": "web_search", "metadata": {f"k{i}": i for i in range(33)}}, "$.metadata"),
        (f"{M}/use", {"action": "web_search", "metadata": {f"k{i}": "v" * 400 for i in range(30)}}, "$.metadata"),
        (f"{M}/reserve", {"amount": 1, "ttl_seconds": 60, "metadata": {"note": "\u0000"}}, "$.metadata.note"),
        (
            f"{M}/use/batch",
            {"items": [{"action": "web_search"}, {"action": "web_search", "metadata": {"why": "a\u0000"}}]},
            "$.items[1].metadata.why",
        ),
        (
            f"{M}/use/batch",
            {"items": [{"action": "web_search", "metadata": {f"k{i}": "v" * 400 for i in range(30)}}]},
            "$.items[0].metadata",
        ),
    ],
    ids=["nul-value", "nul-key", "long-value", "empty-key", "33-keys", "too-big", "reserve", "batch", "batch-big"],
)
async def test_metadata_that_postgres_would_refuse_is_a_400_and_charges_nothing(
    client: Client, hot: HotPath, org: Org, path: str, body: dict[str, Any], param: str
) -> None:
    before = await available(hot, org)
    status, answer = await post(client, path, org, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["param"] == param
    assert await available(hot, org) == before


async def test_metadata_at_the_limits_is_accepted(client: Client, org: Org) -> None:
    metadata = {f"k{i:02}" + "x" * 60: "v" * 200 for i in range(32)}  # 32 keys of 64 characters
    status, answer = await post(client, f"{M}/use", org, {"action": "web_search", "metadata": metadata})
    assert (status, answer["error"]["param"]) == (400, "$.metadata")  # over 8 KiB as JSON
    metadata = {f"k{i:02}" + "x" * 60: "v" * 150 for i in range(32)}
    status, answer = await post(client, f"{M}/use", org, {"action": "web_search", "metadata": metadata})
    assert status == 200, answer
    status, answer = await post(client, f"{M}/use", org, {"action": "web_search", "metadata": {"ok": "ünïcødé ✓"}})
    assert status == 200, answer


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", f"{M}/departments", {"name": "re\u0000search"}, "$.name"),
        ("PUT", f"{M}/costs/web_search", {"credits": 1, "description": "a\u0000b"}, "$.description"),
        ("PUT", f"{M}/costs/web_search", {"credits": 1, "unit": "\u0000"}, "$.unit"),
    ],
)
async def test_nul_in_names_and_descriptions_is_a_400(
    client: Client, org: Org, method: str, path: str, body: Any, param: str
) -> None:
    response = await client.request(method, path, data=json.dumps(body), headers=auth(org))
    answer = await response.json()
    assert response.status == 400, answer
    assert answer["error"]["param"] == param
    assert "NUL" in answer["error"]["message"]


async def test_nul_in_query_cursors_is_a_400(client: Client, billing_client: Client, org: Org) -> None:
    response = await client.get(f"{M}/usage", params={"starting_after": "a\u0000b"}, headers=auth(org))
    assert response.status == 400 and (await response.json())["error"]["param"] == "starting_after"
    for path in ("/api/billing/payments", "/api/billing/invoices"):
        status, answer = await call(billing_client, "GET", f"{path}?starting_after=pi_%00x", org)
        assert (status, answer["error"]["param"]) == (400, "starting_after"), answer


async def test_nul_in_a_customer_name_or_email_is_a_400(billing_client: Client, org: Org, ledger: Ledger) -> None:
    for body, param in (
        ({"email": "a@b.test", "name": "Ac\u0000me"}, "$.name"),
        ({"email": "a\u0000@b.test"}, "$.email"),
    ):
        status, answer = await call(billing_client, "POST", "/api/billing/customer", org, body)
        assert (status, answer["error"]["param"]) == (400, param), answer
    async with ledger.tenant(org.id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_customers") == 0


async def raw_request(client: Client, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no HTTP client library would send (headers that are not UTF-8)."""
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer ck_\xff\xfe\xfd", b"Bearer \xc3\x28eyJhbGciOiJIUzI1NiJ9", b"\xff\xff", b"Bearer ck_" + b"\x80" * 43],
)
async def test_authorization_that_is_not_utf8_is_a_401_on_both_services(
    client: Client, billing_client: Client, org: Org, authorization: bytes
) -> None:
    for service, path in ((client, f"{M}/balance"), (billing_client, "/api/billing/plans")):
        status, body = await raw_request(
            service, b"GET %b HTTP/1.1\r\nHost: x\r\nAuthorization: %b\r\n" % (path.encode(), authorization)
        )
        assert status == 401, body
        assert json.loads(body)["error"]["code"] == "unauthenticated"


async def test_an_idempotency_key_that_is_not_utf8_is_a_400(client: Client, hot: HotPath, org: Org) -> None:
    before = await available(hot, org)
    head = b"POST %b/use HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\nIdempotency-Key: k\xff\r\n" % (
        M.encode(),
        org.admin_key.encode(),
    )
    status, body = await raw_request(client, head + b"Content-Type: application/json\r\n", b'{"action": "web_search"}')
    assert status == 400, body
    assert json.loads(body)["error"]["param"] == "Idempotency-Key"
    assert await available(hot, org) == before


async def test_a_stripe_signature_that_is_not_ascii_is_a_400(billing_client: Client) -> None:
    head = b"POST /api/billing/stripe/webhook HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=\xe2\x9c\x93\r\n"
    status, body = await raw_request(billing_client, head, b'{"id": "evt_1", "type": "x", "created": 1, "data": {}}')
    assert status == 400, body


async def test_keys_that_cannot_be_ours_are_refused_without_asking_postgres(
    client: Client, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    original = Ledger.authenticate

    async def counting(self: Ledger, secret: str) -> Any:
        asked.append(secret)
        return await original(self, secret)

    monkeypatch.setattr(Ledger, "authenticate", counting)
    for bogus in ("ck_short", "ck_" + "!" * 43, "ck_" + "a" * 44):
        response = await client.get(f"{M}/balance", headers={"Authorization": f"Bearer {bogus}"})
        assert response.status == 401
    assert asked == []
    unknown = "ck_" + "A" * 43  # the right shape, but no such key
    for _ in range(3):
        response = await client.get(f"{M}/balance", headers={"Authorization": f"Bearer {unknown}"})
        assert response.status == 401
    assert asked == [unknown]  # asked once, then remembered as unknown


async def test_billing_refuses_a_revoked_key_at_its_next_request(
    billing_client: Client, ledger: Ledger, hot: HotPath, org: Org
) -> None:
    key = await admin.create_key(ledger, hot, org.id, role="admin", name="billing")
    headers = {"Authorization": f"Bearer {key.secret}"}
    response = await billing_client.get("/api/billing/plans", headers=headers)
    assert response.status == 200
    await admin.revoke_key(ledger, hot, org.id, key.id)
    for method, path, body in (
        ("GET", "/api/billing/plans", None),
        ("POST", "/api/billing/customer", {"email": "a@b.test"}),
        ("POST", "/api/billing/purchase-credits", {"package_id": "small", "payment_method_id": "pm_card_visa"}),
    ):
        response = await billing_client.request(method, path, json=body, headers=headers)
        assert response.status == 401, await response.text()
        assert (await response.json())["error"]["code"] == "unauthenticated"


async def test_concurrent_creations_with_one_key_make_one_department_and_replay(
    client: Client, ledger: Ledger, org: Org
) -> None:
    headers = {**auth(org), "Idempotency-Key": "dept-once"}
    answers = await asyncio.gather(
        *(client.post(f"{M}/departments", data=json.dumps({"name": "ops"}), headers=headers) for _ in range(6))
    )
    assert [a.status for a in answers] == [201] * 6
    bodies = {json.dumps(await a.json(), sort_keys=True) for a in answers}
    assert len(bodies) == 1  # one department, the same answer for all
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 5
    assert [d.name for d in await ledger.departments(org.id)] == ["ops"]


async def test_a_credential_cannot_end_another_credentials_hold(
    client: Client, ledger: Ledger, hot: HotPath, org: Org
) -> None:
    mine = await admin.create_key(ledger, hot, org.id, role="agent")
    other = await admin.create_key(ledger, hot, org.id, role="agent")
    held = await client.post(
        f"{M}/reserve", json={"amount": 5, "ttl_seconds": 60}, headers={"Authorization": f"Bearer {mine.secret}"}
    )
    rid = (await held.json())["id"]
    stolen = await client.post(
        f"{M}/release", json={"reservation_id": rid, "used": 5}, headers={"Authorization": f"Bearer {other.secret}"}
    )
    assert stolen.status == 403 and (await stolen.json())["error"]["param"] == "$.reservation_id"
    by_admin = await client.post(f"{M}/release", json={"reservation_id": rid, "used": 1}, headers=auth(org))
    assert by_admin.status == 200 and (await by_admin.json())["used"] == 1


async def test_a_department_key_cannot_read_the_organizations_ledger(
    client: Client, ledger: Ledger, hot: HotPath, org: Org
) -> None:
    dept = await admin.create_department(ledger, hot, org.id, "scoped")
    key = await admin.create_key(ledger, hot, org.id, role="agent", department_id=dept.id)
    headers = {"Authorization": f"Bearer {key.secret}"}
    response = await client.get(f"{M}/transactions", headers=headers)
    assert response.status == 403
    assert (await client.get(f"{M}/transactions", headers=auth(org))).status == 200
