"""Low-balance and recovered alerts, delivered as signed outgoing webhooks.

The settler checks the organizations of every batch it settles (and all configured
ones each second), so a crossing is seen within about a second. A crossing is a state
change in Postgres (`ok` -> `low` or back) written together with its delivery row,
so each crossing is announced once; deliveries are retried with backoff until the
receiver answers 2xx.

Signature: header `Credits-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<raw body>" with the organization's secret>`; receivers should refuse a
timestamp older than five minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import aiohttp
import msgspec

from core.money import to_credits
from hotpath.client import HotPath, now_ms, period_bounds
from ledger.settlement import AlertStore
from lua import Status

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Credits-Signature"
DELIVERY_TIMEOUT_S = 5.0
DELIVERIES_PER_TICK = 100
_encode = msgspec.json.Encoder(decimal_format="number").encode


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: int = 300, now: float | None = None) -> bool:
    """What a receiver does (also used by the tests)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


class Alerts:
    def __init__(self, store: AlertStore, hot: HotPath, session: aiohttp.ClientSession) -> None:
        self.store = store
        self.hot = hot
        self.session = session

    async def check(self, organizations: Iterable[str] | None = None) -> int:
        """Compare available credits with each configured threshold (an amount, and/or
        days left at the recent rate of spend); record and send every crossing. With
        `organizations` (those a batch just charged), their soft department budgets too.
        Returns the number of crossings."""
        orgs = None if organizations is None else list(organizations)
        configs = await self.store.alert_configs(orgs)
        crossings = await self.check_configs(configs)
        if orgs:
            crossings += await self.check_budgets(orgs)
        return crossings

    async def check_configs(self, configs: list[dict[str, Any]]) -> int:
        crossings = 0
        for cfg in configs:
            org = str(cfg["organization_id"])
            result = await self.hot.balance(org)
            if result.status is not Status.OK:
                continue
            available = int(result.payload["available"])
            threshold = int(cfg["threshold"])
            days_wanted: decimal.Decimal | None = cfg.get("days_left")
            now = dt.datetime.now(dt.UTC)
            days_left = runs_out_at = None
            if days_wanted is not None:
                # Counted down to where charges stop: minus the credit line, as runs_out_at
                # in GET /balance is.
                room = available + int(result.payload.get("credit_limit") or 0)
                spend = await self.store.recent_spend(org)
                days_left = spend.days_left(room, now)
                runs_out_at = spend.runs_out_at(room, now)
            low = available < threshold or (
                days_left is not None and days_wanted is not None and days_left < days_wanted
            )
            state = "low" if low else "ok"
            if state == cfg["state"]:
                continue
            event_type = "balance.low" if state == "low" else "balance.recovered"
            event: dict[str, object] = {
                "id": f"evt_{uuid.uuid4().hex}",
                "type": event_type,
                "organization_id": org,
                "available": to_credits(available),
                "threshold": to_credits(threshold),
                "created_at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            }
            if days_wanted is not None:
                event["days_left_threshold"] = days_wanted
                event["days_left"] = days_left
                event["runs_out_at"] = None if runs_out_at is None else runs_out_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            delivery = await self.store.alert_crossed(org, cfg["state"], state, event_type, _encode(event).decode())
            if delivery is not None:
                crossings += 1
                log.warning(
                    "balance_alert",
                    extra={
                        "organization_id": org,
                        "type": event["type"],
                        "available": available,
                        "threshold": threshold,
                    },
                )
                await self._deliver(delivery)
        return crossings

    async def check_budgets(self, organizations: list[str]) -> int:
        """Soft department budgets: once per period, when the period's spend reaches
        alert_percent of the limit, a `department.budget_alert` (charging goes on)."""
        crossings = 0
        for d in await self.store.soft_departments(organizations):
            org, dept = str(d["organization_id"]), str(d["id"])
            result = await self.hot.balance(org, department_id=dept)
            if result.status is not Status.OK or "dept" not in result.payload:
                continue
            spent = int(result.payload["dept"]["spent"])
            budget, percent = int(d["limit_amount"]), int(d["alert_percent"] or 100)
            if spent * 100 < budget * percent:
                continue
            start, end = period_bounds(d["period"], now_ms())
            event = {
                "id": f"evt_{uuid.uuid4().hex}",
                "type": "department.budget_alert",
                "organization_id": org,
                "department_id": dept,
                "department": d["name"],
                "mode": "soft",
                "limit": to_credits(budget),
                "spent": to_credits(spent),
                "alert_percent": percent,
                "period": d["period"],
                "period_start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "period_end": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            }
            delivery = await self.store.department_alerted(
                org,
                dept,
                period_start=start,
                alert_percent=percent,
                spent=spent,
                budget=budget,
                payload=_encode(event).decode(),
            )
            if delivery is None:
                continue  # announced already this period
            crossings += 1
            log.warning(
                "department_budget_alert",
                extra={"organization_id": org, "department_id": dept, "spent": spent, "limit": budget},
            )
            if delivery:
                await self._deliver(delivery)
        return crossings

    async def deliver_due(self) -> int:
        delivered = 0
        for row in await self.store.due_deliveries(limit=DELIVERIES_PER_TICK):
            delivered += await self._deliver(row)
        return delivered

    async def _deliver(self, row: dict[str, Any]) -> int:
        body = row["payload"].encode() if isinstance(row["payload"], str) else _encode(row["payload"])
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(row["secret"], body, int(time.time())),
            "Credits-Event-Id": str(row["id"]),
        }
        try:
            async with self.session.post(
                row["webhook_url"], data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S)
            ) as response:
                ok = 200 <= response.status < 300
                error = "" if ok else f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, error = False, type(exc).__name__  # its text can carry the URL, which is the receiver's secret
        if ok:
            await self.store.delivery_done(row["id"])
            return 1
        log.warning("webhook_delivery_failed", extra={"delivery_id": str(row["id"]), "error": error})
        await self.store.delivery_retry(row["id"], error)
        return 0


OPS_ATTEMPTS_MAX = 5
OPS_QUEUE_MAX = 1000


class OpsAlerts:
    """Alerts for the platform's operators (not an organization's): a quarantined
    entry, settlement lag, drift. POSTed as JSON to OPS_ALERT_URL, signed like the
    organizations' alerts (Credits-Signature, with OPS_ALERT_SECRET), retried a few
    times with backoff; at most OPS_QUEUE_MAX wait. Each is also a log event and a
    metric, which is what to alert on when no URL is set."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str) -> None:
        self.session = session
        self.url = url
        self.secret = secret
        self._pending: set[asyncio.Task[None]] = set()

    def send(self, event_type: str, **fields: object) -> None:
        """Queue one alert (never blocks settlement)."""
        if len(self._pending) >= OPS_QUEUE_MAX:
            log.error("ops_alert_dropped", extra={"type": event_type, "reason": "queue full"})
            return
        event = {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": event_type,
            "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            **fields,
        }
        task = asyncio.create_task(self._deliver(_encode(event)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _deliver(self, body: bytes) -> None:
        for attempt in range(OPS_ATTEMPTS_MAX):
            headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body, int(time.time()))}
            try:
                timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S)
                async with self.session.post(self.url, data=body, headers=headers, timeout=timeout) as response:
                    if 200 <= response.status < 300:
                        return
                    error = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__
            log.warning("ops_alert_failed", extra={"attempt": attempt + 1, "error": error})
            await asyncio.sleep(min(30.0, 0.5 * 2**attempt))

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        for task in list(self._pending):
            with contextlib.suppress(BaseException):
                await task
