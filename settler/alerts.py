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
from hotpath.client import HotPath
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
        """Compare available credits with each configured threshold; record and send
        every crossing. Returns the number of crossings."""
        configs = await self.store.alert_configs(None if organizations is None else list(organizations))
        return await self.check_configs(configs)

    async def check_configs(self, configs: list[dict[str, Any]]) -> int:
        crossings = 0
        for cfg in configs:
            org = str(cfg["organization_id"])
            result = await self.hot.balance(org)
            if result.status is not Status.OK:
                continue
            available = int(result.payload["available"])
            threshold = int(cfg["threshold"])
            state = "low" if available < threshold else "ok"
            if state == cfg["state"]:
                continue
            event_type = "balance.low" if state == "low" else "balance.recovered"
            event: dict[str, object] = {
                "id": f"evt_{uuid.uuid4().hex}",
                "type": event_type,
                "organization_id": org,
                "available": to_credits(available),
                "threshold": to_credits(threshold),
                "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            }
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
