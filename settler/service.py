"""The settler process: partition settlers under leases, plus the periodic jobs
(grant outbox, expiries, lag alerts, reconciliation). settler/worker.py runs it as an
arq worker; tests drive it directly."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

import aiohttp
import prometheus_client
import redis.asyncio as aioredis

from accounts.grants import push_one
from core.config import Config
from hotpath.client import HotPath, Unavailable, now_ms
from ledger.settlement import AlertStore, Settlement
from ledger.store import Ledger
from settler import reconcile
from settler.alerts import Alerts
from settler.stream import PartitionSettler, lag

log = logging.getLogger(__name__)

REGISTRY = prometheus_client.CollectorRegistry()
LAG_ENTRIES = prometheus_client.Gauge(
    "credits_settlement_lag_entries", "Unsettled stream entries", ["partition"], registry=REGISTRY
)
LAG_SECONDS = prometheus_client.Gauge(
    "credits_settlement_lag_seconds", "Age of the oldest unsettled entry", ["partition"], registry=REGISTRY
)
LAG_ALERTS = prometheus_client.Counter(
    "credits_settlement_lag_alerts", "Times settlement lag passed the alert threshold", registry=REGISTRY
)
DRIFT = prometheus_client.Gauge(
    "credits_reconciliation_drift_millicredits", "Total absolute drift, cache vs ledger", registry=REGISTRY
)
SETTLED = prometheus_client.Counter("credits_settled_events", "Events settled into the ledger", registry=REGISTRY)

SUPERVISE_INTERVAL_S = 1.0
OUTBOX_BATCH = 500
EXPIRY_BATCH = 100


@dataclass
class Settler:
    config: Config
    redis: aioredis.Redis
    settlement: Settlement
    ledger: Ledger
    hot: HotPath
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    owned: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    lag_alerting: bool = False
    alerts: Alerts | None = None
    http: aiohttp.ClientSession | None = None

    @classmethod
    async def open(cls, config: Config) -> Settler:
        assert config.redis_url is not None
        redis = aioredis.Redis.from_url(config.redis_url, max_connections=config.usage_partitions * 2 + 16)
        # min_size=0: no connection is opened here, so the settler starts (and keeps
        # the hot path's streams in order) while Postgres is down; work retries later.
        settlement = await Settlement.connect(
            config.settler_dsn(), min_size=0, max_size=min(32, config.usage_partitions + 4)
        )
        ledger = await Ledger.connect(config.app_dsn(), min_size=0, max_size=4)
        hot = HotPath.from_config(redis, ledger, config)
        settler = cls(config, redis, settlement, ledger, hot)
        settler.http = aiohttp.ClientSession()
        settler.alerts = Alerts(AlertStore(settlement), hot, settler.http)
        return settler

    async def close(self) -> None:
        await self.stop_partitions()
        if self.http is not None:
            await self.http.close()
        await self.settlement.close()
        await self.ledger.close()
        await self.redis.aclose()

    # -- partitions ------------------------------------------------------------
    def partition_settler(self, partition: int) -> PartitionSettler:
        return PartitionSettler(
            self.redis,
            self.settlement,
            self.hot,
            partition,
            consumer=self.consumer,
            batch_entries=self.config.settle_batch_entries,
            on_settled=self.alerts.check if self.alerts is not None else None,
        )

    async def supervise(self, stop: asyncio.Event) -> None:
        """Own as many partitions as are free; restart a partition task that ended."""
        while not stop.is_set():
            for p in range(self.config.usage_partitions):
                task = self.owned.get(p)
                if task is not None and not task.done():
                    continue
                ps = self.partition_settler(p)
                try:
                    if await ps.acquire():
                        self.owned[p] = asyncio.create_task(self._run_partition(ps, stop), name=f"settle-{p}")
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let one partition stop the supervisor
                    log.exception("lease_failed partition=%d", p)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SUPERVISE_INTERVAL_S)
        await self.stop_partitions()

    async def _run_partition(self, ps: PartitionSettler, stop: asyncio.Event) -> None:
        before = ps.stats.settled_events
        try:
            await ps.run(stop)
        except asyncio.CancelledError:
            raise
        except Exception:  # logged; the supervisor restarts the partition next round
            log.exception("partition_failed partition=%d", ps.partition)
        finally:
            SETTLED.inc(ps.stats.settled_events - before)

    async def stop_partitions(self) -> None:
        tasks = list(self.owned.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for p in list(self.owned):
            with contextlib.suppress(Exception):
                await self.partition_settler(p).release()
        self.owned.clear()

    # -- periodic jobs -----------------------------------------------------------
    async def push_outbox(self) -> int:
        """Grants the ledger holds and the cache has not confirmed: push them."""
        pushed = 0
        for row in await self.settlement.outbox(limit=OUTBOX_BATCH):
            org = str(row["organization_id"])
            grant_id = str(row["grant_id"])
            try:
                await push_one(
                    self.hot,
                    org,
                    grant_id=grant_id,
                    amount=int(row["amount"]),
                    priority=int(row["priority"]),
                    expires_at=row["expires_at"],
                )
                await self.settlement.outbox_done(row["grant_id"])
                pushed += 1
            except (Unavailable, aioredis.RedisError, OSError) as exc:
                log.warning("grant_push_failed grant=%s error=%s", grant_id, exc)
                await self.settlement.outbox_retry_later(row["grant_id"])
        return pushed

    async def expire_due(self) -> int:
        """Expired holds and grants leave the cache (with their events) even for an
        organization that sends no traffic: touching its balance runs the sweep."""
        orgs = await self.settlement.orgs_with_due_expiry(dt.datetime.now(dt.UTC), limit=EXPIRY_BATCH)
        for org in orgs:
            await self.hot.balance(org)
        return len(orgs)

    async def watch_lag(self) -> float:
        """Publish lag per partition; log an alert when it passes the threshold."""
        now = now_ms()
        worst = 0.0
        for p in range(self.config.usage_partitions):
            entries, age_s = await lag(self.redis, self.hot, p, now)
            LAG_ENTRIES.labels(str(p)).set(entries)
            LAG_SECONDS.labels(str(p)).set(age_s)
            worst = max(worst, age_s)
        alerting = worst > self.config.settlement_lag_alert_s
        if alerting and not self.lag_alerting:
            LAG_ALERTS.inc()
            log.error("settlement_lag_alert lag_s=%.1f threshold_s=%.1f", worst, self.config.settlement_lag_alert_s)
        elif self.lag_alerting and not alerting:
            log.warning("settlement_lag_recovered lag_s=%.1f", worst)
        self.lag_alerting = alerting
        return worst

    async def alerts_tick(self) -> int:
        """Every configured organization, and the deliveries that are due."""
        if self.alerts is None:
            return 0
        crossings = await self.alerts.check()
        await self.alerts.deliver_due()
        return crossings

    async def reconcile(self) -> int:
        report = await reconcile.run(self.redis, self.hot, self.settlement)
        DRIFT.set(sum(abs(d.difference) for d in report.drifts))
        for d in report.drifts:
            log.error(
                "reconciliation_drift org=%s cache=%d ledger=%d in_flight=%d difference=%d",
                d.organization_id,
                d.cache,
                d.ledger,
                d.in_flight,
                d.difference,
            )
        return len(report.drifts)
