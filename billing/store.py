"""Billing's tables, each query in the ledger's tenant transaction (`Ledger.tenant`):
row-level security confines every statement to one organization, exactly as for the
ledger itself. The mirrors of Stripe objects only move forward: a status never goes
back down its order, and a final state (a canceled subscription, a paid invoice, a
succeeded payment) is never overwritten by an older one.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from billing.gateway import Invoice, PaymentIntent, PaymentMethod, Subscription
from ledger.store import Ledger

PAGE_LIMIT_MAX = 100
SUBSCRIPTION_TERMINAL = ("canceled", "incomplete_expired")


def ts(seconds: int | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC)


class InvalidCursor(ValueError):
    """starting_after names no object of this organization."""


@dataclass(frozen=True, slots=True)
class CustomerRow:
    id: str
    stripe_customer_id: str | None
    email: str
    name: str | None
    default_payment_method_id: str | None
    creation_key: str


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    id: str
    stripe_customer_id: str
    plan_id: str | None
    stripe_item_id: str | None
    stripe_price_id: str | None
    status: str
    current_period_start: dt.datetime | None
    current_period_end: dt.datetime | None
    cancel_at_period_end: bool
    canceled_at: dt.datetime | None
    ended_at: dt.datetime | None
    latest_invoice_id: str | None
    credits_invoice_id: str | None
    credits_period_start: dt.datetime | None
    credits_period_end: dt.datetime | None
    credits_level: int
    created_at: dt.datetime

    @property
    def terminal(self) -> bool:
        return self.status in SUBSCRIPTION_TERMINAL


@dataclass(frozen=True, slots=True)
class InvoiceRow:
    id: str
    subscription_id: str | None
    number: str | None
    status: str
    amount_due: int
    amount_paid: int
    currency: str
    period_start: dt.datetime | None
    period_end: dt.datetime | None
    hosted_invoice_url: str | None
    payment_intent_id: str | None
    purpose: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class PaymentRow:
    id: str
    kind: str
    package_id: str | None
    invoice_id: str | None
    amount: int
    amount_refunded: int
    currency: str
    status: str
    description: str
    credits: int | None
    charge_id: str | None
    failure_code: str | None
    failure_message: str | None
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class PaymentMethodRow:
    id: str
    type: str
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class GrantIntent:
    source: str  # purchase | subscription
    reference: str
    kind: str  # package | period | upgrade
    amount: int  # millicredits
    expires_at: dt.datetime | None
    reason: str
    payment_intent_id: str | None = None
    invoice_id: str | None = None
    subscription_id: str | None = None
    grant_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClawbackRow:
    id: str
    cause: str  # refund | dispute
    charge_id: str
    payment_intent_id: str | None
    money_amount: int
    wanted: int
    asked: int
    taken: int | None
    debit_id: str | None


def _fields(cls: type[Any], row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in cls.__dataclass_fields__:
        value = row[name]
        out[name] = str(value) if isinstance(value, uuid.UUID) else value
    return out


def _subscription(row: asyncpg.Record) -> SubscriptionRow:
    return SubscriptionRow(**_fields(SubscriptionRow, row))


def _intent(row: asyncpg.Record) -> GrantIntent:
    return GrantIntent(**_fields(GrantIntent, row))


def payment_status(pi: PaymentIntent) -> str:
    """Our payment status: Stripe's, except that a payment whose attempt failed (back to
    requires_payment_method with an error) is `failed`."""
    if pi.status == "requires_payment_method" and (pi.failure_code or pi.failure_message):
        return "failed"
    return pi.status


class BillingStore:
    def __init__(self, ledger: Ledger, *, subscription_changed: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.ledger = ledger
        # Called after every write of a subscription (the one place plans change):
        # the organization's entitlements follow its plan at once (accounts/entitlements.py).
        self.subscription_changed = subscription_changed

    # -- customers -------------------------------------------------------------------
    async def customer(self, org: str) -> CustomerRow | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM billing_customers")
        return None if row is None else CustomerRow(**_fields(CustomerRow, row))

    async def claim_customer(self, org: str, *, email: str, name: str | None) -> CustomerRow:
        """The organization's customer row, created (without a Stripe id yet) if missing."""
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "INSERT INTO billing_customers (organization_id, email, name, creation_key)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id) DO NOTHING",
                uuid.UUID(org),
                email,
                name,
                f"customer:{org}:{uuid.uuid4().hex}",
            )
            row = await conn.fetchrow("SELECT * FROM billing_customers")
        if row is None:  # just inserted or already there, in this transaction
            raise LookupError("customer row missing")
        return CustomerRow(**_fields(CustomerRow, row))

    async def customer_created(self, org: str, stripe_customer_id: str) -> CustomerRow:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "UPDATE billing_customers SET stripe_customer_id = coalesce(stripe_customer_id, $1),"
                " updated_at = now() RETURNING *",
                stripe_customer_id,
            )
            if row is None:
                raise LookupError("no customer row for this organization")
            await conn.execute("SELECT index_stripe_object($1)", row["stripe_customer_id"])
        return CustomerRow(**_fields(CustomerRow, row))

    async def lock_subscriptions(self, org: str, *, ttl_s: float) -> bool:
        """A short lease: one subscription change (API or webhook) at a time per organization."""
        async with self.ledger.tenant(org) as conn:
            taken = await conn.fetchval(
                "WITH taken AS (UPDATE billing_customers"
                " SET subscription_lock_until = now() + make_interval(secs => $1)"
                " WHERE subscription_lock_until IS NULL OR subscription_lock_until < now() RETURNING 1)"
                # no customer row: no subscription change can be running
                " SELECT EXISTS (SELECT 1 FROM taken) OR NOT EXISTS (SELECT 1 FROM billing_customers)",
                ttl_s,
            )
        return bool(taken)

    async def unlock_subscriptions(self, org: str) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute("UPDATE billing_customers SET subscription_lock_until = NULL")

    # -- payment methods ---------------------------------------------------------------
    async def sync_payment_methods(
        self, org: str, customer_id: str, methods: list[PaymentMethod], default_id: str | None
    ) -> None:
        """Make the mirror equal to Stripe's list for the customer."""
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "DELETE FROM billing_payment_methods WHERE NOT (id = ANY($1::text[]))", [m.id for m in methods]
            )
            for method in methods:
                await self._upsert_method(conn, org, customer_id, method)
            await conn.execute(
                "UPDATE billing_customers SET default_payment_method_id = $1, updated_at = now()",
                default_id if default_id in {m.id for m in methods} else None,
            )

    async def save_payment_method(self, org: str, customer_id: str, method: PaymentMethod) -> None:
        async with self.ledger.tenant(org) as conn:
            await self._upsert_method(conn, org, customer_id, method)

    @staticmethod
    async def _upsert_method(conn: asyncpg.Connection, org: str, customer_id: str, m: PaymentMethod) -> None:
        await conn.execute(
            "INSERT INTO billing_payment_methods (organization_id, id, stripe_customer_id, type, brand, last4,"
            " exp_month, exp_year, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT (id) DO UPDATE SET brand = excluded.brand, last4 = excluded.last4,"
            " exp_month = excluded.exp_month, exp_year = excluded.exp_year, synced_at = now()",
            uuid.UUID(org),
            m.id,
            customer_id,
            m.type,
            m.brand,
            m.last4,
            m.exp_month,
            m.exp_year,
            ts(m.created) or dt.datetime.now(dt.UTC),
        )

    async def set_default_payment_method(self, org: str, payment_method_id: str | None) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE billing_customers SET default_payment_method_id = $1, updated_at = now()", payment_method_id
            )

    async def payment_method(self, org: str, payment_method_id: str) -> PaymentMethodRow | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM billing_payment_methods WHERE id = $1", payment_method_id)
        return None if row is None else PaymentMethodRow(**_fields(PaymentMethodRow, row))

    async def payment_methods(self, org: str) -> list[PaymentMethodRow]:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch("SELECT * FROM billing_payment_methods ORDER BY created_at, id")
        return [PaymentMethodRow(**_fields(PaymentMethodRow, r)) for r in rows]

    async def delete_payment_method(self, org: str, payment_method_id: str) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute("DELETE FROM billing_payment_methods WHERE id = $1", payment_method_id)
            await conn.execute(
                "UPDATE billing_customers SET default_payment_method_id = NULL WHERE default_payment_method_id = $1",
                payment_method_id,
            )

    # -- subscriptions -----------------------------------------------------------------
    async def save_subscription(
        self, org: str, sub: Subscription, plan_id: str | None, *, only_if_missing: bool = False
    ) -> SubscriptionRow:
        """Insert or move the mirror forward (never out of a final state, never down)."""
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "INSERT INTO billing_subscriptions (organization_id, id, stripe_customer_id, plan_id, stripe_price_id,"
                " stripe_item_id, status, current_period_start, current_period_end, cancel_at_period_end,"
                " canceled_at, ended_at, latest_invoice_id, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                " ON CONFLICT (id) DO UPDATE SET plan_id = coalesce(excluded.plan_id, billing_subscriptions.plan_id),"
                " stripe_price_id = excluded.stripe_price_id, stripe_item_id = excluded.stripe_item_id,"
                " status = excluded.status, current_period_start = excluded.current_period_start,"
                " current_period_end = excluded.current_period_end,"
                " cancel_at_period_end = excluded.cancel_at_period_end, canceled_at = excluded.canceled_at,"
                " ended_at = excluded.ended_at,"
                " latest_invoice_id = coalesce(excluded.latest_invoice_id, billing_subscriptions.latest_invoice_id),"
                " synced_at = now()"
                " WHERE NOT $15 AND billing_subscriptions.status NOT IN ('canceled', 'incomplete_expired')"
                " AND billing_status_rank('subscription', excluded.status)"
                "  >= billing_status_rank('subscription', billing_subscriptions.status)",
                uuid.UUID(org),
                sub.id,
                sub.customer,
                plan_id,
                sub.price,
                sub.item,
                sub.status,
                ts(sub.current_period_start),
                ts(sub.current_period_end),
                sub.cancel_at_period_end,
                ts(sub.canceled_at),
                ts(sub.ended_at),
                sub.latest_invoice_id,
                ts(sub.created) or dt.datetime.now(dt.UTC),
                only_if_missing,
            )
            row = await conn.fetchrow("SELECT * FROM billing_subscriptions WHERE id = $1", sub.id)
        if row is None:
            raise LookupError(f"subscription {sub.id} belongs to another organization")
        if self.subscription_changed is not None:
            await self.subscription_changed(org)
        return _subscription(row)

    async def subscription(self, org: str, subscription_id: str) -> SubscriptionRow | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM billing_subscriptions WHERE id = $1", subscription_id)
        return None if row is None else _subscription(row)

    async def current_subscription(self, org: str) -> SubscriptionRow | None:
        """The live subscription, else the most recent one."""
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "SELECT * FROM billing_subscriptions"
                " ORDER BY (status IN ('canceled', 'incomplete_expired')), created_at DESC, id DESC LIMIT 1"
            )
        return None if row is None else _subscription(row)

    # -- invoices ------------------------------------------------------------------------
    async def save_invoice(self, org: str, inv: Invoice, purpose: str) -> InvoiceRow:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "INSERT INTO billing_invoices (organization_id, id, subscription_id, number, status, amount_due,"
                " amount_paid, currency, period_start, period_end, hosted_invoice_url, payment_intent_id,"
                " billing_reason, purpose, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                " ON CONFLICT (id) DO UPDATE SET"
                " status = CASE WHEN billing_status_rank('invoice', excluded.status)"
                "  >= billing_status_rank('invoice', billing_invoices.status)"
                "  THEN excluded.status ELSE billing_invoices.status END,"
                " amount_due = excluded.amount_due,"
                " amount_paid = greatest(excluded.amount_paid, billing_invoices.amount_paid),"
                " number = coalesce(excluded.number, billing_invoices.number),"
                " hosted_invoice_url = coalesce(excluded.hosted_invoice_url, billing_invoices.hosted_invoice_url),"
                " payment_intent_id = coalesce(excluded.payment_intent_id, billing_invoices.payment_intent_id),"
                " purpose = CASE WHEN billing_invoices.purpose = 'upgrade' THEN 'upgrade' ELSE excluded.purpose END,"
                " synced_at = now()",
                uuid.UUID(org),
                inv.id,
                inv.subscription,
                inv.number,
                inv.status,
                inv.amount_due,
                inv.amount_paid,
                inv.currency,
                ts(inv.period_start),
                ts(inv.period_end),
                inv.hosted_invoice_url,
                inv.payment_intent,
                inv.billing_reason,
                purpose,
                ts(inv.created) or dt.datetime.now(dt.UTC),
            )
            row = await conn.fetchrow("SELECT * FROM billing_invoices WHERE id = $1", inv.id)
        if row is None:
            raise LookupError(f"invoice {inv.id} belongs to another organization")
        return InvoiceRow(**_fields(InvoiceRow, row))

    async def invoice(self, org: str, invoice_id: str) -> InvoiceRow | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM billing_invoices WHERE id = $1", invoice_id)
        return None if row is None else InvoiceRow(**_fields(InvoiceRow, row))

    async def invoices(self, org: str, *, limit: int, starting_after: str | None) -> tuple[list[InvoiceRow], bool]:
        rows, more = await self._page(org, "billing_invoices", limit, starting_after)
        return [InvoiceRow(**_fields(InvoiceRow, r)) for r in rows], more

    # -- payments ------------------------------------------------------------------------
    async def save_payment(
        self,
        org: str,
        pi: PaymentIntent,
        *,
        kind: str,
        description: str,
        package_id: str | None = None,
        invoice_id: str | None = None,
        credits: int | None = None,
    ) -> PaymentRow:
        """Insert or move a payment forward; its ids become routable for webhooks."""
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "INSERT INTO billing_payments (organization_id, id, kind, package_id, invoice_id, amount, currency,"
                " status, description, credits, charge_id, failure_code, failure_message, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                " ON CONFLICT (id) DO UPDATE SET"
                " status = CASE WHEN billing_status_rank('payment', excluded.status)"
                "  >= billing_status_rank('payment', billing_payments.status)"
                "  THEN excluded.status ELSE billing_payments.status END,"
                " invoice_id = coalesce(billing_payments.invoice_id, excluded.invoice_id),"
                " charge_id = coalesce(excluded.charge_id, billing_payments.charge_id),"
                " failure_code = CASE WHEN excluded.status = 'failed' THEN excluded.failure_code"
                "   ELSE billing_payments.failure_code END,"
                " failure_message = CASE WHEN excluded.status = 'failed' THEN excluded.failure_message"
                "   ELSE billing_payments.failure_message END,"
                " synced_at = now()",
                uuid.UUID(org),
                pi.id,
                kind,
                package_id,
                invoice_id,
                pi.amount,
                pi.currency,
                payment_status(pi),
                description,
                credits,
                pi.latest_charge,
                pi.failure_code,
                pi.failure_message,
                ts(pi.created) or dt.datetime.now(dt.UTC),
            )
            row = await conn.fetchrow("SELECT * FROM billing_payments WHERE id = $1", pi.id)
            if row is None:
                raise LookupError(f"payment {pi.id} belongs to another organization")
            await conn.execute("SELECT index_stripe_object($1)", pi.id)
            if row["charge_id"]:
                await conn.execute("SELECT index_stripe_object($1)", row["charge_id"])
        return PaymentRow(**_fields(PaymentRow, row))

    async def payment(self, org: str, payment_id: str) -> PaymentRow | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM billing_payments WHERE id = $1", payment_id)
        return None if row is None else PaymentRow(**_fields(PaymentRow, row))

    async def payment_for_charge(self, org: str, charge_id: str) -> PaymentRow | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM billing_payments WHERE charge_id = $1", charge_id)
        return None if row is None else PaymentRow(**_fields(PaymentRow, row))

    async def payment_refunded(self, org: str, payment_id: str, amount_refunded: int) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE billing_payments SET amount_refunded = greatest(amount_refunded, $2), synced_at = now()"
                " WHERE id = $1",
                payment_id,
                amount_refunded,
            )

    async def payments(self, org: str, *, limit: int, starting_after: str | None) -> tuple[list[PaymentRow], bool]:
        rows, more = await self._page(org, "billing_payments", limit, starting_after)
        return [PaymentRow(**_fields(PaymentRow, r)) for r in rows], more

    async def _page(
        self, org: str, table: str, limit: int, starting_after: str | None
    ) -> tuple[list[asyncpg.Record], bool]:
        """Newest first; `starting_after` is the last id of the previous page."""
        if not 1 <= limit <= PAGE_LIMIT_MAX:
            raise ValueError(f"limit must be 1 to {PAGE_LIMIT_MAX}")
        async with self.ledger.tenant(org) as conn:
            if starting_after is None:
                rows = await conn.fetch(
                    f"SELECT * FROM {table} ORDER BY created_at DESC, id DESC LIMIT $1",  # noqa: S608 - fixed names
                    limit + 1,
                )
            else:
                cursor = await conn.fetchrow(f"SELECT created_at, id FROM {table} WHERE id = $1", starting_after)  # noqa: S608
                if cursor is None:
                    raise InvalidCursor(starting_after)
                rows = await conn.fetch(
                    f"SELECT * FROM {table} WHERE (created_at, id) < ($1, $2)"  # noqa: S608 - fixed names
                    " ORDER BY created_at DESC, id DESC LIMIT $3",
                    cursor["created_at"],
                    cursor["id"],
                    limit + 1,
                )
        return list(rows[:limit]), len(rows) > limit

    # -- grants --------------------------------------------------------------------------
    async def add_grant(self, org: str, intent: GrantIntent) -> GrantIntent:
        """Record a grant decision once; return the recorded one (first writer wins)."""
        async with self.ledger.tenant(org) as conn:
            return await self._add_grant(conn, org, intent)

    @staticmethod
    async def _add_grant(conn: asyncpg.Connection, org: str, intent: GrantIntent) -> GrantIntent:
        await conn.execute(
            "INSERT INTO billing_grants (organization_id, source, reference, kind, amount, expires_at, reason,"
            " payment_intent_id, invoice_id, subscription_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " ON CONFLICT (organization_id, source, reference) DO NOTHING",
            uuid.UUID(org),
            intent.source,
            intent.reference,
            intent.kind,
            intent.amount,
            intent.expires_at,
            intent.reason,
            intent.payment_intent_id,
            intent.invoice_id,
            intent.subscription_id,
        )
        row = await conn.fetchrow(
            "SELECT * FROM billing_grants WHERE source = $1 AND reference = $2", intent.source, intent.reference
        )
        if row is None:  # inserted or present, in this transaction
            raise LookupError(f"grant {intent.reference} missing")
        return _intent(row)

    async def grant_applied(self, org: str, intent: GrantIntent, grant_id: str) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE billing_grants SET grant_id = $3, applied_at = coalesce(applied_at, now())"
                " WHERE source = $1 AND reference = $2",
                intent.source,
                intent.reference,
                uuid.UUID(grant_id),
            )

    async def unapplied_grants(self, org: str) -> list[GrantIntent]:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch("SELECT * FROM billing_grants WHERE grant_id IS NULL ORDER BY created_at")
        return [_intent(r) for r in rows]

    async def grants_paid_by(
        self, org: str, *, payment_intent_id: str | None, invoice_id: str | None
    ) -> list[GrantIntent]:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch(
                "SELECT * FROM billing_grants WHERE (payment_intent_id = $1 OR invoice_id = $2) ORDER BY created_at",
                payment_intent_id,
                invoice_id,
            )
        return [_intent(r) for r in rows]

    async def grant_for_period_invoice(
        self,
        org: str,
        *,
        subscription_id: str,
        invoice: Invoice,
        amount: int,
        expires_at: dt.datetime | None,
        reason: str,
    ) -> GrantIntent | None:
        """The plan credits a paid period invoice (creation or renewal) buys, decided once.

        It also opens the period's level (for upgrades), unless a newer period is open
        already (an old invoice processed late). None: the subscription ended before
        the period began, so nothing is granted."""
        async with self.ledger.tenant(org) as conn:
            sub = await conn.fetchrow("SELECT * FROM billing_subscriptions WHERE id = $1 FOR UPDATE", subscription_id)
            if sub is None:
                raise LookupError(f"subscription {subscription_id} is not mirrored")
            existing = await conn.fetchrow(
                "SELECT * FROM billing_grants WHERE source = 'subscription' AND reference = $1", invoice.id
            )
            if existing is not None:
                return _intent(existing)
            period_start = ts(invoice.period_start) or ts(invoice.created)
            ended = sub["ended_at"] or (sub["canceled_at"] if sub["status"] in SUBSCRIPTION_TERMINAL else None)
            if ended is not None and period_start is not None and period_start >= ended:
                return None
            intent = await self._add_grant(
                conn,
                org,
                GrantIntent(
                    source="subscription",
                    reference=invoice.id,
                    kind="period",
                    amount=amount,
                    expires_at=expires_at,
                    reason=reason,
                    invoice_id=invoice.id,
                    subscription_id=subscription_id,
                ),
            )
            created = ts(invoice.created)
            newer = sub["credits_invoice_id"] is None or (period_start, created) >= (
                sub["credits_period_start"],
                sub["credits_invoice_created"],
            )
            if newer:
                await conn.execute(
                    "UPDATE billing_subscriptions SET credits_invoice_id = $2, credits_invoice_created = $3,"
                    " credits_period_start = $4, credits_period_end = $5, credits_level = $6 WHERE id = $1",
                    subscription_id,
                    invoice.id,
                    created,
                    period_start,
                    ts(invoice.period_end),
                    amount,
                )
            return intent

    async def grant_for_upgrade(
        self,
        org: str,
        *,
        subscription_id: str,
        plan_id: str,
        level: int,
        invoice_id: str | None,
        rollover: bool,
        reason: str,
    ) -> GrantIntent | None:
        """The difference between the plan's credits (`level`) and what this period has
        had, decided once per period and plan. None: nothing to grant (a downgrade, or a
        level reached before). Raises LookupError while no period has been granted yet."""
        async with self.ledger.tenant(org) as conn:
            sub = await conn.fetchrow("SELECT * FROM billing_subscriptions WHERE id = $1 FOR UPDATE", subscription_id)
            if sub is None or sub["credits_invoice_id"] is None:
                raise LookupError(f"subscription {subscription_id} has no granted period yet")
            reference = f"upgrade:{sub['credits_invoice_id']}:{plan_id}"
            existing = await conn.fetchrow(
                "SELECT * FROM billing_grants WHERE source = 'subscription' AND reference = $1", reference
            )
            if existing is not None:
                return _intent(existing)
            if level <= int(sub["credits_level"]):
                return None
            intent = await self._add_grant(
                conn,
                org,
                GrantIntent(
                    source="subscription",
                    reference=reference,
                    kind="upgrade",
                    amount=level - int(sub["credits_level"]),
                    expires_at=None if rollover else sub["credits_period_end"],
                    reason=reason,
                    invoice_id=invoice_id,
                    subscription_id=subscription_id,
                ),
            )
            await conn.execute(
                "UPDATE billing_subscriptions SET credits_level = $2 WHERE id = $1", subscription_id, level
            )
            return intent

    # -- clawbacks -------------------------------------------------------------------------
    async def add_clawback(self, org: str, row: ClawbackRow) -> ClawbackRow:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "INSERT INTO billing_clawbacks (organization_id, id, cause, charge_id, payment_intent_id,"
                " money_amount, wanted, asked) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                uuid.UUID(org),
                row.id,
                row.cause,
                row.charge_id,
                row.payment_intent_id,
                row.money_amount,
                row.wanted,
                row.asked,
            )
            stored = await conn.fetchrow("SELECT * FROM billing_clawbacks WHERE id = $1", row.id)
        if stored is None:
            raise LookupError(f"clawback {row.id} belongs to another organization")
        return ClawbackRow(**_fields(ClawbackRow, stored))

    async def clawback_applied(self, org: str, clawback_id: str, *, taken: int, debit_id: str | None) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE billing_clawbacks SET taken = $2, debit_id = $3, applied_at = coalesce(applied_at, now())"
                " WHERE id = $1",
                clawback_id,
                taken,
                debit_id,
            )

    async def clawbacks(self, org: str, *, charge_id: str | None = None) -> list[ClawbackRow]:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch(
                "SELECT * FROM billing_clawbacks WHERE $1::text IS NULL OR charge_id = $1 ORDER BY created_at",
                charge_id,
            )
        return [ClawbackRow(**_fields(ClawbackRow, r)) for r in rows]

    async def clawed_for_payment(self, org: str, payment_intent_id: str) -> int:
        """Credits already asked back for a payment (refunds and disputes together)."""
        async with self.ledger.tenant(org) as conn:
            value = await conn.fetchval(
                "SELECT coalesce(sum(wanted), 0) FROM billing_clawbacks WHERE payment_intent_id = $1",
                payment_intent_id,
            )
        return int(value)
