"""Credits from money, exactly once: grants for succeeded package purchases and paid
subscription invoices, clawbacks for refunds and lost disputes.

Both the synchronous replies (the API) and the webhooks (the worker) call the same
methods here with what Stripe said, in any order and any number of times:

- a grant is decided once (a billing_grants row, keyed like the ledger grant by
  source + a Stripe id), then written to the ledger (`Ledger.grant`, idempotent per
  source + reference) and pushed to the cache (`push_pending`, idempotent per grant);
  a crash between the steps is finished by the next call for the same organization;
- a clawback is decided once (a billing_clawbacks row holding the amount asked, so a
  retry asks the same), then taken by the hot path's partial debit with the row's id as
  idempotency key: never below zero, and what could not be taken stays on record.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from accounts.grants import push_pending
from billing.catalog import Catalog, Plan
from billing.gateway import (
    UPGRADE_INVOICE_DESCRIPTION,
    Charge,
    Dispute,
    Invoice,
    PaymentIntent,
    StripeGateway,
)
from billing.store import BillingStore, ClawbackRow, GrantIntent, InvoiceRow, PaymentRow, ts
from core.money import to_credits
from hotpath.client import HotPath, Unavailable
from ledger.store import Ledger
from lua import Status

log = logging.getLogger(__name__)

PURCHASE_KIND = "credit_purchase"
PERIOD_REASONS = (None, "subscription", "subscription_create", "subscription_cycle")
STALE_AFTER_PAYMENT = ("incomplete", "past_due", "unpaid")


class RetryLater(Exception):
    """Not decidable yet (e.g. an upgrade invoice before its period's invoice): retry."""


@dataclass(frozen=True, slots=True)
class PurchaseMetadata:
    """What billing writes on a package's PaymentIntent, and trusts back from it."""

    organization_id: str
    package_id: str
    credits: int

    def encode(self) -> dict[str, str]:
        return {
            "kind": PURCHASE_KIND,
            "organization_id": self.organization_id,
            "package_id": self.package_id,
            "credits": str(self.credits),
        }

    @staticmethod
    def decode(metadata: dict[str, str] | object) -> PurchaseMetadata | None:
        if not isinstance(metadata, dict) or metadata.get("kind") != PURCHASE_KIND:
            return None
        try:
            credits = int(metadata["credits"])
            return PurchaseMetadata(str(metadata["organization_id"]), str(metadata["package_id"]), credits)
        except (KeyError, ValueError):
            return None


def invoice_purpose(invoice: Invoice, recorded: str | None = None) -> str:
    """period: its plan credits are granted; upgrade: the difference; other: nothing."""
    if recorded == "upgrade" or invoice.description == UPGRADE_INVOICE_DESCRIPTION:
        return "upgrade"
    if invoice.subscription is None:
        return "other"
    if invoice.billing_reason == "subscription_update":
        return "upgrade"
    return "period" if invoice.billing_reason in PERIOD_REASONS else "other"


class Credits:
    def __init__(
        self,
        *,
        store: BillingStore,
        ledger: Ledger,
        hot: HotPath,
        catalog: Catalog,
        gateway: StripeGateway,
        rollover: bool,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.hot = hot
        self.catalog = catalog
        self.gateway = gateway
        self.rollover = rollover

    # -- grants --------------------------------------------------------------------
    async def apply_pending(self, org: str) -> None:
        """Write every decided grant to the ledger, then push them to the cache."""
        for intent in await self.store.unapplied_grants(org):
            result = await self.ledger.grant(
                org,
                amount=intent.amount,
                source=intent.source,
                reference=intent.reference,
                reason=intent.reason,
                expires_at=intent.expires_at,
            )
            await self.store.grant_applied(org, intent, result.grant_id)
            log.info(
                "credits_granted",
                extra={
                    "organization_id": org,
                    "grant_id": result.grant_id,
                    "source": intent.source,
                    "reference": intent.reference,
                    "credits": str(to_credits(intent.amount)),
                    "new_grant": result.created,
                },
            )
        try:
            await push_pending(self.ledger, self.hot, org)
        except Unavailable as exc:
            # The ledger holds the grants; the outbox push is retried by the settler.
            log.warning("grant_push_deferred", extra={"organization_id": org, "error": str(exc)})

    async def settle_payment(self, org: str, pi: PaymentIntent) -> PaymentRow | None:
        """Mirror a PaymentIntent; a package purchase that succeeded is granted once."""
        purchase = PurchaseMetadata.decode(dict(pi.metadata))
        if purchase is None:
            description = "Subscription invoice" if pi.invoice else "Payment"
            return await self.store.save_payment(
                org, pi, kind="invoice", description=description, invoice_id=pi.invoice
            )
        if purchase.organization_id != org:
            log.error("purchase_for_another_organization", extra={"payment_intent": pi.id, "organization_id": org})
            return None
        package = await self.catalog.package(purchase.package_id)
        name = package.name if package is not None else purchase.package_id
        row = await self.store.save_payment(
            org,
            pi,
            kind=PURCHASE_KIND,
            description=f"{name} credit package ({to_credits(purchase.credits)} credits)",
            package_id=package.id if package is not None else None,
            credits=purchase.credits,
        )
        if pi.status == "succeeded":
            await self.store.add_grant(
                org,
                GrantIntent(
                    source="purchase",
                    reference=pi.id,
                    kind="package",
                    amount=purchase.credits,
                    expires_at=None,
                    reason=f"{name} credit package, payment {pi.id}",
                    payment_intent_id=pi.id,
                ),
            )
            await self.apply_pending(org)
        return row

    async def settle_invoice(self, org: str, invoice: Invoice) -> InvoiceRow:
        """Mirror an invoice; a paid subscription invoice grants its plan's credits for the
        period (or an upgrade's difference) once."""
        known = await self.store.invoice(org, invoice.id)
        row = await self.store.save_invoice(org, invoice, invoice_purpose(invoice, known.purpose if known else None))
        if invoice.status != "paid" or invoice.subscription is None or row.purpose == "other":
            return row
        mirrored = await self.store.subscription(org, invoice.subscription)
        if mirrored is None or mirrored.status in STALE_AFTER_PAYMENT:
            # Paying an invoice moves its subscription (incomplete -> active), and not
            # every server says so with an event (localstripe does not): fetch it.
            sub = await self.gateway.retrieve_subscription(invoice.subscription)
            plan = await self.catalog.plan_for(product_id=sub.product, price_id=sub.price)
            await self.store.save_subscription(org, sub, plan.id if plan else None)
        line = invoice.plan_line()
        plan = await self.catalog.plan_for(product_id=line.product, price_id=line.price) if line else None
        if plan is None:
            log.error("invoice_plan_unknown", extra={"invoice": invoice.id, "organization_id": org})
            return row
        if row.purpose == "period":
            await self.store.grant_for_period_invoice(
                org,
                subscription_id=invoice.subscription,
                invoice=invoice,
                amount=plan.credits,
                expires_at=None if self.rollover else ts(invoice.period_end),
                reason=self._period_reason(plan, invoice),
            )
        else:
            await self.grant_upgrade(org, invoice.subscription, plan, invoice_id=invoice.id)
        await self.apply_pending(org)
        return row

    async def grant_upgrade(self, org: str, subscription_id: str, plan: Plan, *, invoice_id: str | None) -> None:
        try:
            await self.store.grant_for_upgrade(
                org,
                subscription_id=subscription_id,
                plan_id=plan.id,
                level=plan.credits,
                invoice_id=invoice_id,
                rollover=self.rollover,
                reason=f"Upgrade to {plan.name}: the difference for the current period",
            )
        except LookupError as exc:
            raise RetryLater(str(exc)) from exc

    @staticmethod
    def _period_reason(plan: Plan, invoice: Invoice) -> str:
        start, end = ts(invoice.period_start), ts(invoice.period_end)
        span = f"{start:%Y-%m-%d} to {end:%Y-%m-%d}" if start and end else "the period"
        return f"{plan.name} plan credits for {span}, invoice {invoice.id}"

    # -- clawbacks -----------------------------------------------------------------
    async def _paid_by(self, org: str, charge_id: str, pi_id: str | None) -> tuple[PaymentRow | None, str | None]:
        payment = await self.store.payment_for_charge(org, charge_id)
        if payment is None and pi_id is not None:
            payment = await self.store.payment(org, pi_id)
        invoice_id = payment.invoice_id if payment is not None else None
        if invoice_id is None and pi_id is not None and (payment is None or payment.kind == "invoice"):
            invoice_id = await self.gateway.invoice_for_payment_intent(pi_id)
        return payment, invoice_id

    async def clawback_refunds(self, org: str, charge: Charge) -> list[ClawbackRow]:
        """Take back the unspent credits a refunded payment bought, once per refund."""
        payment, invoice_id = await self._paid_by(org, charge.id, charge.payment_intent)
        pi_id = charge.payment_intent or (payment.id if payment else None)
        if pi_id is None:
            return []
        if payment is not None:
            await self.store.payment_refunded(org, payment.id, charge.amount_refunded)
        grants = await self.store.grants_paid_by(org, payment_intent_id=pi_id, invoice_id=invoice_id)
        done = []
        for refund in charge.refunds:
            if refund.status not in ("succeeded", "pending"):
                continue
            done.append(
                await self._clawback(
                    org,
                    key=f"refund:{refund.id}",
                    cause="refund",
                    charge=charge,
                    pi_id=pi_id,
                    money=refund.amount,
                    grants=grants,
                )
            )
        return done

    async def clawback_dispute(self, org: str, dispute: Dispute, charge: Charge) -> ClawbackRow | None:
        """A lost dispute takes back the unspent credits the disputed amount bought."""
        if dispute.status != "lost":
            return None
        payment, invoice_id = await self._paid_by(org, charge.id, charge.payment_intent)
        pi_id = charge.payment_intent or (payment.id if payment else None)
        if pi_id is None:
            return None
        grants = await self.store.grants_paid_by(org, payment_intent_id=pi_id, invoice_id=invoice_id)
        return await self._clawback(
            org,
            key=f"dispute:{dispute.id}",
            cause="dispute",
            charge=charge,
            pi_id=pi_id,
            money=dispute.amount,
            grants=grants,
        )

    async def _unspent(self, org: str, grants: list[GrantIntent]) -> int:
        ids = {g.grant_id for g in grants if g.grant_id is not None}
        if not ids:
            return 0
        result = await self.hot.balance(org)
        if result.status is not Status.OK:
            raise Unavailable(f"balance refused: {result.status.name}")
        live = result.payload.get("grants", [])
        now = dt.datetime.now(dt.UTC).timestamp() * 1000
        return sum(
            int(g["remaining"])
            for g in live
            if g.get("id") in ids and (not int(g.get("expires_ms", 0)) or int(g["expires_ms"]) > now)
        )

    async def _clawback(
        self,
        org: str,
        *,
        key: str,
        cause: str,
        charge: Charge,
        pi_id: str,
        money: int,
        grants: list[GrantIntent],
    ) -> ClawbackRow:
        existing = [c for c in await self.store.clawbacks(org, charge_id=charge.id) if c.id == key]
        if existing and existing[0].taken is not None:
            return existing[0]
        if existing:
            row = existing[0]
        else:
            granted = sum(g.amount for g in grants)
            share = granted * min(money, charge.amount) // charge.amount if charge.amount > 0 else 0
            wanted = max(0, min(share, granted - await self.store.clawed_for_payment(org, pi_id)))
            asked = min(wanted, await self._unspent(org, grants))
            row = await self.store.add_clawback(
                org,
                ClawbackRow(
                    id=key,
                    cause=cause,
                    charge_id=charge.id,
                    payment_intent_id=pi_id,
                    money_amount=money,
                    wanted=wanted,
                    asked=asked,
                    taken=None,
                    debit_id=None,
                ),
            )
        taken, debit_id = 0, None
        if row.asked > 0:
            result = await self.hot.debit(
                org,
                amount=row.asked,
                kind="refund",
                reason=f"{cause} {row.id.split(':', 1)[1]} of {row.charge_id}",
                idempotency_key=row.id,
                partial=True,
            )
            if result.status not in (Status.OK, Status.REPLAY):
                raise Unavailable(f"clawback refused: {result.status.name}")
            taken, debit_id = int(result.payload["debited"]), str(result.payload["id"])
        await self.store.clawback_applied(org, row.id, taken=taken, debit_id=debit_id)
        if taken < row.wanted:
            log.warning(
                "clawback_shortfall",
                extra={"organization_id": org, "clawback": row.id, "wanted": row.wanted, "taken": taken},
            )
        return ClawbackRow(
            row.id,
            row.cause,
            row.charge_id,
            row.payment_intent_id,
            row.money_amount,
            row.wanted,
            row.asked,
            taken,
            debit_id,
        )
