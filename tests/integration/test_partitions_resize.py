"""`credits partitions resize`: changing USAGE_PARTITIONS offline, with nothing lost,
nothing charged twice, and no process able to use the old count afterwards. On a key
prefix of its own (the resize drops every cached organization under its prefix)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from accounts import admin
from core.config import Config
from hotpath.client import HotPath, LayoutError, fingerprint
from hotpath.servers import RedisConnections
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from ops.commands import partitions
from ops.runtime import Services
from settler.stream import PartitionSettler

CREDIT = 1000


def services(connections: RedisConnections, ledger: Ledger, config: Config) -> Services:
    return Services(config, ledger, HotPath.using(connections, ledger, config), connections.redis)


async def settle_all(s: Services, settlement: Settlement) -> None:
    for p in range(s.hot.partitions):
        ps = PartitionSettler(s.redis, settlement, s.hot, p, consumer="resize-test", batch_entries=500)
        assert await ps.acquire()
        try:
            while await ps.settle_once(block_ms=1):
                pass
        finally:
            await ps.release()


async def test_resize_keeps_balances_and_replays_and_refuses_the_old_count(
    redis_connections: RedisConnections, ledger: Ledger, migrated: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(partitions, "QUIET_S", 0.2)
    config = replace(migrated, redis_key_prefix=f"rs{uuid.uuid4().hex[:8]}", usage_partitions=4)
    s = services(redis_connections, ledger, config)
    await s.hot.start()
    settlement = await Settlement.connect(config.settler_dsn(), max_size=2)
    try:
        orgs = []
        for i in range(12):
            org, key = await admin.create_organization(ledger, f"resize-{i}")
            first = await s.hot.consume(
                org, key.id, action="generate_content", units=1, idempotency_key="once", fp=fingerprint("u", 1)
            )
            assert first.status is Status.OK
            orgs.append((org, key.id, first.payload["id"]))
        # Something is still charging: refused, nothing changed.
        with pytest.raises(partitions.ResizeRefused, match=r"not settled|still charging"):
            await partitions.resize(s, 7, drain_timeout_s=0, verify=0)
        assert set((await s.hot.layout()).values()) <= {"4"}
        await settle_all(s, settlement)

        out = await partitions.resize(s, 7, drain_timeout_s=30, verify=0)
        assert out["changed"] and out["from"] == 4 and out["to"] == 7
        assert out["idempotency_records_moved"] > 0  # some organizations changed partition

        with pytest.raises(LayoutError, match="USAGE_PARTITIONS=4"):
            await HotPath.using(redis_connections, ledger, config).start()  # the old count is refused
        grown = services(redis_connections, ledger, replace(config, usage_partitions=7))
        await grown.hot.start()
        for org, key_id, event_id in orgs:
            again = await grown.hot.consume(
                org, key_id, action="generate_content", units=1, idempotency_key="once", fp=fingerprint("u", 1)
            )
            assert again.status is Status.REPLAY and again.payload["id"] == event_id  # not charged twice
            assert (await grown.hot.balance(org)).payload["balance"] == 99 * CREDIT

        # And back down: the streams of the partitions that go are removed.
        await settle_all(grown, settlement)
        out = await partitions.resize(grown, 3, drain_timeout_s=30, verify=50)
        assert out["streams_removed"] >= 1 and out["drifts"] == []
        shrunk = services(redis_connections, ledger, replace(config, usage_partitions=3))
        await shrunk.hot.start()
        for org, key_id, event_id in orgs:
            again = await shrunk.hot.consume(
                org, key_id, action="generate_content", units=1, idempotency_key="once", fp=fingerprint("u", 1)
            )
            assert again.status is Status.REPLAY and again.payload["id"] == event_id
        for p in range(3, 7):
            assert not await redis_connections.redis.exists(grown.hot.stream_key(p))
    finally:
        await settlement.close()
