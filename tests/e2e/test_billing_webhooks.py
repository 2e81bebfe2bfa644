"""The webhook endpoint: signatures, deduplication, out-of-order delivery, and the
durable queue behind it (an event stored is processed even if the process died)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from billing.appkeys import EVENTS, GATEWAY
from billing.config import BillingConfig
from billing.credits import PurchaseMetadata
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org
from webhooks.events import decode_event
from webhooks.signature import sign

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")  # imported below, registered as a plugin

from tests.e2e.billing_fixtures import (  # noqa: E402 - after the rewrite registration
    Client,
    StripeDriver,
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
WEBHOOK = "/api/billing/stripe/webhook"


async def customer_event(client: Client, org: Org, driver: StripeDriver) -> dict[str, Any]:
    await with_card(client, org, driver)
    status, customer = await call(client, "GET", "/api/billing/customer", org)
    assert status == 200
    return make_event("customer.updated", {"id": customer["stripe_customer_id"], "object": "customer"})


async def stored(ledger: Ledger, org: Org, event_id: str) -> bool:
    return any(e["id"] == event_id for e in await events_of(ledger, org))


def _bad(kind: str, body: bytes, secret: str) -> tuple[bytes, dict[str, str]]:
    now = int(time.time())
    if kind == "tampered":
        signature = sign(body, secret)
        return body.replace(b"customer.updated", b"customer.deleted"), {"Stripe-Signature": signature}
    if kind == "stale":
        return body, {"Stripe-Signature": sign(body, secret, timestamp=now - 301)}
    if kind == "future":
        return body, {"Stripe-Signature": sign(body, secret, timestamp=now + 301)}
    if kind == "unsigned":
        return body, {}
    if kind == "wrong_secret":
        return body, {"Stripe-Signature": sign(body, "whsec_" + "0" * 48)}
    return body, {"Stripe-Signature": "t=abc,v1=zz"}  # garbage


@pytest.mark.parametrize("kind", ["tampered", "stale", "future", "unsigned", "wrong_secret", "garbage"])
async def test_bad_signatures_are_refused_without_effect(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    billing_config: BillingConfig,
    kind: str,
) -> None:
    secret = billing_config.stripe_webhook_secret or ""
    event = await customer_event(billing_client, org, stripe_driver)
    body = json.dumps(event).encode()
    data, headers = _bad(kind, body, secret)
    response = await billing_client.post(WEBHOOK, data=data, headers={"Content-Type": "application/json", **headers})
    answer = await response.json()
    assert response.status == 400, answer
    assert answer["error"]["code"] == "invalid_signature" and answer["error"]["param"] == "Stripe-Signature"
    assert not await stored(ledger, org, event["id"])
    # Nothing was kept of it: the genuine delivery is new, stored and processed.
    status, ack = await deliver(billing_client, secret, event)
    assert (status, ack) == (200, {"received": True})
    await wait_for(lambda: stored(ledger, org, event["id"]))
    await wait_for(lambda: settled(ledger, org))


async def test_signature_within_tolerance_is_accepted(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, billing_config: BillingConfig
) -> None:
    event = await customer_event(billing_client, org, stripe_driver)
    old = int(time.time()) - 250
    status, _ = await deliver(billing_client, billing_config.stripe_webhook_secret or "", event, timestamp=old)
    assert status == 200
    assert await stored(ledger, org, event["id"])


async def test_signed_garbage_is_400(billing_client: Client, billing_config: BillingConfig) -> None:
    secret = billing_config.stripe_webhook_secret or ""
    for body in (
        b"not json",
        b'{"id": "evt_1", "type": "x"}',
        json.dumps({"id": "nope", "type": "a", "created": 1, "data": {"object": {}}}).encode(),
    ):
        status, answer = await deliver(billing_client, secret, body)
        assert status == 400 and answer["error"]["code"] == "invalid_request", answer


async def test_event_of_no_organization_is_acknowledged_and_ignored(
    billing_client: Client, billing_config: BillingConfig
) -> None:
    event = make_event("customer.updated", {"id": "cus_nobodyknows", "object": "customer"})
    secret = billing_config.stripe_webhook_secret or ""
    assert await deliver(billing_client, secret, event) == (200, {"received": True})
    assert await deliver(billing_client, secret, event) == (200, {"received": True})


async def test_duplicate_event_is_stored_once(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, billing_config: BillingConfig
) -> None:
    event = await customer_event(billing_client, org, stripe_driver)
    secret = billing_config.stripe_webhook_secret or ""
    for _ in range(5):
        assert (await deliver(billing_client, secret, event))[0] == 200
    await wait_for(lambda: settled(ledger, org))
    mine = [e for e in await events_of(ledger, org) if e["id"] == event["id"]]
    assert [(e["status"], e["attempts"]) for e in mine] == [("done", 1)]


async def test_out_of_order_subscription_events_converge_to_stripe(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, billing_config: BillingConfig
) -> None:
    await with_card(billing_client, org, stripe_driver)
    status, sub = await call(billing_client, "POST", "/api/billing/subscription", org, {"plan_id": "starter"})
    assert status == 201
    await wait_for(lambda: settled(ledger, org))
    secret = billing_config.stripe_webhook_secret or ""
    customer = (await billing_rows(ledger, org, "billing_customers"))[0]["stripe_customer_id"]
    stale = {"id": sub["id"], "object": "subscription", "customer": customer}
    # An `updated` that says past_due, then a `deleted`, then the `created` (incomplete),
    # all older than the truth: each is checked against Stripe, which says active.
    for kind, status_said in (("updated", "past_due"), ("deleted", "canceled"), ("created", "incomplete")):
        event = make_event(f"customer.subscription.{kind}", {**stale, "status": status_said}, created=1_700_000_000)
        assert (await deliver(billing_client, secret, event))[0] == 200
    await wait_for(lambda: settled(ledger, org))
    status, current = await call(billing_client, "GET", "/api/billing/subscription", org)
    assert current["status"] == "active" and current["plan_id"] == "starter"
    # Once it has really ended, an old `created` cannot bring it back.
    await stripe_driver.end_subscription(sub["id"])
    await wait_for(lambda: _status_is(billing_client, org, "canceled"), what="the end of the subscription")
    replay = make_event("customer.subscription.created", {**stale, "status": "active"}, created=1_700_000_000)
    assert (await deliver(billing_client, secret, replay))[0] == 200
    await wait_for(lambda: settled(ledger, org))
    status, current = await call(billing_client, "GET", "/api/billing/subscription", org)
    assert current["status"] == "canceled"


async def _status_is(client: Client, org: Org, want: str) -> bool:
    status, body = await call(client, "GET", "/api/billing/subscription", org)
    return status == 200 and body["status"] == want


async def test_a_stored_event_is_processed_even_if_the_process_died(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
) -> None:
    """Stripe charged, then our process died before granting and before the worker saw
    the event: the stored row is found by the sweeper and the credits are granted."""
    pm = await with_card(billing_client, org, stripe_driver)
    customer = (await billing_rows(ledger, org, "billing_customers"))[0]["stripe_customer_id"]
    gateway = billing_client.app[GATEWAY]
    pi = await gateway.create_payment_intent(
        customer_id=customer,
        payment_method_id=pm,
        amount=990,
        currency="usd",
        description="small",
        metadata=PurchaseMetadata(org.id, "small", 100 * MILLI).encode(),
        idempotency_key=f"crash-{org.id}",
    )
    # Nothing of it is recorded on our side; the event is routed by its customer.
    event = make_event("payment_intent.succeeded", _pi_dict(pi.id, customer, pi.metadata))
    body = json.dumps(event).encode()
    received = await billing_client.app[EVENTS].receive(decode_event(body), body)  # stored; worker never nudged
    assert received.organization_id == org.id and not received.duplicate
    grant = await wait_for(lambda: _purchase_grant(ledger, org), what="the sweeper to process the stored event")
    assert grant["amount"] == 100 * MILLI and grant["reference"] == pi.id
    assert await cache_balance(hot, org) == 200 * MILLI


def _pi_dict(pi_id: str, customer: str, metadata: Any) -> dict[str, Any]:
    return {
        "id": pi_id,
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 990,
        "currency": "usd",
        "customer": customer,
        "metadata": dict(metadata),
        "created": int(time.time()),
    }


async def _purchase_grant(ledger: Ledger, org: Org) -> dict[str, Any] | None:
    found = await grants(ledger, org, "purchase")
    return found[0] if found else None


async def test_an_abandoned_lease_is_taken_over(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, billing_config: BillingConfig
) -> None:
    """A worker claimed the event and died mid-way: when its lease runs out, another
    attempt processes it."""
    event = await customer_event(billing_client, org, stripe_driver)
    body = json.dumps(event).encode()
    events = billing_client.app[EVENTS]
    await events.receive(decode_event(body), body)
    claimed = await events.claim(org.id, event["id"], lease_s=0.5)  # ... and never finished
    assert claimed is not None and claimed.attempts == 1
    assert await events.claim(org.id, event["id"], lease_s=0.5) is None  # leased: nobody else takes it
    state = await wait_for(lambda: _done_state(events, org, event["id"]), what="the lease to expire")
    assert state.attempts == 2


async def _done_state(events: Any, org: Org, event_id: str) -> Any:
    state = await events.state(org.id, event_id)
    return state if state is not None and state.status == "done" else None
