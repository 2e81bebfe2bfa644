"""The one typed door between billing logic and Stripe.

Billing code sees `StripeGateway` (a Protocol) and the small frozen records below,
never the SDK: billing/stripe_client.py implements the Protocol with the official
StripeClient. The records are parsed from plain mappings by the `parse_*` functions,
which read both API shapes we meet: the pinned current version we send, and the
2017-08-15 shapes localstripe speaks (and that webhook endpoints created long ago still
receive), e.g. `invoice.subscription` vs `invoice.parent.subscription_details.subscription`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from billing.config import StripeFlavor
from core.errors import OutcomeUnknown

# The description of the invoice billing creates itself for an upgrade where Stripe
# cannot (localstripe); it marks the invoice as an upgrade's even when the webhook for
# it arrives before our own record of it.
UPGRADE_INVOICE_DESCRIPTION = "Plan upgrade: the rest of the current period"


# -- errors ------------------------------------------------------------------------
class StripeError(Exception):
    """Base of every failure the gateway reports."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class StripeUnavailable(StripeError, OutcomeUnknown):
    """Stripe could not be reached or failed (after the bounded retries); the request
    may or may not have taken effect, so callers retry with the same idempotency key.
    (An OutcomeUnknown: answered as a 503 that says so; StripeError.__init__ reaches
    OutcomeUnknown's through the method order.)"""


class StripeNotFound(StripeError):
    """The object does not exist (or not in this account)."""


class PaymentDeclined(StripeError):
    """The card was declined: nothing was charged."""

    def __init__(self, message: str, *, code: str | None = None, payment_intent_id: str | None = None) -> None:
        super().__init__(message, code=code or "card_declined")
        self.payment_intent_id = payment_intent_id


class StripeRejected(StripeError):
    """Stripe refused the request as invalid (a bug of ours, or a bad id from a client)."""


# -- records -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    email: str | None
    name: str | None
    default_payment_method: str | None


@dataclass(frozen=True, slots=True)
class PaymentMethod:
    id: str
    customer: str | None
    type: str
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None
    created: int


@dataclass(frozen=True, slots=True)
class PaymentIntent:
    id: str
    status: str
    amount: int
    currency: str
    customer: str | None
    client_secret: str | None
    metadata: Mapping[str, str]
    latest_charge: str | None
    invoice: str | None  # old API shapes only; see StripeGateway.invoice_for_payment_intent
    created: int
    failure_code: str | None
    failure_message: str | None


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    product: str | None
    price: str | None  # a Price id (current API) or a Plan id (localstripe)
    amount: int
    period_start: int | None
    period_end: int | None
    proration: bool
    subscription_item: bool  # True: a subscription line, False: an invoice item


@dataclass(frozen=True, slots=True)
class Invoice:
    id: str
    customer: str | None
    subscription: str | None
    status: str
    number: str | None
    amount_due: int
    amount_paid: int
    currency: str
    hosted_invoice_url: str | None
    payment_intent: str | None
    billing_reason: str | None
    description: str | None
    created: int
    period_start: int | None
    period_end: int | None
    lines: tuple[InvoiceLine, ...]
    client_secret: str | None  # to finish a payment that needs the customer (3-D Secure)

    def plan_line(self) -> InvoiceLine | None:
        """The line that says which plan (and period) the invoice pays for: the regular
        subscription line, else (a proration invoice) the largest positive priced line."""
        priced = [line for line in self.lines if line.price or line.product]
        for line in priced:
            if line.subscription_item and not line.proration:
                return line
        positive = [line for line in priced if line.amount > 0]
        return max(positive, key=lambda line: line.amount) if positive else None


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    customer: str
    status: str
    product: str | None
    price: str | None
    item: str | None
    current_period_start: int | None
    current_period_end: int | None
    cancel_at_period_end: bool
    canceled_at: int | None
    ended_at: int | None
    created: int
    latest_invoice_id: str | None
    latest_invoice: Invoice | None  # when the reply expanded it
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Refund:
    id: str
    amount: int
    status: str


@dataclass(frozen=True, slots=True)
class Charge:
    id: str
    customer: str | None
    payment_intent: str | None
    amount: int
    amount_refunded: int
    currency: str
    status: str
    refunds: tuple[Refund, ...]


@dataclass(frozen=True, slots=True)
class Dispute:
    id: str
    charge: str | None
    payment_intent: str | None
    amount: int
    currency: str
    status: str


@dataclass(frozen=True, slots=True)
class SetupIntent:
    id: str
    client_secret: str
    status: str


# -- the interface -----------------------------------------------------------------
class StripeGateway(Protocol):
    """Every Stripe call billing makes. Each POST carries an idempotency key."""

    @property
    def flavor(self) -> StripeFlavor: ...

    async def close(self) -> None: ...

    # customers and payment methods
    async def create_customer(
        self, *, email: str, name: str | None, metadata: Mapping[str, str], idempotency_key: str
    ) -> Customer: ...

    async def retrieve_customer(self, customer_id: str) -> Customer: ...

    async def set_default_payment_method(
        self, customer_id: str, payment_method_id: str | None, *, idempotency_key: str
    ) -> Customer: ...

    async def retrieve_payment_method(self, payment_method_id: str) -> PaymentMethod: ...

    async def attach_payment_method(
        self, payment_method_id: str, customer_id: str, *, idempotency_key: str
    ) -> PaymentMethod: ...

    async def detach_payment_method(self, payment_method_id: str, *, idempotency_key: str) -> PaymentMethod: ...

    async def list_payment_methods(self, customer_id: str) -> list[PaymentMethod]: ...

    async def create_setup_intent(
        self, customer_id: str, *, metadata: Mapping[str, str], idempotency_key: str
    ) -> SetupIntent: ...

    # one-time payments
    async def create_payment_intent(
        self,
        *,
        customer_id: str,
        payment_method_id: str,
        amount: int,
        currency: str,
        description: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
        off_session: bool = False,
    ) -> PaymentIntent: ...

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntent: ...

    async def invoice_for_payment_intent(self, payment_intent_id: str) -> str | None: ...

    # subscriptions and invoices
    async def create_subscription(
        self,
        *,
        customer_id: str,
        price_id: str,
        payment_method_id: str | None,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> Subscription: ...

    async def retrieve_subscription(self, subscription_id: str) -> Subscription: ...

    async def change_subscription_price(
        self, subscription: Subscription, *, price_id: str, upgrade: bool, idempotency_key: str
    ) -> tuple[Subscription, Invoice | None]:
        """Switch the plan. An upgrade is invoiced at once for the rest of the period (the
        returned invoice, paid or not); a downgrade takes effect without proration."""
        ...

    async def cancel_subscription(
        self, subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> Subscription: ...

    async def resume_subscription(self, subscription_id: str, *, idempotency_key: str) -> Subscription:
        """Undo a cancellation at period end (the subscription renews again)."""
        ...

    async def retrieve_invoice(self, invoice_id: str) -> Invoice: ...

    # refunds
    async def retrieve_charge(self, charge_id: str) -> Charge: ...

    # catalog
    async def ensure_product(
        self, *, product_id: str, name: str, description: str, metadata: Mapping[str, str]
    ) -> str: ...

    async def ensure_recurring_price(
        self,
        *,
        product_id: str,
        lookup_key: str,
        amount: int,
        currency: str,
        interval: str,
        known_price_id: str | None,
        metadata: Mapping[str, str],
    ) -> str: ...


# -- parsing (both API shapes) -------------------------------------------------------
def object_id(value: Any) -> str | None:
    """An object's id whether the field holds the id or the expanded object."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        inner = value.get("id")
        return inner if isinstance(inner, str) and inner else None
    return None


def dig(value: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    return value if isinstance(value, int) else None


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


def _list(value: Any) -> Sequence[Any]:
    data = dig(value, "data") if isinstance(value, Mapping) else value
    return data if isinstance(data, list) else []


def _required(obj: Mapping[str, Any], key: str, kind: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} without {key}")
    return value


def parse_customer(obj: Mapping[str, Any]) -> Customer:
    return Customer(
        id=_required(obj, "id", "customer"),
        email=_str(obj.get("email")),
        name=_str(obj.get("name")),
        default_payment_method=object_id(dig(obj, "invoice_settings", "default_payment_method")),
    )


def parse_payment_method(obj: Mapping[str, Any]) -> PaymentMethod:
    card = obj.get("card")
    card = card if isinstance(card, Mapping) else {}
    return PaymentMethod(
        id=_required(obj, "id", "payment method"),
        customer=object_id(obj.get("customer")),
        type=_str(obj.get("type")) or "card",
        brand=_str(card.get("brand")),
        last4=_str(card.get("last4")),
        exp_month=_int(card.get("exp_month")),
        exp_year=_int(card.get("exp_year")),
        created=_int(obj.get("created")) or 0,
    )


def parse_payment_intent(obj: Mapping[str, Any]) -> PaymentIntent:
    charge = object_id(obj.get("latest_charge"))
    if charge is None:  # versions before 2022-11-15 list charges instead
        charges = _list(obj.get("charges"))
        charge = object_id(charges[-1]) if charges else None
    error = obj.get("last_payment_error")
    error = error if isinstance(error, Mapping) else {}
    return PaymentIntent(
        id=_required(obj, "id", "payment intent"),
        status=_str(obj.get("status")) or "requires_payment_method",
        amount=_int(obj.get("amount")) or 0,
        currency=_str(obj.get("currency")) or "usd",
        customer=object_id(obj.get("customer")),
        client_secret=_str(obj.get("client_secret")),
        metadata=_metadata(obj.get("metadata")),
        latest_charge=charge,
        invoice=object_id(obj.get("invoice")),
        created=_int(obj.get("created")) or 0,
        failure_code=_str(error.get("decline_code")) or _str(error.get("code")),
        failure_message=_str(error.get("message")),
    )


def _line(obj: Mapping[str, Any]) -> InvoiceLine:
    price_obj = obj.get("price") or obj.get("plan")
    price = object_id(price_obj) or _str(dig(obj, "pricing", "price_details", "price"))
    product = object_id(dig(price_obj, "product")) or _str(dig(obj, "pricing", "price_details", "product"))
    parent_type = _str(dig(obj, "parent", "type"))
    if parent_type is not None:  # 2025-03-31 and later
        subscription_item = parent_type == "subscription_item_details"
        details = dig(obj, "parent", parent_type)
        proration = bool(dig(details, "proration"))
    else:
        subscription_item = obj.get("type") == "subscription"
        proration = bool(obj.get("proration"))
    return InvoiceLine(
        product=product,
        price=price,
        amount=_int(obj.get("amount")) or 0,
        period_start=_int(dig(obj, "period", "start")),
        period_end=_int(dig(obj, "period", "end")),
        proration=proration,
        subscription_item=subscription_item,
    )


def parse_invoice(obj: Mapping[str, Any]) -> Invoice:
    subscription = object_id(obj.get("subscription")) or object_id(
        dig(obj, "parent", "subscription_details", "subscription")
    )
    pi_field = obj.get("payment_intent")
    payment_intent = object_id(pi_field)
    client_secret = _str(dig(obj, "confirmation_secret", "client_secret"))
    if isinstance(pi_field, Mapping):
        client_secret = client_secret or _str(pi_field.get("client_secret"))
    if payment_intent is None:  # 2025-03-31 and later: invoice.payments (when expanded)
        for payment in _list(obj.get("payments")):
            if dig(payment, "payment", "type") == "payment_intent":
                payment_intent = object_id(dig(payment, "payment", "payment_intent"))
                if payment_intent:
                    break
    lines = tuple(_line(line) for line in _list(obj.get("lines")) if isinstance(line, Mapping))
    invoice = Invoice(
        id=_required(obj, "id", "invoice"),
        customer=object_id(obj.get("customer")),
        subscription=subscription,
        status=_str(obj.get("status")) or "draft",
        number=_str(obj.get("number")),
        amount_due=_int(obj.get("amount_due")) or 0,
        amount_paid=_int(obj.get("amount_paid")) or 0,
        currency=_str(obj.get("currency")) or "usd",
        hosted_invoice_url=_str(obj.get("hosted_invoice_url")),
        payment_intent=payment_intent,
        billing_reason=_str(obj.get("billing_reason")),
        description=_str(obj.get("description")),
        created=_int(obj.get("created")) or _int(obj.get("date")) or 0,
        period_start=_int(obj.get("period_start")),
        period_end=_int(obj.get("period_end")),
        lines=lines,
        client_secret=client_secret,
    )
    line = invoice.plan_line()
    if line is not None and line.period_start is not None and line.period_end is not None:
        # The subscription line's period is the one paid for; the invoice's own
        # period_start/end is the previous period on Stripe.
        invoice = replace(invoice, period_start=line.period_start, period_end=line.period_end)
    return invoice


def parse_subscription(obj: Mapping[str, Any]) -> Subscription:
    items = _list(obj.get("items"))
    first = items[0] if items and isinstance(items[0], Mapping) else {}
    price_obj = first.get("price") or first.get("plan")
    latest = obj.get("latest_invoice")
    return Subscription(
        id=_required(obj, "id", "subscription"),
        customer=object_id(obj.get("customer")) or "",
        status=_str(obj.get("status")) or "incomplete",
        product=object_id(dig(price_obj, "product")),
        price=object_id(price_obj),
        item=_str(first.get("id")),
        current_period_start=_int(obj.get("current_period_start")) or _int(first.get("current_period_start")),
        current_period_end=_int(obj.get("current_period_end")) or _int(first.get("current_period_end")),
        cancel_at_period_end=bool(obj.get("cancel_at_period_end")),
        canceled_at=_int(obj.get("canceled_at")),
        ended_at=_int(obj.get("ended_at")),
        created=_int(obj.get("created")) or _int(obj.get("start_date")) or 0,
        latest_invoice_id=object_id(latest),
        latest_invoice=parse_invoice(latest) if isinstance(latest, Mapping) else None,
        metadata=_metadata(obj.get("metadata")),
    )


def parse_refund(obj: Mapping[str, Any]) -> Refund:
    return Refund(
        id=_required(obj, "id", "refund"),
        amount=_int(obj.get("amount")) or 0,
        status=_str(obj.get("status")) or "succeeded",
    )


def parse_charge(obj: Mapping[str, Any]) -> Charge:
    return Charge(
        id=_required(obj, "id", "charge"),
        customer=object_id(obj.get("customer")),
        payment_intent=object_id(obj.get("payment_intent")),
        amount=_int(obj.get("amount")) or 0,
        amount_refunded=_int(obj.get("amount_refunded")) or 0,
        currency=_str(obj.get("currency")) or "usd",
        status=_str(obj.get("status")) or "pending",
        refunds=tuple(parse_refund(r) for r in _list(obj.get("refunds")) if isinstance(r, Mapping)),
    )


def parse_dispute(obj: Mapping[str, Any]) -> Dispute:
    return Dispute(
        id=_required(obj, "id", "dispute"),
        charge=object_id(obj.get("charge")),
        payment_intent=object_id(obj.get("payment_intent")),
        amount=_int(obj.get("amount")) or 0,
        currency=_str(obj.get("currency")) or "usd",
        status=_str(obj.get("status")) or "needs_response",
    )


def parse_setup_intent(obj: Mapping[str, Any]) -> SetupIntent:
    return SetupIntent(
        id=_required(obj, "id", "setup intent"),
        client_secret=_required(obj, "client_secret", "setup intent"),
        status=_str(obj.get("status")) or "requires_payment_method",
    )
