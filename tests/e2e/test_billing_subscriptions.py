"""Subscriptions through HTTP against localstripe: plan credits per paid period, renewals,
upgrades and downgrades, cancellation, 3-D Secure, refunds of an invoice."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import actions
from billing.app import create_app
from billing.config import BillingConfig
from billing.store import BillingStore
from core.config import Config
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")  # imported below, registered as a plugin

from tests.e2e.billing_fixtures import (  # noqa: E402 - after the rewrite registration
    VISA_3DS,
    VISA_3DS_2,
    Client,
    StripeDriver,
    billing_rows,
    cache_balance,
    call,
    deliver,
    grants,
    iso_to_epoch,
    make_event,
    settled,
    wait_for,
    with_card,
)

# The billing fixtures, registered once for the session (imported by name, pytest
# would make one session-wide localstripe and billing app per test module).
pytest_plugins = ("tests.e2e.billing_fixtures",)

MILLI = 1000


async def subscribe(client: Client, org: Org, plan: str = "starter", **extra: Any) -> dict[str, Any]:
    status, body = await call(client, "POST", "/api/billing/subscription", org, {"plan_id": plan, **extra})
    assert status == 201, body
    return dict(body)


async def subscription_grants(ledger: Ledger, org: Org) -> list[dict[str, Any]]:
    return await grants(ledger, org, "subscription")


async def stripe_customer(client: Client, org: Org) -> str:
    status, body = await call(client, "GET", "/api/billing/customer", org)
    assert status == 200, body
    return str(body["stripe_customer_id"])


async def test_subscribe_grants_the_plan_credits_once(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver)
    sub = await subscribe(billing_client, org, "starter")
    assert sub["status"] == "active" and sub["plan_id"] == "starter" and sub["cancel_at_period_end"] is False
    # The invoice was paid in the synchronous reply: the credits are there already.
    [grant] = await subscription_grants(ledger, org)
    assert grant["amount"] == 500 * MILLI
    assert int(grant["expires_at"].timestamp()) == iso_to_epoch(sub["current_period_end"])
    assert await cache_balance(hot, org) == 600 * MILLI
    # Then Stripe's webhooks (invoice.payment_succeeded, payment_intent.succeeded, ...)
    # arrive: nothing more is granted.
    await wait_for(lambda: _events_done(ledger, org, {"invoice.payment_succeeded", "payment_intent.succeeded"}))
    await wait_for(lambda: settled(ledger, org))
    assert len(await subscription_grants(ledger, org)) == 1
    assert await cache_balance(hot, org) == 600 * MILLI
    status, current = await call(billing_client, "GET", "/api/billing/subscription", org)
    assert status == 200 and current["id"] == sub["id"] and current["status"] == "active"
    status, invoices = await call(billing_client, "GET", "/api/billing/invoices", org)
    assert status == 200 and invoices["has_more"] is False
    [invoice] = invoices["data"]
    assert (invoice["status"], invoice["amount_paid"], invoice["currency"]) == ("paid", 2900, "usd")
    assert invoice["period_end"] == sub["current_period_end"]
    status, payments = await call(billing_client, "GET", "/api/billing/payments", org)
    assert [(p["amount"], p["status"]) for p in payments["data"]] == [(2900, "succeeded")]
    # One subscription at a time.
    status, again = await call(billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "professional"})
    assert status == 409 and again["error"]["code"] == "subscription_exists"


async def test_subscribe_retried_after_a_lost_reply_is_the_same_subscription(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    await with_card(billing_client, org, stripe_driver)
    headers = {"Idempotency-Key": "subscribe-1"}
    status, first = await call(
        billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"}, **headers
    )
    assert status == 201
    # The reply was lost before it was stored (a crash): the retry finds what it made.
    async with ledger.tenant(org.id) as conn:
        await conn.execute("DELETE FROM idempotency_records WHERE key = 'billing:subscribe-1'")
    status, again = await call(
        billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"}, **headers
    )
    assert status == 201 and again["id"] == first["id"]
    status, other = await call(
        billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"}, **{"Idempotency-Key": "x"}
    )
    assert status == 409 and other["error"]["code"] == "subscription_exists"
    assert len(await subscription_grants(ledger, org)) == 1


async def _events_done(ledger: Ledger, org: Org, kinds: set[str]) -> bool:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT type FROM stripe_events WHERE status = 'done'")
    return kinds <= {r["type"] for r in rows}


async def test_renewal_grants_the_next_period(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver)
    sub = await subscribe(billing_client, org, "professional")
    # Stripe's clock: the next period's invoice is created and charged. Only the webhook
    # tells us; it grants that invoice's plan credits.
    renewal = await stripe_driver.renew(await stripe_customer(billing_client, org), sub["id"])
    assert renewal["status"] == "paid"
    found = await wait_for(lambda: _grant_for(ledger, org, renewal["id"]), what="the renewal's grant")
    assert found["amount"] == 2000 * MILLI and found["source"] == "subscription"
    await wait_for(lambda: settled(ledger, org))
    assert [g["amount"] for g in await subscription_grants(ledger, org)] == [2000 * MILLI, 2000 * MILLI]
    assert await cache_balance(hot, org) == (100 + 4000) * MILLI
    status, invoices = await call(billing_client, "GET", "/api/billing/invoices", org)
    assert status == 200
    assert {i["id"] for i in invoices["data"]} >= {renewal["id"]} and len(invoices["data"]) == 2


async def _grant_for(ledger: Ledger, org: Org, reference: str) -> dict[str, Any] | None:
    for grant in await grants(ledger, org):
        if grant["reference"] == reference:
            return grant
    return None


async def test_upgrade_grants_the_difference_at_once_and_a_downgrade_waits(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver)
    sub = await subscribe(billing_client, org, "starter")
    status, up = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "professional"})
    assert status == 200, up
    assert up["plan_id"] == "professional" and up["id"] == sub["id"]
    # The difference for the rest of the period, at once, expiring with the period.
    amounts = [g["amount"] for g in await subscription_grants(ledger, org)]
    assert amounts == [500 * MILLI, 1500 * MILLI]
    upgrade = (await subscription_grants(ledger, org))[1]
    assert int(upgrade["expires_at"].timestamp()) == iso_to_epoch(sub["current_period_end"])
    assert await cache_balance(hot, org) == 2100 * MILLI
    # A downgrade changes the plan for the next invoice and grants (or takes) nothing;
    # climbing back to a level this period already had grants nothing either.
    status, down = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "starter"})
    assert status == 200 and down["plan_id"] == "starter"
    status, back = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "professional"})
    assert status == 200 and back["plan_id"] == "professional"
    assert len(await subscription_grants(ledger, org)) == 2
    status, top = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "enterprise"})
    assert status == 200 and top["plan_id"] == "enterprise"
    # The upgrade invoices' webhooks arrive too, shuffled with the rest: still once each.
    await wait_for(lambda: settled(ledger, org))
    await wait_for(lambda: _events_done(ledger, org, {"invoice.payment_succeeded"}))
    assert [g["amount"] for g in await subscription_grants(ledger, org)] == [500 * MILLI, 1500 * MILLI, 8000 * MILLI]
    assert await cache_balance(hot, org) == (100 + 10000) * MILLI
    status, same = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "enterprise"})
    assert status == 200 and same["plan_id"] == "enterprise"
    status, unknown = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "platinum"})
    assert status == 404 and unknown["error"]["param"] == "$.plan_id"


async def test_cancel_at_period_end_stops_future_grants(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, billing_config: BillingConfig
) -> None:
    await with_card(billing_client, org, stripe_driver)
    sub = await subscribe(billing_client, org, "starter")
    status, body = await call(billing_client, "DELETE", "/api/billing/subscription?at_period_end=true", org)
    assert status == 200, body
    assert body["status"] == "active" and body["cancel_at_period_end"] is True
    status, current = await call(billing_client, "GET", "/api/billing/subscription", org)
    assert current["cancel_at_period_end"] is True
    # Stripe's clock reaches the period end: the subscription ends (webhook).
    await stripe_driver.end_subscription(sub["id"])
    await wait_for(lambda: _status(billing_client, org, "canceled"), what="the subscription to end")
    # No renewal follows; even a paid invoice for a period after the end grants nothing.
    customer = await stripe_customer(billing_client, org)
    late = _invoice_after_end(sub, customer)
    status, _ = await deliver(
        billing_client, billing_config.stripe_webhook_secret or "", make_event("invoice.paid", late)
    )
    assert status == 200
    await wait_for(lambda: settled(ledger, org))
    assert len(await subscription_grants(ledger, org)) == 1
    status, again = await call(billing_client, "DELETE", "/api/billing/subscription", org)
    assert status == 404 and again["error"]["code"] == "not_found"


async def test_resume_takes_back_a_cancellation_and_renewals_grant_again(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    status, body = await call(billing_client, "POST", "/api/billing/subscription/resume", org)
    assert status == 404 and body["error"]["code"] == "not_found"
    await with_card(billing_client, org, stripe_driver)
    sub = await subscribe(billing_client, org, "starter")
    status, body = await call(billing_client, "POST", "/api/billing/subscription/resume", org, role="agent")
    assert status == 403
    status, body = await call(billing_client, "POST", "/api/billing/subscription/resume", org)
    assert status == 200 and body["cancel_at_period_end"] is False  # nothing to take back: as it is
    status, body = await call(billing_client, "DELETE", "/api/billing/subscription?at_period_end=true", org)
    assert status == 200 and body["cancel_at_period_end"] is True
    status, body = await call(
        billing_client, "POST", "/api/billing/subscription/resume", org, **{"Idempotency-Key": "resume-1"}
    )
    assert status == 200 and body["cancel_at_period_end"] is False and body["status"] == "active"
    status, again = await call(
        billing_client, "POST", "/api/billing/subscription/resume", org, **{"Idempotency-Key": "resume-1"}
    )
    assert status == 200 and again == body
    remote = await stripe_driver.request("GET", f"/v1/subscriptions/{sub['id']}")
    assert remote["cancel_at_period_end"] is False  # Stripe renews it again
    await stripe_driver.renew(remote["customer"], sub["id"])
    await wait_for(lambda: _grants_at_least(ledger, org, 2), what="the renewal's grant")


async def _grants_at_least(ledger: Ledger, org: Org, n: int) -> bool:
    return len(await subscription_grants(ledger, org)) >= n


def _invoice_after_end(sub: dict[str, Any], customer: str) -> dict[str, Any]:
    """An invoice localstripe never made (so the worker falls back to the event's copy)."""
    start = int(time.time()) + 40 * 86400
    return {
        "id": "in_late" + sub["id"][-10:],
        "object": "invoice",
        "customer": customer,
        "subscription": sub["id"],
        "status": "paid",
        "amount_due": 2900,
        "amount_paid": 2900,
        "currency": "usd",
        "billing_reason": "subscription_cycle",
        "created": start,
        "lines": {
            "data": [
                {
                    "type": "subscription",
                    "amount": 2900,
                    "proration": False,
                    "period": {"start": start, "end": start + 30 * 86400},
                    "plan": {"id": "credits_starter_usd_2900_month", "product": "credits_plan_starter"},
                }
            ]
        },
    }


async def _status(client: Client, org: Org, want: str) -> bool:
    status, body = await call(client, "GET", "/api/billing/subscription", org)
    return status == 200 and body["status"] == want


async def test_cancel_now_then_subscribe_again(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    await with_card(billing_client, org, stripe_driver)
    first = await subscribe(billing_client, org, "starter")
    status, body = await call(billing_client, "DELETE", "/api/billing/subscription", org)
    assert status == 200 and body["status"] == "canceled" and body["canceled_at"] is not None
    await wait_for(lambda: settled(ledger, org))
    status, current = await call(billing_client, "GET", "/api/billing/subscription", org)
    assert current["id"] == first["id"] and current["status"] == "canceled"
    second = await subscribe(billing_client, org, "professional")
    assert second["id"] != first["id"] and second["status"] == "active"
    assert [g["amount"] for g in await subscription_grants(ledger, org)] == [500 * MILLI, 2000 * MILLI]


async def test_first_invoice_needing_3ds_grants_after_authentication(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver, VISA_3DS_2)
    sub = await subscribe(billing_client, org, "starter")
    assert sub["status"] == "incomplete" and sub["client_secret"]
    assert await subscription_grants(ledger, org) == []
    pi = sub["client_secret"].split("_secret_")[0]
    await stripe_driver.authenticate(pi, sub["client_secret"], success=True)
    # Only the webhook knows: it grants, and the subscription is fetched again (active).
    await wait_for(lambda: subscription_grants(ledger, org), what="the plan credits")
    await wait_for(lambda: _status(billing_client, org, "active"), what="the subscription to be active")
    await wait_for(lambda: settled(ledger, org))
    assert [g["amount"] for g in await subscription_grants(ledger, org)] == [500 * MILLI]
    assert await cache_balance(hot, org) == 600 * MILLI


async def test_failed_first_payment_grants_nothing(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    await with_card(billing_client, org, stripe_driver, VISA_3DS)
    sub = await subscribe(billing_client, org, "starter")
    assert sub["status"] == "incomplete" and sub["client_secret"]
    pi = sub["client_secret"].split("_secret_")[0]
    await stripe_driver.authenticate(pi, sub["client_secret"], success=False)
    # invoice.payment_failed, then the subscription is deleted (Stripe gives up on it).
    await wait_for(lambda: _events_done(ledger, org, {"invoice.payment_failed"}), what="invoice.payment_failed")
    await wait_for(lambda: _status(billing_client, org, "canceled"), what="the subscription to end")
    await wait_for(lambda: settled(ledger, org))
    assert await subscription_grants(ledger, org) == []
    status, invoices = await call(billing_client, "GET", "/api/billing/invoices", org)
    assert status == 200
    assert [i["status"] for i in invoices["data"]] == ["open"]


async def test_refunded_invoice_claws_back_unspent_plan_credits(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    billing_config: BillingConfig,
) -> None:
    await with_card(billing_client, org, stripe_driver)
    await subscribe(billing_client, org, "starter")
    [invoice] = await billing_rows(ledger, org, "billing_invoices")
    # Spend 300 credits: the signup bonus first (burn-down order), then 200 plan credits.
    spent = await hot.consume(org.id, org.admin_key_id, action="image_generation", units=60)
    assert spent.payload["balance"] == 300 * MILLI
    await stripe_driver.refund(invoice["payment_intent_id"])
    charge = await stripe_driver.charge_of(invoice["payment_intent_id"])
    status, _ = await deliver(
        billing_client, billing_config.stripe_webhook_secret or "", make_event("charge.refunded", charge)
    )
    assert status == 200
    [clawback] = await wait_for(lambda: _applied_clawbacks(ledger, org), what="the clawback")
    assert (clawback["wanted"], clawback["asked"], clawback["taken"]) == (500 * MILLI, 300 * MILLI, 300 * MILLI)
    assert await cache_balance(hot, org) == 0


async def _applied_clawbacks(ledger: Ledger, org: Org) -> list[dict[str, Any]] | None:
    rows = [r for r in await billing_rows(ledger, org, "billing_clawbacks") if r["applied_at"] is not None]
    return rows or None


async def test_rollover_setting_keeps_plan_credits(
    migrated: Config, billing_config: BillingConfig, stripe_driver: StripeDriver, org: Org, ledger: Ledger
) -> None:
    rolling = replace(billing_config, plan_credits_rollover=True, catalog_sync_on_start=False)
    async with TestClient(TestServer(create_app(migrated, rolling))) as client:
        await with_card(client, org, stripe_driver)
        status, body = await call(client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"})
        assert status == 201, json.dumps(body)
    [grant] = await subscription_grants(ledger, org)
    assert grant["amount"] == 500 * MILLI and grant["expires_at"] is None


async def test_a_plan_change_waits_out_a_webhook_holding_the_subscription(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A webhook holds the subscription lease briefly; a caller's change waits for it
    (a 409 only when the lease outlives the wait, and then nothing changed)."""
    await with_card(billing_client, org, stripe_driver)
    await subscribe(billing_client, org, "starter")
    store = BillingStore(ledger)
    await wait_for(lambda: store.lock_subscriptions(org.id, ttl_s=30), what="the subscription lease")

    async def release_soon() -> None:
        await asyncio.sleep(0.3)
        await store.unlock_subscriptions(org.id)

    releasing = asyncio.create_task(release_soon())
    status, body = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "professional"})
    await releasing
    assert status == 200 and body["plan_id"] == "professional", body

    monkeypatch.setattr(actions, "SUBSCRIPTION_LOCK_WAIT_S", 0.3)
    await wait_for(lambda: store.lock_subscriptions(org.id, ttl_s=30), what="the subscription lease")
    try:
        status, body = await call(billing_client, "PUT", "/api/billing/subscription", org, {"plan_id": "enterprise"})
        assert status == 409 and body["error"]["code"] == "subscription_busy", body
    finally:
        await store.unlock_subscriptions(org.id)
    status, current = await call(billing_client, "GET", "/api/billing/subscription", org)
    assert current["plan_id"] == "professional"
    assert [g["amount"] for g in await subscription_grants(ledger, org)] == [500 * MILLI, 1500 * MILLI]
