"""Grants go to the ledger first, then to the cache: this pushes what is pending.

A push is idempotent (the grant script remembers grant ids), so pushing twice, or
racing a cold-cache load that already read the grant from the ledger, never counts a
grant twice. When the organization is not cached, the push loads it from the ledger
(a snapshot read after the grant committed, so it holds the grant) and pushes again:
a slower load holding an older snapshot may have landed first, and the second push
then applies the grant.
"""

from __future__ import annotations

import datetime as dt
import logging

from hotpath.client import HotPath, Unavailable
from ledger.store import Ledger
from lua import Status

log = logging.getLogger(__name__)


def _ms(value: object) -> int:
    return int(value.timestamp() * 1000) if isinstance(value, dt.datetime) else 0


async def push_one(
    hot: HotPath,
    organization_id: str,
    *,
    grant_id: str,
    amount: int,
    priority: int,
    expires_at: object,
    created_at: object,
) -> None:
    """Push one grant the ledger holds; raises Unavailable if the cache refuses it.
    A grant older than the cache remembers applied grants (STALE) is not pushed: the
    organization is loaded again from the ledger, which holds it (a load replays what
    is unsettled, so it is right whatever is in flight)."""
    expires_ms, created_ms = _ms(expires_at), _ms(created_at)

    async def push() -> Status:
        result = await hot.grant(
            organization_id,
            grant_id=grant_id,
            amount=amount,
            priority=priority,
            expires_ms=expires_ms,
            created_ms=created_ms,
        )
        return result.status

    status = await push()
    if status is Status.NOT_LOADED:
        await hot.load(organization_id)
        status = await push()
    if status is Status.STALE:
        log.warning("grant_push_stale_reload", extra={"organization_id": organization_id, "grant_id": grant_id})
        await hot.evict(organization_id)
        await hot.load(organization_id)
        return
    if status not in (Status.OK, Status.DUPLICATE):
        raise Unavailable(f"grant push refused: {status.name}")


async def push_pending(ledger: Ledger, hot: HotPath, organization_id: str) -> int:
    """Push every outbox grant of one organization; return how many were confirmed.

    Raises Unavailable when Redis is down; the rows stay in the outbox for a retry.
    """
    confirmed = 0
    for row in await ledger.pending_pushes(organization_id):
        grant_id = str(row["id"])
        await push_one(
            hot,
            organization_id,
            grant_id=grant_id,
            amount=int(row["amount"]),
            priority=int(row["priority"]),
            expires_at=row["expires_at"],
            created_at=row["created_at"],
        )
        await ledger.grant_pushed(organization_id, grant_id)
        confirmed += 1
    return confirmed
