"""Nothing can stall a partition (issue 8, item 1): an entry settlement refuses is
isolated from its batch, settled cleaned (its charge in the ledger, the offending text
replaced) or held in quarantine, and the partition moves on; reconciliation counts
what quarantine holds and says so; a cold load replays it; ops can replay or discard it."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from hotpath.client import HotPath, now_ms
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from settler import quarantine, reconcile
from settler import stream as stream_module
from settler.metrics import QUARANTINED
from settler.stream import PartitionSettler
from tests.conftest import Org
from tests.integration.test_settlement import assert_conserved, cache_balance, drain, ledger_state, settler

CREDIT = 1000
POISON = '{"note": "a\\u0000b"}'  # JSON text Postgres' jsonb refuses (it cannot store NUL)

pytest_plugins = ("tests.integration.test_settlement",)


async def consume(hot: HotPath, org: Org, *, metadata: str = "", units: int = 1) -> str:
    r = await hot.consume(org.id, org.admin_key_id, action="web_search", units=units, metadata=metadata)
    assert r.status is Status.OK
    return str(r.payload["id"])


async def usage(ledger: Ledger, org: Org) -> dict[str, Any]:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT id, metadata::text AS m FROM usage_events")
    return {r["id"]: msgspec.json.decode(r["m"]) for r in rows}


def quarantined(state: str) -> float:
    return QUARANTINED.labels(state)._value.get()  # type: ignore[attr-defined, no-any-return]


async def test_a_poison_entry_is_settled_cleaned_and_the_partition_moves_on(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    before_metric = quarantined("cleaned")
    first = await consume(hot, org, metadata='{"n": 1}')
    poison = await consume(hot, org, metadata=POISON)  # the charge itself is right: 0.5 credits
    after = await consume(hot, org, metadata='{"n": 3}')
    await drain(settler(redis, settlement, hot, org.id))
    events = await usage(ledger, org)
    assert events[first] == {"n": 1} and events[after] == {"n": 3}  # the batch around it settled as it was
    assert events[poison] == {}  # charged, metadata emptied
    assert_conserved(await ledger_state(ledger, org.id), await cache_balance(hot, org.id))
    [dead] = await settlement.dead_letters(organization_id=org.id)
    assert (dead.state == "cleaned" and "jsonb" in dead.error.lower()) or "unicode" in dead.error.lower()
    assert msgspec.msgpack.decode(dead.raw)["m"] == POISON  # the original, for the record
    assert quarantined("cleaned") == before_metric + 1
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert report.drifts == [] and report.quarantined == {}  # its charge is in the ledger
    # Later entries still settle: the partition was not stalled.
    later = await consume(hot, org)
    await drain(settler(redis, settlement, hot, org.id))
    assert later in await usage(ledger, org)


async def test_an_entry_that_cannot_be_settled_even_cleaned_is_held_and_counted(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_module, "clean_event", lambda ev: ev)  # as if no cleaning could help
    balance_before = await cache_balance(hot, org.id)
    ok_id = await consume(hot, org)
    poison = await consume(hot, org, metadata=POISON, units=4)  # 2 credits, charged in the cache
    await drain(settler(redis, settlement, hot, org.id))
    assert ok_id in await usage(ledger, org) and poison not in await usage(ledger, org)
    [dead] = await settlement.dead_letters(organization_id=org.id, state="held")
    assert dead.amount == -2 * CREDIT
    cache = await cache_balance(hot, org.id)
    assert cache == balance_before - int(2.5 * CREDIT)
    # Reconciliation counts it as held, not as drift, and says so.
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert report.drifts == [] and report.quarantined == {org.id: -2 * CREDIT} and not report.clean
    assert report.dead_letters.get("held", 0) >= 1
    # A cold load replays it: the cache after a reload is the cache before it.
    await hot.evict(org.id)
    assert await cache_balance(hot, org.id) == cache
    # Replaying it as it is fails again (its cause is not fixed); discarding closes it.
    with pytest.raises(quarantine.QuarantineError, match="still cannot be settled"):
        await quarantine.replay(settlement, dead.id, reason="try again")
    discarded = await quarantine.discard(settlement, dead.id, reason="test: never happened", by="tests")
    assert (discarded.state, discarded.resolved_by, discarded.resolution) == (
        "discarded",
        "tests",
        "test: never happened",
    )
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert [d.difference for d in report.drifts] == [-2 * CREDIT]  # the cache charged what the ledger never will
    repaired = await reconcile.repair(hot, settlement, org.id)
    assert repaired is not None
    assert await cache_balance(hot, org.id) == cache + 2 * CREDIT  # the credits are back
    with pytest.raises(quarantine.QuarantineError, match="not held"):
        await quarantine.discard(settlement, dead.id, reason="again")


async def test_a_held_entry_replays_once_its_cause_is_fixed(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """An entry of an organization the ledger does not know (yet): held; once the
    organization exists, its replay settles it exactly once."""
    missing = str(uuid.uuid4())
    partition = hot.partition(org.id)
    event = {"t": "use", "id": f"ghost-{uuid.uuid4().hex}", "act": "web_search", "u": 1, "amt": 500,
             "d": "", "k": "key", "m": "{}", "g": [], "at": now_ms()}  # fmt: skip
    await redis.xadd(hot.stream_key(partition), {"o": missing, "d": msgspec.msgpack.encode(event)})
    mine = await consume(hot, org)
    await drain(settler(redis, settlement, hot, org.id))
    assert mine in await usage(ledger, org)  # the partition moved on
    [dead] = await settlement.dead_letters(organization_id=missing)
    assert dead.state == "held" and dead.amount == -500 and "unknown organization" in dead.error
    async with ledger.tenant(missing) as conn:
        await conn.fetchval("SELECT create_organization($1, 'late')", uuid.UUID(missing))
    replayed = await quarantine.replay(settlement, dead.id, reason="organization restored")
    assert replayed.state == "replayed"
    async with ledger.tenant(missing) as conn:
        assert await conn.fetchval("SELECT count(*) FROM usage_events WHERE id = $1", event["id"]) == 1
        assert await conn.fetchval("SELECT balance FROM organizations") == 100 * CREDIT - 500
    with pytest.raises(quarantine.QuarantineError):
        await quarantine.replay(settlement, dead.id, reason="twice")


async def test_undecodable_entries_are_held_with_their_bytes(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    partition = hot.partition(org.id)
    await redis.xadd(hot.stream_key(partition), {"o": org.id, "d": b"\xc1\xff not msgpack"})
    await redis.xadd(hot.stream_key(partition), {"o": org.id, "d": msgspec.msgpack.encode({"t": "mystery"})})
    mine = await consume(hot, org)
    await drain(settler(redis, settlement, hot, org.id))
    assert mine in await usage(ledger, org)
    held = await settlement.dead_letters(organization_id=org.id, state="held")
    assert {bytes(d.raw) for d in held} == {b"\xc1\xff not msgpack", msgspec.msgpack.encode({"t": "mystery"})}
    assert all(d.amount == 0 for d in held)


async def test_failures_that_are_not_the_entries_fault_are_retried_never_quarantined(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = {"left": 7}  # more than SETTLE_ATTEMPTS_MAX: a transient failure is never counted
    real = Settlement.settle

    async def flaky(self: Settlement, *args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise asyncpg.exceptions.SerializationError("could not serialize access")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Settlement, "settle", flaky)
    mine = await consume(hot, org)
    ps: PartitionSettler = settler(redis, settlement, hot, org.id)
    assert await ps.acquire()
    try:
        for _ in range(20):
            try:
                await ps.settle_once(block_ms=1)
            except asyncpg.exceptions.SerializationError:
                continue
            if mine in await usage(ledger, org):
                break
    finally:
        await ps.release()
    assert mine in await usage(ledger, org)
    assert await settlement.dead_letters(organization_id=org.id) == []
