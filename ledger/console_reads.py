"""What the ops console reads across organizations, through its own role
(credits_console: explicit `console` read policies, no write privilege on any table;
0020_console.sql). `credits org show` reads the same way."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

SEARCH_LIMIT_MAX = 200
SPEND_DAYS = 30  # "the last 30 days": today (UTC) and the 29 before
ENTRIES_SHOWN = 50


@dataclass(frozen=True, slots=True)
class OrgRow:
    id: str
    name: str
    ledger_balance: int
    plan: str | None  # the plan of a subscription that has not ended, with its status
    last_activity: dt.datetime | None  # the newest ledger entry
    spend_30d: int
    created_at: dt.datetime


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


class ConsoleReads:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 4) -> ConsoleReads:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        assert pool is not None
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    # -- organizations ----------------------------------------------------------------
    async def search(self, query: str, *, limit: int = 50) -> list[OrgRow]:
        """By id (exact) or name (contains, any case); the newest first. Empty: the newest."""
        limit = max(1, min(limit, SEARCH_LIMIT_MAX))
        query = query.strip()
        by_id = _as_uuid(query) if query else None
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT o.id, o.name, o.balance, o.created_at,"
                " (SELECT s.plan_id || ' (' || s.status || ')' FROM billing_subscriptions s"
                "   WHERE s.organization_id = o.id AND s.ended_at IS NULL ORDER BY s.created_at DESC LIMIT 1) AS plan,"
                " (SELECT e.created_at FROM ledger_entries e WHERE e.organization_id = o.id"
                "   ORDER BY e.id DESC LIMIT 1) AS last_activity,"
                " (SELECT coalesce(sum(h.credits), 0) FROM usage_hourly h WHERE h.organization_id = o.id"
                "   AND h.hour >= date_trunc('day', now(), 'UTC') - make_interval(days => $4 - 1)) AS spend"
                " FROM organizations o"
                " WHERE ($1::uuid IS NOT NULL AND o.id = $1) OR ($1::uuid IS NULL AND o.name ILIKE $2)"
                " ORDER BY o.created_at DESC, o.id LIMIT $3",
                by_id,
                pattern,
                limit,
                SPEND_DAYS,
            )
        return [
            OrgRow(
                str(r["id"]),
                r["name"],
                int(r["balance"]),
                r["plan"],
                r["last_activity"],
                int(r["spend"]),
                r["created_at"],
            )
            for r in rows
        ]

    async def organization(self, organization_id: str) -> dict[str, Any] | None:
        """Everything the organization page shows, from one snapshot."""
        org = uuid.UUID(organization_id)
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            head = await conn.fetchrow("SELECT id, name, balance, created_at FROM organizations WHERE id = $1", org)
            if head is None:
                return None

            async def rows(sql: str, *args: Any) -> list[dict[str, Any]]:
                return [dict(r) for r in await conn.fetch(sql, org, *args)]

            return {
                "id": str(head["id"]),
                "name": head["name"],
                "ledger_balance": int(head["balance"]),
                "created_at": head["created_at"],
                "grants": await rows(
                    "SELECT id, source, amount, remaining, priority, expires_at, reference, reason, created_at"
                    " FROM credit_grants WHERE organization_id = $1 ORDER BY created_at DESC LIMIT 200"
                ),
                "entries": await rows(
                    "SELECT id, type, amount, balance_after, grant_id, reference, reason, created_at"
                    " FROM ledger_entries WHERE organization_id = $1 ORDER BY id DESC LIMIT $2",
                    ENTRIES_SHOWN,
                ),
                "keys": await rows(
                    "SELECT id, prefix, name, role, department_id, cap, rate_limit_per_s, created_at, revoked_at,"
                    " (SELECT max(h.hour) FROM usage_hourly h WHERE h.organization_id = k.organization_id"
                    "   AND h.credential_id = k.id::text) AS last_used_hour"
                    " FROM api_keys k WHERE organization_id = $1 ORDER BY created_at DESC"
                ),
                "departments": await rows(
                    "SELECT id, name, limit_amount, period, created_at FROM departments"
                    " WHERE organization_id = $1 ORDER BY name"
                ),
                "subscriptions": await rows(
                    "SELECT id, plan_id, status, current_period_start, current_period_end, cancel_at_period_end,"
                    " ended_at FROM billing_subscriptions WHERE organization_id = $1 ORDER BY created_at DESC"
                ),
                "payments": await rows(
                    "SELECT id, kind, package_id, amount, amount_refunded, currency, status, credits, created_at"
                    " FROM billing_payments WHERE organization_id = $1 ORDER BY created_at DESC LIMIT 50"
                ),
                "alerts": await rows(
                    "SELECT threshold, webhook_url, state, updated_at FROM balance_alerts WHERE organization_id = $1"
                ),
                "deliveries": await rows(
                    "SELECT id, event_type, attempts, next_attempt_at, delivered_at, last_error, created_at"
                    " FROM webhook_deliveries WHERE organization_id = $1 ORDER BY created_at DESC LIMIT 20"
                ),
                "adjustments": await rows(
                    "SELECT id, reference, kind, amount, grant_id, reason, actor, outcome, debited, created_at"
                    " FROM credit_adjustments WHERE organization_id = $1 ORDER BY created_at DESC LIMIT 50"
                ),
                "auto_topup": await rows(
                    "SELECT enabled, threshold, package_id, max_per_month, monthly_cap_cents, armed, paused_reason,"
                    " updated_at FROM auto_topup_settings WHERE organization_id = $1"
                ),
                "topup_attempts": await rows(
                    "SELECT id, status, failure_reason, package_id, credits, amount_cents, currency, created_at"
                    " FROM auto_topup_attempts WHERE organization_id = $1 ORDER BY created_at DESC LIMIT 10"
                ),
                "entitlement_overrides": await rows(
                    "SELECT o.feature, o.type, o.enabled, o.limit_value, o.value, o.reason, u.usage"
                    " FROM organization_entitlements o LEFT JOIN entitlement_usage u"
                    "   ON u.organization_id = o.organization_id AND u.feature = o.feature"
                    " WHERE o.organization_id = $1 ORDER BY o.feature"
                ),
                "usage_by_day": await rows(
                    "SELECT date_trunc('day', hour, 'UTC') AS day, action, sum(credits)::bigint AS credits,"
                    " sum(events)::bigint AS events FROM usage_hourly WHERE organization_id = $1"
                    " AND hour >= date_trunc('day', now(), 'UTC') - make_interval(days => $2 - 1)"
                    " GROUP BY 1, 2 ORDER BY 1, 2",
                    SPEND_DAYS,
                ),
            }

    # -- health -----------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """What waits or fails in Postgres: webhook events, outbox pushes, alert
        deliveries, quarantined entries, the settlement watermarks."""
        async with self.pool.acquire() as conn:
            events = await conn.fetch(
                "SELECT e.id, e.organization_id, o.name, e.type, e.status, e.attempts, e.next_attempt_at,"
                " e.last_error, e.received_at FROM stripe_events e"
                " LEFT JOIN organizations o ON o.id = e.organization_id"
                " WHERE e.status = 'failed' OR (e.status = 'pending' AND e.attempts > 0)"
                " ORDER BY e.received_at DESC LIMIT 100"
            )
            outbox = await conn.fetch(
                "SELECT b.grant_id, b.organization_id, o.name, b.attempts, b.next_attempt_at, b.created_at"
                " FROM grant_outbox b JOIN organizations o ON o.id = b.organization_id"
                " ORDER BY b.created_at LIMIT 100"
            )
            outbox_total = await conn.fetchval("SELECT count(*) FROM grant_outbox")
            deliveries = await conn.fetch(
                "SELECT d.id, d.organization_id, o.name, d.event_type, d.attempts, d.next_attempt_at, d.last_error,"
                " d.created_at FROM webhook_deliveries d JOIN organizations o ON o.id = d.organization_id"
                " WHERE d.delivered_at IS NULL AND d.attempts > 0 ORDER BY d.created_at LIMIT 100"
            )
            dead = await conn.fetch("SELECT state, count(*) AS n FROM settlement_dead_letters GROUP BY state")
            marks = await conn.fetch(
                "SELECT partition, last_ms, last_seq FROM settlement_watermarks ORDER BY partition"
            )
        return {
            "events": [dict(r) for r in events],
            "outbox": [dict(r) for r in outbox],
            "outbox_total": int(outbox_total or 0),
            "deliveries": [dict(r) for r in deliveries],
            "dead_letters": {r["state"]: int(r["n"]) for r in dead},
            "watermarks": {int(r["partition"]): int(r["last_ms"]) for r in marks},
        }

    async def organization_names(self, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, name FROM organizations WHERE id = ANY($1::uuid[])", [uuid.UUID(i) for i in ids]
            )
        return {str(r["id"]): r["name"] for r in rows}
