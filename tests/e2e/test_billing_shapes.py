"""What localstripe cannot show: the current Stripe API's shapes (invoice.parent,
invoice.payments, line pricing, periods on subscription items), read by the same
parsers; the signature rules; event routing; configuration errors. No servers needed
(the file sits with the billing tests it belongs to)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from billing.config import StripeFlavor
from billing.config import load as load_billing
from billing.credits import PurchaseMetadata, invoice_purpose
from billing.gateway import (
    UPGRADE_INVOICE_DESCRIPTION,
    parse_charge,
    parse_invoice,
    parse_payment_intent,
    parse_subscription,
)
from core.config import ConfigError
from webhooks.events import Event, EventData, decode_event, routing_ids
from webhooks.signature import SignatureError, sign, verify

SECRET = "whsec_" + "s" * 32


def line(amount: int, price: str, product: str, start: int, end: int, *, proration: bool) -> dict[str, Any]:
    """An invoice line item as API versions from 2025-03-31 on shape it."""
    return {
        "id": f"il_{price}_{amount}",
        "object": "line_item",
        "amount": amount,
        "period": {"start": start, "end": end},
        "parent": {
            "type": "subscription_item_details",
            "subscription_item_details": {"proration": proration, "subscription": "sub_1", "subscription_item": "si_1"},
            "invoice_item_details": None,
        },
        "pricing": {"type": "price_details", "price_details": {"price": price, "product": product}},
    }


def test_current_invoice_shape() -> None:
    invoice = parse_invoice(
        {
            "id": "in_1",
            "object": "invoice",
            "customer": "cus_1",
            "status": "paid",
            "number": "ABC-0001",
            "amount_due": 2900,
            "amount_paid": 2900,
            "currency": "usd",
            "billing_reason": "subscription_cycle",
            "created": 1_800_000_000,
            "period_start": 1_797_400_000,  # Stripe: the previous period
            "period_end": 1_800_000_000,
            "hosted_invoice_url": "https://invoice.stripe.com/i/x",
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1"}},
            "payments": {"data": [{"payment": {"type": "payment_intent", "payment_intent": "pi_1"}, "status": "paid"}]},
            "confirmation_secret": {"client_secret": "pi_1_secret_x", "type": "payment_intent"},
            "lines": {
                "data": [
                    line(2900, "price_starter", "credits_plan_starter", 1_800_000_000, 1_802_600_000, proration=False)
                ]
            },
        }
    )
    assert (invoice.subscription, invoice.payment_intent, invoice.client_secret) == ("sub_1", "pi_1", "pi_1_secret_x")
    # The period paid for is the subscription line's, not the invoice's own (previous) one.
    assert (invoice.period_start, invoice.period_end) == (1_800_000_000, 1_802_600_000)
    plan_line = invoice.plan_line()
    assert plan_line is not None and (plan_line.price, plan_line.product) == ("price_starter", "credits_plan_starter")
    assert invoice_purpose(invoice) == "period"


def test_proration_invoice_names_the_new_plan() -> None:
    invoice = parse_invoice(
        {
            "id": "in_2",
            "customer": "cus_1",
            "status": "paid",
            "currency": "usd",
            "billing_reason": "subscription_update",
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1"}},
            "lines": {
                "data": [
                    line(-1450, "price_starter", "credits_plan_starter", 1_801_000_000, 1_802_600_000, proration=True),
                    line(4950, "price_pro", "credits_plan_professional", 1_801_000_000, 1_802_600_000, proration=True),
                ]
            },
        }
    )
    plan_line = invoice.plan_line()
    assert plan_line is not None and plan_line.product == "credits_plan_professional"
    assert invoice_purpose(invoice) == "upgrade"


def test_invoice_purposes() -> None:
    base: dict[str, Any] = {"id": "in_3", "status": "paid", "subscription": "sub_1"}
    assert invoice_purpose(parse_invoice(base)) == "period"  # localstripe: no billing_reason
    assert invoice_purpose(parse_invoice({**base, "billing_reason": "manual"})) == "other"
    assert invoice_purpose(parse_invoice({**base, "description": UPGRADE_INVOICE_DESCRIPTION})) == "upgrade"
    assert invoice_purpose(parse_invoice({**base, "subscription": None})) == "other"
    assert invoice_purpose(parse_invoice(base), recorded="upgrade") == "upgrade"


def test_current_subscription_shape() -> None:
    sub = parse_subscription(
        {
            "id": "sub_1",
            "customer": "cus_1",
            "status": "active",
            "cancel_at_period_end": True,
            "created": 1_800_000_000,
            "latest_invoice": "in_1",
            "items": {
                "data": [
                    {
                        "id": "si_1",
                        "current_period_start": 1_800_000_000,
                        "current_period_end": 1_802_600_000,
                        "price": {"id": "price_pro", "product": "credits_plan_professional"},
                    }
                ]
            },
        }
    )
    assert (sub.item, sub.price, sub.product) == ("si_1", "price_pro", "credits_plan_professional")
    assert (sub.current_period_start, sub.current_period_end) == (1_800_000_000, 1_802_600_000)
    assert sub.cancel_at_period_end and sub.latest_invoice_id == "in_1" and sub.latest_invoice is None


def test_payment_intent_and_charge_shapes() -> None:
    pi = parse_payment_intent(
        {
            "id": "pi_1",
            "status": "requires_payment_method",
            "amount": 990,
            "currency": "usd",
            "latest_charge": "ch_1",
            "metadata": {"kind": "credit_purchase", "organization_id": "o", "package_id": "small", "credits": "100000"},
            "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds", "message": "no"},
        }
    )
    assert (pi.latest_charge, pi.failure_code, pi.invoice) == ("ch_1", "insufficient_funds", None)
    charge = parse_charge(
        {
            "id": "ch_1",
            "payment_intent": {"id": "pi_1"},
            "amount": 990,
            "amount_refunded": 500,
            "refunds": {"data": [{"id": "re_1", "amount": 500, "status": "succeeded"}]},
        }
    )
    assert charge.payment_intent == "pi_1" and [r.id for r in charge.refunds] == ["re_1"]


def test_purchase_metadata_round_trip() -> None:
    meta = PurchaseMetadata("org-1", "jumbo", 5_000_000)
    assert PurchaseMetadata.decode(meta.encode()) == meta
    assert PurchaseMetadata.decode({"kind": "something else"}) is None
    assert PurchaseMetadata.decode({"kind": "credit_purchase", "credits": "many"}) is None


def test_signature_rules() -> None:
    body = b'{"id": "evt_1"}'
    now = int(time.time())
    assert verify(body, sign(body, SECRET, timestamp=now), SECRET) == now
    assert verify(body, sign(body, SECRET, timestamp=now - 299), SECRET) == now - 299
    # Several v1 signatures (a secret being rolled): one match is enough.
    other = sign(body, "whsec_" + "o" * 32, timestamp=now).split(",")[1]
    assert verify(body, sign(body, SECRET, timestamp=now) + "," + other, SECRET) == now
    bad = [
        (body, None),
        (body, ""),
        (body, "v1=abc"),
        (body, "t=1,t=2,v1=abc"),
        (body + b" ", sign(body, SECRET, timestamp=now)),
        (body, sign(body, SECRET, timestamp=now - 301)),
        (body, sign(body, SECRET, timestamp=now + 301)),
        (body, sign(body, "whsec_" + "x" * 32, timestamp=now)),
        (b"\xff\xfe", f"t={now},v1=00"),
    ]
    for payload, header in bad:
        with pytest.raises(SignatureError):
            verify(payload, header, SECRET)


def event(obj: dict[str, Any], kind: str = "x.y") -> Event:
    return Event(id="evt_1", type=kind, created=1, data=EventData(object=obj))


def test_routing_ids() -> None:
    assert routing_ids(event({"id": "cus_1", "object": "customer"})) == ["cus_1"]
    assert routing_ids(event({"id": "sub_1", "object": "subscription", "customer": "cus_1"})) == ["cus_1"]
    assert routing_ids(event({"id": "pi_1", "object": "payment_intent", "customer": "cus_1"})) == ["cus_1", "pi_1"]
    assert routing_ids(
        event({"id": "ch_1", "object": "charge", "customer": {"id": "cus_1"}, "payment_intent": "pi_1"})
    ) == [
        "cus_1",
        "pi_1",
        "ch_1",
    ]
    assert routing_ids(event({"id": "dp_1", "object": "dispute", "charge": "ch_1", "payment_intent": "pi_1"})) == [
        "pi_1",
        "ch_1",
    ]
    with pytest.raises(ValueError):
        decode_event(b'{"id": "nope", "type": "a", "created": 1, "data": {"object": {}}}')


def test_configuration_errors_name_the_variable() -> None:
    defaults = load_billing({})
    assert defaults.stripe_flavor is StripeFlavor.LOCALSTRIPE and not defaults.stripe_configured
    assert defaults.plan_credits_rollover is False and defaults.billing_port == 8081
    real = load_billing({"STRIPE_SECRET_KEY": "sk_live_abcdef", "STRIPE_WEBHOOK_SECRET": "whsec_abcdef"})
    assert real.stripe_flavor is StripeFlavor.STRIPE and real.stripe_api_base == "https://api.stripe.com"
    for env, name in (
        ({"STRIPE_SECRET_KEY": "sk_live_abcdef"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_abcdef"}, "STRIPE_SECRET_KEY"),
        ({"STRIPE_SECRET_KEY": "pk_live_abcdef", "STRIPE_WEBHOOK_SECRET": "whsec_abcdef"}, "STRIPE_SECRET_KEY"),
        ({"STRIPE_API_BASE": "http://localhost:8420"}, "STRIPE_API_BASE"),
        ({"PLAN_CREDITS_ROLLOVER": "perhaps"}, "PLAN_CREDITS_ROLLOVER"),
        ({"BILLING_PORT": "70000"}, "BILLING_PORT"),
        ({"STRIPE_FLAVOR": "fake"}, "STRIPE_FLAVOR"),
        ({"STRIPE_TIMEOUT_S": "0"}, "STRIPE_TIMEOUT_S"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_billing(env)
