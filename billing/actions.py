"""What an organization does with billing: its customer, cards, subscription and
credit purchases. Each action checks ownership against the organization's own mirror
(row-level security), calls Stripe through the gateway with an idempotency key derived
from the caller's, and hands what Stripe answered to billing/credits.py, which grants.

Errors are the API's (`ApiError`): the handlers are thin, so the rules live here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from api.errors import ApiError
from billing.catalog import Catalog, Package, Plan
from billing.credits import Credits, PurchaseMetadata
from billing.gateway import PaymentDeclined, SetupIntent, StripeGateway, StripeNotFound, StripeRejected
from billing.store import BillingStore, CustomerRow, PaymentMethodRow, PaymentRow, SubscriptionRow
from core.money import to_credits

log = logging.getLogger(__name__)

SUBSCRIPTION_LOCK_TTL_S = 60.0
# A webhook holds the same lease for one Stripe fetch and one row write: a caller waits
# that out instead of getting a 409 for a change nobody else asked for.
SUBSCRIPTION_LOCK_WAIT_S = 5.0
FINAL_PAYMENT_STATUSES = ("succeeded", "canceled")


def not_found(what: str, param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}", param)


def no_default_card() -> ApiError:
    return ApiError(
        400,
        "invalid_request",
        "the customer has no default payment method: send payment_method_id, or add a card first"
        " (POST /api/billing/payment-methods)",
        "$.payment_method_id",
    )


def declined(exc: PaymentDeclined) -> ApiError:
    return ApiError(402, exc.code or "card_declined", f"payment declined: {exc.message}; nothing was charged")


@dataclass(frozen=True, slots=True)
class Purchase:
    payment: PaymentRow
    package: Package
    client_secret: str | None


@dataclass(frozen=True, slots=True)
class Subscribed:
    subscription: SubscriptionRow
    client_secret: str | None


class BillingActions:
    def __init__(self, *, store: BillingStore, credits: Credits, catalog: Catalog, gateway: StripeGateway) -> None:
        self.store = store
        self.credits = credits
        self.catalog = catalog
        self.gateway = gateway

    # -- customer ------------------------------------------------------------------------
    async def customer(self, org: str) -> CustomerRow:
        row = await self.store.customer(org)
        if row is None or row.stripe_customer_id is None:
            raise not_found("customer: create it with POST /api/billing/customer")
        return row

    async def create_customer(self, org: str, *, email: str, name: str | None) -> CustomerRow:
        """The organization's one Stripe customer; a second call returns the first."""
        row = await self.store.claim_customer(org, email=email, name=name)
        if row.stripe_customer_id is not None:
            return row
        created = await self.gateway.create_customer(
            email=row.email, name=row.name, metadata={"organization_id": org}, idempotency_key=row.creation_key
        )
        return await self.store.customer_created(org, created.id)

    async def _customer_for_payments(self, org: str) -> tuple[CustomerRow, str]:
        row = await self.store.customer(org)
        if row is None or row.stripe_customer_id is None:
            raise ApiError(409, "customer_required", "create the customer first: POST /api/billing/customer")
        return row, row.stripe_customer_id

    # -- payment methods -------------------------------------------------------------------
    async def _own_payment_method(self, org: str, payment_method_id: str, param: str) -> PaymentMethodRow:
        """The card, attached to this organization's customer if it is free; a card of
        another customer is `not found` (its existence is not revealed)."""
        known = await self.store.payment_method(org, payment_method_id)
        if known is not None:
            return known
        _, customer_id = await self._customer_for_payments(org)
        try:
            method = await self.gateway.retrieve_payment_method(payment_method_id)
        except StripeNotFound:
            raise not_found("payment method", param) from None
        if method.customer is None:
            try:
                method = await self.gateway.attach_payment_method(
                    payment_method_id, customer_id, idempotency_key=f"attach:{org}:{payment_method_id}"
                )
            except PaymentDeclined as exc:
                raise declined(exc) from None
            except StripeRejected as exc:
                raise ApiError(400, "invalid_request", exc.message, param) from None
        elif method.customer != customer_id:
            raise not_found("payment method", param)
        await self.store.save_payment_method(org, customer_id, method)
        row = await self.store.payment_method(org, payment_method_id)
        if row is None:  # saved just above, in this organization
            raise LookupError(f"payment method {payment_method_id} vanished")
        return row

    async def payment_methods(self, org: str) -> tuple[list[PaymentMethodRow], str | None]:
        customer = await self.store.customer(org)
        rows = await self.store.payment_methods(org)
        return rows, customer.default_payment_method_id if customer else None

    async def add_payment_method(self, org: str, payment_method_id: str, *, make_default: bool, key: str) -> None:
        await self._own_payment_method(org, payment_method_id, "$.payment_method_id")
        customer, _ = await self._customer_for_payments(org)
        if make_default or customer.default_payment_method_id is None:
            await self.set_default_payment_method(org, payment_method_id, key=key)

    async def set_default_payment_method(self, org: str, payment_method_id: str, *, key: str) -> None:
        if await self.store.payment_method(org, payment_method_id) is None:
            raise not_found("payment method", "payment_method_id")
        _, customer_id = await self._customer_for_payments(org)
        await self.gateway.set_default_payment_method(
            customer_id, payment_method_id, idempotency_key=f"default-pm:{org}:{key}"
        )
        await self.store.set_default_payment_method(org, payment_method_id)

    async def detach_payment_method(self, org: str, payment_method_id: str, *, key: str) -> None:
        if await self.store.payment_method(org, payment_method_id) is None:
            raise not_found("payment method", "payment_method_id")
        try:
            await self.gateway.detach_payment_method(payment_method_id, idempotency_key=f"detach:{org}:{key}")
        except StripeNotFound:
            pass  # already gone at Stripe: drop the mirror too
        except StripeRejected as exc:
            if exc.code != "payment_method_not_attached":  # detached before: converge
                raise ApiError(400, "invalid_request", exc.message, "payment_method_id") from None
        await self.store.delete_payment_method(org, payment_method_id)

    async def refresh_payment_methods(self, org: str) -> None:
        """Make the mirror Stripe's (after a payment method or customer event)."""
        customer = await self.store.customer(org)
        if customer is None or customer.stripe_customer_id is None:
            return
        methods = await self.gateway.list_payment_methods(customer.stripe_customer_id)
        current = await self.gateway.retrieve_customer(customer.stripe_customer_id)
        await self.store.sync_payment_methods(org, customer.stripe_customer_id, methods, current.default_payment_method)

    async def setup_intent(self, org: str, *, key: str) -> SetupIntent:
        _, customer_id = await self._customer_for_payments(org)
        return await self.gateway.create_setup_intent(
            customer_id, metadata={"organization_id": org}, idempotency_key=f"setup:{org}:{key}"
        )

    # -- credit packages -------------------------------------------------------------------
    async def purchase(self, org: str, *, package_id: str, payment_method_id: str | None, key: str) -> Purchase:
        """Buy a package with the named card, or with the customer's default card."""
        package = await self.catalog.package(package_id)
        if package is None:
            raise not_found("credit package", "$.package_id")
        customer, customer_id = await self._customer_for_payments(org)
        if payment_method_id is None:
            payment_method_id = customer.default_payment_method_id
            if payment_method_id is None:
                raise no_default_card()
        await self._own_payment_method(org, payment_method_id, "$.payment_method_id")
        metadata = PurchaseMetadata(organization_id=org, package_id=package.id, credits=package.credits)
        try:
            pi = await self.gateway.create_payment_intent(
                customer_id=customer_id,
                payment_method_id=payment_method_id,
                amount=package.price_cents,
                currency=package.currency,
                description=f"{package.name} credit package: {to_credits(package.credits)} credits",
                metadata=metadata.encode(),
                idempotency_key=f"purchase:{org}:{key}",
            )
        except PaymentDeclined as exc:
            if exc.payment_intent_id is not None:  # record the failed attempt (Stripe names it)
                await self.credits.settle_payment(
                    org, await self.gateway.retrieve_payment_intent(exc.payment_intent_id)
                )
            raise declined(exc) from None
        payment = await self.credits.settle_payment(org, pi)
        if payment is None:  # our own metadata names this organization
            raise LookupError(f"payment {pi.id} names another organization")
        return Purchase(payment, package, pi.client_secret if pi.status == "requires_action" else None)

    async def payment(self, org: str, payment_id: str, *, refresh: bool) -> PaymentRow:
        """A payment from the mirror; one not final yet is first refreshed from Stripe
        (and granted if it succeeded meanwhile, e.g. after 3-D Secure)."""
        row = await self.store.payment(org, payment_id)
        if row is None:
            raise not_found("payment", "payment_id")
        if refresh and row.status not in FINAL_PAYMENT_STATUSES:
            refreshed = await self.credits.settle_payment(org, await self.gateway.retrieve_payment_intent(payment_id))
            row = refreshed or row
        return row

    # -- subscriptions ---------------------------------------------------------------------
    @asynccontextmanager
    async def _subscription_lock(self, org: str) -> AsyncIterator[None]:
        deadline = asyncio.get_running_loop().time() + SUBSCRIPTION_LOCK_WAIT_S
        pause = 0.01
        while not await self.store.lock_subscriptions(org, ttl_s=SUBSCRIPTION_LOCK_TTL_S):
            if asyncio.get_running_loop().time() + pause > deadline:
                raise ApiError(409, "subscription_busy", "another change of this subscription is in progress; retry")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
        try:
            yield
        finally:
            await self.store.unlock_subscriptions(org)

    async def _plan(self, plan_id: str) -> Plan:
        plan = await self.catalog.plan(plan_id)
        if plan is None:
            raise not_found("plan", "$.plan_id")
        if plan.stripe_price_id is None:
            raise ApiError(503, "unavailable", "the catalog is not synced with Stripe yet (credits catalog sync)")
        return plan

    async def subscribe(self, org: str, *, plan_id: str, payment_method_id: str | None, key: str) -> Subscribed:
        plan = await self._plan(plan_id)
        customer, customer_id = await self._customer_for_payments(org)
        if payment_method_id is not None:
            await self._own_payment_method(org, payment_method_id, "$.payment_method_id")
            await self.set_default_payment_method(org, payment_method_id, key=f"subscribe:{key}")
        elif customer.default_payment_method_id is None:
            raise no_default_card()
        async with self._subscription_lock(org):
            current = await self.store.current_subscription(org)
            if current is not None and not current.terminal:
                existing = await self.gateway.retrieve_subscription(current.id)
                if existing.metadata.get("request") == key:  # a retry of the request that made it
                    return Subscribed(current, None)
                raise ApiError(
                    409, "subscription_exists", "the organization has a subscription: change it with PUT instead"
                )
            try:
                sub = await self.gateway.create_subscription(
                    customer_id=customer_id,
                    price_id=plan.stripe_price_id or "",
                    payment_method_id=payment_method_id,
                    metadata={"organization_id": org, "plan_id": plan.id, "request": key},
                    idempotency_key=f"subscribe:{org}:{key}",
                )
            except PaymentDeclined as exc:
                raise declined(exc) from None
            await self.store.save_subscription(org, sub, plan.id)
            client_secret = None
            if sub.latest_invoice is not None:
                await self.credits.settle_invoice(org, sub.latest_invoice)
                if sub.status == "incomplete":
                    client_secret = sub.latest_invoice.client_secret
            row = await self.store.subscription(org, sub.id)
        if row is None:  # saved just above
            raise LookupError(f"subscription {sub.id} vanished")
        return Subscribed(row, client_secret)

    async def _live_subscription(self, org: str) -> SubscriptionRow:
        current = await self.store.current_subscription(org)
        if current is None or current.terminal:
            raise not_found("subscription")
        return current

    async def change_plan(self, org: str, *, plan_id: str, key: str) -> SubscriptionRow:
        plan = await self._plan(plan_id)
        await self._live_subscription(org)  # 404 before anything else
        async with self._subscription_lock(org):
            current = await self._live_subscription(org)
            if current.plan_id == plan.id:
                return current
            old = await self.catalog.plan(current.plan_id) if current.plan_id else None
            upgrade = old is None or (plan.credits, plan.price_cents) > (old.credits, old.price_cents)
            fresh = await self.gateway.retrieve_subscription(current.id)
            try:
                changed, invoice = await self.gateway.change_subscription_price(
                    fresh, price_id=plan.stripe_price_id or "", upgrade=upgrade, idempotency_key=f"plan:{org}:{key}"
                )
            except PaymentDeclined as exc:
                raise declined(exc) from None
            row = await self.store.save_subscription(org, changed, plan.id)
            if upgrade:
                if invoice is not None:
                    await self.credits.settle_invoice(org, invoice)
                    if invoice.status != "paid":
                        raise ApiError(
                            402, "payment_failed", f"the upgrade's invoice {invoice.id} is {invoice.status}, not paid"
                        )
                else:  # nothing to invoice (e.g. a zero proration): the plan changed all the same
                    await self.credits.grant_upgrade(org, changed.id, plan, invoice_id=None)
                    await self.credits.apply_pending(org)
            log.info("plan_changed", extra={"organization_id": org, "plan": plan.id, "upgrade": upgrade})
            return await self.store.subscription(org, row.id) or row

    async def cancel(self, org: str, *, at_period_end: bool, key: str) -> SubscriptionRow:
        await self._live_subscription(org)  # 404 before anything else
        async with self._subscription_lock(org):
            current = await self._live_subscription(org)
            sub = await self.gateway.cancel_subscription(
                current.id, at_period_end=at_period_end, idempotency_key=f"cancel:{org}:{key}"
            )
            plan = await self.catalog.plan_for(product_id=sub.product, price_id=sub.price)
            return await self.store.save_subscription(org, sub, plan.id if plan else current.plan_id)

    async def resume(self, org: str, *, key: str) -> SubscriptionRow:
        """Take back a cancellation at period end: the subscription renews again. One
        not scheduled to end is returned as it is; one already ended is not found."""
        await self._live_subscription(org)  # 404 before anything else
        async with self._subscription_lock(org):
            current = await self._live_subscription(org)
            if not current.cancel_at_period_end:
                return current
            sub = await self.gateway.resume_subscription(current.id, idempotency_key=f"resume:{org}:{key}")
            plan = await self.catalog.plan_for(product_id=sub.product, price_id=sub.price)
            log.info("subscription_resumed", extra={"organization_id": org, "subscription": sub.id})
            return await self.store.save_subscription(org, sub, plan.id if plan else current.plan_id)
