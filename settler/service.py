"""The settler process: partition settlers under leases, shared evenly with the other
settlers, plus the periodic jobs (grant outbox, expiries, lag alerts, alerts,
reconciliation), each run by one settler at a time (schedule). settler/worker.py runs
it as a process; tests drive it directly."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from accounts.grants import push_one
from core.config import Config
from core.money import to_credits
from hotpath.client import HotPath, Unavailable, now_ms
from hotpath.servers import RedisConnections, open_redis
from ledger.settlement import AlertStore, DeadLetter, Settlement
from ledger.store import Ledger
from settler import reconcile
from settler.alerts import Alerts, OpsAlerts
from settler.metrics import DRIFT, LAG_ALERTS, LAG_ENTRIES, LAG_SECONDS, SETTLED
from settler.stream import PartitionSettler, lag

log = logging.getLogger(__name__)
# (redis-py types its async commands as a union with their sync results: the awaits of
# sadd, spop, hset, hdel and hvals below carry type: ignore[misc] for that reason.)


SUPERVISE_INTERVAL_S = 1.0
MEMBER_TTL_S = 10.0  # a settler that has not announced itself for this long is gone
HANDOVER_WAIT_S = 10.0  # how long a stopping settler lets its partitions finish their batch
JOB_TIMEOUT_S = 60.0
OUTBOX_BATCH = 500
EXPIRY_BATCH = 100
ALERT_CONFIGS_PER_TICK = 500
RECONCILE_TOUCHED_PER_TICK = 1000
RECONCILE_SWEEP_PER_TICK = 200


@dataclass(frozen=True)
class Job:
    name: str
    interval_s: float
    run: Callable[[], Awaitable[object]]


@dataclass
class Settler:
    config: Config
    redis: aioredis.Redis
    settlement: Settlement
    ledger: Ledger
    hot: HotPath
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    owned: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    _stops: dict[int, asyncio.Event] = field(default_factory=dict)  # per owned partition: hand it over
    lag_alerting: bool = False
    alerts: Alerts | None = None
    ops_alerts: OpsAlerts | None = None
    http: aiohttp.ClientSession | None = None
    connections: RedisConnections | None = None  # what open() opened (closed with it)

    @classmethod
    async def open(cls, config: Config, connections: RedisConnections | None = None) -> Settler:
        """Connect (to Redis through `connections` when given: the worker waits for Redis with open_redis_waiting)."""
        if connections is None:
            assert config.redis_url is not None
            connections = await open_redis(config.redis_url, **cls.redis_options(config))
        # min_size=0: no connection is opened here, so the settler starts (and keeps
        # the hot path's streams in order) while Postgres is down; work retries later.
        settlement = await Settlement.connect(
            config.settler_dsn(), min_size=0, max_size=min(32, config.usage_partitions + 4)
        )
        ledger = await Ledger.connect(config.app_dsn(), min_size=0, max_size=4)
        hot = HotPath.using(connections, ledger, config)
        settler = cls(config, connections.redis, settlement, ledger, hot, connections=connections)
        settler.http = aiohttp.ClientSession()
        settler.alerts = Alerts(AlertStore(settlement), hot, settler.http)
        if config.ops_alert_url and config.ops_alert_secret:
            settler.ops_alerts = OpsAlerts(settler.http, config.ops_alert_url, config.ops_alert_secret)
        return settler

    @staticmethod
    def redis_options(config: Config) -> dict[str, Any]:
        return {"max_connections": config.usage_partitions * 2 + 16}

    async def close(self) -> None:
        await self.stop_partitions()
        if self.ops_alerts is not None:
            await self.ops_alerts.close()
        if self.http is not None:
            await self.http.close()
        await self.settlement.close()
        await self.ledger.close()
        if self.connections is not None:
            await self.connections.close()
        else:
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
            on_settled=self._settled,
            on_quarantined=self._quarantined,
        )

    async def _settled(self, organizations: set[str]) -> None:
        """After each settled batch: its organizations' alerts, and a note for the next
        reconciliation (the organizations whose money moved)."""
        if self.alerts is not None:
            await self.alerts.check(organizations)
        await self.redis.sadd(self._key("reconcile:touched"), *organizations)  # type: ignore[misc]

    async def _quarantined(self, dead: DeadLetter) -> None:
        if self.ops_alerts is not None:
            self.ops_alerts.send(
                "settlement.quarantined",
                partition=dead.partition,
                entry_id=dead.entry_id,
                organization_id=dead.organization_id,
                state=dead.state,
                amount=float(to_credits(dead.amount)),
                error=dead.error[:500],
            )

    def _key(self, name: str) -> str:
        return f"{self.config.redis_key_prefix}:settler:{name}"

    async def supervise(self, stop: asyncio.Event) -> None:
        """Share the partitions with the other settlers: each owns at most
        ceil(partitions / settlers) (the settlers alive are those that announced
        themselves in the last MEMBER_TTL_S), gives up the ones over its share
        gracefully (after their current batch) and takes free ones up to it; a partition
        task that ended is restarted."""
        while not stop.is_set():
            try:
                await self._share(stop)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away for a moment: try again next round
                log.exception("supervise_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SUPERVISE_INTERVAL_S)
        await self.stop_partitions()

    async def members(self) -> list[str]:
        """The settlers alive now (this one included), in a stable order."""
        key = self._key("members")
        now = now_ms()
        await self.redis.zadd(key, {self.consumer: now})
        await self.redis.zremrangebyscore(key, "-inf", now - MEMBER_TTL_S * 1000)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in await self.redis.zrange(key, 0, -1))

    async def _share(self, stop: asyncio.Event) -> None:
        members = await self.members()
        partitions = self.config.usage_partitions
        quota = -(-partitions // max(1, len(members)))
        for p, task in list(self.owned.items()):
            if task.done():
                del self.owned[p]
                self._stops.pop(p, None)
        if len(self.owned) > quota:  # more settlers now: hand the extra partitions over
            for p in sorted(self.owned)[quota:]:
                self._stops[p].set()
            return
        # Start looking at a different place than the others, so they do not all race
        # for the same free partitions.
        offset = members.index(self.consumer) * quota if self.consumer in members else 0
        for i in range(partitions):
            if len(self.owned) >= quota or stop.is_set():
                return
            p = (offset + i) % partitions
            if p in self.owned:
                continue
            ps = self.partition_settler(p)
            if await ps.acquire():
                own_stop = asyncio.Event()
                self._stops[p] = own_stop
                self.owned[p] = asyncio.create_task(self._run_partition(ps, stop, own_stop), name=f"settle-{p}")

    async def _run_partition(self, ps: PartitionSettler, stop: asyncio.Event, own_stop: asyncio.Event) -> None:
        """Settle one partition until the process stops or hands it over; then release
        it (after the batch in progress), so that its next owner need not wait out the
        lease."""
        before = ps.stats.settled_events
        both = asyncio.Event()

        async def either() -> None:
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(own_stop.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            both.set()

        watcher = asyncio.create_task(either())
        try:
            await ps.run(both)
        except asyncio.CancelledError:
            raise
        except Exception:  # logged; the supervisor restarts the partition next round
            log.exception("partition_failed", extra={"partition": ps.partition})
        finally:
            watcher.cancel()
            SETTLED.inc(ps.stats.settled_events - before)
            with contextlib.suppress(Exception):
                await ps.release()

    async def stop_partitions(self) -> None:
        for own_stop in self._stops.values():
            own_stop.set()
        tasks = list(self.owned.values())
        for t in tasks:  # a graceful end first: each finishes its batch and releases
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(t), timeout=HANDOVER_WAIT_S)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for p in list(self.owned):
            with contextlib.suppress(Exception):
                await self.partition_settler(p).release()
        self.owned.clear()
        self._stops.clear()
        with contextlib.suppress(Exception):
            await self.redis.zrem(self._key("members"), self.consumer)

    # -- periodic jobs -----------------------------------------------------------
    def jobs(self) -> tuple[Job, ...]:
        return (
            Job("push_outbox", 2.0, self.push_outbox),
            Job("expire_due", 5.0, self.expire_due),
            Job("watch_lag", 1.0, self.watch_lag),
            Job("alerts", 1.0, self.alerts_tick),
            Job("reconcile", 30.0, self.reconcile),
            Job("anomalies", self.config.anomaly_interval_s, self.scan_anomalies),
        )

    async def scan_anomalies(self) -> int:
        """The usage audit (settler/anomalies.py): new findings of this hour and the last."""
        from settler.anomalies import AnomalyDetector, Method

        return await AnomalyDetector(self.settlement.pool, Method.of(self.config)).scan()

    async def schedule(self, stop: asyncio.Event) -> None:
        """Run each periodic job once per its interval across all settlers: whoever
        takes the job's lease (one key: `SET NX PX interval`, so it works on Redis
        Cluster too, where arq's multi-key transactions do not) runs it. A failing job
        is logged and runs again at its next turn; none runs longer than JOB_TIMEOUT_S."""
        jobs = self.jobs()
        due = {job.name: 0.0 for job in jobs}
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            now = loop.time()
            for job in jobs:
                if now < due[job.name]:
                    continue
                due[job.name] = now + job.interval_s
                try:
                    key = self._key(f"job:{job.name}")
                    if await self.redis.set(key, self.consumer, nx=True, px=int(job.interval_s * 1000)):
                        await asyncio.wait_for(job.run(), timeout=JOB_TIMEOUT_S)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the next turn tries again
                    log.exception("job_failed", extra={"job": job.name})
            wait_s = max(0.05, min(due.values()) - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait_s)

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
                    created_at=row["created_at"],
                )
                await self.settlement.outbox_done(row["grant_id"])
                pushed += 1
            except (Unavailable, aioredis.RedisError, OSError) as exc:
                log.warning("grant_push_failed", extra={"grant_id": grant_id, "error": str(exc)})
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
            log.error("settlement_lag_alert", extra={"lag_s": worst, "threshold_s": self.config.settlement_lag_alert_s})
            if self.ops_alerts is not None:
                self.ops_alerts.send("settlement.lagging", lag_s=worst, threshold_s=self.config.settlement_lag_alert_s)
        elif self.lag_alerting and not alerting:
            log.warning("settlement_lag_recovered", extra={"lag_s": worst})
        self.lag_alerting = alerting
        return worst

    async def alerts_tick(self) -> int:
        """The alerts whose configuration changed since the last tick (settled batches
        check their own organizations as they settle), and the deliveries that are due.
        Costs what changed, not the number of organizations: ALERT_CONFIGS_PER_TICK at
        most, the rest on the next ticks (the cursor is in Redis, shared by settlers)."""
        if self.alerts is None:
            return 0
        cursor_key = self._key("alerts:cursor")
        raw = await self.redis.get(cursor_key)
        after = None
        if raw:
            stamp, _, org = raw.decode().partition("|")
            after = (dt.datetime.fromisoformat(stamp), org)
        configs = await self.alerts.store.alert_configs_changed(after, limit=ALERT_CONFIGS_PER_TICK)
        crossings = await self.alerts.check_configs(configs) if configs else 0
        if configs:
            last = configs[-1]
            await self.redis.set(cursor_key, f"{last['updated_at'].isoformat()}|{last['organization_id']}")
        await self.alerts.deliver_due()
        return crossings

    async def reconcile(self) -> int:
        """One reconciliation tick: the organizations whose money moved since the last
        (noted by each settled batch), then the next page of every organization in
        turn (a sweep for drift nothing moved). Bounded per tick, whatever the number
        of organizations; the drifts found stay published until a check finds them gone."""
        touched = await self.redis.spop(self._key("reconcile:touched"), RECONCILE_TOUCHED_PER_TICK) or []  # type: ignore[misc]
        organizations = list(dict.fromkeys(o.decode() if isinstance(o, bytes) else str(o) for o in touched))
        cursor_key = self._key("reconcile:cursor")
        cursor = await self.redis.get(cursor_key)
        page = await self.settlement.organizations(
            after=cursor.decode() if cursor else None, limit=RECONCILE_SWEEP_PER_TICK
        )
        await self.redis.set(cursor_key, page[-1] if len(page) == RECONCILE_SWEEP_PER_TICK else "")
        organizations += [o for o in page if o not in set(organizations)]
        report = reconcile.Report()
        await reconcile.check_many(self.hot, self.settlement, organizations, report)
        drifts_key = self._key("reconcile:drifts")
        found = {d.organization_id: d.difference for d in report.drifts}
        gone = [o for o in organizations if o not in found]
        if gone:
            await self.redis.hdel(drifts_key, *gone)  # type: ignore[misc]
        if found:
            await self.redis.hset(drifts_key, mapping=found)  # type: ignore[misc]
        known = await self.redis.hvals(drifts_key)  # type: ignore[misc]
        DRIFT.set(sum(abs(int(v)) for v in known))
        # When it last ran, for the ops console's health page (which shows the drifts too).
        await self.redis.set(
            self._key("reconcile:last"),
            json.dumps({"at": dt.datetime.now(dt.UTC).isoformat(), "checked": len(organizations)}),
        )
        for d in report.drifts:
            log.error(
                "reconciliation_drift",
                extra={
                    "organization_id": d.organization_id,
                    "cache": d.cache,
                    "ledger": d.ledger,
                    "in_flight": d.in_flight,
                    "unpushed": d.unpushed,
                    "quarantined": d.quarantined,
                    "difference": d.difference,
                },
            )
            if self.ops_alerts is not None:
                self.ops_alerts.send(
                    "reconciliation.drift",
                    organization_id=d.organization_id,
                    difference=float(to_credits(d.difference)),
                )
        return len(report.drifts)
