"""The operators' money verbs, audited: the CLI (`credits grant|adjust|grant void|key
revoke|reconcile --repair`) and the ops console call these, and nothing else, so both
go through the same path (accounts.admin: the ledger first, then the cache) and both
leave the same audit row (ledger/operators.py): who, what, when, from where, why and
the outcome, a refusal included. The row is written after the action, so it says what
happened; a repeat of a reference is a `replayed` row that moved nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from accounts import admin
from hotpath.client import HotPath
from ledger.operators import Actor, AuditEntry, check_actor, record
from ledger.store import GrantResult, Ledger


async def _refused(ledger: Ledger, actor: Actor, entry: AuditEntry, exc: Exception) -> None:
    await record(ledger.pool, actor, replace(entry, outcome="refused", detail={**entry.detail, "error": str(exc)}))


async def grant(
    ledger: Ledger,
    hot: HotPath,
    actor: Actor,
    organization_id: str,
    *,
    amount: int,
    reason: str,
    reference: str | None,
    expires_at: dt.datetime | None = None,
    priority: int | None = None,
) -> GrantResult:
    base = AuditEntry(
        "credits.grant",
        "applied",
        organization_id,
        amount=amount,
        reason=reason,
        reference=reference or "",
        detail={"expires_at": expires_at.isoformat() if expires_at else None, "priority": priority},
    )
    await check_actor(ledger.pool, actor)
    try:
        g = await admin.grant(
            ledger,
            hot,
            organization_id,
            amount=amount,
            reason=reason,
            reference=reference,
            expires_at=expires_at,
            priority=priority,
        )
    except (admin.AdminError, LookupError) as exc:
        await _refused(ledger, actor, base, exc)
        raise
    await record(
        ledger.pool,
        actor,
        AuditEntry(
            "credits.grant",
            "applied" if g.created else "replayed",
            organization_id,
            target=f"grant:{g.grant_id}",
            amount=amount if g.created else 0,
            reason=reason,
            reference=reference or "",
            detail={**base.detail, "balance_after": g.balance_after},
        ),
    )
    return g


async def adjust(
    ledger: Ledger,
    hot: HotPath,
    actor: Actor,
    organization_id: str,
    *,
    amount: int,
    reason: str,
    reference: str | None,
) -> dict[str, Any]:
    """Up (a grant) or down (a debit, never below zero: a refusal is on record)."""
    base = AuditEntry(
        "credits.adjust", "applied", organization_id, amount=amount, reason=reason, reference=reference or ""
    )
    await check_actor(ledger.pool, actor)
    try:
        out = await admin.adjust(
            ledger, hot, organization_id, amount=amount, reason=reason, reference=reference, actor=actor.label
        )
    except (admin.AdminError, LookupError) as exc:
        await _refused(ledger, actor, base, exc)
        raise
    replayed = out["kind"] == "grant" and not out["created"]
    target = f"grant:{out['grant_id']}" if out["kind"] == "grant" else f"adjustment:{out['id']}"
    await record(
        ledger.pool,
        actor,
        AuditEntry(
            "credits.adjust",
            "replayed" if replayed else "applied",
            organization_id,
            target=target,
            amount=int(out["amount"]),
            reason=reason,
            reference=str(out.get("reference") or reference or ""),
            detail={"kind": out["kind"]},
        ),
    )
    return out


async def void_grant(
    ledger: Ledger,
    hot: HotPath,
    actor: Actor,
    organization_id: str,
    grant_id: str,
    *,
    reason: str,
    reference: str | None,
) -> dict[str, Any]:
    """Take what an unspent grant has left."""
    base = AuditEntry("grant.void", "applied", organization_id, target=f"grant:{grant_id}", reason=reason)
    await check_actor(ledger.pool, actor)
    try:
        out = await admin.void_grant(
            ledger, hot, organization_id, grant_id, reason=reason, reference=reference, actor=actor.label
        )
    except (admin.AdminError, LookupError) as exc:
        await _refused(ledger, actor, base, exc)
        raise
    await record(
        ledger.pool,
        actor,
        AuditEntry(
            "grant.void",
            "applied",
            organization_id,
            target=f"grant:{grant_id}",
            amount=int(out["amount"]),
            reason=reason,
            reference=reference or f"void:{grant_id}",
            detail={"adjustment_event": out["id"]},
        ),
    )
    return out


async def revoke_key(
    ledger: Ledger, hot: HotPath, actor: Actor, organization_id: str, key_id: str, *, reason: str
) -> bool:
    """Revoked in the ledger, then flagged in the cache. False: it was revoked already."""
    base = AuditEntry("key.revoke", "applied", organization_id, target=f"key:{key_id}", reason=reason)
    await check_actor(ledger.pool, actor)
    try:
        revoked = await admin.revoke_key(ledger, hot, organization_id, key_id)
    except (admin.AdminError, LookupError) as exc:
        await _refused(ledger, actor, base, exc)
        raise
    await record(ledger.pool, actor, replace(base, outcome="applied" if revoked else "replayed"))
    return revoked


class Repaired(Protocol):
    """What a repair reports (settler.reconcile.Drift)."""

    @property
    def difference(self) -> int: ...

    @property
    def cache(self) -> int: ...

    @property
    def ledger(self) -> int: ...


Repair = Callable[[HotPath, Ledger, str], Awaitable["Repaired | None"]]


async def repair_cache(
    ledger: Ledger, hot: HotPath, actor: Actor, organization_id: str, *, reason: str, repair: Repair
) -> int | None:
    """Rebuild one organization's cache from the ledger with `repair` (the settler's
    reconcile.repair, handed in by the CLI and the console: accounts sits below the
    settler): the difference repaired in millicredits, None when there was none."""
    base = AuditEntry("cache.repair", "applied", organization_id, reason=reason)
    await check_actor(ledger.pool, actor)
    try:
        drift = await repair(hot, ledger, organization_id)
    except (RuntimeError, LookupError) as exc:
        await _refused(ledger, actor, base, exc)
        raise admin.AdminError(str(exc)) from None
    difference = None if drift is None else drift.difference
    entry = AuditEntry(
        "cache.repair",
        "applied" if drift is not None else "replayed",
        organization_id,
        amount=difference,
        reason=reason,
        detail={} if drift is None else {"cache": drift.cache, "ledger": drift.ledger},
    )
    await record(ledger.pool, actor, entry)
    return difference


ANOMALY_ACTIONS = {"acknowledged": "anomaly.acknowledge", "dismissed": "anomaly.dismiss", "open": "anomaly.reopen"}


async def decide_anomaly(
    ledger: Ledger, actor: Actor, organization_id: str, anomaly_id: str, *, state: str, note: str = ""
) -> bool:
    """Acknowledge or dismiss a usage anomaly (settler/anomalies.py). False: no such
    finding in this organization, or it has that state already."""
    if state not in ANOMALY_ACTIONS:
        raise admin.AdminError("a finding is acknowledged, dismissed, or open again")
    if len(note) > 500:
        raise admin.AdminError("a note has at most 500 characters")
    await check_actor(ledger.pool, actor)
    async with ledger.tenant(organization_id) as conn:
        found = await conn.fetchval(
            "UPDATE usage_anomalies SET state = $2, decided_by = $3, decided_at = now(), note = $4, updated_at = now()"
            " WHERE id = $1 AND state <> $2 RETURNING id",
            uuid.UUID(anomaly_id),
            state,
            actor.label,
            note,
        )
    entry = AuditEntry(
        ANOMALY_ACTIONS[state],
        "applied" if found else "replayed",
        organization_id,
        target=f"anomaly:{anomaly_id}",
        reason=note,
    )
    await record(ledger.pool, actor, entry)
    return found is not None
