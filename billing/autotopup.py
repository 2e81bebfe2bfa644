"""Automatic top-up: when an organization's available credits fall below its threshold,
one credit package is bought with its default card, off-session, and granted through
the purchase path (billing/credits.py: once per PaymentIntent, whichever of the reply
and the webhook comes first).

Why it cannot run away (the failures of other platforms: duplicate top-ups, top-ups
that ran for weeks):

- single flight: a top-up starts only in the transaction that turns the organization's
  `armed` flag off (migration 0032), so of many billing processes seeing the same
  crossing, one starts it; `armed` comes back only once available is at or above the
  threshold again, no attempt is open, and the cooldown has passed;
- exactly once: the attempt's number makes the Stripe idempotency key
  (`autotopup:<org>:<n>`), and a runner that died mid-payment leaves a lease that runs
  out, after which another runner finishes the same attempt (the PaymentIntent it
  recorded, or the same key);
- bounded: at most `max_per_month` top-ups and `monthly_cap_cents` a month (UTC);
- a failure stops it: a declined card, one that needs its holder (authentication
  required) or a cap reached pauses the organization's top-ups until its settings are
  saved again, and sends `topup.failed` (once, with the reason) as the organization's
  signed webhook (its alert URL, delivered by the settler like the low-balance alerts).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from dataclasses import dataclass

import asyncpg
import msgspec

from billing.catalog import Catalog, Package
from billing.credits import Credits, PurchaseMetadata
from billing.gateway import PaymentDeclined, StripeError, StripeGateway
from billing.store import BillingStore
from core.errors import Unavailable
from core.money import to_credits
from hotpath.client import HotPath
from ledger.store import POSTGRES_DOWN, Ledger
from lua import Status

log = logging.getLogger(__name__)

CANDIDATES_PAGE = 500
CANDIDATE_PAGES_PER_TICK_MAX = 20  # 10,000 organizations a tick at most; the rest wait for the next
STALLED_PER_TICK_MAX = 50
ATTEMPTS_SHOWN_MAX = 10
LEASE_S = 60.0  # a pending attempt is its runner's this long (Stripe calls time out well before)
FAILURE_REASONS = ("card_declined", "authentication_required", "cap_reached", "no_payment_method", "payment_failed")


@dataclass(frozen=True, slots=True)
class Settings:
    organization_id: str
    enabled: bool
    threshold: int  # millicredits of available
    package_id: str
    max_per_month: int
    monthly_cap_cents: int
    paused_reason: str | None
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Attempt:
    id: str
    organization_id: str
    trigger_seq: int
    package_id: str
    credits: int
    amount_cents: int
    currency: str
    available_at_trigger: int
    status: str  # pending | succeeded | failed
    failure_reason: str | None
    payment_intent_id: str | None
    created_at: dt.datetime
    decided_at: dt.datetime | None


def _settings(row: asyncpg.Record) -> Settings:
    return Settings(
        str(row["organization_id"]),
        bool(row["enabled"]),
        int(row["threshold"]),
        row["package_id"],
        int(row["max_per_month"]),
        int(row["monthly_cap_cents"]),
        row["paused_reason"],
        row["updated_at"],
    )


def _attempt(row: asyncpg.Record) -> Attempt:
    return Attempt(
        str(row["id"]),
        str(row["organization_id"]),
        int(row["trigger_seq"]),
        row["package_id"],
        int(row["credits"]),
        int(row["amount_cents"]),
        row["currency"],
        int(row["available_at_trigger"]),
        row["status"],
        row["failure_reason"],
        row["payment_intent_id"],
        row["created_at"],
        row["decided_at"],
    )


_encode = msgspec.json.Encoder(decimal_format="number").encode


def _event(kind: str, attempt: Attempt, **extra: object) -> str:
    body = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": kind,
        "organization_id": attempt.organization_id,
        "attempt_id": attempt.id,
        "package_id": attempt.package_id,
        "credits": to_credits(attempt.credits),
        "amount_cents": attempt.amount_cents,
        "currency": attempt.currency,
        "payment_id": attempt.payment_intent_id,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        **extra,
    }
    return _encode(body).decode()


async def _notify(conn: asyncpg.Connection, org: uuid.UUID, kind: str, payload: str) -> bool:
    """Queue the organization's signed webhook (sent by the settler to its alert URL);
    False (a log only) when it has no URL."""
    if not await conn.fetchval("SELECT 1 FROM balance_alerts WHERE organization_id = $1", org):
        return False
    await conn.execute(
        "INSERT INTO webhook_deliveries (id, organization_id, event_type, payload) VALUES ($1, $2, $3, $4::jsonb)",
        uuid.uuid4(),
        org,
        kind,
        payload,
    )
    return True


class AutoTopupStore:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def settings(self, org: str) -> Settings | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM auto_topup_settings")
        return None if row is None else _settings(row)

    async def save(
        self, org: str, *, enabled: bool, threshold: int, package_id: str, max_per_month: int, monthly_cap_cents: int
    ) -> Settings:
        """Saving settings also lifts a pause (the card was fixed, the cap raised)."""
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "INSERT INTO auto_topup_settings (organization_id, enabled, threshold, package_id, max_per_month,"
                " monthly_cap_cents) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (organization_id) DO UPDATE SET enabled = $2, threshold = $3, package_id = $4,"
                " max_per_month = $5, monthly_cap_cents = $6, paused_reason = NULL, updated_at = now(),"
                " armed = auto_topup_settings.armed OR NOT EXISTS (SELECT 1 FROM auto_topup_attempts a"
                "   WHERE a.organization_id = $1 AND a.status = 'pending')"
                " RETURNING *",
                uuid.UUID(org),
                enabled,
                threshold,
                package_id,
                max_per_month,
                monthly_cap_cents,
            )
        assert row is not None
        return _settings(row)

    async def attempts(self, org: str, *, limit: int = ATTEMPTS_SHOWN_MAX) -> list[Attempt]:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch(
                "SELECT * FROM auto_topup_attempts ORDER BY created_at DESC, trigger_seq DESC LIMIT $1", limit
            )
        return [_attempt(r) for r in rows]

    async def candidates(self, *, after: str | None, limit: int) -> list[str]:
        async with self.ledger.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT organization_id FROM auto_topup_candidates($1, $2)",
                None if after is None else uuid.UUID(after),
                limit,
            )
        return [str(r["organization_id"]) for r in rows]

    async def stalled(self, *, limit: int) -> list[tuple[str, str]]:
        async with self.ledger.pool.acquire() as conn:
            rows = await conn.fetch("SELECT organization_id, id FROM auto_topup_stalled($1)", limit)
        return [(str(r["organization_id"]), str(r["id"])) for r in rows]

    async def rearm(self, org: str, *, cooldown_s: float) -> bool:
        """Available is back at or above the threshold: the next crossing may start one
        (once no attempt is open and the cooldown since the last has passed)."""
        async with self.ledger.tenant(org) as conn:
            status = await conn.execute(
                "UPDATE auto_topup_settings s SET armed = true WHERE NOT s.armed AND NOT EXISTS ("
                "  SELECT 1 FROM auto_topup_attempts a WHERE a.organization_id = s.organization_id AND"
                "  (a.status = 'pending' OR a.created_at > now() - make_interval(secs => $1)))",
                cooldown_s,
            )
        return str(status).endswith(" 1")

    async def claim(self, org: str, *, available: int, package: Package, lease_s: float = LEASE_S) -> Attempt | None:
        """Start one top-up if this organization is armed, below its threshold and not
        paused: the attempt (pending, leased to the caller), or None. A cap reached is a
        failed attempt, returned as such (the pause and topup.failed are recorded here)."""
        org_id = uuid.UUID(org)
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT * FROM auto_topup_settings FOR UPDATE")
            if row is None or not row["enabled"] or row["paused_reason"] or not row["armed"]:
                return None
            if available >= int(row["threshold"]):
                return None
            month = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(sum(amount_cents), 0) AS cents FROM auto_topup_attempts"
                " WHERE status IN ('pending', 'succeeded')"
                " AND created_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
            )
            assert month is not None
            seq = int(row["triggers"]) + 1
            capped = int(month["n"]) >= int(row["max_per_month"]) or (
                int(month["cents"]) + package.price_cents > int(row["monthly_cap_cents"])
            )
            attempt_row = await conn.fetchrow(
                "INSERT INTO auto_topup_attempts (id, organization_id, trigger_seq, package_id, credits, amount_cents,"
                " currency, available_at_trigger, status, failure_reason, lease_until, decided_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11),"
                "  CASE WHEN $9 = 'failed' THEN now() END) RETURNING *",
                uuid.uuid4(),
                org_id,
                seq,
                package.id,
                package.credits,
                package.price_cents,
                package.currency,
                available,
                "failed" if capped else "pending",
                "cap_reached" if capped else None,
                lease_s,
            )
            assert attempt_row is not None
            attempt = _attempt(attempt_row)
            await conn.execute(
                "UPDATE auto_topup_settings SET armed = false, triggers = $1, paused_reason = $2", seq,
                "cap_reached" if capped else None,
            )  # fmt: skip
            if capped:
                limits = {
                    "max_per_month": int(row["max_per_month"]),
                    "monthly_cap_cents": int(row["monthly_cap_cents"]),
                }
                await _notify(
                    conn, org_id, "topup.failed", _event("topup.failed", attempt, reason="cap_reached", **limits)
                )
        log.info(
            "auto_topup_started" if not capped else "auto_topup_capped",
            extra={"organization_id": org, "attempt": attempt.id, "trigger_seq": seq, "available": available},
        )
        return attempt

    async def take_lease(self, org: str, attempt_id: str, *, lease_s: float = LEASE_S) -> Attempt | None:
        """A pending attempt whose runner's lease ran out, now the caller's (or None)."""
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "UPDATE auto_topup_attempts SET lease_until = now() + make_interval(secs => $2)"
                " WHERE id = $1 AND status = 'pending' AND lease_until < now() RETURNING *",
                uuid.UUID(attempt_id),
                lease_s,
            )
        return None if row is None else _attempt(row)

    async def paying(self, org: str, attempt_id: str, payment_intent_id: str) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE auto_topup_attempts SET payment_intent_id = $2 WHERE id = $1 AND payment_intent_id IS NULL",
                uuid.UUID(attempt_id),
                payment_intent_id,
            )

    async def decide(self, attempt: Attempt, *, succeeded: bool, reason: str | None = None) -> bool:
        """Close a pending attempt once (False: it was closed already): a failure pauses
        the organization's top-ups; either way its webhook is queued, in the same step."""
        org_id = uuid.UUID(attempt.organization_id)
        async with self.ledger.tenant(attempt.organization_id) as conn:
            row = await conn.fetchrow(
                "UPDATE auto_topup_attempts SET status = $2, failure_reason = $3, decided_at = now()"
                " WHERE id = $1 AND status = 'pending' RETURNING *",
                uuid.UUID(attempt.id),
                "succeeded" if succeeded else "failed",
                reason,
            )
            if row is None:
                return False
            closed = _attempt(row)
            if succeeded:
                await _notify(conn, org_id, "topup.succeeded", _event("topup.succeeded", closed))
            else:
                await conn.execute("UPDATE auto_topup_settings SET paused_reason = $1", reason)
                await _notify(conn, org_id, "topup.failed", _event("topup.failed", closed, reason=reason))
        log.log(
            logging.INFO if succeeded else logging.WARNING,
            "auto_topup_succeeded" if succeeded else "auto_topup_failed",
            extra={"organization_id": attempt.organization_id, "attempt": attempt.id, "reason": reason},
        )
        return True


class AutoTopups:
    """The runner: every `interval_s`, each enabled organization's available credits
    (from the cache) against its threshold; starts and pays what is due, finishes what
    a dead runner left. Any number of billing processes may run one."""

    def __init__(
        self,
        store: AutoTopupStore,
        *,
        hot: HotPath,
        catalog: Catalog,
        gateway: StripeGateway,
        credits: Credits,
        billing: BillingStore,
        interval_s: float,
        cooldown_s: float,
        lease_s: float = LEASE_S,
    ) -> None:
        self.store = store
        self.hot = hot
        self.catalog = catalog
        self.gateway = gateway
        self.credits = credits
        self.billing = billing
        self.interval_s = interval_s
        self.cooldown_s = cooldown_s
        self.lease_s = lease_s
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> int:
        """One round; returns how many top-ups it started."""
        for org, attempt_id in await self.store.stalled(limit=STALLED_PER_TICK_MAX):
            attempt = await self.store.take_lease(org, attempt_id, lease_s=self.lease_s)
            if attempt is not None:
                await self.pay(attempt)
        started = 0
        after: str | None = None
        for _ in range(CANDIDATE_PAGES_PER_TICK_MAX):
            page = await self.store.candidates(after=after, limit=CANDIDATES_PAGE)
            for org in page:
                started += await self.check(org)
            if len(page) < CANDIDATES_PAGE:
                break
            after = page[-1]
        return started

    async def check(self, org: str) -> int:
        """One organization: start (and pay) a top-up if it is due."""
        settings = await self.store.settings(org)
        if settings is None or not settings.enabled or settings.paused_reason:
            return 0
        result = await self.hot.balance(org)
        if result.status is not Status.OK:
            return 0
        available = int(result.payload["available"])
        if available >= settings.threshold:
            await self.store.rearm(org, cooldown_s=self.cooldown_s)
            return 0
        package = await self.catalog.package(settings.package_id)
        if package is None:
            return 0
        attempt = await self.store.claim(org, available=available, package=package, lease_s=self.lease_s)
        if attempt is None:
            return 0
        if attempt.status == "pending":
            await self.pay(attempt)
        return 1

    async def pay(self, attempt: Attempt) -> None:
        """Pay a pending attempt off-session with the default card and grant it through
        the purchase path. A Stripe error that is not a decline leaves it pending: its
        lease runs out and a runner tries again with the same idempotency key."""
        org = attempt.organization_id
        customer = await self.billing.customer(org)
        if customer is None or customer.stripe_customer_id is None or customer.default_payment_method_id is None:
            await self.store.decide(attempt, succeeded=False, reason="no_payment_method")
            return
        try:
            if attempt.payment_intent_id is not None:  # a runner before us got this far
                pi = await self.gateway.retrieve_payment_intent(attempt.payment_intent_id)
            else:
                metadata = PurchaseMetadata(organization_id=org, package_id=attempt.package_id, credits=attempt.credits)
                pi = await self.gateway.create_payment_intent(
                    customer_id=customer.stripe_customer_id,
                    payment_method_id=customer.default_payment_method_id,
                    amount=attempt.amount_cents,
                    currency=attempt.currency,
                    description=f"Automatic top-up: {to_credits(attempt.credits)} credits",
                    metadata={**metadata.encode(), "auto_topup_attempt": attempt.id},
                    idempotency_key=f"autotopup:{org}:{attempt.trigger_seq}",
                    off_session=True,
                )
        except PaymentDeclined as exc:
            if exc.payment_intent_id is not None:  # on record, as any declined purchase
                with contextlib.suppress(StripeError):
                    await self.store.paying(org, attempt.id, exc.payment_intent_id)
                    await self.credits.settle_payment(
                        org, await self.gateway.retrieve_payment_intent(exc.payment_intent_id)
                    )
            reason = "authentication_required" if exc.code == "authentication_required" else "card_declined"
            await self.store.decide(attempt, succeeded=False, reason=reason)
            return
        except StripeError as exc:
            log.warning("auto_topup_payment_retry_later", extra={"organization_id": org, "error": str(exc)})
            return
        await self.store.paying(org, attempt.id, pi.id)
        await self.credits.settle_payment(org, pi)  # grants once if it succeeded
        if pi.status == "succeeded":
            await self.store.decide(attempt, succeeded=True)
        elif pi.status == "requires_action":  # the card wants its holder, who is not here
            await self.store.decide(attempt, succeeded=False, reason="authentication_required")
        elif pi.status in ("requires_payment_method", "canceled"):
            await self.store.decide(attempt, succeeded=False, reason="card_declined")
        # processing: left pending; the lease runs out and the next runner reads it again

    # -- the loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Unavailable as exc:
                log.warning("auto_topup_tick_failed", extra={"error": str(exc)})
            except POSTGRES_DOWN as exc:
                log.warning("auto_topup_tick_failed", extra={"error": str(exc)})
            except Exception:  # a bug must not stop every organization's top-ups for good
                log.exception("auto_topup_tick_crashed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
