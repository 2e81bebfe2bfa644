"""Credit packages through HTTP against localstripe: each package, exactly-once grants
whatever the order and number of replies and webhooks, 3-D Secure, declines, refunds
and lost disputes."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import pytest

from billing.config import BillingConfig
from core.logs import JsonFormatter, fields
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")  # imported below, registered as a plugin

from tests.e2e.billing_fixtures import (  # noqa: E402 - after the rewrite registration
    DECLINED,
    VISA_3DS,
    VISA_3DS_2,
    Client,
    StripeDriver,
    bearer,
    billing_rows,
    cache_balance,
    call,
    deliver,
    events_of,
    grants,
    make_event,
    settled,
    wait_for,
    with_card,
)

# The billing fixtures, registered once for the session (imported by name, pytest
# would make one session-wide localstripe and billing app per test module).
pytest_plugins = ("tests.e2e.billing_fixtures",)

MILLI = 1000


async def purchase(client: Client, org: Org, package: str, pm: str, **headers: str) -> tuple[int, dict[str, Any]]:
    status, body = await call(
        client,
        "POST",
        "/api/billing/purchase-credits",
        org,
        {"package_id": package, "payment_method_id": pm},
        **headers,
    )
    return status, dict(body)


async def purchase_grants(ledger: Ledger, org: Org) -> list[dict[str, Any]]:
    return await grants(ledger, org, "purchase")


@pytest.mark.parametrize(
    ("package", "credits", "cents"),
    [("small", 100, 990), ("medium", 500, 3990), ("large", 2000, 14990), ("jumbo", 5000, 34990)],
)
async def test_each_package_grants_its_credits_once(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    package: str,
    credits: int,
    cents: int,
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    status, body = await purchase(billing_client, org, package, pm)
    assert status == 200, body
    assert body["status"] == "succeeded" and body["credits"] == credits and body["client_secret"] is None
    [grant] = await purchase_grants(ledger, org)
    assert (grant["amount"], grant["reference"], grant["expires_at"]) == (credits * MILLI, body["payment_id"], None)
    assert await cache_balance(hot, org) == (100 + credits) * MILLI
    # payment_intent.succeeded arrives after the synchronous reply: no second grant.
    await wait_for(lambda: _done(ledger, org, "payment_intent.succeeded"), what="payment_intent.succeeded")
    assert len(await purchase_grants(ledger, org)) == 1
    assert await cache_balance(hot, org) == (100 + credits) * MILLI
    status, payments = await call(billing_client, "GET", "/api/billing/payments", org)
    [payment] = payments["data"]
    assert (payment["id"], payment["amount"], payment["currency"]) == (body["payment_id"], cents, "usd")
    assert (payment["status"], payment["credits"]) == ("succeeded", credits)


async def test_the_grant_is_logged_with_whom_how_much_and_why(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    """`credits_granted` prints its fields (core/logs.py), not just its name."""
    caplog.set_level(logging.INFO, logger="billing.credits")
    pm = await with_card(billing_client, org, stripe_driver)
    status, body = await purchase(billing_client, org, "small", pm)
    assert status == 200, body
    [record] = [
        r for r in caplog.records if r.getMessage() == "credits_granted" and fields(r)["organization_id"] == org.id
    ]
    assert fields(record) == {
        "organization_id": org.id,
        "grant_id": fields(record)["grant_id"],
        "source": "purchase",
        "reference": body["payment_id"],
        "credits": "100",
        "new_grant": True,
    }
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "credits_granted" and line["credits"] == "100" and line["source"] == "purchase"


async def test_without_a_card_named_the_default_card_pays(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    status, body = await call(billing_client, "POST", "/api/billing/customer", org, {"email": "d@example.test"})
    assert status == 200, body
    status, body = await call(billing_client, "POST", "/api/billing/purchase-credits", org, {"package_id": "small"})
    assert status == 400 and body["error"]["param"] == "$.payment_method_id", body
    assert "no default payment method" in body["error"]["message"]
    assert await purchase_grants(ledger, org) == []
    pm = await with_card(billing_client, org, stripe_driver)
    status, body = await call(billing_client, "POST", "/api/billing/purchase-credits", org, {"package_id": "small"})
    assert status == 200 and body["status"] == "succeeded" and body["credits"] == 100, body
    [grant] = await purchase_grants(ledger, org)
    assert grant["reference"] == body["payment_id"]
    payment = await stripe_driver.request("GET", f"/v1/payment_intents/{body['payment_id']}")
    assert payment["payment_method"] == pm


async def _done(ledger: Ledger, org: Org, kind: str) -> bool:
    return any(e["type"] == kind and e["status"] == "done" for e in await events_of(ledger, org))


async def test_idempotency_key_replays_the_purchase(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    first = await purchase(billing_client, org, "small", pm, **{"Idempotency-Key": "buy-1"})
    again = await purchase(billing_client, org, "small", pm, **{"Idempotency-Key": "buy-1"})
    assert first == again and first[0] == 200
    # The replay says it is one (and a first answer never does).
    body = {"package_id": "small", "payment_method_id": pm}
    path = "/api/billing/purchase-credits"
    replayed = await billing_client.post(path, json=body, headers=bearer(org, **{"Idempotency-Key": "buy-1"}))
    assert replayed.status == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    fresh = await billing_client.post(path, json=body, headers=bearer(org, **{"Idempotency-Key": "buy-2"}))
    assert fresh.status == 200 and "Idempotent-Replayed" not in fresh.headers
    conflict = await purchase(billing_client, org, "medium", pm, **{"Idempotency-Key": "buy-1"})
    assert conflict[0] == 409 and conflict[1]["error"]["code"] == "idempotency_conflict"
    assert len(await purchase_grants(ledger, org)) == 2


async def test_duplicated_and_shuffled_webhooks_change_nothing(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    billing_config: BillingConfig,
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    status, bought = await purchase(billing_client, org, "medium", pm)
    assert status == 200
    status, sub = await call(billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"})
    assert status == 201
    await wait_for(lambda: _done(ledger, org, "customer.subscription.created"), what="localstripe's deliveries")
    await wait_for(lambda: settled(ledger, org))
    before = (await grants(ledger, org), await cache_balance(hot, org), await events_of(ledger, org))
    # Every event localstripe sent about this customer, five times each, shuffled and
    # concurrent, re-signed now (the originals' signatures are valid for 300 s anyway).
    customer = (await billing_rows(ledger, org, "billing_customers"))[0]["stripe_customer_id"]
    sent = await stripe_driver.events(about={customer, bought["payment_id"], sub["id"]})
    assert {"payment_intent.succeeded", "invoice.payment_succeeded", "customer.subscription.created"} <= {
        e["type"] for e in sent
    }
    deliveries = [e for e in sent for _ in range(5)]
    random.Random(7).shuffle(deliveries)
    secret = billing_config.stripe_webhook_secret or ""
    answers = await asyncio.gather(*(deliver(billing_client, secret, e) for e in deliveries))
    assert {status for status, _ in answers} == {200}
    await wait_for(lambda: settled(ledger, org))
    after = (await grants(ledger, org), await cache_balance(hot, org), await events_of(ledger, org))
    assert after == before  # the same grants, balance, and one stored row per event id, processed once


async def test_3ds_purchase_grants_only_when_it_succeeds_webhook_first(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    pm = await with_card(billing_client, org, stripe_driver, VISA_3DS)
    status, body = await purchase(billing_client, org, "medium", pm)
    assert status == 200, body
    assert body["status"] == "requires_action" and body["client_secret"].startswith(body["payment_id"])
    assert await purchase_grants(ledger, org) == []
    # The customer passes 3-D Secure in the browser; Stripe's webhook is the first to tell.
    await stripe_driver.authenticate(body["payment_id"], body["client_secret"], success=True)
    await wait_for(lambda: purchase_grants(ledger, org), what="the grant from the webhook")
    # Then the page asks (the synchronous path): the same single grant.
    status, payment = await call(billing_client, "GET", f"/api/billing/payments/{body['payment_id']}", org)
    assert status == 200 and payment["status"] == "succeeded"
    assert [g["amount"] for g in await purchase_grants(ledger, org)] == [500 * MILLI]
    assert await cache_balance(hot, org) == 600 * MILLI


async def test_3ds_reply_and_webhooks_racing_grant_once(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    billing_config: BillingConfig,
) -> None:
    pm = await with_card(billing_client, org, stripe_driver, VISA_3DS_2)
    status, body = await purchase(billing_client, org, "large", pm)
    assert status == 200 and body["status"] == "requires_action"
    pi = await stripe_driver.authenticate(body["payment_id"], body["client_secret"], success=True)
    assert pi["status"] == "succeeded"
    event = make_event("payment_intent.succeeded", pi)
    secret = billing_config.stripe_webhook_secret or ""
    path = f"/api/billing/payments/{body['payment_id']}"
    results = await asyncio.gather(
        *(deliver(billing_client, secret, event) for _ in range(5)),
        *(call(billing_client, "GET", path, org) for _ in range(3)),
    )
    assert {status for status, _ in results} == {200}
    await wait_for(lambda: _done(ledger, org, "payment_intent.succeeded"))
    await wait_for(lambda: settled(ledger, org))
    assert [g["amount"] for g in await purchase_grants(ledger, org)] == [2000 * MILLI]
    assert await cache_balance(hot, org) == 2100 * MILLI


async def test_failed_3ds_grants_nothing(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    pm = await with_card(billing_client, org, stripe_driver, VISA_3DS)
    status, body = await purchase(billing_client, org, "small", pm)
    await stripe_driver.authenticate(body["payment_id"], body["client_secret"], success=False)
    status, payment = await call(billing_client, "GET", f"/api/billing/payments/{body['payment_id']}", org)
    assert status == 200 and payment["status"] == "failed"
    assert await purchase_grants(ledger, org) == []


async def test_declined_card_is_402_and_grants_nothing(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    pm = await with_card(billing_client, org, stripe_driver, DECLINED)
    status, body = await purchase(billing_client, org, "jumbo", pm)
    assert status == 402 and body["error"]["code"] == "card_declined", body
    # payment_intent.payment_failed records the failed attempt; nothing is granted.
    await wait_for(lambda: _done(ledger, org, "payment_intent.payment_failed"), what="payment_intent.payment_failed")
    status, payments = await call(billing_client, "GET", "/api/billing/payments", org)
    assert [(p["status"], p["credits"]) for p in payments["data"]] == [("failed", 5000)]
    assert await purchase_grants(ledger, org) == []
    assert await cache_balance(hot, org) == 100 * MILLI


async def _clawbacks(ledger: Ledger, org: Org, count: int) -> list[dict[str, Any]] | None:
    rows = [r for r in await billing_rows(ledger, org, "billing_clawbacks") if r["applied_at"] is not None]
    return sorted(rows, key=lambda r: r["created_at"]) if len(rows) >= count else None


async def test_refund_claws_back_only_unspent_credits(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    billing_config: BillingConfig,
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    status, body = await purchase(billing_client, org, "medium", pm)
    # Spend 550 credits: the 100-credit bonus first, then 450 of the 500 bought.
    spent = await hot.consume(org.id, org.admin_key_id, action="image_generation", units=110)
    assert spent.payload["balance"] == 50 * MILLI
    await stripe_driver.refund(body["payment_id"])
    charge = await stripe_driver.charge_of(body["payment_id"])
    secret = billing_config.stripe_webhook_secret or ""
    event = make_event("charge.refunded", charge)
    assert (await deliver(billing_client, secret, event))[0] == 200
    [clawback] = await wait_for(lambda: _clawbacks(ledger, org, 1), what="the clawback")
    # Wanted back: the 500 credits paid for; unspent and taken: 50. Never below zero,
    # and the 450 that could not be taken back are on record.
    assert (clawback["wanted"], clawback["asked"], clawback["taken"]) == (500 * MILLI, 50 * MILLI, 50 * MILLI)
    assert clawback["id"] == f"refund:{charge['refunds']['data'][0]['id']}"
    assert await cache_balance(hot, org) == 0
    # The same refund again, under the same or a new event id: nothing more.
    assert (await deliver(billing_client, secret, event))[0] == 200
    assert (await deliver(billing_client, secret, make_event("charge.refunded", charge)))[0] == 200
    await wait_for(lambda: settled(ledger, org))
    assert len(await billing_rows(ledger, org, "billing_clawbacks")) == 1
    status, payments = await call(billing_client, "GET", "/api/billing/payments", org)
    assert status == 200 and payments["data"][0]["status"] == "refunded"


async def test_partial_refunds_claw_back_their_share(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    billing_config: BillingConfig,
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    status, body = await purchase(billing_client, org, "large", pm)
    secret = billing_config.stripe_webhook_secret or ""
    rows: list[dict[str, Any]] = []
    for count in (1, 2):  # half, then the other half
        await stripe_driver.refund(body["payment_id"], 7495)
        charge = await stripe_driver.charge_of(body["payment_id"])
        assert (await deliver(billing_client, secret, make_event("charge.refunded", charge)))[0] == 200

        async def applied(count: int = count) -> list[dict[str, Any]] | None:
            return await _clawbacks(ledger, org, count)

        rows = await wait_for(applied, what=f"clawback {count}")
    assert [r["taken"] for r in rows] == [1000 * MILLI, 1000 * MILLI]
    assert await cache_balance(hot, org) == 100 * MILLI
    status, payments = await call(billing_client, "GET", "/api/billing/payments", org)
    assert status == 200
    assert payments["data"][0]["status"] == "refunded" and payments["data"][0]["amount_refunded"] == 14990


async def test_lost_dispute_claws_back_and_a_won_one_does_not(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    billing_config: BillingConfig,
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    secret = billing_config.stripe_webhook_secret or ""
    won = await purchase(billing_client, org, "small", pm)
    lost = await purchase(billing_client, org, "medium", pm)
    for (_, body), outcome in ((won, "won"), (lost, "lost")):
        charge = await stripe_driver.charge_of(body["payment_id"])
        # localstripe has no disputes: Stripe's event, signed by us as Stripe would.
        dispute = {
            "id": f"dp_{outcome}{charge['id'][3:]}",
            "object": "dispute",
            "charge": charge["id"],
            "payment_intent": body["payment_id"],
            "amount": charge["amount"],
            "currency": "usd",
            "status": outcome,
        }
        assert (await deliver(billing_client, secret, make_event("charge.dispute.closed", dispute)))[0] == 200
    [clawback] = await wait_for(lambda: _clawbacks(ledger, org, 1), what="the dispute's clawback")
    await wait_for(lambda: settled(ledger, org))
    assert clawback["cause"] == "dispute" and clawback["id"].startswith("dispute:dp_lost")
    assert clawback["taken"] == 500 * MILLI
    assert len(await billing_rows(ledger, org, "billing_clawbacks")) == 1
    assert await cache_balance(hot, org) == 200 * MILLI


async def test_purchase_needs_customer_known_package_and_own_card(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, other_org: Org
) -> None:
    pm = await stripe_driver.card("4242424242424242")
    status, body = await purchase(billing_client, org, "small", pm)
    assert status == 409 and body["error"]["code"] == "customer_required"
    mine = await with_card(billing_client, org, stripe_driver)
    status, body = await purchase(billing_client, org, "gigantic", mine)
    assert status == 404 and body["error"]["param"] == "$.package_id"
    status, body = await purchase(billing_client, org, "small", "pm_doesnotexist")
    assert status == 404 and body["error"]["param"] == "$.payment_method_id"
    status, body = await call(
        billing_client, "POST", "/api/billing/purchase-credits", org, {"package_id": "small", "payment_method_id": 7}
    )
    assert status == 400 and body["error"]["param"] == "$.payment_method_id", json.dumps(body)
    status, body = await purchase(billing_client, org, "small", mine)
    assert status == 200
    status, body = await call(
        billing_client,
        "POST",
        "/api/billing/purchase-credits",
        org,
        {"package_id": "small", "payment_method_id": mine},
        role="agent",
    )
    assert status == 403 and body["error"]["code"] == "forbidden"
