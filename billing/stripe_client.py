"""`StripeGateway` on the official SDK: `stripe.StripeClient`, async over aiohttp, with
a pinned API version, a timeout on every call and bounded retries (the SDK retries
connection errors, 409 and 5xx with backoff, reusing our idempotency key).

localstripe (development and tests) answers the same calls except where it lacks a
feature; each such branch is marked `LOCALSTRIPE GAP` and listed in the README.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast

import aiohttp
import stripe

from billing.config import BillingConfig, StripeFlavor
from billing.gateway import (
    UPGRADE_INVOICE_DESCRIPTION,
    Customer,
    Invoice,
    PaymentDeclined,
    PaymentIntent,
    PaymentMethod,
    SetupIntent,
    StripeNotFound,
    StripeRejected,
    StripeUnavailable,
    Subscription,
    parse_charge,
    parse_customer,
    parse_invoice,
    parse_payment_intent,
    parse_payment_method,
    parse_setup_intent,
    parse_subscription,
)
from billing.gateway import Charge as ChargeRecord

log = logging.getLogger(__name__)

# Pinned: the version stripe-python 16.1 was generated for, spelled out so that an SDK
# upgrade cannot change the shapes we read without a code change here.
STRIPE_API_VERSION = "2026-10-28.endive"
STRIPE_CONNECT_TIMEOUT_S_MAX = 3.0
PAYMENT_METHODS_PAGE_MAX = 100


class _Dumpable(Protocol):
    def to_dict(self, recursive: bool = True, for_json: bool = False) -> dict[str, Any]: ...


class StripeClientGateway:
    """The production gateway (also used against localstripe)."""

    def __init__(self, config: BillingConfig) -> None:
        if config.stripe_secret_key is None:
            raise ValueError("STRIPE_SECRET_KEY is not set and no localstripe was started")
        self._flavor = config.stripe_flavor
        timeout = aiohttp.ClientTimeout(
            total=config.stripe_timeout_s, connect=min(STRIPE_CONNECT_TIMEOUT_S_MAX, config.stripe_timeout_s)
        )
        self._http = stripe.AIOHTTPClient(timeout=timeout)
        self._client = stripe.StripeClient(
            config.stripe_secret_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": config.stripe_api_base},
            max_network_retries=config.stripe_max_retries,
            http_client=self._http,
        )
        self._v1 = self._client.v1

    @property
    def flavor(self) -> StripeFlavor:
        return self._flavor

    @property
    def _localstripe(self) -> bool:
        return self._flavor is StripeFlavor.LOCALSTRIPE

    async def close(self) -> None:
        close_async = cast(Callable[[], Awaitable[None]], self._http.close_async)  # untyped in the SDK
        await close_async()

    async def _call(self, what: str, request: Callable[[], Awaitable[_Dumpable]]) -> dict[str, Any]:
        """One SDK call, its errors translated to the gateway's (no SDK type leaks out)."""
        try:
            result = await request()
        except stripe.CardError as exc:
            error = exc.error
            pi = getattr(error, "payment_intent", None) if error is not None else None
            raise PaymentDeclined(
                exc.user_message or "the card was declined",
                code=getattr(error, "decline_code", None) or exc.code,
                payment_intent_id=_maybe_id(pi),
            ) from exc
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise StripeUnavailable(f"{what}: {exc.user_message or exc}") from exc
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise StripeNotFound(f"{what}: {exc.user_message or 'not found'}", code=exc.code) from exc
            raise StripeRejected(f"{what}: {exc.user_message or exc}", code=exc.code, param=exc.param) from exc
        except stripe.APIError as exc:
            # localstripe answers unknown routes with a bare (non-JSON) 404.
            if exc.http_status == 404:
                raise StripeNotFound(f"{what}: not found") from exc
            raise StripeUnavailable(f"{what}: {exc.user_message or exc}") from exc
        except stripe.IdempotencyError as exc:
            raise StripeRejected(f"{what}: {exc.user_message or exc}", code="idempotency_conflict") from exc
        except stripe.StripeError as exc:  # authentication, permission: our configuration
            raise StripeRejected(f"{what}: {exc.user_message or exc}", code=exc.code) from exc
        return result.to_dict()

    # -- customers and payment methods ---------------------------------------------
    async def create_customer(
        self, *, email: str, name: str | None, metadata: Mapping[str, str], idempotency_key: str
    ) -> Customer:
        params: stripe.params.CustomerCreateParams = {"email": email, "metadata": dict(metadata)}
        if name:
            params["name"] = name
        obj = await self._call(
            "create customer",
            lambda: self._v1.customers.create_async(params, {"idempotency_key": idempotency_key}),
        )
        return parse_customer(obj)

    async def retrieve_customer(self, customer_id: str) -> Customer:
        obj = await self._call("retrieve customer", lambda: self._v1.customers.retrieve_async(customer_id))
        return parse_customer(obj)

    async def set_default_payment_method(
        self, customer_id: str, payment_method_id: str | None, *, idempotency_key: str
    ) -> Customer:
        obj = await self._call(
            "update customer",
            lambda: self._v1.customers.update_async(
                customer_id,
                {"invoice_settings": {"default_payment_method": payment_method_id or ""}},
                {"idempotency_key": idempotency_key},
            ),
        )
        return parse_customer(obj)

    async def retrieve_payment_method(self, payment_method_id: str) -> PaymentMethod:
        obj = await self._call(
            "retrieve payment method", lambda: self._v1.payment_methods.retrieve_async(payment_method_id)
        )
        return parse_payment_method(obj)

    async def attach_payment_method(
        self, payment_method_id: str, customer_id: str, *, idempotency_key: str
    ) -> PaymentMethod:
        obj = await self._call(
            "attach payment method",
            lambda: self._v1.payment_methods.attach_async(
                payment_method_id, {"customer": customer_id}, {"idempotency_key": idempotency_key}
            ),
        )
        return parse_payment_method(obj)

    async def detach_payment_method(self, payment_method_id: str, *, idempotency_key: str) -> PaymentMethod:
        obj = await self._call(
            "detach payment method",
            lambda: self._v1.payment_methods.detach_async(
                payment_method_id, None, {"idempotency_key": idempotency_key}
            ),
        )
        return parse_payment_method(obj)

    async def list_payment_methods(self, customer_id: str) -> list[PaymentMethod]:
        # LOCALSTRIPE GAP: `type` is required there (optional on Stripe); cards only here.
        obj = await self._call(
            "list payment methods",
            lambda: self._v1.payment_methods.list_async(
                {"customer": customer_id, "type": "card", "limit": PAYMENT_METHODS_PAGE_MAX}
            ),
        )
        data = obj.get("data")
        return [parse_payment_method(pm) for pm in data if isinstance(pm, Mapping)] if isinstance(data, list) else []

    async def create_setup_intent(
        self, customer_id: str, *, metadata: Mapping[str, str], idempotency_key: str
    ) -> SetupIntent:
        params: stripe.params.SetupIntentCreateParams = {
            "customer": customer_id,
            "usage": "off_session",
            "metadata": dict(metadata),
        }
        if not self._localstripe:  # LOCALSTRIPE GAP: it knows only the older payment_method_types
            params["allowed_payment_method_types"] = ["card"]
        obj = await self._call(
            "create setup intent",
            lambda: self._v1.setup_intents.create_async(params, {"idempotency_key": idempotency_key}),
        )
        return parse_setup_intent(obj)

    # -- one-time payments -----------------------------------------------------------
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
    ) -> PaymentIntent:
        params: stripe.params.PaymentIntentCreateParams = {
            "amount": amount,
            "currency": currency,
            "customer": customer_id,
            "payment_method": payment_method_id,
            "confirm": True,
            "metadata": dict(metadata),
        }
        if off_session and not self._localstripe:
            # The customer is not there (an automatic top-up): a card that needs them
            # fails with authentication_required instead of asking. LOCALSTRIPE GAP: it
            # refuses the parameter; its 3-D Secure cards answer requires_action instead.
            params["off_session"] = True
        if not self._localstripe:
            # Cards only: no redirect-based methods, so no return_url is needed.
            # LOCALSTRIPE GAP: it knows neither allowed_payment_method_types nor a
            # PaymentIntent description (cards are all it has anyway).
            params["allowed_payment_method_types"] = ["card"]
            params["description"] = description
        obj = await self._call(
            "create payment intent",
            lambda: self._v1.payment_intents.create_async(params, {"idempotency_key": idempotency_key}),
        )
        return parse_payment_intent(obj)

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntent:
        obj = await self._call(
            "retrieve payment intent", lambda: self._v1.payment_intents.retrieve_async(payment_intent_id)
        )
        return parse_payment_intent(obj)

    async def invoice_for_payment_intent(self, payment_intent_id: str) -> str | None:
        pi = await self.retrieve_payment_intent(payment_intent_id)
        if pi.invoice is not None or self._localstripe:
            return pi.invoice  # the 2017-08-15 shape has payment_intent.invoice
        obj = await self._call(
            "list invoice payments",
            lambda: self._v1.invoice_payments.list_async(
                {"payment": {"type": "payment_intent", "payment_intent": payment_intent_id}, "limit": 1}
            ),
        )
        data = obj.get("data")
        if isinstance(data, list) and data and isinstance(data[0], Mapping):
            invoice = data[0].get("invoice")
            return _maybe_id(invoice)
        return None

    # -- subscriptions and invoices ----------------------------------------------------
    async def create_subscription(
        self,
        *,
        customer_id: str,
        price_id: str,
        payment_method_id: str | None,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> Subscription:
        params: stripe.params.SubscriptionCreateParams = {
            "customer": customer_id,
            "metadata": dict(metadata),
            "payment_behavior": "allow_incomplete",
        }
        if self._localstripe:
            # LOCALSTRIPE GAP: no Prices API (the catalog holds Plan ids there), no
            # `default_payment_method` on subscriptions (the customer's default pays),
            # and the old invoice shape carries the PaymentIntent (for its client_secret).
            params["items"] = [{"plan": price_id}]
            params["expand"] = ["latest_invoice.payment_intent"]
        else:
            params["items"] = [{"price": price_id}]
            params["expand"] = ["latest_invoice.confirmation_secret", "latest_invoice.payments"]
            if payment_method_id is not None:
                params["default_payment_method"] = payment_method_id
        obj = await self._call(
            "create subscription",
            lambda: self._v1.subscriptions.create_async(params, {"idempotency_key": idempotency_key}),
        )
        return parse_subscription(obj)

    async def retrieve_subscription(self, subscription_id: str) -> Subscription:
        obj = await self._call("retrieve subscription", lambda: self._v1.subscriptions.retrieve_async(subscription_id))
        return parse_subscription(obj)

    async def change_subscription_price(
        self, subscription: Subscription, *, price_id: str, upgrade: bool, idempotency_key: str
    ) -> tuple[Subscription, Invoice | None]:
        item = subscription.item
        if item is None:
            raise StripeRejected(f"subscription {subscription.id} has no item to change")
        if not self._localstripe:
            params: stripe.params.SubscriptionUpdateParams = {
                "items": [{"id": item, "price": price_id}],
                # An upgrade is invoiced and paid now for the rest of the period, or
                # refused (402) with the subscription unchanged; a downgrade waits for
                # the next invoice, with no credit for the unused time.
                "proration_behavior": "always_invoice" if upgrade else "none",
                "payment_behavior": "error_if_incomplete" if upgrade else "allow_incomplete",
                "expand": ["latest_invoice.payments"],
            }
            obj = await self._call(
                "update subscription",
                lambda: self._v1.subscriptions.update_async(
                    subscription.id, params, {"idempotency_key": idempotency_key}
                ),
            )
            changed = parse_subscription(obj)
            fresh = (
                changed.latest_invoice
                if upgrade and changed.latest_invoice_id != subscription.latest_invoice_id
                else None
            )
            return changed, fresh
        # LOCALSTRIPE GAP: no proration_behavior / payment_behavior on updates (a 500).
        # It always books the whole previous invoice as negative "Unused time" items and
        # never invoices them; we invoice them now for an upgrade (what always_invoice
        # does) and drop them for a downgrade (what proration_behavior=none does). A
        # declined upgrade payment leaves the plan switched there (Stripe refuses it).
        obj = await self._call(
            "update subscription",
            lambda: self._v1.subscriptions.update_async(
                subscription.id,
                {"items": [{"id": item, "plan": price_id}]},
                {"idempotency_key": idempotency_key},
            ),
        )
        changed = parse_subscription(obj)
        if not upgrade:
            await self._drop_pending_prorations(subscription.customer)
            return changed, None
        created = await self._call(
            "create invoice",
            lambda: self._v1.invoices.create_async(
                {
                    "customer": subscription.customer,
                    "subscription": subscription.id,
                    "description": UPGRADE_INVOICE_DESCRIPTION,
                },
                {"idempotency_key": f"{idempotency_key}:invoice"},
            ),
        )
        invoice_id = str(created["id"])
        paid = await self._call(
            "pay invoice",
            lambda: self._v1.invoices.pay_async(invoice_id, None, {"idempotency_key": f"{idempotency_key}:pay"}),
        )
        return changed, parse_invoice(paid)

    async def _drop_pending_prorations(self, customer_id: str) -> None:
        pending = await self._call(
            "list invoice items", lambda: self._v1.invoice_items.list_async({"customer": customer_id, "limit": 100})
        )
        data = pending.get("data")
        for item in data if isinstance(data, list) else []:
            if isinstance(item, Mapping) and item.get("proration") and item.get("invoice") is None:
                await self._delete_invoice_item(str(item["id"]))

    async def _delete_invoice_item(self, item_id: str) -> None:
        await self._call("delete invoice item", lambda: self._v1.invoice_items.delete_async(item_id))

    async def cancel_subscription(
        self, subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> Subscription:
        if at_period_end:
            obj = await self._call(
                "update subscription",
                lambda: self._v1.subscriptions.update_async(
                    subscription_id, {"cancel_at_period_end": True}, {"idempotency_key": idempotency_key}
                ),
            )
        else:
            obj = await self._call(
                "cancel subscription",
                lambda: self._v1.subscriptions.cancel_async(
                    subscription_id, None, {"idempotency_key": idempotency_key}
                ),
            )
        return parse_subscription(obj)

    async def resume_subscription(self, subscription_id: str, *, idempotency_key: str) -> Subscription:
        obj = await self._call(
            "update subscription",
            lambda: self._v1.subscriptions.update_async(
                subscription_id, {"cancel_at_period_end": False}, {"idempotency_key": idempotency_key}
            ),
        )
        return parse_subscription(obj)

    async def retrieve_invoice(self, invoice_id: str) -> Invoice:
        if self._localstripe:  # LOCALSTRIPE GAP: no invoice.payments (it has invoice.payment_intent)
            obj = await self._call("retrieve invoice", lambda: self._v1.invoices.retrieve_async(invoice_id))
        else:
            obj = await self._call(
                "retrieve invoice",
                lambda: self._v1.invoices.retrieve_async(invoice_id, {"expand": ["payments"]}),
            )
        return parse_invoice(obj)

    # -- refunds -------------------------------------------------------------------------
    async def retrieve_charge(self, charge_id: str) -> ChargeRecord:
        obj = await self._call(
            "retrieve charge", lambda: self._v1.charges.retrieve_async(charge_id, {"expand": ["refunds"]})
        )
        return parse_charge(obj)

    # -- catalog -------------------------------------------------------------------------
    async def ensure_product(self, *, product_id: str, name: str, description: str, metadata: Mapping[str, str]) -> str:
        """The product with our own id, created when missing (idempotent)."""
        try:
            obj = await self._call("retrieve product", lambda: self._v1.products.retrieve_async(product_id))
            return str(obj["id"])
        except StripeNotFound:
            pass
        try:
            obj = await self._call(
                "create product",
                lambda: self._v1.products.create_async(
                    {"id": product_id, "name": name, "description": description, "metadata": dict(metadata)},
                    {"idempotency_key": f"catalog-product:{product_id}"},
                ),
            )
        except StripeRejected:
            # Created by another process between our two calls: it exists now.
            obj = await self._call("retrieve product", lambda: self._v1.products.retrieve_async(product_id))
        return str(obj["id"])

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
    ) -> str:
        """A recurring price for the product with this amount, created when missing.

        Prices are immutable, so the lookup key names the amount: a new catalog price
        makes a new Stripe price and leaves the old one to existing subscriptions."""
        if self._localstripe:
            return await self._ensure_plan(product_id, lookup_key, amount, currency, interval, metadata)
        if known_price_id is not None:
            try:
                obj = await self._call("retrieve price", lambda: self._v1.prices.retrieve_async(known_price_id))
                if obj.get("lookup_key") == lookup_key and obj.get("active"):
                    return known_price_id
            except StripeNotFound:
                pass
        found = await self._call(
            "list prices", lambda: self._v1.prices.list_async({"lookup_keys": [lookup_key], "active": True, "limit": 1})
        )
        data = found.get("data")
        if isinstance(data, list) and data and isinstance(data[0], Mapping):
            return str(data[0]["id"])
        obj = await self._call(
            "create price",
            lambda: self._v1.prices.create_async(
                {
                    "product": product_id,
                    "unit_amount": amount,
                    "currency": currency,
                    "recurring": {"interval": "year" if interval == "year" else "month"},
                    "lookup_key": lookup_key,
                    "transfer_lookup_key": True,
                    "metadata": dict(metadata),
                },
                {"idempotency_key": f"catalog-price:{lookup_key}"},
            ),
        )
        return str(obj["id"])

    async def _ensure_plan(
        self, product_id: str, plan_id: str, amount: int, currency: str, interval: str, metadata: Mapping[str, str]
    ) -> str:
        # LOCALSTRIPE GAP: no Prices API; a Plan (the older form of a recurring price,
        # which accepts our own id) stands in for it.
        try:
            obj = await self._call("retrieve plan", lambda: self._v1.plans.retrieve_async(plan_id))
            return str(obj["id"])
        except StripeNotFound:
            pass
        obj = await self._call(
            "create plan",
            lambda: self._v1.plans.create_async(
                {
                    "id": plan_id,
                    "product": product_id,
                    "amount": amount,
                    "currency": currency,
                    "interval": "year" if interval == "year" else "month",
                    "metadata": dict(metadata),
                },
                {"idempotency_key": f"catalog-plan:{plan_id}"},
            ),
        )
        return str(obj["id"])


def _maybe_id(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    inner = getattr(value, "id", None)
    if isinstance(inner, str):
        return inner
    if isinstance(value, Mapping):
        raw = value.get("id")
        return raw if isinstance(raw, str) else None
    return None
