"""Operations staff's verbs: each writes the ledger first, then mirrors to the cache."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from accounts.grants import push_pending
from hotpath.client import HotPath
from ledger.store import Cost, Department, GrantResult, Ledger, NewKey
from lua import Status


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
    ledger: Ledger, hot: HotPath, organization_id: str, department_id: str, *, limit: int | None, period: str
) -> Department:
    """A department's budget per period (None: no limit); ledger.NotFound for another
    organization's department. A new period kind starts counting at zero."""
    dept = await ledger.set_department_limit(organization_id, department_id, limit, period)
    await hot.configure(organization_id, "dept", dept.id, -1 if limit is None else limit, dept.period)
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
) -> GrantResult:
    """Ledger first (survives Redis being down), then the outbox push."""
    if amount <= 0:
        raise AdminError("a grant must be positive")
    if not reason.strip():
        raise AdminError("a reason is required")
    result = await ledger.grant(
        organization_id,
        amount=amount,
        source=source,
        reference=reference or str(uuid.uuid4()),
        reason=reason,
        expires_at=expires_at,
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
) -> dict[str, Any]:
    """Positive: an admin grant. Negative: a debit of available credits (never below
    zero), recorded as an `adjustment` when it settles. The reference makes a retry safe."""
    if amount == 0:
        raise AdminError("an adjustment must not be zero")
    if not reason.strip():
        raise AdminError("a reason is required")
    reference = reference or str(uuid.uuid4())
    if amount > 0:
        g = await grant(ledger, hot, organization_id, amount=amount, reason=reason, reference=reference)
        return {"kind": "grant", "grant_id": g.grant_id, "created": g.created, "amount": amount}
    if not await ledger.organization_exists(organization_id):
        raise AdminError(f"organization {organization_id} not found")
    result = await hot.debit(
        organization_id, amount=-amount, kind="adjustment", reason=reason, idempotency_key=f"adjust:{reference}"
    )
    if result.status is Status.INSUFFICIENT_CREDITS:
        raise AdminError(f"only {result.payload['available']} millicredits are available; nothing was changed")
    if result.status is Status.IDEMPOTENCY_CONFLICT:
        raise AdminError("this reference was used for a different adjustment")
    if result.status not in (Status.OK, Status.REPLAY):
        raise AdminError(f"adjustment refused: {result.status.name}")
    return {"kind": "debit", "id": result.payload["id"], "amount": -int(result.payload["debited"])}


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
