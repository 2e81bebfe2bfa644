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
    hot: HotPath, organization_id: str, *, grant_id: str, amount: int, priority: int, expires_at: object
) -> None:
    """Push one grant the ledger holds; raises Unavailable if the cache refuses it."""
    expires_ms = _ms(expires_at)
    result = await hot.grant(
        organization_id, grant_id=grant_id, amount=amount, priority=priority, expires_ms=expires_ms
    )
    if result.status is Status.NOT_LOADED:
        await hot.load(organization_id)
        result = await hot.grant(
            organization_id, grant_id=grant_id, amount=amount, priority=priority, expires_ms=expires_ms
        )
    if result.status not in (Status.OK, Status.DUPLICATE):
        raise Unavailable(f"grant push refused: {result.status.name}")


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
        )
        await ledger.grant_pushed(organization_id, grant_id)
        confirmed += 1
    return confirmed
