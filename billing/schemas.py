"""Request and response bodies of the billing API: decoded by, and documented from,
these types (billing/openapi.py generates the OpenAPI document from them)."""

from __future__ import annotations

import decimal
from typing import Annotated, Any, Literal

from msgspec import Meta

from core.structs import NO_NUL, Body

Credits = Annotated[decimal.Decimal, Meta(description="credits, exact to 0.001")]
Cents = Annotated[int, Meta(ge=0, description="money in the currency's minor unit (cents)")]
MONTHLY_CAP_CENTS_MAX = 10**12  # ten billion dollars: far inside the ledger's bigint
Currency = Annotated[str, Meta(pattern=r"^[a-z]{3}$", description="lowercase ISO 4217 code")]
Timestamp = Annotated[str, Meta(description="ISO 8601, UTC")]
CatalogId = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="a plan or package id")]
StripeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]{3,255}$", description="a Stripe object id")]
Email = Annotated[str, Meta(min_length=3, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]


# -- requests ----------------------------------------------------------------------
class CustomerRequest(Body):
    email: Email
    name: Name | None = None


class SubscriptionRequest(Body):
    plan_id: CatalogId
    payment_method_id: Annotated[
        StripeId | None, Meta(description="the card to pay with (it becomes the default); without it, the default card")
    ] = None


class ChangePlanRequest(Body):
    plan_id: CatalogId


class PurchaseRequest(Body):
    package_id: CatalogId
    payment_method_id: Annotated[
        StripeId | None, Meta(description="the card to charge; without it, the customer's default card")
    ] = None


class PaymentMethodRequest(Body):
    payment_method_id: StripeId
    set_default: bool = False


ReturnUrl = Annotated[
    str, Meta(pattern=r"^https?://[^\s]+$", max_length=2048, description="shown as a link back to your product")
]


class PortalSessionRequest(Body):
    return_url: ReturnUrl | None = None
    role: Annotated[
        Literal["admin", "viewer"],
        Meta(description="viewer sees everything and changes nothing; admin may also pay and manage"),
    ] = "viewer"


# -- responses ---------------------------------------------------------------------
class CustomerView(Body):
    id: str
    stripe_customer_id: str
    email: str
    name: str | None


class FeatureDefinition(Body):
    """A typed feature of a plan: boolean (enabled), limit (limit; null = unlimited) or
    config (value). GET /api/credits/entitlements gives an organization's, with usage."""

    feature: str
    type: Literal["boolean", "limit", "config"]
    enabled: bool | None = None
    limit: int | None = None
    value: str | None = None


class PlanView(Body):
    id: str
    name: str
    description: str
    price_cents: Cents
    currency: Currency
    interval: str
    credits_per_period: Credits
    features: list[str]  # as people read them ("5 projects"); `entitlements` as code checks them
    entitlements: list[FeatureDefinition]


class PlanList(Body):
    data: list[PlanView]
    free_entitlements: list[FeatureDefinition]  # what an organization without a plan has


class SubscriptionView(Body):
    id: str
    plan_id: str | None
    status: str
    current_period_start: Timestamp | None
    current_period_end: Timestamp | None
    cancel_at_period_end: bool
    canceled_at: Timestamp | None = None
    client_secret: Annotated[
        str | None, Meta(description="set while the first invoice needs the customer (3-D Secure)")
    ] = None


class PackageView(Body):
    id: str
    name: str
    credits: Credits
    price_cents: Cents
    currency: Currency


class PackageList(Body):
    data: list[PackageView]


class PurchaseResponse(Body):
    payment_id: str
    status: str
    credits: Credits
    client_secret: Annotated[
        str | None, Meta(description="set when the payment needs the customer (3-D Secure): finish it with Stripe.js")
    ] = None


class PaymentMethodView(Body):
    id: str
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None
    is_default: bool


class PaymentMethodList(Body):
    data: list[PaymentMethodView]


class DeletedView(Body):
    id: str
    deleted: bool


class SetupIntentView(Body):
    client_secret: str
    setup_intent_id: str


class InvoiceView(Body):
    id: str
    number: str | None
    status: str
    amount_due: Cents
    amount_paid: Cents
    currency: Currency
    period_start: Timestamp | None
    period_end: Timestamp | None
    hosted_invoice_url: str | None = None


class InvoiceList(Body):
    data: list[InvoiceView]
    has_more: bool


class PaymentView(Body):
    id: str
    amount: Cents
    currency: Currency
    status: Annotated[
        str,
        Meta(description="Stripe's PaymentIntent status, `failed`, `refunded` or `partially_refunded`"),
    ]
    description: str
    created_at: Timestamp
    credits: Credits | None = None
    amount_refunded: Cents = 0


class PaymentList(Body):
    data: list[PaymentView]
    has_more: bool


class PortalSessionView(Body):
    id: Annotated[str, Meta(description="the link's id: DELETE it to end every session it started")]
    url: Annotated[str, Meta(description="single use; opening it starts a browser session")]
    expires_at: Timestamp
    role: str
    return_url: str | None


class PortalRevokedView(Body):
    id: str
    revoked: bool


class BillingConfigView(Body):
    stripe_publishable_key: Annotated[str | None, Meta(description="null: card entry is not configured")]
    stripe_js_url: Annotated[str, Meta(description="load Stripe.js from here (localstripe's stand-in offline)")]


class WebhookAck(Body):
    received: bool


class StripeEventBody(Body, forbid_unknown_fields=False):
    """A Stripe event, signed (Stripe-Signature header): verified on the raw body."""

    id: str
    type: str
    created: int
    data: dict[str, Any]


# -- automatic top-up (issue 13) ------------------------------------------------------
TopupFailure = Literal["card_declined", "authentication_required", "cap_reached", "no_payment_method", "payment_failed"]


class AutoTopupRequest(Body):
    """When available credits fall below `threshold`, buy `package_id` with the default
    card (off-session), at most `max_per_month` times and `monthly_cap_cents` a month."""

    enabled: bool
    threshold: Credits
    package_id: CatalogId
    max_per_month: Annotated[int, Meta(ge=1, le=1000)]
    monthly_cap_cents: Annotated[int, Meta(ge=0, le=MONTHLY_CAP_CENTS_MAX, description="cents a month at most")]


class AutoTopupAttemptView(Body):
    id: str
    status: Literal["pending", "succeeded", "failed"]
    reason: TopupFailure | None
    package_id: str
    credits: Credits
    amount_cents: Cents
    currency: Currency
    available_at_trigger: Credits
    payment_id: str | None
    created_at: Timestamp
    decided_at: Timestamp | None


class AutoTopupView(Body):
    """The settings (`configured: false` and nulls when never set) and the last attempts,
    newest first. `paused_reason`: a failure stopped the top-ups; saving resumes them."""

    configured: bool
    enabled: bool
    threshold: Credits | None
    package_id: str | None
    max_per_month: int | None
    monthly_cap_cents: int | None
    paused_reason: TopupFailure | None
    attempts: list[AutoTopupAttemptView]
