"""The hot path on a real Redis Cluster (TEST_REDIS=cluster: 3 masters, a replica each,
formed by the suite itself): organizations on every master, a slot migrated while
charges run, a master killed and failed over. Skipped in the other modes.

The money is checked the way the fault suite checks it: every charge a client saw
acknowledged is in the ledger exactly once after settling, a retry with the same
Idempotency-Key never charges twice, and reconciliation finds no drift."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config, Durability
from core.errors import OutcomeUnknown, Unavailable
from hotpath.client import HotPath, fingerprint
from hotpath.cluster import slot_of
from hotpath.servers import RedisConnections, open_redis
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from settler import reconcile
from settler.stream import PartitionSettler
from tests.faults.chaos import wait_for

if TYPE_CHECKING:
    from ops.embedded_cluster import EmbeddedCluster

pytestmark = pytest.mark.timeout(300)

CREDIT = 1000


@pytest.fixture
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn(), max_size=4)
    yield s
    await s.close()


def slot_of_org(hot: HotPath, org: str) -> int:
    return slot_of(hot.tag(org))


async def org_on(cluster: EmbeddedCluster, hot: HotPath, ledger: Ledger, port: int) -> tuple[str, str]:
    """A new organization whose partition's slot the master on `port` serves."""
    for i in itertools.count():
        org, key = await admin.create_organization(ledger, f"on-{port}-{i}")
        if cluster.node_for_slot(slot_of_org(hot, org)).port == port:
            await admin.grant(ledger, hot, org, amount=10_000 * CREDIT, reason="float")
            return org, key.id
        assert i < 200, "no organization lands on this master"
    raise AssertionError


async def settle_partition(redis: aioredis.Redis, settlement: Settlement, hot: HotPath, partition: int) -> None:
    ps = PartitionSettler(redis, settlement, hot, partition, consumer=f"t-{uuid.uuid4().hex[:6]}", batch_entries=500)
    for _ in range(100):
        if await ps.acquire():
            break
        await asyncio.sleep(0.2)  # the session's own settlers may hold it a moment
    else:
        raise AssertionError("could not take the partition")
    try:
        while await ps.settle_once(block_ms=1):
            pass
    finally:
        await ps.release()


async def ledger_usage(ledger: Ledger, org: str) -> tuple[int, set[str]]:
    async with ledger.tenant(org) as conn:
        rows = await conn.fetch("SELECT id, credits FROM usage_events")
    return sum(int(r["credits"]) for r in rows), {str(r["id"]) for r in rows}


@dataclass
class Load:
    """Clients charging one organization, each request retried with its own key until
    it gets a final answer (as the SDK does): what they were told, by key."""

    hot: HotPath
    org: str
    key_id: str
    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> event id
    answers_503: int = 0
    last_503: str = ""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, n: int) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            key = f"c{n}-{i}"
            while True:
                try:
                    r = await self.hot.consume(
                        self.org,
                        self.key_id,
                        action="generate_content",
                        units=1,
                        idempotency_key=key,
                        fp=fingerprint("use", 1),
                    )
                except (Unavailable, OutcomeUnknown) as e:
                    self.answers_503 += 1
                    self.last_503 = f"{type(e).__name__}: {e}"
                    await asyncio.sleep(0.05)
                    continue
                assert r.status in (Status.OK, Status.REPLAY), r
                self.acknowledged[key] = str(r.payload["id"])
                break

    async def until(self, count: int, deadline_s: float = 120) -> None:
        await wait_for(
            lambda: len(self.acknowledged) >= count,
            deadline_s,
            f"{count} acknowledged charges (the last 503: {self.last_503 or 'none'})",
        )

    def run(self, clients: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.client(n)) for n in range(clients)]


async def finish(load: Load, tasks: list[asyncio.Task[None]]) -> None:
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)


async def test_organizations_on_every_master_charge_and_settle(
    redis_cluster: EmbeddedCluster, hot: HotPath, redis: aioredis.Redis, ledger: Ledger, settlement: Settlement
) -> None:
    assert hot.cluster is not None and len(hot.cluster.primaries) == 3
    for master in redis_cluster.primaries():
        org, key_id = await org_on(redis_cluster, hot, ledger, master.port)
        for _ in range(3):
            r = await hot.consume(org, key_id, action="generate_content", units=1)
            assert r.status is Status.OK
        await settle_partition(redis, settlement, hot, hot.partition(org))
        assert (await ledger_usage(ledger, org))[0] == 3 * CREDIT
        report = reconcile.Report()
        await reconcile.check_many(hot, settlement, [org], report)
        assert not report.drifts


async def test_a_slot_migrated_while_charges_run_loses_nothing(
    redis_cluster: EmbeddedCluster,
    pipelined: RedisConnections,
    ledger: Ledger,
    settlement: Settlement,
    migrated: Config,
) -> None:
    """The organization's slot moves to another master, key by key, while 8 clients
    charge it over the sidecar's pipes: ASK while its keys are split (TRYAGAIN for a
    script whose keys are on both sides, waited out), MOVED once it is done."""
    hot = HotPath.using(pipelined, ledger, migrated)
    await hot.start()
    source = redis_cluster.primaries()[0]
    org, key_id = await org_on(redis_cluster, hot, ledger, source.port)
    slot = slot_of_org(hot, org)
    target = next(m for m in redis_cluster.primaries() if m.port != source.port)
    assert (await hot.consume(org, key_id, action="generate_content", units=1)).status is Status.OK
    load = Load(hot, org, key_id)
    tasks = load.run(8)
    try:
        await load.until(50)
        migration = await asyncio.to_thread(redis_cluster.begin_migration, slot, target)
        before = len(load.acknowledged)
        for _ in range(1000):  # a few keys at a time; charges run against the split slot meanwhile
            if not await asyncio.to_thread(redis_cluster.migrate_some_keys, migration, 3):
                break
            # A script whose keys are on both sides cannot run (TRYAGAIN: 503, nothing
            # charged) until the last key has moved; the clients retry meanwhile.
            await asyncio.sleep(0.05)
        await asyncio.to_thread(redis_cluster.finish_migration, migration)
        await load.until(len(load.acknowledged) + 50)
        assert len(load.acknowledged) > before
    finally:
        await finish(load, tasks)
    assert pipelined.cluster is not None and pipelined.cluster.node(slot).port == target.port
    await settle_partition(pipelined.redis, settlement, hot, hot.partition(org))
    used, events = await ledger_usage(ledger, org)
    assert set(load.acknowledged.values()) <= events  # every acknowledged charge settled
    assert used == (len(load.acknowledged) + 1) * CREDIT  # ... once each, and nothing else
    report = reconcile.Report()
    await reconcile.check_many(hot, settlement, [org], report)
    assert not report.drifts


async def test_a_killed_master_answers_503_then_its_replica_serves_with_nothing_acknowledged_lost(
    redis_cluster: EmbeddedCluster, ledger: Ledger, settlement: Settlement, migrated: Config
) -> None:
    """DURABILITY=replica: each charge is acknowledged once its replica has it in its
    AOF (WAITAOF 1 1). The master of the organization's slot is killed under load:
    calls answer 503 (nothing charged, or outcome unknown) while it is down; its replica
    is promoted and runs the calls, but has no replica of its own, so each charge is
    answered 503 outcome_unknown (applied, not yet on a second server) until the killed
    node comes back as the heir's replica; then the retries (same key) are acknowledged.
    Every charge acknowledged before, during and after is in the ledger once."""
    assert migrated.redis_url is not None
    connections = await open_redis(migrated.redis_url, max_connections=64)
    config = replace(migrated, durability=Durability.REPLICA)
    hot = HotPath.using(connections, ledger, config)
    killed = None
    try:
        await hot.start()
        master = redis_cluster.primaries()[1]
        org, key_id = await org_on(redis_cluster, hot, ledger, master.port)
        load = Load(hot, org, key_id)
        tasks = load.run(6)
        try:
            await load.until(40)
            killed = await asyncio.to_thread(redis_cluster.kill_node, master)
            heir = await asyncio.to_thread(redis_cluster.wait_for_failover, master)
            during = len(load.acknowledged)
            # The heir runs the calls, alone: each waits out WAITAOF and is not acknowledged.
            await wait_for(lambda: "NotDurable" in load.last_503, 30, "a charge the heir could not confirm")
            assert len(load.acknowledged) == during, "acknowledged with no replica to confirm it"
            await asyncio.to_thread(redis_cluster.restart_node, killed.index)  # back as the heir's replica
            assert [r.port for r in redis_cluster.replicas_of(heir)] == [master.port]
            await load.until(len(load.acknowledged) + 40)
        finally:
            await finish(load, tasks)
        assert load.answers_503 > 0  # the outage was seen
        assert connections.cluster is not None
        assert connections.cluster.node(slot_of_org(hot, org)).port != master.port  # the replica serves now
        await settle_partition(connections.redis, settlement, hot, hot.partition(org))
        used, events = await ledger_usage(ledger, org)
        assert set(load.acknowledged.values()) <= events  # nothing acknowledged was lost
        assert used == len(load.acknowledged) * CREDIT
    finally:
        if killed is not None and redis_cluster.node(killed.index).state != "running":
            with contextlib.suppress(Exception):
                await asyncio.to_thread(redis_cluster.restart_node, killed.index)
        await connections.close()
