"""Operations staff's verbs: each writes the ledger first, then mirrors to the cache."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, replace
from typing import Any

from accounts.grants import push_pending
from core.money import to_credits
from hotpath.client import HotPath
from ledger.store import Adjustment, Conflict, Cost, CreditLine, Department, GrantResult, Ledger, NewKey
from lua import Status

PRIORITY_MAX = 899  # credit_grants.priority CHECK


class AdminError(ValueError):
    pass


@dataclass(frozen=True)
class Balance:
    organization_id: str
    cache_balance: int
    cache_reserved: int
    cache_available: int
    ledger_balance: int
    ledger_entries_sum: int


async def create_organization(ledger: Ledger, name: str) -> tuple[str, NewKey]:
    """The organization, its signup bonus (a ledger entry) and an admin key. The cache
    loads it from the ledger on first use."""
    return await ledger.create_organization(name)


async def create_key(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    *,
    role: str,
    name: str = "",
    department_id: str | None = None,
    cap: int | None = None,
    rate_limit_per_s: float | None = None,
    rate_limit_burst: float | None = None,
) -> NewKey:
    key = await ledger.create_api_key(
        organization_id,
        role=role,
        name=name,
        department_id=department_id,
        cap=cap,
        rate_limit_per_s=rate_limit_per_s,
        rate_limit_burst=rate_limit_burst,
    )
    await hot.configure(
        organization_id,
        "cred",
        key.id,
        -1 if cap is None else cap,
        "0",
        "" if rate_limit_per_s is None else rate_limit_per_s,
        "" if rate_limit_burst is None else rate_limit_burst,
    )
    return key


async def revoke_key(ledger: Ledger, hot: HotPath, organization_id: str, key_id: str) -> bool:
    """Revoked in the ledger, then flagged in the cache: the next charge is refused."""
    revoked = await ledger.revoke_api_key(organization_id, key_id)
    row = await ledger.api_key(organization_id, key_id)
    cap = -1 if row["cap"] is None else int(row["cap"])
    await hot.configure(organization_id, "cred", key_id, cap, "1", "", "")
    return revoked


async def create_department(ledger: Ledger, hot: HotPath, organization_id: str, name: str) -> Department:
    """A department without a limit (ledger.Conflict if the name is taken)."""
    dept = await ledger.create_department(organization_id, name)
    await hot.configure(organization_id, "dept", dept.id, -1, dept.period)
    return dept


async def set_department_limit(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    department_id: str,
    *,
    limit: int | None,
    period: str,
    mode: str = "hard",
    alert_percent: int | None = None,
) -> Department:
    """A department's budget per period (None: no limit); ledger.NotFound for another
    organization's department. A new period kind starts counting at zero. A hard budget
    refuses a charge past it (the hot path enforces it); a soft one keeps charging and
    the settler alerts once per period at alert_percent (the hot path only counts)."""
    if mode not in ("hard", "soft"):
        raise AdminError("mode is hard or soft")
    if mode == "hard" and alert_percent is not None:
        raise AdminError("alert_percent is for soft budgets")
    dept = await ledger.set_department_limit(
        organization_id, department_id, limit, period, mode=mode, alert_percent=alert_percent
    )
    await hot.configure(organization_id, "dept", dept.id, dept.enforced_limit, dept.period)
    return dept


async def set_cost(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    action: str,
    *,
    credits: int,
    unit: str | None = None,
    description: str | None = None,
) -> Cost:
    """An action's price per unit (millicredits), from the next consume on."""
    cost = await ledger.set_cost(organization_id, action, credits, unit, description)
    await hot.configure(organization_id, "cost", action, credits)
    return cost


async def set_credit_limit(
    ledger: Ledger, hot: HotPath, organization_id: str, *, limit: int, reason: str = ""
) -> CreditLine:
    """An organization's credit line (millicredits, 0 = none): usage may take `available`
    down to minus it; grants repay the debt first. Ledger first, then the cache (a cache
    that is not loaded reads it on the next load)."""
    if limit < 0:
        raise AdminError("a credit limit is zero or more")
    line = await ledger.set_credit_limit(organization_id, limit, reason)
    await hot.configure(organization_id, "line", limit)
    return line


async def grant(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    *,
    amount: int,
    reason: str,
    reference: str | None = None,
    expires_at: dt.datetime | None = None,
    source: str = "admin",
    priority: int | None = None,
) -> GrantResult:
    """Ledger first (survives Redis being down), then the outbox push. `priority`
    orders burn-down (lower is spent first; default: the source's, 20 for admin)."""
    if amount <= 0:
        raise AdminError("a grant must be positive")
    if not reason.strip():
        raise AdminError("a reason is required")
    if priority is not None and not 0 <= priority <= PRIORITY_MAX:
        raise AdminError(f"a priority is between 0 and {PRIORITY_MAX}")
    if expires_at is not None and expires_at <= dt.datetime.now(dt.UTC):
        raise AdminError("the expiry must be in the future")
    result = await ledger.grant(
        organization_id,
        amount=amount,
        source=source,
        reference=reference or str(uuid.uuid4()),
        reason=reason,
        expires_at=expires_at,
        priority=priority,
    )
    await push_pending(ledger, hot, organization_id)
    return result


async def adjust(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    *,
    amount: int,
    reason: str,
    reference: str | None = None,
    actor: str = "",
) -> dict[str, Any]:
    """Positive: an admin grant. Negative: a debit of available credits, never below
    zero (all or nothing), recorded as an `adjustment` when it settles. The reference
    makes a retry safe for ever: it is unique in Postgres (credit_adjustments), written
    before the debit, and a refused adjustment is on record too."""
    if amount == 0:
        raise AdminError("an adjustment must not be zero")
    if not reason.strip():
        raise AdminError("a reason is required")
    reference = reference or str(uuid.uuid4())
    if amount > 0:
        g = await grant(ledger, hot, organization_id, amount=amount, reason=reason, reference=reference)
        return {"kind": "grant", "grant_id": g.grant_id, "created": g.created, "amount": amount}
    done = await _debit_once(
        ledger, hot, organization_id, kind="debit", amount=-amount, reason=reason, reference=reference, actor=actor
    )
    return {"kind": "debit", "id": done.event_id, "amount": -int(done.debited or 0), "reference": reference}


async def void_grant(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    grant_id: str,
    *,
    reason: str,
    reference: str | None = None,
    actor: str = "",
) -> dict[str, Any]:
    """Take away what a grant has left (a grant given by mistake): what it has left in
    the cache now, not what is held or spent; idempotent by reference like adjust."""
    if not reason.strip():
        raise AdminError("a reason is required")
    try:
        row = await ledger.grant_row(organization_id, grant_id)
    except (LookupError, ValueError):
        raise AdminError(f"no grant {grant_id} in organization {organization_id}") from None
    done = await _debit_once(
        ledger,
        hot,
        organization_id,
        kind="void",
        amount=int(row["amount"]),
        reason=reason,
        reference=reference or f"void:{grant_id}",
        actor=actor,
        grant_id=grant_id,
    )
    return {"kind": "void", "grant_id": grant_id, "id": done.event_id, "amount": -int(done.debited or 0)}


async def _debit_once(
    ledger: Ledger,
    hot: HotPath,
    organization_id: str,
    *,
    kind: str,
    amount: int,
    reason: str,
    reference: str,
    actor: str,
    grant_id: str | None = None,
) -> Adjustment:
    """The adjustment of `reference`, applied once: claimed in Postgres, then debited by
    the hot path with an event id of the row's own (its idempotency key keeps a retry
    within IDEMPOTENCY_TTL_S from debiting twice; after that, the ledger entry of that
    event id says it happened)."""
    if not await ledger.organization_exists(organization_id):
        raise AdminError(f"organization {organization_id} not found")
    try:
        row = await ledger.claim_adjustment(
            organization_id,
            reference=reference,
            kind=kind,
            amount=amount,
            reason=reason,
            actor=actor,
            grant_id=grant_id,
        )
    except Conflict as exc:
        raise AdminError(str(exc)) from None
    if row.outcome == "applied":
        return row
    settled = await ledger.settled_debit(organization_id, row.event_id)
    if settled is not None:  # it happened (its answer was lost): record it
        await ledger.decide_adjustment(organization_id, row.id, outcome="applied", debited=settled)
        return replace(row, outcome="applied", debited=settled)
    result = await hot.debit(
        organization_id,
        amount=amount,
        kind="adjustment",
        reason=f"void of grant {grant_id}: {reason}" if grant_id else reason,
        idempotency_key=f"adjust:{row.id}",
        partial=kind == "void",  # a void takes what the grant has left
        event_id=row.event_id,
        grant_id=grant_id or "",
    )
    if result.status is Status.INSUFFICIENT_CREDITS:
        await ledger.decide_adjustment(organization_id, row.id, outcome="refused", debited=0)
        available = to_credits(int(result.payload["available"]))
        raise AdminError(f"only {available} credits are available; nothing was changed (refused, on record)")
    if result.status is Status.NOT_FOUND:
        await ledger.decide_adjustment(organization_id, row.id, outcome="refused", debited=0)
        raise AdminError(f"grant {grant_id} has nothing left to void (spent, held or expired)")
    if result.status not in (Status.OK, Status.REPLAY):
        raise AdminError(f"adjustment refused: {result.status.name}")
    debited = int(result.payload["debited"])
    await ledger.decide_adjustment(organization_id, row.id, outcome="applied", debited=debited)
    return replace(row, outcome="applied", debited=debited)


async def balance(ledger: Ledger, hot: HotPath, organization_id: str) -> Balance:
    ledger_balance, entries = await ledger.ledger_balance(organization_id)
    result = await hot.balance(organization_id)
    if result.status is not Status.OK:
        raise AdminError(f"cache refused: {result.status.name}")
    p = result.payload
    return Balance(
        organization_id=organization_id,
        cache_balance=int(p["balance"]),
        cache_reserved=int(p["reserved"]),
        cache_available=int(p["available"]),
        ledger_balance=ledger_balance,
        ledger_entries_sum=entries,
    )


async def send_test_alert(ledger: Ledger, organization_id: str) -> str:
    """Queue a signed `alert.test` event to the organization's alert URL (delivered by
    the settler like any alert, retried until the receiver answers 2xx). Returns the
    event id; ledger.NotFound when no alert is set."""
    event_id = f"evt_{uuid.uuid4().hex}"
    payload = {
        "id": event_id,
        "type": "alert.test",
        "organization_id": organization_id,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    await ledger.queue_alert_test(organization_id, json.dumps(payload))
    return event_id
