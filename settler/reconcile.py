"""Reconciliation: does the cache agree with the ledger?

For each cached organization: cache balance == ledger balance + the change of its
stream entries not yet settled + grants the ledger holds but the cache has not applied.
The ledger side (balance, the partition's settlement watermark, the outbox) is read in
one Postgres snapshot, the cache side in one Lua step; a settlement committing between
the two can make a difference appear for a moment, so a difference is only reported
when it is seen again on a second read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from hotpath.client import HotPath
from ledger.settlement import Settlement
from lua import Status

SCAN_ENTRIES_MAX = 100_000
CONFIRM_DELAY_S = 0.2
PAGE = 1000


class LedgerView(Protocol):
    """The ledger side: the settler's cross-tenant Settlement, or a tenant's Ledger."""

    async def ledger_view(self, organization_id: str, partition: int) -> tuple[int, str, list[tuple[str, int]]]: ...


@dataclass(frozen=True)
class Drift:
    organization_id: str
    cache: int
    ledger: int
    in_flight: int
    unpushed: int

    @property
    def difference(self) -> int:
        return self.cache - (self.ledger + self.in_flight + self.unpushed)


@dataclass
class Report:
    checked: int = 0
    drifts: list[Drift] = field(default_factory=list)
    lagging: list[str] = field(default_factory=list)  # too much unsettled to compare now


async def measure(hot: HotPath, settlement: LedgerView, org: str) -> Drift | None:
    """One reading; None when the organization is not cached or too far behind."""
    ledger_balance, after, outbox = await settlement.ledger_view(org, hot.partition(org))
    result = await hot.reconcile_read(org, after=after, scan_max=SCAN_ENTRIES_MAX, outbox=outbox)
    if result.status is not Status.OK:
        return None
    p = result.payload
    if p["truncated"]:
        raise OverflowError(org)
    return Drift(org, int(p["balance"]), ledger_balance, int(p["in_flight"]), int(p["unpushed"]))


async def check(hot: HotPath, settlement: LedgerView, org: str) -> Drift | None:
    """A confirmed drift of one organization, or None when cache and ledger agree."""
    first = await measure(hot, settlement, org)
    if first is None or first.difference == 0:
        return None
    await asyncio.sleep(CONFIRM_DELAY_S)
    second = await measure(hot, settlement, org)
    if second is None or second.difference == 0:
        return None
    return second


async def run(
    redis: aioredis.Redis, hot: HotPath, settlement: Settlement, organizations: list[str] | None = None
) -> Report:
    report = Report()
    if organizations is None:
        organizations = []
        after: str | None = None
        while True:
            page = await settlement.organizations(after=after, limit=PAGE)
            organizations.extend(page)
            if len(page) < PAGE:
                break
            after = page[-1]
    for org in organizations:
        try:
            drift = await check(hot, settlement, org)
        except OverflowError:
            report.lagging.append(org)
            continue
        report.checked += 1
        if drift is not None:
            report.drifts.append(drift)
    return report


async def repair(hot: HotPath, settlement: LedgerView, org: str) -> Drift | None:
    """Rebuild one organization's cache from the ledger. Only when nothing of it is in
    flight (settle first), since the ledger would not hold those entries yet. Returns
    the drift that was repaired, None if there was none."""
    drift = await check(hot, settlement, org)
    if drift is None:
        return None
    if drift.in_flight != 0:
        raise RuntimeError(f"{org}: {drift.in_flight} millicredits still unsettled; let the settler catch up first")
    await hot.evict(org)
    await hot.load(org)
    return drift
