"""Settler handover while the old owner is still working: its lease expires (a stall,
a long pause) and another settler takes the partition, while the first one goes on
until its next renewal. Found by the chaos experiment with a paused settler (in runs
where a partition of the paused settler was between batches, not inside one).

Run on the session's servers, in a database and key prefix of the module's own."""

from __future__ import annotations

import asyncio

from accounts import admin
from lua import Status
from settler.stream import GROUP, PartitionSettler
from tests.faults.chaos import wait_for
from tests.faults.world import World
from tests.integration.test_settlement import drain

CREDIT = 1000


async def test_a_settler_that_lost_its_lease_leaves_nothing_pending(world: World) -> None:
    """Every acknowledged charge reaches the ledger after the handover, and nothing
    stays pending (a pending entry also stops the stream from being trimmed)."""
    w = world
    org, key = await admin.create_organization(w.ledger, "handover")
    await admin.grant(w.ledger, w.hot, org, amount=100_000 * CREDIT, reason="float")
    partition = w.hot.partition(org)
    first = PartitionSettler(w.redis, w.settlement, w.hot, partition, consumer="first", batch_entries=20)
    second = PartitionSettler(w.redis, w.settlement, w.hot, partition, consumer="second", batch_entries=20)
    acknowledged: list[str] = []
    flowing = asyncio.Event()
    flowing.set()

    async def traffic() -> None:
        while flowing.is_set():
            r = await w.hot.consume(org, key.id, action="generate_content", units=1)
            assert r.status is Status.OK, r
            acknowledged.append(r.payload["id"])
            await asyncio.sleep(0.002)

    load = asyncio.create_task(traffic())
    stop = asyncio.Event()
    assert await first.acquire()
    working = asyncio.create_task(first.run(stop))
    try:
        await wait_for(lambda: first.stats.batches >= 3, 60, "the first settler to settle")
        # Its lease runs out while it works; the second settler takes the partition
        # (and claims what is pending) as it would after the expiry.
        while True:
            await w.redis.delete(first.lease_key)
            if await second.acquire():
                break
        await asyncio.wait_for(asyncio.shield(working), 60)  # the first one stops at its next renewal
    finally:
        stop.set()
        flowing.clear()
        await load
        await working
    await drain(second)
    pending = await w.redis.xpending(w.hot.stream_key(partition), GROUP)
    async with w.ledger.tenant(org) as conn:
        settled = {r["id"] for r in await conn.fetch("SELECT id FROM usage_events")}
    missing = set(acknowledged) - settled
    assert pending["pending"] == 0 and not missing, (
        f"{pending['pending']} entries still pending {pending['consumers']}; "
        f"{len(missing)} acknowledged charges not in the ledger"
    )
