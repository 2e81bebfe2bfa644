"""When an organization's credits run out, at the recent rate of spend.

The rate is the settled spend (usage and reservation captures, from the hourly rollup
settlement keeps) over the last SPEND_WINDOW_S, divided by the time since the start of
the first hour in that window that had any spend (at least MIN_ELAPSED_S, so a first
burst does not read as an infinite rate). No spend in the window: idle, no forecast.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from dataclasses import dataclass

import asyncpg

SPEND_WINDOW_S = 24 * 3600
MIN_ELAPSED_S = 60
DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class RecentSpend:
    credits: int  # millicredits settled in the window
    since: dt.datetime | None  # start of the first hour with spend in the window

    def rate_per_s(self, now: dt.datetime) -> float:
        """Millicredits per second; 0.0 when idle."""
        if self.credits <= 0 or self.since is None:
            return 0.0
        elapsed_s = max(MIN_ELAPSED_S, (now - self.since).total_seconds())
        return self.credits / elapsed_s

    def runs_out_at(self, available: int, now: dt.datetime) -> dt.datetime | None:
        """When `available` is spent at this rate: None when idle, `now` when none is left."""
        rate = self.rate_per_s(now)
        if rate <= 0:
            return None
        if available <= 0:
            return now
        return now + dt.timedelta(seconds=available / rate)

    def days_left(self, available: int, now: dt.datetime) -> decimal.Decimal | None:
        at = self.runs_out_at(available, now)
        if at is None:
            return None
        return decimal.Decimal((at - now).total_seconds() / DAY_S).quantize(decimal.Decimal("0.01"))


async def recent_spend(conn: asyncpg.Connection, organization_id: str, window_s: int = SPEND_WINDOW_S) -> RecentSpend:
    """The organization's recent spend (the connection sees it: a tenant one, or the settler's)."""
    row = await conn.fetchrow("SELECT credits, since FROM recent_spend($1, $2)", uuid.UUID(organization_id), window_s)
    if row is None:
        return RecentSpend(0, None)
    return RecentSpend(int(row["credits"]), row["since"])
