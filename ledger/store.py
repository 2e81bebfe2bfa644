"""The ledger's door: typed operations on Postgres, each in one tenant transaction.

Every query runs inside `tenant(org)`, which sets app.organization_id for that
transaction only; row-level security does the rest, so a query that forgets its
WHERE clause still sees one organization.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from core.periods import period_starts_ms
from hotpath.snapshot import CredSnapshot, DeptSnapshot, GrantSnapshot, HoldSnapshot, Snapshot

# What Postgres being unreachable looks like from asyncpg.
POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
)
API_KEY_PREFIX = "ck_"
# How long the cache remembers that a grant was applied (hotpath: a push of a grant
# older than this, not remembered, is refused as stale); the snapshot marks as applied
# the grants created this recently and those still in the outbox.
APPLIED_KEEP_MS = 7 * 86_400_000
GRANT_PRIORITY = {"signup_bonus": 0, "subscription": 10, "purchase": 20, "admin": 20}


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Credential:
    """Who is calling: an API key or a frontend user (JWT)."""

    id: str  # api key id, or "jwt:<subject>"
    organization_id: str
    role: str  # agent | admin
    department_id: str | None


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    secret: str
    prefix: str


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant_id: str
    created: bool
    balance_after: int


@dataclass(frozen=True, slots=True)
class CreditLine:
    """An organization's credit line (migrations/0035), as the ledger knows it."""

    credit_limit: int  # millicredits: how far below zero `available` may go (0: none)
    debt: int  # millicredits owed (settled; the cache also counts what is in flight)
    entries: list[dict[str, Any]]  # the latest debt_entries, newest first
    changes: list[dict[str, Any]]  # the latest limit changes, newest first


@dataclass(frozen=True, slots=True)
class Department:
    id: str
    name: str
    limit: int | None
    period: str
    generation: int
    mode: str = "hard"  # hard: the hot path refuses past the limit; soft: alerts at alert_percent
    alert_percent: int | None = None

    @property
    def enforced_limit(self) -> int:
        """The limit the hot path enforces (millicredits, -1 none): a soft budget's is none."""
        return -1 if self.limit is None or self.mode == "soft" else self.limit


@dataclass(frozen=True, slots=True)
class Cost:
    action: str
    credits: int  # millicredits per unit
    unit: str
    description: str


@dataclass(frozen=True, slots=True)
class LedgerSide:
    """What reconciliation compares the cache with, read in one snapshot."""

    balance: int  # organizations.balance
    after: str  # the first stream entry of the partition the ledger does not hold
    outbox: list[tuple[str, int]]  # grants not yet confirmed in the cache: (id, amount)
    quarantined: int  # the balance change of held dead letters (settlement could not take them)
    debt: int = 0  # organizations.debt: what is owed on the credit line (migrations/0035)
    quarantined_debt: int = 0  # the debt change of the held dead letters


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """An API key as people see it: never its secret."""

    id: str
    prefix: str
    name: str
    role: str
    department_id: str | None
    cap: int | None  # millicredits, lifetime
    rate_limit_per_s: float | None  # None: the default
    rate_limit_burst: float | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None  # of its last settled usage event


@dataclass(frozen=True, slots=True)
class AlertConfig:
    organization_id: str
    threshold: int  # millicredits of `available`
    webhook_url: str
    state: str  # ok | low
    updated_at: dt.datetime
    days_left: decimal.Decimal | None = None  # also low when fewer days are left at the recent rate


@dataclass(frozen=True, slots=True)
class Adjustment:
    """An adjustment down or a void (migrations/0011), decided once."""

    id: str
    reference: str
    kind: str  # debit | void
    amount: int  # asked, millicredits
    grant_id: str | None
    reason: str
    actor: str
    event_id: str
    outcome: str  # pending | applied | refused
    debited: int | None
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class StoredResponse:
    fingerprint: str
    status: int
    body: bytes


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _ms(ts: dt.datetime | None) -> int:
    return 0 if ts is None else int(ts.timestamp() * 1000)


class Ledger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> Ledger:
        # timeout: a connection attempt to an unreachable host gives up after 5 s, not 60.
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=10, timeout=5)
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def tenant(self, organization_id: str) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('app.organization_id', $1, true)", str(organization_id))
            yield conn

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    # -- organizations and keys ----------------------------------------------------
    async def create_organization(self, name: str) -> tuple[str, NewKey]:
        """A new organization with its signup bonus and one admin key."""
        org = str(uuid.uuid4())
        async with self.tenant(org) as conn:
            await conn.fetchval("SELECT create_organization($1, $2)", uuid.UUID(org), name)
            key = await self._create_key(conn, org, role="admin", name="initial admin key")
        return org, key

    async def organization_exists(self, organization_id: str) -> bool:
        async with self.tenant(organization_id) as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM organizations"))

    async def create_api_key(
        self,
        organization_id: str,
        *,
        role: str,
        name: str = "",
        department_id: str | None = None,
        cap: int | None = None,
        rate_limit_per_s: float | None = None,
        rate_limit_burst: float | None = None,
    ) -> NewKey:
        async with self.tenant(organization_id) as conn:
            if not await conn.fetchval("SELECT count(*) FROM organizations"):
                raise NotFound(f"organization {organization_id} not found")
            if department_id is not None and not await conn.fetchval(
                "SELECT count(*) FROM departments WHERE id = $1", uuid.UUID(department_id)
            ):
                raise NotFound(f"department {department_id} not found")
            return await self._create_key(
                conn,
                organization_id,
                role=role,
                name=name,
                department_id=department_id,
                cap=cap,
                rate=rate_limit_per_s,
                burst=rate_limit_burst,
            )

    async def _create_key(
        self,
        conn: asyncpg.Connection,
        organization_id: str,
        *,
        role: str,
        name: str = "",
        department_id: str | None = None,
        cap: int | None = None,
        rate: float | None = None,
        burst: float | None = None,
    ) -> NewKey:
        if role not in ("agent", "admin"):
            raise ValueError("role must be agent or admin")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = str(uuid.uuid4())
        digest = hash_key(secret)
        await conn.execute(
            "INSERT INTO api_keys (id, organization_id, key_hash, prefix, name, role, department_id,"
            " cap, rate_limit_per_s, rate_limit_burst) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            uuid.UUID(key_id),
            uuid.UUID(organization_id),
            digest,
            secret[:10],
            name,
            role,
            uuid.UUID(department_id) if department_id else None,
            cap,
            rate,
            burst,
        )
        await conn.execute("SELECT index_api_key($1)", digest)
        return NewKey(id=key_id, secret=secret, prefix=secret[:10])

    async def revoke_api_key(self, organization_id: str, key_id: str) -> bool:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchval(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id",
                uuid.UUID(key_id),
            )
            return row is not None

    async def api_keys(self, organization_id: str, *, include_revoked: bool = True) -> list[ApiKeyRow]:
        """The organization's keys, newest first."""
        async with self.tenant(organization_id) as conn:
            rows = await conn.fetch(
                "SELECT k.*, s.last_used_at FROM api_keys k LEFT JOIN credential_spend s"
                "   ON s.organization_id = k.organization_id AND s.credential_id = k.id::text"
                " WHERE $1 OR k.revoked_at IS NULL ORDER BY k.created_at DESC, k.id",
                include_revoked,
            )
        return [
            ApiKeyRow(
                id=str(r["id"]),
                prefix=r["prefix"],
                name=r["name"],
                role=r["role"],
                department_id=str(r["department_id"]) if r["department_id"] else None,
                cap=None if r["cap"] is None else int(r["cap"]),
                rate_limit_per_s=r["rate_limit_per_s"],
                rate_limit_burst=r["rate_limit_burst"],
                created_at=r["created_at"],
                revoked_at=r["revoked_at"],
                last_used_at=r["last_used_at"],
            )
            for r in rows
        ]

    async def api_key_active(self, organization_id: str, key_id: str) -> bool:
        """Whether the key exists in this organization and is not revoked."""
        try:
            key = uuid.UUID(key_id)
        except ValueError:
            return False
        async with self.tenant(organization_id) as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key))

    async def api_key(self, organization_id: str, key_id: str) -> dict[str, Any]:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", uuid.UUID(key_id))
        if row is None:
            raise NotFound(f"api key {key_id} not found")
        return dict(row)

    async def authenticate(self, secret: str) -> Credential | None:
        if not secret.startswith(API_KEY_PREFIX) or len(secret) > 200:
            return None
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM authenticate_api_key($1)", hash_key(secret))
        if row is None:
            return None
        dept = row["department_id"]
        return Credential(
            id=str(row["id"]),
            organization_id=str(row["organization_id"]),
            role=row["role"],
            department_id=str(dept) if dept else None,
        )

    # -- grants ---------------------------------------------------------------------
    async def grant(
        self,
        organization_id: str,
        *,
        amount: int,
        source: str,
        reference: str,
        reason: str = "",
        expires_at: dt.datetime | None = None,
        priority: int | None = None,
    ) -> GrantResult:
        """Write a grant to the ledger (idempotent per source + reference)."""
        if priority is None:
            priority = GRANT_PRIORITY[source]
        try:
            async with self.tenant(organization_id) as conn:
                row = await conn.fetchrow(
                    "SELECT * FROM grant_credits($1, $2, $3, $4, $5, $6, $7)",
                    uuid.UUID(organization_id),
                    source,
                    amount,
                    priority,
                    expires_at,
                    reference,
                    reason,
                )
        except asyncpg.exceptions.NoDataFoundError as exc:
            raise NotFound(str(exc)) from exc
        assert row is not None
        return GrantResult(str(row["grant_id"]), bool(row["created"]), int(row["balance_after"]))

    async def grant_row(self, organization_id: str, grant_id: str) -> dict[str, Any]:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow("SELECT * FROM credit_grants WHERE id = $1", uuid.UUID(grant_id))
        if row is None:
            raise NotFound(f"grant {grant_id} not found")
        return dict(row)

    async def grant_sources(self, organization_id: str, grant_ids: list[str]) -> dict[str, str]:
        if not grant_ids:
            return {}
        async with self.tenant(organization_id) as conn:
            rows = await conn.fetch(
                "SELECT id, source FROM credit_grants WHERE id = ANY($1::uuid[])", [uuid.UUID(g) for g in grant_ids]
            )
        return {str(r["id"]): r["source"] for r in rows}

    async def pending_pushes(self, organization_id: str) -> list[dict[str, Any]]:
        """Grants of the outbox not yet confirmed in the cache."""
        async with self.tenant(organization_id) as conn:
            rows = await conn.fetch(
                "SELECT g.id, g.amount, g.priority, g.expires_at, g.created_at FROM grant_outbox o"
                " JOIN credit_grants g ON g.id = o.grant_id ORDER BY o.created_at"
            )
        return [dict(r) for r in rows]

    async def grant_pushed(self, organization_id: str, grant_id: str) -> None:
        """The cache holds the grant now: drop it from the outbox."""
        async with self.tenant(organization_id) as conn:
            await conn.execute("DELETE FROM grant_outbox WHERE grant_id = $1", uuid.UUID(grant_id))

    async def ledger_balance(self, organization_id: str) -> tuple[int, int]:
        """(organizations.balance, sum of ledger entries): equal when the ledger is whole."""
        async with self.tenant(organization_id) as conn:
            balance = await conn.fetchval("SELECT balance FROM organizations")
            if balance is None:
                raise NotFound(f"organization {organization_id} not found")
            total = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries")
        return int(balance), int(total)

    # -- credit lines (migrations/0035) ----------------------------------------------
    async def set_credit_limit(self, organization_id: str, limit: int, reason: str = "") -> CreditLine:
        """Set how far below zero the organization's `available` may go (operations only)."""
        try:
            async with self.tenant(organization_id) as conn:
                await conn.execute(
                    "SELECT * FROM set_credit_limit($1, $2, $3)", uuid.UUID(organization_id), limit, reason
                )
        except asyncpg.exceptions.NoDataFoundError as exc:
            raise NotFound(str(exc)) from exc
        return await self.credit_line(organization_id)

    async def credit_line(self, organization_id: str, *, limit: int = 20) -> CreditLine:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow("SELECT credit_limit, debt FROM organizations")
            if row is None:
                raise NotFound(f"organization {organization_id} not found")
            entries = await conn.fetch(
                "SELECT type, amount, debt_after, grant_id::text AS grant_id, reference, created_at"
                " FROM debt_entries ORDER BY id DESC LIMIT $1",
                limit,
            )
            changes = await conn.fetch(
                "SELECT credit_limit, reason, created_at FROM credit_line_changes ORDER BY id DESC LIMIT $1", limit
            )
        return CreditLine(
            credit_limit=int(row["credit_limit"]),
            debt=int(row["debt"]),
            entries=[dict(r) for r in entries],
            changes=[dict(r) for r in changes],
        )

    # -- cold-cache snapshot --------------------------------------------------------
    async def snapshot(self, organization_id: str, partition: int | None = None) -> Snapshot:
        """The organization as the ledger knows it, in one repeatable-read snapshot,
        with the watermark of its partition (the first stream entry not yet settled)."""
        now = dt.datetime.now(dt.UTC)
        starts = dict(zip(("day", "week", "month"), period_starts_ms(_ms(now)), strict=True))
        start_days = {k: dt.datetime.fromtimestamp(v / 1000, dt.UTC).date() for k, v in starts.items()}
        org = uuid.UUID(organization_id)
        async with self.tenant(organization_id) as conn:
            # Each load gets a new generation (its own short transaction: concurrent
            # loads must not fail the snapshot below with a serialization error).
            gen = await conn.fetchval("UPDATE organizations SET cache_gen = cache_gen + 1 RETURNING cache_gen")
        if gen is None:
            raise NotFound(f"organization {organization_id} not found")
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SELECT set_config('app.organization_id', $1, true)", str(organization_id))
            mark = None
            if partition is not None:
                mark = await conn.fetchrow(
                    "SELECT last_ms, last_seq FROM settlement_watermarks WHERE partition = $1", partition
                )
            grants = await conn.fetch(
                "SELECT id, remaining, priority, expires_at FROM credit_grants WHERE remaining > 0"
            )
            line = await conn.fetchrow("SELECT credit_limit, debt FROM organizations WHERE id = $1", org)
            # Grants a push may still arrive for: the recent ones and those in the outbox
            # (the cache remembers applied grants as long; an older push is refused as
            # stale and answered with a reload, see accounts.grants).
            applied = await conn.fetch(
                "SELECT id FROM credit_grants WHERE organization_id = $1 AND created_at > $2"
                " UNION SELECT grant_id FROM grant_outbox WHERE organization_id = $1",
                org,
                now - dt.timedelta(milliseconds=APPLIED_KEEP_MS),
            )
            costs = await conn.fetch("SELECT action, credits FROM action_costs")
            # What each department spent in its current period, from the daily totals
            # settlement keeps (migrations/0008): usage and captures of closed holds.
            depts = await conn.fetch(
                "SELECT d.id, d.limit_amount, d.period, d.budget_mode,"
                " coalesce((SELECT sum(s.spent) FROM department_spend_daily s"
                "   WHERE s.organization_id = d.organization_id AND s.department_id = d.id"
                "   AND s.day >= CASE d.period WHEN 'day' THEN $1::date WHEN 'week' THEN $2::date ELSE $3::date END),"
                " 0) AS spent FROM departments d",
                start_days["day"],
                start_days["week"],
                start_days["month"],
            )
            holds = await conn.fetch(
                "SELECT r.id, r.amount, r.department_id, r.credential_id, r.action, r.expires_at, r.created_at,"
                " coalesce(array_agg(a.grant_id::text ORDER BY a.score, a.grant_id)"
                "   FILTER (WHERE a.grant_id IS NOT NULL), '{}') AS grant_ids,"
                " coalesce(array_agg(a.amount ORDER BY a.score, a.grant_id)"
                "   FILTER (WHERE a.grant_id IS NOT NULL), '{}') AS amounts,"
                " coalesce(array_agg(a.score ORDER BY a.score, a.grant_id)"
                "   FILTER (WHERE a.grant_id IS NOT NULL), '{}') AS scores,"
                # the part on the credit line (migrations/0035)
                " coalesce((SELECT d.amount FROM debt_entries d WHERE d.organization_id = r.organization_id"
                "   AND d.type = 'overdraw' AND d.reference = 'hold:' || r.id), 0) AS overdraft"
                " FROM reservations r LEFT JOIN reservation_allocations a"
                "   ON a.organization_id = r.organization_id AND a.reservation_id = r.id"
                " WHERE r.status = 'open' GROUP BY r.organization_id, r.id"
            )
            held = await conn.fetch(
                "SELECT raw FROM settlement_dead_letters WHERE organization_id = $1 AND state = 'held' ORDER BY id",
                uuid.UUID(organization_id),
            )
            keys = await conn.fetch(
                "SELECT k.id, k.cap, k.revoked_at, k.rate_limit_per_s, k.rate_limit_burst,"
                " coalesce(s.spent, 0) AS spent FROM api_keys k LEFT JOIN credential_spend s"
                "   ON s.organization_id = k.organization_id AND s.credential_id = k.id::text"
            )
        after = "0-0" if mark is None else f"{mark['last_ms']}-{int(mark['last_seq']) + 1}"
        dept_rows = {d["id"]: d for d in depts}
        dept_spent: dict[Any, int] = {d["id"]: int(d["spent"]) for d in depts}
        hold_snaps: list[HoldSnapshot] = []
        cred_held: dict[str, int] = {}
        for h in holds:
            dept = h["department_id"]
            ps = 0
            if dept is not None and dept in dept_rows:
                period = dept_rows[dept]["period"]
                ps = dict(zip(("day", "week", "month"), period_starts_ms(_ms(h["created_at"])), strict=True))[period]
                if ps == starts[period]:
                    dept_spent[dept] = dept_spent.get(dept, 0) + int(h["amount"])
            cred_held[h["credential_id"]] = cred_held.get(h["credential_id"], 0) + int(h["amount"])
            alloc: list[str | int] = []
            for gid, amount, score in zip(h["grant_ids"], h["amounts"], h["scores"], strict=True):
                alloc += [gid, int(amount), int(score)]
            hold_snaps.append(
                HoldSnapshot(
                    id=h["id"],
                    a=int(h["amount"]),
                    al=alloc,
                    d=str(dept) if dept else "",
                    ps=ps,
                    k=h["credential_id"],
                    x=_ms(h["expires_at"]),
                    act=h["action"],
                    o=int(h["overdraft"]),
                )
            )
        return Snapshot(
            gen=int(gen),
            grants=[
                GrantSnapshot(
                    id=str(g["id"]), rem=int(g["remaining"]), prio=int(g["priority"]), exp=_ms(g["expires_at"])
                )
                for g in grants
            ],
            applied=[str(r["id"]) for r in applied],
            costs={r["action"]: int(r["credits"]) for r in costs},
            depts=[
                DeptSnapshot(
                    id=str(d["id"]),
                    # a soft budget is not enforced by the hot path (settler alerts on it)
                    limit=-1 if d["limit_amount"] is None or d["budget_mode"] == "soft" else int(d["limit_amount"]),
                    period=d["period"],
                    pstart=starts[d["period"]],
                    spent=dept_spent.get(d["id"], 0),
                )
                for d in depts
            ],
            creds=[
                CredSnapshot(
                    id=str(k["id"]),
                    cap=-1 if k["cap"] is None else int(k["cap"]),
                    spent=int(k["spent"]) + cred_held.get(str(k["id"]), 0),
                    revoked="1" if k["revoked_at"] else "0",
                    rate=-1.0 if k["rate_limit_per_s"] is None else float(k["rate_limit_per_s"]),
                    burst=-1.0 if k["rate_limit_burst"] is None else float(k["rate_limit_burst"]),
                )
                for k in keys
            ],
            holds=hold_snaps,
            after=after,
            held=[bytes(r["raw"]) for r in held],
            limit=int(line["credit_limit"]) if line else 0,
            debt=int(line["debt"]) if line else 0,
        )

    async def ledger_view(self, organization_id: str, partition: int) -> LedgerSide:
        """Reconciliation's ledger side for one organization, in one snapshot (see
        ledger.settlement.Settlement.ledger_view, the settler's cross-tenant twin)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SELECT set_config('app.organization_id', $1, true)", str(organization_id))
            balance = await conn.fetchval("SELECT balance FROM organizations")
            if balance is None:
                raise NotFound(f"organization {organization_id} not found")
            return await ledger_side(conn, uuid.UUID(organization_id), int(balance), partition)

    # -- alerts ---------------------------------------------------------------------
    async def set_alert(
        self, organization_id: str, *, threshold: int, webhook_url: str, days_left: decimal.Decimal | None = None
    ) -> str:
        """Configure the low-balance alert: below `threshold` available, or (days_left)
        when fewer days than that are left at the recent rate of spend. Returns the
        signing secret (new each time)."""
        if threshold < 0:
            raise ValueError("threshold must not be negative")
        if days_left is not None and not decimal.Decimal("0.01") <= days_left <= 365:
            raise ValueError("days_left must be between 0.01 and 365")
        if not webhook_url.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http(s) URL")
        secret = "whsec_" + secrets.token_urlsafe(32)
        async with self.tenant(organization_id) as conn:
            await conn.execute(
                "INSERT INTO balance_alerts (organization_id, threshold, webhook_url, secret, days_left)"
                " VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (organization_id) DO UPDATE SET threshold = $2, webhook_url = $3, secret = $4,"
                " days_left = $5, updated_at = now()",
                uuid.UUID(organization_id),
                threshold,
                webhook_url,
                secret,
                days_left,
            )
        return secret

    async def alert(self, organization_id: str) -> AlertConfig | None:
        """The low-balance alert, if one is set (its signing secret is not returned)."""
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow(
                "SELECT organization_id, threshold, webhook_url, state, updated_at, days_left FROM balance_alerts"
            )
        if row is None:
            return None
        return AlertConfig(
            str(row["organization_id"]),
            int(row["threshold"]),
            row["webhook_url"],
            row["state"],
            row["updated_at"],
            row["days_left"],
        )

    async def delete_alert(self, organization_id: str) -> bool:
        """Stop alerting; deliveries still waiting are dropped with it. False: none was set."""
        async with self.tenant(organization_id) as conn:
            await conn.execute("DELETE FROM webhook_deliveries WHERE delivered_at IS NULL")
            deleted = await conn.fetchval("DELETE FROM balance_alerts RETURNING organization_id")
        return deleted is not None

    async def queue_alert_test(self, organization_id: str, payload: str) -> str:
        """Queue a signed test delivery (`alert.test`) to the alert's URL; the settler
        sends it within about a second, like any alert. Raises NotFound without an alert."""
        delivery_id = uuid.uuid4()
        async with self.tenant(organization_id) as conn:
            if await conn.fetchval("SELECT count(*) FROM balance_alerts") == 0:
                raise NotFound(f"organization {organization_id} has no alert set")
            await conn.execute(
                "INSERT INTO webhook_deliveries (id, organization_id, event_type, payload)"
                " VALUES ($1, $2, $3, $4::jsonb)",
                delivery_id,
                uuid.UUID(organization_id),
                "alert.test",
                payload,
            )
        return str(delivery_id)

    # -- departments ----------------------------------------------------------------
    async def departments(self, organization_id: str) -> list[Department]:
        async with self.tenant(organization_id) as conn:
            rows = await conn.fetch("SELECT * FROM departments ORDER BY created_at, id")
        return [self._dept(r) for r in rows]

    async def department(self, organization_id: str, department_id: str) -> Department:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow("SELECT * FROM departments WHERE id = $1", uuid.UUID(department_id))
        if row is None:
            raise NotFound(f"department {department_id} not found")
        return self._dept(row)

    async def create_department(self, organization_id: str, name: str) -> Department:
        try:
            async with self.tenant(organization_id) as conn:
                row = await conn.fetchrow(
                    "INSERT INTO departments (id, organization_id, name) VALUES ($1, $2, $3) RETURNING *",
                    uuid.uuid4(),
                    uuid.UUID(organization_id),
                    name,
                )
        except asyncpg.exceptions.UniqueViolationError as exc:
            raise Conflict(f"a department named {name!r} exists") from exc
        assert row is not None
        return self._dept(row)

    async def set_department_limit(
        self,
        organization_id: str,
        department_id: str,
        limit: int | None,
        period: str,
        *,
        mode: str = "hard",
        alert_percent: int | None = None,
    ) -> Department:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow(
                "UPDATE departments SET limit_amount = $2, period = $3, limit_generation = limit_generation + 1,"
                " budget_mode = $4, alert_percent = $5 WHERE id = $1 RETURNING *",
                uuid.UUID(department_id),
                limit,
                period,
                mode,
                alert_percent,
            )
        if row is None:
            raise NotFound(f"department {department_id} not found")
        return self._dept(row)

    @staticmethod
    def _dept(row: asyncpg.Record) -> Department:
        limit = row["limit_amount"]
        return Department(
            id=str(row["id"]),
            name=row["name"],
            limit=None if limit is None else int(limit),
            period=row["period"],
            generation=int(row["limit_generation"]),
            mode=row["budget_mode"],
            alert_percent=row["alert_percent"],
        )

    # -- costs ----------------------------------------------------------------------
    async def costs(self, organization_id: str) -> list[Cost]:
        async with self.tenant(organization_id) as conn:
            rows = await conn.fetch("SELECT * FROM action_costs ORDER BY action")
        return [Cost(r["action"], int(r["credits"]), r["unit"], r["description"]) for r in rows]

    async def set_cost(
        self, organization_id: str, action: str, credits: int, unit: str | None, description: str | None
    ) -> Cost:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO action_costs (organization_id, action, credits, unit, description)"
                " VALUES ($1, $2, $3, coalesce($4, 'request'), coalesce($5, ''))"
                " ON CONFLICT (organization_id, action) DO UPDATE SET credits = excluded.credits,"
                " unit = coalesce($4, action_costs.unit), description = coalesce($5, action_costs.description),"
                " updated_at = now() RETURNING *",
                uuid.UUID(organization_id),
                action,
                credits,
                unit,
                description,
            )
        assert row is not None
        return Cost(row["action"], int(row["credits"]), row["unit"], row["description"])

    # -- adjustments down ------------------------------------------------------------
    async def claim_adjustment(
        self,
        organization_id: str,
        *,
        reference: str,
        kind: str,
        amount: int,
        reason: str,
        actor: str,
        grant_id: str | None = None,
    ) -> Adjustment:
        """The adjustment of this reference: written now, or the one written before
        (Conflict when that one asked for something else)."""
        new_id = uuid.uuid4()
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO credit_adjustments (id, organization_id, reference, kind, amount, grant_id, reason, actor,"
                " event_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (organization_id, reference) DO NOTHING RETURNING *",
                new_id,
                uuid.UUID(organization_id),
                reference,
                kind,
                amount,
                uuid.UUID(grant_id) if grant_id else None,
                reason,
                actor,
                f"adj-{new_id.hex}",
            )
            if row is None:
                row = await conn.fetchrow("SELECT * FROM credit_adjustments WHERE reference = $1", reference)
        if row is None:
            raise NotFound(f"organization {organization_id} not found")
        found = _adjustment(row)
        if (found.kind, found.amount, found.grant_id, found.reason) != (kind, amount, grant_id, reason):
            raise Conflict(f"reference {reference!r} was used for a different adjustment")
        return found

    async def decide_adjustment(self, organization_id: str, adjustment_id: str, *, outcome: str, debited: int) -> None:
        async with self.tenant(organization_id) as conn:
            await conn.execute(
                "UPDATE credit_adjustments SET outcome = $2, debited = $3, decided_at = now()"
                " WHERE id = $1 AND outcome <> 'applied'",
                uuid.UUID(adjustment_id),
                outcome,
                debited,
            )

    async def settled_debit(self, organization_id: str, event_id: str) -> int | None:
        """What an adjustment's event took, once it is in the ledger (None: not yet)."""
        async with self.tenant(organization_id) as conn:
            amount = await conn.fetchval(
                "SELECT amount FROM ledger_entries WHERE type = 'adjustment' AND reference = $1", event_id
            )
        return None if amount is None else -int(amount)

    # -- idempotency of endpoints outside the hot path -------------------------------
    @asynccontextmanager
    async def idempotency_lock(self, organization_id: str, key: str) -> AsyncIterator[None]:
        """Requests with the same key (in one organization) run one at a time: a session
        advisory lock on the pair, held while the caller decides and stores its answer."""
        async with self.pool.acquire() as conn:
            lock = await conn.fetchval("SELECT hashtextextended($1, 0)", f"idempotency:{organization_id}:{key}")
            await conn.execute("SELECT pg_advisory_lock($1)", lock)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock)

    async def stored_response(self, organization_id: str, key: str) -> StoredResponse | None:
        async with self.tenant(organization_id) as conn:
            row = await conn.fetchrow(
                "SELECT fingerprint, status, response FROM idempotency_records"
                " WHERE key = $1 AND created_at > now() - interval '48 hours'",
                key,
            )
        if row is None:
            return None
        return StoredResponse(row["fingerprint"], int(row["status"]), bytes(row["response"]))

    async def store_response(self, organization_id: str, key: str, response: StoredResponse) -> StoredResponse:
        """Store the first response for a key; return whichever response won."""
        async with self.tenant(organization_id) as conn:
            await conn.execute(
                "INSERT INTO idempotency_records (organization_id, key, fingerprint, status, response)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (organization_id, key) DO UPDATE"
                " SET fingerprint = excluded.fingerprint, status = excluded.status,"
                " response = excluded.response, created_at = now()"
                " WHERE idempotency_records.created_at <= now() - interval '48 hours'",
                uuid.UUID(organization_id),
                key,
                response.fingerprint,
                response.status,
                response.body,
            )
            row = await conn.fetchrow(
                "SELECT fingerprint, status, response FROM idempotency_records WHERE key = $1", key
            )
        assert row is not None
        return StoredResponse(row["fingerprint"], int(row["status"]), bytes(row["response"]))


@dataclass(frozen=True, slots=True)
class UsageRow:
    id: str
    action: str
    units: int
    credits: int
    department_id: str | None
    metadata: str  # JSON text
    created_at: dt.datetime
    kind: str = "use"  # use | capture (a released reservation's charge)


@dataclass(frozen=True, slots=True)
class SummaryRow:
    key: str
    events: int
    units: int
    credits: int
    sub_key: str = ""  # the second grouping, when one was asked for


@dataclass(frozen=True, slots=True)
class EntryRow:
    id: int
    type: str
    amount: int
    balance_after: int
    reference: str
    created_at: dt.datetime


def _adjustment(row: asyncpg.Record) -> Adjustment:
    return Adjustment(
        id=str(row["id"]),
        reference=row["reference"],
        kind=row["kind"],
        amount=int(row["amount"]),
        grant_id=str(row["grant_id"]) if row["grant_id"] else None,
        reason=row["reason"],
        actor=row["actor"],
        event_id=row["event_id"],
        outcome=row["outcome"],
        debited=None if row["debited"] is None else int(row["debited"]),
        created_at=row["created_at"],
    )


async def ledger_side(conn: asyncpg.Connection, org: uuid.UUID, balance: int, partition: int) -> LedgerSide:
    """The rest of LedgerSide, in the caller's snapshot (shared by the tenant's and the
    settler's view)."""
    mark = await conn.fetchrow("SELECT last_ms, last_seq FROM settlement_watermarks WHERE partition = $1", partition)
    outbox = await conn.fetch(
        "SELECT o.grant_id, g.amount FROM grant_outbox o JOIN credit_grants g ON g.id = o.grant_id"
        " WHERE o.organization_id = $1",
        org,
    )
    quarantined = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM settlement_dead_letters WHERE organization_id = $1 AND state = 'held'",
        org,
    )
    debt = await conn.fetchval("SELECT debt FROM organizations WHERE id = $1", org)
    held = await conn.fetch(
        "SELECT raw FROM settlement_dead_letters WHERE organization_id = $1 AND state = 'held'", org
    )
    return LedgerSide(
        balance=balance,
        after=watermark_after(mark),
        outbox=[(str(r["grant_id"]), int(r["amount"])) for r in outbox],
        quarantined=int(quarantined),
        debt=int(debt or 0),
        quarantined_debt=sum(debt_change(bytes(r["raw"])) for r in held),
    )


def debt_change(raw: bytes) -> int:
    """What a stream event (msgpack) did to its organization's debt on the credit line,
    as lua/reconcile.lua counts it; 0 when unreadable."""
    try:
        ev = msgspec.msgpack.decode(raw)
        kind = ev.get("t")
        if kind in ("use", "hold"):
            return int(ev.get("od") or 0)
        if kind == "use_batch":
            return sum(int(item.get("od") or 0) for item in ev["ev"])
        if kind == "hold_closed":
            return -int(ev.get("odr") or 0)
        if kind == "grant_applied":
            return -int(ev.get("rp") or 0)
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError, ValueError):
        return 0
    return 0


def watermark_after(mark: asyncpg.Record | None) -> str:
    """The first stream entry after a partition's watermark ("0-0": nothing settled)."""
    return "0-0" if mark is None else f"{mark['last_ms']}-{int(mark['last_seq']) + 1}"


# Usage is two kinds of rows read as one: the usage events, and the reservations a
# release charged (`used > 0`: a capture), each capture one event of one unit at the
# time it was released. Each kind pages in order along its own index (migrations/0001,
# 0002 and 0010), and the page merges the two streams.
_USAGE_SOURCES = (
    (
        "SELECT id, action, units, credits, department_id, metadata::text AS metadata, created_at,"
        " 'use' AS kind FROM usage_events",
        "created_at",
        "",
    ),
    (
        "SELECT id, action, 1::bigint AS units, used AS credits, department_id, metadata::text AS metadata,"
        " closed_at AS created_at, 'capture' AS kind FROM reservations",
        "closed_at",
        " AND used > 0",
    ),
)


def usage_page_query(
    organization_id: uuid.UUID,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    department_id: uuid.UUID | None = None,
    action: str | None = None,
    cursor: tuple[dt.datetime, str] | None = None,
    limit: int = 20,
) -> tuple[str, list[Any]]:
    """The page query with only the filters in use, so each variant gets a plan of its
    own that walks an index in order (no generic plan full of `$n IS NULL OR ...`):
    usage events and captures, each along its index, merged in order."""
    args: list[Any] = [organization_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    lo = None if start is None else arg(start)
    hi = None if end is None else arg(end)
    dept = None if department_id is None else arg(department_id)
    act = None if action is None else arg(action)
    after = None if cursor is None else (arg(cursor[0]), arg(cursor[1]))
    n = arg(limit)
    branches = []
    for select, at, only in _USAGE_SOURCES:
        where = ["organization_id = $1"]
        if lo is not None:
            where.append(f"{at} >= {lo}")
        if hi is not None:
            where.append(f"{at} < {hi}")
        if dept is not None:
            where.append(f"department_id = {dept}")
        if act is not None:
            where.append(f"action = {act}")
        if after is not None:
            where.append(f"({at}, id) < ({after[0]}, {after[1]}::text)")
        branches.append(f"({select} WHERE {' AND '.join(where)}{only} ORDER BY {at} DESC, id DESC LIMIT {n})")
    # Each branch ordered and limited on its own: the planner merges two short index
    # scans (Merge Append) instead of sorting everything (it will not push the order
    # into a plain UNION ALL under row-level security).
    sql = f"SELECT * FROM ({' UNION ALL '.join(branches)}) u ORDER BY created_at DESC, id DESC LIMIT {n}"  # noqa: S608
    return sql, args


# group_by -> (key over usage_hourly, key over usage_events, key over reservations)
_SUMMARY_KEYS = {
    "action": ("action", "action", "action"),
    "department": ("coalesce(department_id::text, '')",) * 3,
    "api_key": ("credential_id",) * 3,
    "day": (
        "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    ),
    "hour": (
        "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
        "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
        "to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
    ),
}
SUMMARY_GROUPS = tuple(_SUMMARY_KEYS)
_HOUR = dt.timedelta(hours=1)


def _hour_floor(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _hour_ceil(t: dt.datetime) -> dt.datetime:
    floor = _hour_floor(t)
    return floor if floor == t else floor + _HOUR


def usage_summary_query(
    organization_id: uuid.UUID,
    *,
    start: dt.datetime | None,
    end: dt.datetime | None,
    group_by: str,
    then_by: str | None = None,
    action: str | None = None,
    department_id: uuid.UUID | None = None,
) -> tuple[str, list[Any]]:
    """The summary of [start, end) (None: unbounded): the hourly rollup for the whole
    hours inside (usage events and captures), the raw rows for the partial hour at each
    edge. Only the parts and bounds in use are in the SQL, so each part walks its index
    over its range. `then_by`: a second grouping (e.g. day, then action); `action` and
    `department_id` keep only that action's or department's usage."""
    keys = [_SUMMARY_KEYS[group_by], _SUMMARY_KEYS[then_by] if then_by else ("''",) * 3]
    args: list[Any] = [organization_id]
    only: list[str] = []
    for column, value in (("action", action), ("department_id", department_id)):
        if value is not None:
            args.append(value)
            only.append(f"{column} = ${len(args)}")

    def within(column: str, lo: dt.datetime | None, hi: dt.datetime | None) -> str:
        where = ["organization_id = $1", *only]
        for op, bound in ((">=", lo), ("<", hi)):
            if bound is not None:
                args.append(bound)
                where.append(f"{column} {op} ${len(args)}")
        return " AND ".join(where)

    def select(source: int) -> str:
        return f"SELECT {keys[0][source]} AS key, {keys[1][source]} AS sub_key"

    first = None if start is None else _hour_ceil(start)  # whole hours: [first, last)
    last = None if end is None else _hour_floor(end)
    parts: list[str] = []
    raw: list[tuple[dt.datetime | None, dt.datetime | None]] = []
    if first is not None and last is not None and first >= last:
        raw.append((start, end))  # less than one whole hour: the rows alone
    else:
        parts.append(f"{select(0)}, events, units, credits FROM usage_hourly WHERE {within('hour', first, last)}")
        if start is not None and first is not None and start < first:
            raw.append((start, first))
        if end is not None and last is not None and last < end:
            raw.append((last, end))
    for lo, hi in raw:
        parts.append(f"{select(1)}, 1 AS events, units, credits FROM usage_events WHERE {within('created_at', lo, hi)}")
        parts.append(
            f"{select(2)}, 1 AS events, 1 AS units, used AS credits FROM reservations"
            f" WHERE {within('closed_at', lo, hi)} AND used > 0"
        )
    sql = (
        "SELECT key, sub_key, sum(events) AS events, sum(units) AS units, sum(credits) AS credits"  # noqa: S608
        f" FROM ({' UNION ALL '.join(parts)}) x GROUP BY key, sub_key ORDER BY key, sub_key"
    )
    return sql, args


class LedgerReads:
    """Read-only views of one organization's ledger for the API (cursor pages)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def usage(
        self,
        organization_id: str,
        *,
        start: dt.datetime | None,
        end: dt.datetime | None,
        department_id: str | None,
        action: str | None,
        limit: int,
        starting_after: str | None,
    ) -> tuple[list[UsageRow], bool]:
        org = uuid.UUID(organization_id)
        async with self.ledger.tenant(organization_id) as conn:
            cursor_at: dt.datetime | None = None
            if starting_after is not None:  # a usage event, or a capture (by primary key)
                cursor_at = await conn.fetchval(
                    "SELECT created_at FROM usage_events WHERE organization_id = $1 AND id = $2 UNION ALL"
                    " SELECT closed_at FROM reservations WHERE organization_id = $1 AND id = $2 AND used > 0 LIMIT 1",
                    org,
                    starting_after,
                )
                if cursor_at is None:
                    raise NotFound(f"no usage event {starting_after}")
            sql, args = usage_page_query(
                org,
                start=start,
                end=end,
                department_id=uuid.UUID(department_id) if department_id else None,
                action=action,
                cursor=(cursor_at, starting_after) if cursor_at is not None and starting_after is not None else None,
                limit=limit + 1,
            )
            rows = await conn.fetch(sql, *args)
        page = [
            UsageRow(
                id=r["id"],
                action=r["action"],
                units=int(r["units"]),
                credits=int(r["credits"]),
                department_id=str(r["department_id"]) if r["department_id"] else None,
                metadata=r["metadata"],
                created_at=r["created_at"],
                kind=r["kind"],
            )
            for r in rows[:limit]
        ]
        return page, len(rows) > limit

    async def usage_summary(
        self,
        organization_id: str,
        *,
        start: dt.datetime | None,
        end: dt.datetime | None,
        group_by: str,
        then_by: str | None = None,
        action: str | None = None,
        department_id: str | None = None,
    ) -> list[SummaryRow]:
        """Usage (events and captures) in [start, end) grouped by action, department,
        API key (credential id), UTC day or UTC hour, and optionally by a second of
        these: the whole hours of the range from the hourly rollup, the partial hours at
        its edges from the rows themselves (one statement, one snapshot)."""
        sql, args = usage_summary_query(
            uuid.UUID(organization_id),
            start=start,
            end=end,
            group_by=group_by,
            then_by=then_by,
            action=action,
            department_id=uuid.UUID(department_id) if department_id else None,
        )
        async with self.ledger.tenant(organization_id) as conn:
            rows = await conn.fetch(sql, *args)
        return [SummaryRow(r["key"], int(r["events"]), int(r["units"]), int(r["credits"]), r["sub_key"]) for r in rows]

    async def transactions(
        self, organization_id: str, *, type_: str | None, limit: int, starting_after: int | None
    ) -> tuple[list[EntryRow], bool]:
        async with self.ledger.tenant(organization_id) as conn:
            rows = await conn.fetch(
                "SELECT id, type, amount, balance_after, reference, created_at FROM ledger_entries"
                " WHERE organization_id = $1 AND ($2::text IS NULL OR type = $2)"
                " AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
                uuid.UUID(organization_id),
                type_,
                starting_after,
                limit + 1,
            )
        page = [
            EntryRow(
                int(r["id"]), r["type"], int(r["amount"]), int(r["balance_after"]), r["reference"], r["created_at"]
            )
            for r in rows[:limit]
        ]
        return page, len(rows) > limit
