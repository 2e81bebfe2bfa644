"""The usage audit: an hour of spend far beyond its own recent baseline is a finding
(`usage.anomaly`), per organization and per API key.

Method. The settlement keeps an hourly rollup of spend (usage_hourly: usage events and
reservation captures, per organization, action, department and credential), in the
same transaction as the events. For an hour H (the current one, so far, and the one
before, complete) and each subject (an organization; an API key or token of it):

    spend     = the subject's credits in H
    history   = hours from the subject's first spend to H, at most BASELINE_HOURS (7 days)
    baseline  = the subject's credits in the `history` hours before H / history
                (a mean per hour, the quiet hours counted as zero)
    spike     = history >= MIN_HISTORY_HOURS (a day: a new key has no baseline yet)
                and spend > FACTOR x max(baseline, MIN_CREDITS)

FACTOR (ANOMALY_FACTOR, 5), MIN_CREDITS (ANOMALY_MIN_CREDITS, 10 credits per hour:
below it nothing is a spike, so a key that spends 0.01 an hour is not alarming at
0.06) and the windows are configuration. The mean is over all hours, so a subject
that spends in bursts has a low baseline and its bursts must be FACTOR above that; a
past spike raises the baseline for a week (it is not a new normal at once, but it makes
a second spike in that week count for less). A finding is recorded once per subject
and hour (its spend grows with the hour), `open` until an operator acknowledges or
dismisses it, and announced once, as the organization's signed webhook (the URL and
secret of its low-balance alert, delivered and retried by settler/alerts.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from core.config import Config
from core.money import to_credits

log = logging.getLogger(__name__)

EVENT_TYPE = "usage.anomaly"
STATES = ("open", "acknowledged", "dismissed")


@dataclass(frozen=True, slots=True)
class Method:
    factor: float = 5.0
    baseline_hours: int = 7 * 24
    min_history_hours: int = 24
    min_credits: int = 10_000  # millicredits per hour

    @classmethod
    def of(cls, config: Config) -> Method:
        return cls(
            config.anomaly_factor,
            config.anomaly_baseline_hours,
            config.anomaly_min_history_hours,
            config.anomaly_min_credits,
        )


@dataclass(frozen=True, slots=True)
class Finding:
    organization_id: str
    scope: str  # organization | api_key
    credential_id: str | None
    hour: dt.datetime
    spend: int
    baseline: int
    baseline_hours: int


def hour_of(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


# Each subject's spend in the hour, only where it could be a spike at all (above
# factor x the floor), then its history from the rollup (index (organization, hour)).
_CANDIDATES = """
WITH cur AS (
  SELECT organization_id, credential_id, sum(credits)::bigint AS spend
    FROM usage_hourly WHERE hour = $1
   GROUP BY GROUPING SETS ((organization_id), (organization_id, credential_id))
)
SELECT c.organization_id, c.credential_id, c.spend,
       (SELECT min(h.hour) FROM usage_hourly h
         WHERE h.organization_id = c.organization_id AND (c.credential_id IS NULL OR h.credential_id = c.credential_id)
           AND h.hour < $1) AS first_hour,
       (SELECT coalesce(sum(h.credits), 0)::bigint FROM usage_hourly h
         WHERE h.organization_id = c.organization_id AND (c.credential_id IS NULL OR h.credential_id = c.credential_id)
           AND h.hour >= $1 - make_interval(hours => $3) AND h.hour < $1) AS before
  FROM cur c
 WHERE c.spend > $2
"""


def judge(method: Method, row: dict[str, Any], hour: dt.datetime) -> Finding | None:
    """The method above, for one subject's hour."""
    first = row["first_hour"]
    if first is None:
        return None
    history = min(method.baseline_hours, int((hour - first).total_seconds() // 3600))
    if history < method.min_history_hours:
        return None
    baseline = int(row["before"]) // history
    spend = int(row["spend"])
    if spend <= method.factor * max(baseline, method.min_credits):
        return None
    credential = row["credential_id"]
    return Finding(
        str(row["organization_id"]),
        "organization" if credential is None else "api_key",
        credential,
        hour,
        spend,
        baseline,
        history,
    )


def payload(anomaly_id: str, f: Finding, method: Method) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": EVENT_TYPE,
        "organization_id": f.organization_id,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "anomaly": {
            "id": anomaly_id,
            "scope": f.scope,
            "api_key_id": f.credential_id,
            "hour": f.hour.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "spend": float(to_credits(f.spend)),
            "baseline_per_hour": float(to_credits(f.baseline)),
            "baseline_hours": f.baseline_hours,
            "threshold_factor": method.factor,
        },
    }


class AnomalyDetector:
    """Runs on the settler's role (its `settler` policies see every organization)."""

    def __init__(self, pool: asyncpg.Pool, method: Method) -> None:
        self.pool = pool
        self.method = method

    async def findings(self, hour: dt.datetime) -> list[Finding]:
        floor = int(self.method.factor * self.method.min_credits)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_CANDIDATES, hour, floor, self.method.baseline_hours)
        found = (judge(self.method, dict(r), hour) for r in rows)
        return [f for f in found if f is not None]

    async def record(self, f: Finding) -> bool:
        """Record a finding (or its hour's larger spend); True when it is new, and
        then its webhook is queued in the same transaction (if the organization has
        an alert URL), so it is announced once."""
        anomaly_id = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO usage_anomalies (id, organization_id, scope, credential_id, hour, spend, baseline,"
                " baseline_hours, threshold_factor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (organization_id, scope, credential_id, hour) DO UPDATE"
                " SET spend = greatest(usage_anomalies.spend, excluded.spend), updated_at = now()"
                " RETURNING id, (xmax = 0) AS inserted",
                anomaly_id,
                uuid.UUID(f.organization_id),
                f.scope,
                f.credential_id,
                f.hour,
                f.spend,
                f.baseline,
                f.baseline_hours,
                self.method.factor,
            )
            assert row is not None
            if not row["inserted"]:
                return False
            has_url = await conn.fetchval(
                "SELECT count(*) FROM balance_alerts WHERE organization_id = $1", uuid.UUID(f.organization_id)
            )
            if has_url:
                await conn.execute(
                    "INSERT INTO webhook_deliveries (id, organization_id, event_type, payload)"
                    " VALUES ($1, $2, $3, $4::jsonb)",
                    uuid.uuid4(),
                    uuid.UUID(f.organization_id),
                    EVENT_TYPE,
                    json.dumps(payload(str(row["id"]), f, self.method)),
                )
        log.warning(
            "usage_anomaly",
            extra={
                "organization_id": f.organization_id,
                "scope": f.scope,
                "credential_id": f.credential_id,
                "hour": f.hour.isoformat(),
                "spend": f.spend,
                "baseline": f.baseline,
            },
        )
        return True

    async def scan(self, now: dt.datetime | None = None) -> int:
        """The current hour (so far) and the one before; returns new findings."""
        current = hour_of(now or dt.datetime.now(dt.UTC))
        new = 0
        for hour in (current - dt.timedelta(hours=1), current):
            for f in await self.findings(hour):
                new += await self.record(f)
        return new


# -- reading and deciding (the console and the CLI) --------------------------------------
@dataclass(frozen=True, slots=True)
class AnomalyRow:
    id: str
    organization_id: str
    organization: str
    scope: str
    credential_id: str | None
    key_name: str | None
    hour: dt.datetime
    spend: int
    baseline: int
    baseline_hours: int
    threshold_factor: float
    state: str
    decided_by: str | None
    decided_at: dt.datetime | None
    note: str
    created_at: dt.datetime

    @property
    def ratio(self) -> float | None:
        return None if self.baseline == 0 else self.spend / self.baseline


async def anomalies(
    pool: asyncpg.Pool, *, state: str | None = None, organization_id: str | None = None, limit: int = 200
) -> list[AnomalyRow]:
    """Findings, newest first (through the console's role: every organization)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT a.*, o.name AS organization, k.name AS key_name FROM usage_anomalies a"
            " JOIN organizations o ON o.id = a.organization_id"
            " LEFT JOIN api_keys k ON k.organization_id = a.organization_id AND k.id::text = a.credential_id"
            " WHERE ($1::text IS NULL OR a.state = $1) AND ($2::uuid IS NULL OR a.organization_id = $2)"
            " ORDER BY a.hour DESC, a.created_at DESC LIMIT $3",
            state,
            uuid.UUID(organization_id) if organization_id else None,
            limit,
        )
    return [
        AnomalyRow(
            str(r["id"]),
            str(r["organization_id"]),
            r["organization"],
            r["scope"],
            r["credential_id"],
            r["key_name"],
            r["hour"],
            int(r["spend"]),
            int(r["baseline"]),
            int(r["baseline_hours"]),
            float(r["threshold_factor"]),
            r["state"],
            r["decided_by"],
            r["decided_at"],
            r["note"],
            r["created_at"],
        )
        for r in rows
    ]
