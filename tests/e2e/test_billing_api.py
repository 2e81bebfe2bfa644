"""The billing API's contract through HTTP: catalog, customer, payment methods, setup
intents, history pages, the OpenAPI document, and isolation between organizations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from billing.appkeys import CATALOG, GATEWAY
from billing.catalog import sync_catalog
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")  # imported below, registered as a plugin

from tests.e2e.billing_fixtures import (  # noqa: E402 - after the rewrite registration
    VISA,
    Client,
    StripeDriver,
    call,
    with_card,
)

# The billing fixtures, registered once for the session (imported by name, pytest
# would make one session-wide localstripe and billing app per test module).
pytest_plugins = ("tests.e2e.billing_fixtures",)

B = "/api/billing"


async def test_plans_and_packages_from_the_catalog(billing_client: Client, org: Org) -> None:
    status, plans = await call(billing_client, "GET", f"{B}/plans", org, role="agent")
    assert status == 200
    assert [
        (p["id"], p["price_cents"], p["currency"], p["interval"], p["credits_per_period"]) for p in plans["data"]
    ] == [
        ("starter", 2900, "usd", "month", 500),
        ("professional", 9900, "usd", "month", 2000),
        ("enterprise", 29900, "usd", "month", 10000),
    ]
    assert plans["data"][1]["features"] == ["API access", "5 projects"]
    status, packages = await call(billing_client, "GET", f"{B}/credit-packages", org)
    assert [(p["id"], p["credits"], p["price_cents"], p["currency"]) for p in packages["data"]] == [
        ("small", 100, 990, "usd"),
        ("medium", 500, 3990, "usd"),
        ("large", 2000, 14990, "usd"),
        ("jumbo", 5000, 34990, "usd"),
    ]
    response = await billing_client.get(f"{B}/plans")
    assert response.status == 401


async def test_catalog_is_linked_to_stripe_and_sync_is_idempotent(
    billing_client: Client, stripe_driver: StripeDriver
) -> None:
    catalog = billing_client.app[CATALOG]
    plans = await catalog.plans()
    assert all(p.stripe_product_id == f"credits_plan_{p.id}" and p.stripe_price_id for p in plans)
    assert all(p.stripe_product_id == f"credits_package_{p.id}" for p in await catalog.packages())
    products = await stripe_driver.request("GET", "/v1/products", limit="100")
    prices = await stripe_driver.request("GET", "/v1/plans", limit="100")
    again = await sync_catalog(catalog, billing_client.app[GATEWAY])
    assert len(again) == 7 and not any(item.changed for item in again)
    assert await stripe_driver.request("GET", "/v1/products", limit="100") == products
    assert await stripe_driver.request("GET", "/v1/plans", limit="100") == prices
    starter = next(p for p in prices["data"] if p["id"] == plans[0].stripe_price_id)
    assert (starter["amount"], starter["currency"], starter["interval"]) == (2900, "usd", "month")


async def test_the_billing_reference_is_browsable_at_docs(billing_client: Client) -> None:
    r = await billing_client.get("/docs")
    assert r.status == 200 and 'data-openapi="/api/billing/openapi.json"' in await r.text()
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    r = await billing_client.get("/docs/assets/reference.js")
    assert r.status == 200 and r.content_type == "application/javascript"


async def test_openapi_document_covers_the_billing_api(billing_client: Client) -> None:
    response = await billing_client.get(f"{B}/openapi.json")
    assert response.status == 200
    doc = await response.json()
    paths = doc["paths"]
    for path, methods in {
        "/customer": {"get", "post"},
        "/plans": {"get"},
        "/subscription": {"get", "post", "put", "delete"},
        "/credit-packages": {"get"},
        "/purchase-credits": {"post"},
        "/payment-methods": {"get", "post"},
        "/setup-intent": {"post"},
        "/invoices": {"get"},
        "/payments": {"get"},
        "/stripe/webhook": {"post"},
        "/subscription/resume": {"post"},
        "/config": {"get"},
        "/portal-sessions": {"post"},
        "/portal-sessions/{portal_session_id}": {"delete"},
    }.items():
        assert methods <= set(paths[B + path]), path
    for path, methods in paths.items():
        for method, op in methods.items():
            listed = set(op["responses"])
            if op["security"]:  # every credential is checked for revocation and rate
                assert {"401", "429"} <= listed, (method, path)
            if any(p["name"] == "Idempotency-Key" for p in op["parameters"]):  # a malformed or reused key
                assert {"400", "409"} <= listed, (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= listed, (method, path)
    schemas = doc["components"]["schemas"]
    assert schemas["PurchaseResponse"]["properties"]["credits"]["type"] == "number"
    assert set(schemas["PurchaseRequest"]["required"]) == {"package_id"}  # no card: the default card


async def test_customer_is_one_per_organization(billing_client: Client, org: Org) -> None:
    status, missing = await call(billing_client, "GET", f"{B}/customer", org)
    assert status == 404 and missing["error"]["code"] == "not_found"
    results = await asyncio.gather(
        *(call(billing_client, "POST", f"{B}/customer", org, {"email": f"a{i}@example.com"}) for i in range(3))
    )
    assert {status for status, _ in results} == {200}
    assert len({(body["id"], body["stripe_customer_id"]) for _, body in results}) == 1
    status, again = await call(
        billing_client, "POST", f"{B}/customer", org, {"email": "other@example.com", "name": "X"}
    )
    assert status == 200 and again["id"] == results[0][1]["id"]
    status, current = await call(billing_client, "GET", f"{B}/customer", org, role="agent")
    assert status == 200 and current == again and current["stripe_customer_id"].startswith("cus_")


async def test_customer_request_is_validated_and_needs_admin(billing_client: Client, org: Org) -> None:
    for body, param in (
        ({}, "$.email"),
        ({"email": "no-at-sign"}, "$.email"),
        ({"email": "a@b.c", "surprise": 1}, "$.surprise"),
        ({"email": "a@b.c", "name": ""}, "$.name"),
    ):
        status, error = await call(billing_client, "POST", f"{B}/customer", org, body)
        assert status == 400 and error["error"]["param"] == param, (body, error)
    status, error = await call(billing_client, "POST", f"{B}/customer", org, {"email": "a@b.c"}, role="agent")
    assert status == 403 and error["error"]["code"] == "forbidden"
    response = await billing_client.post(
        f"{B}/customer", json={"email": "a@b.c"}, headers={"Authorization": "Bearer nope"}
    )
    assert response.status == 401


async def test_payment_methods_list_default_and_detach(
    billing_client: Client, stripe_driver: StripeDriver, org: Org
) -> None:
    first = await with_card(billing_client, org, stripe_driver)
    second = await stripe_driver.card("5555555555554444")
    status, added = await call(billing_client, "POST", f"{B}/payment-methods", org, {"payment_method_id": second})
    assert status == 201 and added["is_default"] is False and added["last4"] == "4444"
    status, listed = await call(billing_client, "GET", f"{B}/payment-methods", org, role="agent")
    by_id = {m["id"]: m for m in listed["data"]}  # oldest first; these two share a second
    assert {k: m["is_default"] for k, m in by_id.items()} == {first: True, second: False}
    assert by_id[first]["last4"] == "4242" and by_id[first]["exp_year"] == 2034
    status, made = await call(billing_client, "POST", f"{B}/payment-methods/{second}/default", org)
    assert status == 200 and made["is_default"] is True
    status, gone = await call(billing_client, "DELETE", f"{B}/payment-methods/{first}", org)
    assert (status, gone) == (200, {"id": first, "deleted": True})
    status, listed = await call(billing_client, "GET", f"{B}/payment-methods", org)
    assert [(m["id"], m["is_default"]) for m in listed["data"]] == [(second, True)]
    status, again = await call(billing_client, "DELETE", f"{B}/payment-methods/{first}", org)
    assert status == 404 and again["error"]["code"] == "not_found"
    pm = await stripe_driver.request("GET", f"/v1/payment_methods/{first}")
    assert pm["customer"] is None


async def test_setup_intent_then_attach_the_card(billing_client: Client, stripe_driver: StripeDriver, org: Org) -> None:
    status, body = await call(billing_client, "POST", f"{B}/setup-intent", org)
    assert status == 409 and body["error"]["code"] == "customer_required"
    await call(billing_client, "POST", f"{B}/customer", org, {"email": "setup@example.com"})
    status, intent = await call(billing_client, "POST", f"{B}/setup-intent", org)
    assert status == 201 and intent["client_secret"].startswith(intent["setup_intent_id"])
    # The browser confirms it with Stripe.js and the publishable key ...
    async with stripe_driver.session.post(
        f"{stripe_driver.keys.api_base}/v1/setup_intents/{intent['setup_intent_id']}/confirm",
        data={
            "client_secret": intent["client_secret"],
            "key": stripe_driver.keys.publishable_key,
            "payment_method_data[type]": "card",
            "payment_method_data[card][number]": VISA,
            "payment_method_data[card][exp_month]": "11",
            "payment_method_data[card][exp_year]": "2033",
            "payment_method_data[card][cvc]": "123",
        },
    ) as response:
        confirmed = await response.json()
    assert confirmed["status"] == "succeeded"
    # ... and hands the card to the API, which attaches it to the organization's customer.
    pm = confirmed["payment_method"]
    status, added = await call(billing_client, "POST", f"{B}/payment-methods", org, {"payment_method_id": pm})
    assert status == 201 and added["is_default"] is True and added["exp_month"] == 11


async def test_payments_history_pages(billing_client: Client, stripe_driver: StripeDriver, org: Org) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    bought = []
    for _ in range(3):
        status, body = await call(
            billing_client, "POST", f"{B}/purchase-credits", org, {"package_id": "small", "payment_method_id": pm}
        )
        assert status == 200
        bought.append(body["payment_id"])
    status, first = await call(billing_client, "GET", f"{B}/payments?limit=2", org)
    assert status == 200 and first["has_more"] is True and len(first["data"]) == 2
    status, rest = await call(
        billing_client, "GET", f"{B}/payments?limit=2&starting_after={first['data'][-1]['id']}", org
    )
    assert rest["has_more"] is False and len(rest["data"]) == 1
    assert {p["id"] for p in first["data"] + rest["data"]} == set(bought)
    for query, param in (
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("starting_after=pi_nope", "starting_after"),
    ):
        status, error = await call(billing_client, "GET", f"{B}/payments?{query}", org)
        assert status == 400 and error["error"]["param"] == param, query


async def test_one_organization_cannot_see_or_touch_anothers_billing(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, other_org: Org, ledger: Ledger
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    status, sub = await call(billing_client, "POST", f"{B}/subscription", org, {"plan_id": "starter"})
    assert status == 201
    status, bought = await call(
        billing_client, "POST", f"{B}/purchase-credits", org, {"package_id": "small", "payment_method_id": pm}
    )
    status, invoices = await call(billing_client, "GET", f"{B}/invoices", org)
    [invoice] = invoices["data"]
    intruder = other_org  # a valid admin JWT, of another organization
    expectations: list[tuple[str, str, Any, int]] = [
        ("GET", f"{B}/subscription", None, 404),
        ("PUT", f"{B}/subscription", {"plan_id": "enterprise"}, 404),
        ("DELETE", f"{B}/subscription", None, 404),
        ("GET", f"{B}/customer", None, 404),
        ("GET", f"{B}/payments/{bought['payment_id']}", None, 404),
        ("POST", f"{B}/payment-methods/{pm}/default", None, 404),
        ("DELETE", f"{B}/payment-methods/{pm}", None, 404),
        ("GET", f"{B}/invoices?starting_after={invoice['id']}", None, 400),
    ]
    for method, path, body, want in expectations:
        status, answer = await call(billing_client, method, path, intruder, body)
        assert status == want, (method, path, answer)
    for path in ("/invoices", "/payments", "/payment-methods"):
        status, page = await call(billing_client, "GET", B + path, intruder)
        assert status == 200 and page["data"] == [], path
    # With a customer of its own, the intruder still cannot use the other's card.
    await call(billing_client, "POST", f"{B}/customer", intruder, {"email": "intruder@example.com"})
    status, answer = await call(billing_client, "POST", f"{B}/payment-methods", intruder, {"payment_method_id": pm})
    assert status == 404 and answer["error"]["param"] == "$.payment_method_id"
    status, answer = await call(
        billing_client, "POST", f"{B}/purchase-credits", intruder, {"package_id": "small", "payment_method_id": pm}
    )
    assert status == 404
    # The owner's objects are untouched, and the database itself hides them (RLS).
    status, mine = await call(billing_client, "GET", f"{B}/subscription", org)
    assert mine["id"] == sub["id"] and mine["status"] == "active"
    status, methods = await call(billing_client, "GET", f"{B}/payment-methods", org)
    assert [m["id"] for m in methods["data"]] == [pm]
    async with ledger.tenant(intruder.id) as conn:
        for table in ("billing_subscriptions", "billing_invoices", "billing_payments", "billing_payment_methods"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        assert await conn.fetchval("SELECT count(*) FROM stripe_events WHERE organization_id = $1", org.id) == 0
