"""What each Stripe event does, run by the worker (never in the HTTP request).

Every handler converges on Stripe's true state whatever the order or number of
deliveries: subscriptions, invoices and charges are fetched from Stripe again (the
event's copy may be older than what we already hold; an `updated` may come before its
`created`), the mirrors only move forward, and grants and clawbacks are exactly once
(billing/credits.py). Payment intents are taken from the event itself: their statuses
are ordered, and a later delivery can only move the mirror forward.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from billing.actions import BillingActions
from billing.catalog import Catalog
from billing.credits import Credits, RetryLater
from billing.gateway import (
    Invoice,
    StripeGateway,
    StripeNotFound,
    Subscription,
    parse_dispute,
    parse_invoice,
    parse_payment_intent,
    parse_subscription,
)
from billing.store import BillingStore

log = logging.getLogger(__name__)

SUBSCRIPTION_LOCK_TTL_S = 30.0

Handler = Callable[[str, Mapping[str, Any]], Awaitable[None]]


class EventHandlers:
    def __init__(
        self,
        *,
        store: BillingStore,
        credits: Credits,
        catalog: Catalog,
        gateway: StripeGateway,
        actions: BillingActions,
    ) -> None:
        self.store = store
        self.credits = credits
        self.catalog = catalog
        self.gateway = gateway
        self.actions = actions
        self._by_type: dict[str, Handler] = {}
        for kind in ("succeeded", "payment_failed", "processing", "requires_action", "canceled"):
            self._by_type[f"payment_intent.{kind}"] = self.payment_intent
        for kind in ("created", "finalized", "updated", "paid", "payment_succeeded", "voided", "marked_uncollectible"):
            self._by_type[f"invoice.{kind}"] = self.invoice
        self._by_type["invoice.payment_failed"] = self.invoice_failed
        for kind in ("created", "updated", "deleted", "paused", "resumed"):
            self._by_type[f"customer.subscription.{kind}"] = self.subscription
        self._by_type["charge.refunded"] = self.charge_refunded
        self._by_type["charge.dispute.closed"] = self.dispute_closed
        for kind in ("payment_method.attached", "payment_method.detached", "payment_method.updated"):
            self._by_type[kind] = self.payment_methods
        self._by_type["setup_intent.succeeded"] = self.payment_methods
        self._by_type["customer.updated"] = self.payment_methods

    async def handle(self, org: str, event_type: str, obj: Mapping[str, Any]) -> bool:
        """Process one event; False when billing does not act on this type."""
        handler = self._by_type.get(event_type)
        if handler is None:
            return False
        await handler(org, obj)
        return True

    async def payment_intent(self, org: str, obj: Mapping[str, Any]) -> None:
        await self.credits.settle_payment(org, parse_payment_intent(obj))

    async def invoice(self, org: str, obj: Mapping[str, Any]) -> None:
        invoice: Invoice
        try:
            invoice = await self.gateway.retrieve_invoice(str(obj.get("id")))
        except StripeNotFound:
            invoice = parse_invoice(obj)  # deleted drafts: the event's copy is all there is
        await self.credits.settle_invoice(org, invoice)

    async def invoice_failed(self, org: str, obj: Mapping[str, Any]) -> None:
        """A failed payment also moves its subscription (past_due, or ended): not every
        server says so with an event of its own (localstripe does not), so fetch it."""
        await self.invoice(org, obj)
        subscription = parse_invoice(obj).subscription
        if subscription is not None:
            await self.subscription(org, {"id": subscription})

    async def subscription(self, org: str, obj: Mapping[str, Any]) -> None:
        # One subscription writer at a time per organization (the API holds the same
        # lease while it changes the plan), so an older fetch cannot overwrite a newer one.
        if not await self.store.lock_subscriptions(org, ttl_s=SUBSCRIPTION_LOCK_TTL_S):
            raise RetryLater("a subscription change is in progress")
        try:
            sub: Subscription
            try:
                sub = await self.gateway.retrieve_subscription(str(obj.get("id")))
            except StripeNotFound:
                if obj.get("object") != "subscription":
                    return  # nothing to go on: neither Stripe nor the event has it
                sub = parse_subscription(obj)
            plan = await self.catalog.plan_for(product_id=sub.product, price_id=sub.price)
            await self.store.save_subscription(org, sub, plan.id if plan else None)
        finally:
            await self.store.unlock_subscriptions(org)

    async def charge_refunded(self, org: str, obj: Mapping[str, Any]) -> None:
        charge = await self.gateway.retrieve_charge(str(obj.get("id")))
        await self.credits.clawback_refunds(org, charge)

    async def dispute_closed(self, org: str, obj: Mapping[str, Any]) -> None:
        dispute = parse_dispute(obj)
        if dispute.charge is None:
            log.error("dispute_without_charge", extra={"dispute": dispute.id})
            return
        charge = await self.gateway.retrieve_charge(dispute.charge)
        await self.credits.clawback_dispute(org, dispute, charge)

    async def payment_methods(self, org: str, obj: Mapping[str, Any]) -> None:
        await self.actions.refresh_payment_methods(org)
