"""Reconciliation: does the cache agree with the ledger?

For each cached organization: cache balance == ledger balance + the change of its
stream entries not yet settled + grants the ledger holds but the cache has not applied
+ the change of its entries held in quarantine (settlement could not take them; see
ledger/migrations/0007_dead_letters.sql); and, for a credit line (migrations/0035),
cache debt == ledger debt + the debt change of the unsettled entries (charges past the
grants and holds made on the line, less what closes gave back and grant pushes repaid,
and what held dead letters did to it). The ledger side (balance, the partition's
settlement watermark, the outbox, quarantine) is read in one Postgres snapshot, the
cache side in one Lua step; a settlement committing between the two can make a
difference appear for a moment, so a difference is only reported when it is seen again
on a second read.

A report never says "no drift" while it cannot know: organizations too far behind to
compare are listed as lagging, partitions with old unsettled entries as lagging
partitions, and quarantined entries (held out of the ledger, or settled cleaned) are
listed with their amounts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from hotpath.client import HotPath, now_ms
from ledger.settlement import Settlement
from ledger.store import LedgerSide
from lua import Status
from settler.stream import lag

SCAN_ENTRIES_MAX = 100_000
CONFIRM_DELAY_S = 0.2
PAGE = 1000
LAGGING_S = 60.0  # unsettled entries older than this make an organization, or a partition, lagging


class LedgerView(Protocol):
    """The ledger side: the settler's cross-tenant Settlement, or a tenant's Ledger."""

    async def ledger_view(self, organization_id: str, partition: int) -> LedgerSide: ...


@dataclass(frozen=True)
class Drift:
    organization_id: str
    cache: int
    ledger: int
    in_flight: int
    unpushed: int
    quarantined: int = 0  # held in quarantine: charged in the cache, not in the ledger
    unsettled_s: float = 0.0  # age of its oldest entry not settled yet
    cache_debt: int = 0  # what the cache says is owed on the credit line
    ledger_debt: int = 0
    debt_in_flight: int = 0

    @property
    def difference(self) -> int:
        return self.cache - (self.ledger + self.in_flight + self.unpushed + self.quarantined)

    @property
    def debt_difference(self) -> int:
        return self.cache_debt - (self.ledger_debt + self.debt_in_flight)

    @property
    def agrees(self) -> bool:
        return self.difference == 0 and self.debt_difference == 0


@dataclass
class Report:
    checked: int = 0
    drifts: list[Drift] = field(default_factory=list)
    lagging: list[str] = field(default_factory=list)  # too much unsettled to compare, or unsettled too long
    quarantined: dict[str, int] = field(default_factory=dict)  # organization -> held amount (<= 0)
    dead_letters: dict[str, int] = field(default_factory=dict)  # state -> entries (held, cleaned, ...)
    lagging_partitions: dict[int, float] = field(default_factory=dict)  # partition -> oldest unsettled, s

    @property
    def clean(self) -> bool:
        """True only when everything compared agrees and nothing is held or behind."""
        return not (self.drifts or self.lagging or self.quarantined or self.lagging_partitions)


async def measure(hot: HotPath, settlement: LedgerView, org: str) -> Drift | None:
    """One reading; None when the organization is not cached. OverflowError when too
    much of it is unsettled to compare."""
    side = await settlement.ledger_view(org, hot.partition(org))
    result = await hot.reconcile_read(org, after=side.after, scan_max=SCAN_ENTRIES_MAX, outbox=side.outbox)
    if result.status is not Status.OK:
        return None
    p = result.payload
    if p["truncated"]:
        raise OverflowError(org)
    oldest = p.get("oldest") or ""
    unsettled_s = max(0.0, (now_ms() - int(oldest.split("-")[0])) / 1000) if oldest else 0.0
    return Drift(
        org,
        int(p["balance"]),
        side.balance,
        int(p["in_flight"]),
        int(p["unpushed"]),
        side.quarantined,
        unsettled_s,
        cache_debt=int(p.get("debt") or 0),
        ledger_debt=side.debt,
        debt_in_flight=int(p.get("debt_in_flight") or 0) + side.quarantined_debt,
    )


async def check(hot: HotPath, settlement: LedgerView, org: str) -> Drift | None:
    """A confirmed drift of one organization, or None when cache and ledger agree.
    A drift-free reading that holds something to report (quarantined entries, or
    entries unsettled longer than LAGGING_S) is returned too, with difference 0."""
    first = await measure(hot, settlement, org)
    if first is None:
        return None
    if first.agrees:
        return first if first.quarantined or first.unsettled_s > LAGGING_S else None
    await asyncio.sleep(CONFIRM_DELAY_S)
    second = await measure(hot, settlement, org)
    if second is None or (second.agrees and not second.quarantined and second.unsettled_s <= LAGGING_S):
        return None
    return second


async def all_organizations(settlement: Settlement, *, page: int = PAGE) -> AsyncIterator[str]:
    """Every organization id, a page at a time (never all of them in memory)."""
    after: str | None = None
    while True:
        ids = await settlement.organizations(after=after, limit=page)
        for org in ids:
            yield org
        if len(ids) < page:
            return
        after = ids[-1]


async def check_many(hot: HotPath, settlement: LedgerView, organizations: Iterable[str], report: Report) -> None:
    for org in organizations:
        await _check_into(hot, settlement, org, report)


async def _check_into(hot: HotPath, settlement: LedgerView, org: str, report: Report) -> None:
    try:
        drift = await check(hot, settlement, org)
    except OverflowError:
        report.lagging.append(org)
        return
    report.checked += 1
    if drift is None:
        return
    if drift.quarantined:
        report.quarantined[org] = drift.quarantined
    if drift.unsettled_s > LAGGING_S:
        report.lagging.append(org)  # compared, but what it holds in flight is old: settlement is behind
    if not drift.agrees:
        report.drifts.append(drift)


async def run(
    redis: aioredis.Redis, hot: HotPath, settlement: Settlement, organizations: list[str] | None = None
) -> Report:
    """Reconcile the given organizations, or every one (paged, with the partitions
    settlement is behind on); with what is lagging and what quarantine holds."""
    report = Report()
    if organizations is None:
        async for org in all_organizations(settlement):
            await _check_into(hot, settlement, org, report)
    else:
        await check_many(hot, settlement, organizations, report)
    report.dead_letters = await settlement.dead_letter_counts()
    if organizations is None:  # the whole picture: every partition settlement is behind on
        now = now_ms()
        for partition in range(hot.partitions):
            _, age_s = await lag(redis, hot, partition, now)
            if age_s > LAGGING_S:
                report.lagging_partitions[partition] = age_s
    return report


async def repair(hot: HotPath, settlement: LedgerView, org: str) -> Drift | None:
    """Rebuild one organization's cache from the ledger. Only when nothing of it is in
    flight (settle first), since the ledger would not hold those entries yet. Returns
    the drift that was repaired, None if there was none."""
    drift = await check(hot, settlement, org)
    if drift is None or drift.agrees:
        return None
    if drift.in_flight != 0:
        raise RuntimeError(f"{org}: {drift.in_flight} millicredits still unsettled; let the settler catch up first")
    await hot.evict(org)
    await hot.load(org)
    return drift
