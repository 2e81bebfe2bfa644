"""Settlement into the ledger: exactly once, through crashes, claims and duplicates."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config
from hotpath.client import BatchItem, HotPath, fingerprint, now_ms
from ledger.settlement import Settlement, Staged
from ledger.store import Ledger, LedgerReads
from lua import Status
from settler import reconcile
from settler.stream import GROUP, PartitionSettler
from tests.conftest import Org

CREDIT = 1000


@pytest.fixture(scope="session")
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


def settler(
    redis: aioredis.Redis, settlement: Settlement, hot: HotPath, org: str, consumer: str = "c1"
) -> PartitionSettler:
    return PartitionSettler(redis, settlement, hot, hot.partition(org), consumer=consumer, batch_entries=50)


async def drain(ps: PartitionSettler) -> int:
    assert await ps.acquire()
    total = 0
    try:
        for _ in range(1000):
            n = await ps.settle_once(block_ms=1)
            if n == 0:
                return total
            total += n
        raise AssertionError("did not drain")
    finally:
        await ps.release()


async def ledger_state(ledger: Ledger, org: str) -> dict[str, int]:
    async with ledger.tenant(org) as conn:
        balance = await conn.fetchval("SELECT balance FROM organizations")
        entries = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries")
        grants = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE type = 'grant'")
        usage = await conn.fetchval("SELECT coalesce(sum(credits), 0) FROM usage_events")
        remaining = await conn.fetchval("SELECT coalesce(sum(remaining), 0) FROM credit_grants")
        held = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM reservations WHERE status = 'open'")
        debt = await conn.fetchval("SELECT debt FROM organizations")
        captured = await conn.fetchval("SELECT coalesce(sum(used), 0) FROM reservations WHERE status <> 'open'")
        other = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE type IN ('expiration', 'adjustment', 'refund')"
        )
    return {
        "balance": int(balance),
        "entries": int(entries),
        "grants": int(grants),
        "usage": int(usage),
        "remaining": int(remaining),
        "held": int(held),
        "captured": int(captured),
        "other": int(other),
        "debt": int(debt),
    }


async def cache_balance(hot: HotPath, org: str) -> int:
    r = await hot.balance(org)
    assert r.status is Status.OK
    return int(r.payload["balance"])


def assert_conserved(state: dict[str, int], cache: int) -> None:
    assert state["balance"] == state["entries"] == cache
    assert state["grants"] - state["usage"] - state["captured"] + state["other"] == state["balance"]
    assert state["remaining"] + state["held"] - state["debt"] == state["balance"]  # debt: a credit line's


async def test_everything_settles_exactly_once(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    now = dt.datetime.now(dt.UTC)
    await admin.grant(ledger, hot, org.id, amount=50 * CREDIT, reason="t", expires_at=now + dt.timedelta(hours=1))
    cred = org.admin_key_id
    assert (await hot.consume(org.id, cred, action="generate_content", units=3)).status is Status.OK
    items = [BatchItem("web_search", 1, "", '{"q": "x"}', None, fingerprint("use", "web_search", 1))] * 4
    assert (await hot.consume_batch(org.id, cred, items, atomic=True)).status is Status.OK
    hold = await hot.reserve(org.id, cred, amount=120 * CREDIT, ttl_ms=60_000)  # spans the bonus and the grant
    await hot.release(org.id, cred, reservation_id=hold.payload["id"], used=7 * CREDIT)
    open_hold = await hot.reserve(org.id, cred, amount=5 * CREDIT, ttl_ms=60_000)
    assert open_hold.status is Status.OK
    await admin.adjust(ledger, hot, org.id, amount=-2 * CREDIT, reason="fix")
    later = now_ms() + 2 * 3600 * 1000
    await hot.balance(org.id, now=later)  # the grant's remainder expires
    await drain(settler(redis, settlement, hot, org.id))

    state = await ledger_state(ledger, org.id)
    cache = await cache_balance(hot, org.id)
    assert_conserved(state, cache)
    assert state["usage"] == 5 * CREDIT
    assert state["captured"] == 7 * CREDIT
    assert state["held"] == 0  # the open hold expired too, two hours later
    async with ledger.tenant(org.id) as conn:
        statuses = sorted(r[0] for r in await conn.fetch("SELECT status FROM reservations"))
        assert statuses == ["expired", "released"]
        types = [r[0] for r in await conn.fetch("SELECT type FROM ledger_entries ORDER BY id")]
        events = await conn.fetchval("SELECT count(*) FROM usage_events")
        meta = await conn.fetchval("SELECT metadata->>'q' FROM usage_events WHERE action = 'web_search' LIMIT 1")
        running = await conn.fetch("SELECT amount, balance_after FROM ledger_entries ORDER BY id")
    assert types[:2] == ["grant", "grant"]
    assert set(types[2:]) == {"usage", "reservation_capture", "adjustment", "expiration"}
    assert events == 5 and meta == "x"
    total = 0
    for row in running:  # every entry's balance_after is the running sum
        total += row["amount"]
        assert row["balance_after"] == total


async def test_a_batch_delivered_twice_counts_once(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    for _ in range(5):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    stream = hot.stream_key(hot.partition(org.id))
    rows = [r for r in await redis.xrange(stream) if r[1][b"o"] == org.id.encode()]
    for _ in range(3):  # the same entries, settled three times
        staged = Staged()
        for _, fields in rows:
            staged.add(org.id, msgspec.msgpack.decode(fields[b"d"]))
        await settlement.settle(
            staged, batch_id=uuid.uuid4().hex, partition=hot.partition(org.id), first_entry="0-1", last_entry="0-1"
        )
    state = await ledger_state(ledger, org.id)
    assert state["usage"] == 5 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))


async def test_a_batch_partly_settled_before_counts_only_the_rest(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """Usage events settle with a plain INSERT: a batch that overlaps what the ledger
    holds is refused by the primary key and staged again without the settled events,
    so each event, and each grant debit, counts once."""
    now = dt.datetime.now(dt.UTC)
    await admin.grant(ledger, hot, org.id, amount=20 * CREDIT, reason="t", expires_at=now + dt.timedelta(hours=1))
    for _ in range(3):  # the expiring grant first, then across into the bonus
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=3)
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=5)
    hold = await hot.reserve(org.id, org.admin_key_id, amount=4 * CREDIT, ttl_ms=60_000)
    assert hold.status is Status.OK
    stream = hot.stream_key(hot.partition(org.id))
    rows = [r for r in await redis.xrange(stream) if r[1][b"o"] == org.id.encode()]
    events = [msgspec.msgpack.decode(fields[b"d"]) for _, fields in rows]

    async def settle(evs: list[dict[str, object]]) -> None:
        staged = Staged()
        for ev in evs:
            staged.add(org.id, ev)
        await settlement.settle(
            staged, batch_id=uuid.uuid4().hex, partition=hot.partition(org.id), first_entry="0-1", last_entry="0-1"
        )

    await settle([events[0], events[2]])  # some of the batch settled before...
    await settle(events)  # ...then all of it (with the hold): only the rest counts
    await settle(events)  # and again: nothing
    state = await ledger_state(ledger, org.id)
    assert state["usage"] == 14 * CREDIT
    assert state["held"] == 4 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))
    async with ledger.tenant(org.id) as conn:
        remaining = sorted(r[0] for r in await conn.fetch("SELECT remaining FROM credit_grants"))
    cached = await hot.balance(org.id)
    assert sorted(int(g["remaining"]) for g in cached.payload["grants"]) == remaining


async def test_two_settlers_racing_on_one_batch_count_it_once(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """Two settlers that both believe they own a partition (a lease that ran out under
    a slow one) settle the same entries at the same moment: the second INSERT waits on
    the first's rows, is refused by the primary key, and restages to nothing new."""
    for _ in range(6):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    stream = hot.stream_key(hot.partition(org.id))
    rows = [r for r in await redis.xrange(stream) if r[1][b"o"] == org.id.encode()]

    async def settle_all() -> None:
        staged = Staged()
        for _, fields in rows:
            staged.add(org.id, msgspec.msgpack.decode(fields[b"d"]))
        await settlement.settle(
            staged, batch_id=uuid.uuid4().hex, partition=hot.partition(org.id), first_entry="0-1", last_entry="0-1"
        )

    await asyncio.gather(*(settle_all() for _ in range(4)))
    state = await ledger_state(ledger, org.id)
    assert state["usage"] == 6 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))
    async with ledger.tenant(org.id) as conn:
        assert await conn.fetchval("SELECT sum(events) FROM usage_hourly") == 6


async def test_a_failed_commit_settles_the_read_ahead_in_order_after_it(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """The loop reads the next batch while a transaction runs; when that transaction
    fails, the batch read ahead waits behind it, and both settle once, in order."""
    for _ in range(6):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    ps = PartitionSettler(redis, settlement, hot, hot.partition(org.id), consumer="ahead", batch_entries=2)
    ps.on_settled = None
    calls: list[str] = []
    real = settlement.settle

    async def flaky(staged: Staged, **kw: Any) -> Any:
        calls.append(kw["first_entry"])
        if len(calls) == 2:
            await asyncio.sleep(0.2)  # long enough for the next batch to be read ahead
            raise ConnectionError("postgres went away")
        return await real(staged, **kw)

    ps.settlement = type("Flaky", (), {"settle": staticmethod(flaky)})()  # type: ignore[assignment]
    stop = asyncio.Event()
    task = asyncio.create_task(ps.run(stop))
    stream = hot.stream_key(hot.partition(org.id))
    for _ in range(200):  # (the partition may hold other organizations' events too)
        await asyncio.sleep(0.05)
        settled = (await ledger_state(ledger, org.id))["usage"] == 6 * CREDIT
        if settled and (await redis.xpending(stream, GROUP))["pending"] == 0:
            break
    stop.set()
    await task
    await ps.release()
    assert ps.stats.failures == 1
    # The failed batch was tried again before the one read ahead of it.
    assert calls[2] == calls[1] and calls == sorted(calls, key=lambda e: tuple(map(int, e.split("-"))))
    state = await ledger_state(ledger, org.id)
    assert state["usage"] == 6 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))


async def test_a_transaction_longer_than_the_lease_keeps_it(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat renews the lease while a slow transaction runs: no other settler
    can take the partition meanwhile, and the batch commits (no fence raised)."""
    import settler.stream as stream

    monkeypatch.setattr(stream, "LEASE_TTL_MS", 600)
    for _ in range(3):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    ps = settler(redis, settlement, hot, org.id, consumer="slow")
    ps.on_settled = None
    other = settler(redis, settlement, hot, org.id, consumer="other")
    real = settlement.settle
    refused: list[bool] = []

    async def slow(staged: Staged, **kw: Any) -> Any:
        for _ in range(6):  # 1.8 s: three leases' worth
            await asyncio.sleep(0.3)
            refused.append(not await other.acquire())
        return await real(staged, **kw)

    ps.settlement = type("Slow", (), {"settle": staticmethod(slow)})()  # type: ignore[assignment]
    stop = asyncio.Event()
    task = asyncio.create_task(ps.run(stop))
    for _ in range(400):  # (the partition may hold other organizations' events too)
        await asyncio.sleep(0.05)
        if (await ledger_state(ledger, org.id))["usage"] == 3 * CREDIT:
            break
    stop.set()
    await task
    await ps.release()
    assert refused and all(refused), refused
    assert ps.stats.failures == 0 and ps.stats.batches >= 1
    assert (await ledger_state(ledger, org.id))["usage"] == 3 * CREDIT


async def test_crash_after_commit_before_ack_is_claimed_and_not_recounted(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    for _ in range(7):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    dead = settler(redis, settlement, hot, org.id, consumer=f"dead-{uuid.uuid4().hex[:6]}")
    assert await dead.acquire()
    # The dead worker read and committed, then died before XACK.
    entries, _ = await dead._read(1)
    staged = Staged()
    for _, fields in entries:
        staged.add(fields[b"o"].decode(), msgspec.msgpack.decode(fields[b"d"]))
    await settlement.settle(
        staged,
        batch_id="dead-batch-" + uuid.uuid4().hex,
        partition=dead.partition,
        first_entry=entries[0][0],
        last_entry=entries[-1][0],
    )
    pending = await redis.xpending(dead.stream, GROUP)
    assert pending["pending"] >= len(entries)
    await redis.delete(dead.lease_key)  # its lease runs out
    survivor = settler(redis, settlement, hot, org.id, consumer=f"alive-{uuid.uuid4().hex[:6]}")
    await drain(survivor)
    assert (await redis.xpending(dead.stream, GROUP))["pending"] == 0
    state = await ledger_state(ledger, org.id)
    assert state["usage"] == 7 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))


async def test_crash_mid_transaction_loses_nothing(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org, migrated: Config
) -> None:
    for _ in range(4):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    ps = settler(redis, settlement, hot, org.id)
    assert await ps.acquire()
    # A connection dies inside the transaction: the settle raises, nothing is acked.
    broken = await Settlement.connect(migrated.settler_dsn(), max_size=1)
    async with broken.pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    killer = await Settlement.connect(migrated.database_url or "", max_size=1)
    ps.settlement = broken
    orig = broken.settle

    async def settle_and_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        async with killer.pool.acquire() as k:
            await k.execute("SELECT pg_terminate_backend($1)", pid)
        return await orig(*args, **kwargs)

    broken.settle = settle_and_die  # type: ignore[method-assign]
    with pytest.raises(Exception):  # noqa: B017 - any connection error
        await ps.settle_once(block_ms=1)
    await broken.close()
    await killer.close()
    assert (await ledger_state(ledger, org.id))["usage"] == 0
    ps.settlement = settlement
    await drain(ps)
    state = await ledger_state(ledger, org.id)
    assert state["usage"] == 4 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))


async def test_cold_load_with_unsettled_events(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    dept = await ledger.create_department(org.id, "d")
    await ledger.set_department_limit(org.id, dept.id, 20 * CREDIT, "month")
    await hot.evict(org.id)
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=3, department_id=dept.id)
    await drain(settler(redis, settlement, hot, org.id))  # some settled...
    h = await hot.reserve(org.id, org.admin_key_id, amount=10 * CREDIT, ttl_ms=60_000, department_id=dept.id)
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=4, department_id=dept.id)
    before = (await hot.balance(org.id, department_id=dept.id)).payload
    await hot.evict(org.id)  # ...some not, and the cache is gone
    after = (await hot.balance(org.id, department_id=dept.id)).payload
    assert (after["balance"], after["reserved"], after["available"]) == (
        before["balance"],
        before["reserved"],
        before["available"],
    )
    assert after["dept"]["spent"] == before["dept"]["spent"] == 17 * CREDIT
    assert after["grants"] == before["grants"]
    rel = await hot.release(org.id, org.admin_key_id, reservation_id=h.payload["id"], used=CREDIT)
    assert rel.status is Status.OK and rel.payload["released"] == 9 * CREDIT
    await drain(settler(redis, settlement, hot, org.id))
    assert_conserved(await ledger_state(ledger, org.id), await cache_balance(hot, org.id))


async def test_reconciliation_finds_and_repairs_drift(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=2)
    # Unsettled events are in flight, not drift.
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert report.checked == 1 and report.drifts == []
    await drain(settler(redis, settlement, hot, org.id))
    assert (await reconcile.run(redis, hot, settlement, [org.id])).drifts == []
    # Somebody edits the cache behind the ledger's back.
    acct = hot.org_keys(org.id)[0]
    await redis.hincrby(acct, "bal", 5 * CREDIT)
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert [(d.organization_id, d.difference) for d in report.drifts] == [(org.id, 5 * CREDIT)]
    repaired = await reconcile.repair(hot, settlement, org.id)
    assert repaired is not None and repaired.difference == 5 * CREDIT
    assert (await reconcile.run(redis, hot, settlement, [org.id])).drifts == []
    assert await cache_balance(hot, org.id) == 98 * CREDIT


async def test_period_reset_racing_consumes(hot: HotPath, ledger: Ledger, org: Org) -> None:
    """Consumes at the instant a period rolls over: each lands in exactly one period."""
    dept = await ledger.create_department(org.id, "race")
    await ledger.set_department_limit(org.id, dept.id, 30 * CREDIT, "day")
    await hot.configure(org.id, "dept", dept.id, 30 * CREDIT, "day")
    midnight = int(dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp() * 1000)
    times = [midnight - 1 if i % 2 else midnight for i in range(40)]
    results = await asyncio.gather(
        *(
            hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, department_id=dept.id, now=t)
            for t in times
        )
    )
    ok_before = sum(1 for t, r in zip(times, results, strict=True) if r.status is Status.OK and t < midnight)
    ok_after = sum(1 for t, r in zip(times, results, strict=True) if r.status is Status.OK and t >= midnight)
    assert ok_before <= 30 and ok_after <= 30
    spent = (await hot.balance(org.id, department_id=dept.id, now=midnight)).payload["dept"]["spent"]
    assert spent <= 30 * CREDIT


async def test_the_hourly_rollup_sums_like_the_events_over_any_range(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """/usage/summary adds whole hours from usage_hourly and partial hours from the
    events: over any range and grouping it says what the events alone say, and a batch
    delivered again adds nothing to either."""
    dept = await ledger.create_department(org.id, "rollup")
    await ledger.set_department_limit(org.id, dept.id, 10**6 * CREDIT, "month")
    base = (now_ms() // 3_600_000 - 50) * 3_600_000  # an hour boundary, 50 h ago
    minute = 60_000
    at = [10, 40, 70, 130, 131, 60 * 25 + 5, 60 * 26, 60 * 49 + 59]  # minutes after base
    for i, m in enumerate(at):
        action = "web_search" if i % 2 else "generate_content"
        r = await hot.consume(
            org.id,
            org.admin_key_id,
            action=action,
            units=1 + i,
            department_id=dept.id if i % 3 == 0 else "",
            now=base + m * minute,
        )
        assert r.status is Status.OK, r
    stream = hot.stream_key(hot.partition(org.id))
    entries = [r for r in await redis.xrange(stream) if r[1][b"o"] == org.id.encode()]
    await drain(settler(redis, settlement, hot, org.id))
    staged = Staged()  # the same events once more, as after a crash before the ack
    for _, fields in entries:
        staged.add(org.id, msgspec.msgpack.decode(fields[b"d"]))
    await settlement.settle(
        staged, batch_id=uuid.uuid4().hex, partition=hot.partition(org.id), first_entry="0-1", last_entry="0-1"
    )

    reads = LedgerReads(ledger)
    t = lambda minutes: dt.datetime.fromtimestamp((base + minutes * minute) / 1000, dt.UTC)  # noqa: E731
    keys = {
        "action": "action",
        "department": "coalesce(department_id::text, '')",
        "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    }
    ranges = [
        (None, None),
        (t(0), t(60)),
        (t(15), t(45)),
        (t(15), t(135)),
        (t(30), None),
        (None, t(131)),
        (t(60), t(60 * 26)),
        (t(1), t(60 * 50)),
        (t(131), t(131)),
    ]
    async with ledger.tenant(org.id) as conn:
        for start, end in ranges:
            for group_by, key in keys.items():
                want = await conn.fetch(
                    f"SELECT {key} AS key, count(*) AS events, sum(units) AS units, sum(credits) AS credits"
                    " FROM usage_events WHERE ($1::timestamptz IS NULL OR created_at >= $1)"
                    " AND ($2::timestamptz IS NULL OR created_at < $2) GROUP BY 1 ORDER BY 1",
                    start,
                    end,
                )
                got = await reads.usage_summary(org.id, start=start, end=end, group_by=group_by)
                assert [(g.key, g.events, g.units, g.credits) for g in got] == [tuple(w) for w in want], (
                    start,
                    end,
                    group_by,
                )
        assert await conn.fetchval("SELECT sum(events) FROM usage_hourly") == len(at)


async def test_captures_count_as_usage_in_pages_and_summaries(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """A release that charged is usage: /usage lists it (kind capture) in time order with
    the events, and every summary adds it up, from the rollup for whole hours and from
    the reservations at the edges; an expired hold and a release of nothing are not."""
    dept = await ledger.create_department(org.id, "captures")
    other_key = await admin.create_key(ledger, hot, org.id, role="agent")
    base = (now_ms() // 3_600_000 - 30) * 3_600_000
    minute = 60_000
    captured: list[str] = []
    charged: dict[str, int] = {}
    for i, m in enumerate([5, 50, 65, 60 * 24 + 30, 60 * 29 + 10]):
        r = await hot.consume(org.id, org.admin_key_id, action="web_search", units=2, now=base + m * minute)
        assert r.status is Status.OK, r
        cred = other_key.id if i % 2 else org.admin_key_id
        hold = await hot.reserve(
            org.id,
            cred,
            amount=5 * CREDIT,
            ttl_ms=10 * minute,
            department_id=dept.id if i % 2 == 0 else "",
            action="generate_content" if i < 3 else "",
            metadata=f'{{"task": {i}}}',
            now=base + (m + 1) * minute,
        )
        assert hold.status is Status.OK, hold
        rid = hold.payload["id"]
        used = (i + 1) * 500 if i != 2 else 0  # the third releases nothing
        done = await hot.release(org.id, cred, reservation_id=rid, used=used, now=base + (m + 3) * minute)
        assert done.status is Status.OK, done
        if used:
            captured.append(rid)
            charged[rid] = used
    expiring = await hot.reserve(org.id, org.admin_key_id, amount=CREDIT, ttl_ms=minute, now=base + 100 * minute)
    assert expiring.status is Status.OK
    await hot.balance(org.id, now=base + 200 * minute)  # the sweep expires it: no capture
    await drain(settler(redis, settlement, hot, org.id))

    reads = LedgerReads(ledger)
    rows, more = await reads.usage(
        org.id, start=None, end=None, department_id=None, action=None, limit=100, starting_after=None
    )
    assert not more
    assert [r.created_at for r in rows] == sorted((r.created_at for r in rows), reverse=True)
    captures = [r for r in rows if r.kind == "capture"]
    assert sorted(r.id for r in captures) == sorted(captured)
    assert {r.id: r.credits for r in captures} == charged
    first = next(r for r in captures if r.id == captured[0])
    assert (first.units, first.action, first.department_id, json.loads(first.metadata)) == (
        1,
        "generate_content",
        dept.id,
        {"task": 0},
    )
    # pages walk both kinds with one cursor, and filters apply to captures too
    seen: list[str] = []
    after = None
    while True:
        page, more = await reads.usage(
            org.id, start=None, end=None, department_id=None, action=None, limit=2, starting_after=after
        )
        seen += [r.id for r in page]
        if not more:
            break
        after = page[-1].id
    assert seen == [r.id for r in rows]
    by_dept, _ = await reads.usage(
        org.id, start=None, end=None, department_id=dept.id, action=None, limit=100, starting_after=None
    )
    assert {r.id for r in by_dept} == {captured[0], captured[3]}  # i = 0 and 4 (2 charged nothing)
    by_action, _ = await reads.usage(
        org.id, start=None, end=None, department_id=None, action="generate_content", limit=100, starting_after=None
    )
    assert {r.id for r in by_action} == {captured[0], captured[1]}

    t = lambda minutes: dt.datetime.fromtimestamp((base + minutes * minute) / 1000, dt.UTC)  # noqa: E731
    keys = {
        "action": "action",
        "department": "coalesce(department_id::text, '')",
        "day": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "hour": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
        "api_key": "credential_id",
    }
    both = (
        "SELECT action, department_id, credential_id, units, credits, created_at AS at FROM usage_events"
        " UNION ALL SELECT action, department_id, credential_id, 1, used, closed_at FROM reservations WHERE used > 0"
    )
    async with ledger.tenant(org.id) as conn:
        for start, end in [(None, None), (t(0), t(60)), (t(30), t(60 * 25)), (t(52), None), (t(4), t(70))]:
            for group_by, key in keys.items():
                want = await conn.fetch(
                    f"SELECT {key} AS key, count(*) AS events, sum(units) AS units, sum(credits) AS credits"
                    f" FROM ({both}) x WHERE ($1::timestamptz IS NULL OR at >= $1)"
                    " AND ($2::timestamptz IS NULL OR at < $2) GROUP BY 1 ORDER BY 1",
                    start,
                    end,
                )
                got = await reads.usage_summary(org.id, start=start, end=end, group_by=group_by)
                assert [(g.key, g.events, g.units, g.credits) for g in got] == [tuple(w) for w in want], (
                    start,
                    end,
                    group_by,
                )
        daily = await reads.usage_summary(org.id, start=None, end=None, group_by="day", then_by="action")
        assert sum(g.credits for g in daily) == sum(r.credits for r in rows)
        assert {g.sub_key for g in daily} == {"web_search", "generate_content", ""}
        rolled = await conn.fetchval("SELECT sum(events) FROM usage_hourly")
    assert rolled == 5 + len(captured)


async def test_a_settler_whose_epoch_counter_was_lost_raises_it_past_the_fence(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """Redis lost the epoch counters (flushed, restored, replaced): the next owner's
    epoch would start again at 1, below the fence in Postgres, and every transaction of
    it would be refused for ever. It raises its epoch past the fence instead."""
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    ps = settler(redis, settlement, hot, org.id, consumer="before")
    await drain(ps)
    fence = await settlement.fence(ps.partition)
    assert fence >= 1
    await redis.delete(ps.epoch_key)  # the counter is gone
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    after = settler(redis, settlement, hot, org.id, consumer="after")
    assert await after.acquire()
    assert after.epoch == fence + 1
    await after.release()
    await drain(after)
    assert (await ledger_state(ledger, org.id))["usage"] == 2 * CREDIT
