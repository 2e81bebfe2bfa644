"""The bank test: many clients spend, hold, release and retry against a few
organizations while the settler process is killed and restarted and Postgres turns
the settler away for a while. At the end, for every organization:

    cache balance == ledger balance == sum of ledger entries
                  == grants - usage - captures - expirations - adjustments

and every consume the hot path acknowledged is in the ledger exactly once. A fourth
organization lives on a credit line (a small float, a limit, grants arriving during the
traffic): it never goes below minus its limit, and its debt is the same in the cache,
in organizations.debt and in the sum of its debt entries, with
grants remaining - debt == balance.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config
from hotpath.client import BatchItem, HotPath, fingerprint, now_ms
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from settler.stream import lag

CREDIT = 1000
TRAFFIC_S = 12.0
CLIENTS = 24


@dataclass
class Book:
    acknowledged: set[str] = field(default_factory=set)  # consume event ids answered OK
    retries: int = 0
    refusals: int = 0


SETTLER_LOG = f"/tmp/bank-settler-{os.getpid()}.log"


def start_settler(config: Config) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": config.redis_url or "",
        "DATABASE_URL": config.database_url or "",
        "REDIS_KEY_PREFIX": config.redis_key_prefix,
        "SETTLE_BATCH_ENTRIES": "20",
        "SETTLER_PORT": "0",
        "LOG_LEVEL": "WARNING",
    }
    log = open(SETTLER_LOG, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", "settler"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()


async def client(hot: HotPath, orgs: list[tuple[str, str]], book: Book, stop: asyncio.Event, seed: int) -> None:
    rnd = random.Random(seed)
    while not stop.is_set():
        org, cred = rnd.choice(orgs)
        roll = rnd.random()
        if roll < 0.5:
            key = uuid.uuid4().hex if rnd.random() < 0.5 else None
            fp = fingerprint("use", "tool_call", 1)
            tries = 2 if key else 1
            for _ in range(tries):  # a retry with the same key must not charge twice
                r = await hot.consume(
                    org, cred, action="tool_call", units=rnd.randint(1, 5), idempotency_key=key, fp=fp
                )
                if r.status in (Status.OK, Status.REPLAY):
                    book.acknowledged.add(r.payload["id"])
                    book.retries += r.status is Status.REPLAY
                else:
                    book.refusals += 1
        elif roll < 0.7:
            items = [BatchItem("tool_call", rnd.randint(1, 3), "", "", None, "") for _ in range(rnd.randint(1, 20))]
            r = await hot.consume_batch(org, cred, items, atomic=rnd.random() < 0.5)
            if r.status is Status.OK:
                book.acknowledged.update(x["id"] for x in r.payload["results"] if x.get("ok"))
        else:
            h = await hot.reserve(org, cred, amount=rnd.randint(1, 4) * CREDIT, ttl_ms=rnd.choice([300, 60_000]))
            if h.status is Status.OK:
                await asyncio.sleep(rnd.random() * 0.4)
                used = rnd.randint(0, h.payload["amount"])
                for _ in range(rnd.choice([1, 2])):  # a second release is refused, never charged
                    await hot.release(org, cred, reservation_id=h.payload["id"], used=used)
        await asyncio.sleep(0)


@pytest.fixture
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


async def settler_outage(owner_url: str, seconds: float) -> None:
    """Postgres refuses the settler: no connections to this database for a while."""
    conn = await asyncpg.connect(owner_url)
    db = await conn.fetchval("SELECT current_database()")
    try:
        await conn.execute(f'REVOKE CONNECT ON DATABASE "{db}" FROM PUBLIC')
        await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO credits_app')
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = 'credits_settler' AND datname = current_database()"
            )
            await asyncio.sleep(0.2)
    finally:
        await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO PUBLIC')
        await conn.close()


async def wait_drained(redis: aioredis.Redis, hot: HotPath, partitions: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = [(await lag(redis, hot, p, now_ms()))[0] for p in range(partitions)]
        if sum(counts) == 0:
            return
        await asyncio.sleep(0.3)
    tail = pathlib.Path(SETTLER_LOG).read_bytes()[-4000:].decode(errors="replace")  # noqa: ASYNC240
    diag = []
    for p, n in enumerate(counts):
        if n:
            lease = await redis.get(hot.partition_key(p, "settler-lease"))
            pending = await redis.xpending(hot.stream_key(p), "settlers")
            groups = await redis.xinfo_groups(hot.stream_key(p))
            ttl = await redis.pttl(hot.partition_key(p, "settler-lease"))
            diag.append(f"p{p}: lease={lease!r} ttl={ttl} pending={pending} groups={groups}")
    raise AssertionError(f"settlement did not catch up: {counts}\n" + "\n".join(diag) + f"\nsettler log:\n{tail}")


async def test_bank_invariants_through_crashes_and_outages(
    migrated: Config, hot: HotPath, ledger: Ledger, redis: aioredis.Redis, settlement: Settlement
) -> None:
    orgs: list[tuple[str, str]] = []
    for i in range(3):
        org, _ = await admin.create_organization(ledger, f"bank-{i}")
        await admin.grant(ledger, hot, org, amount=2_000 * CREDIT, reason="float", reference=f"float-{i}")
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
        await admin.grant(
            ledger, hot, org, amount=50 * CREDIT, reason="expiring", reference=f"exp-{i}", expires_at=soon
        )
        key = await admin.create_key(ledger, hot, org, role="agent", rate_limit_per_s=0)
        orgs.append((org, key.id))
        await hot.configure(org, "cost", "tool_call", 100)  # 0.1 credit per unit
        await ledger.set_cost(org, "tool_call", 100, "call", "")
    # On a credit line: 100 credits of signup bonus and a 30-credit limit, so it owes
    # within seconds, and grants of 3 credits (repaying first) keep arriving.
    lined, _ = await admin.create_organization(ledger, "bank-credit-line")
    await admin.set_credit_limit(ledger, hot, lined, limit=30 * CREDIT, reason="bank")
    lined_key = await admin.create_key(ledger, hot, lined, role="agent", rate_limit_per_s=0)
    await hot.configure(lined, "cost", "tool_call", 100)
    await ledger.set_cost(lined, "tool_call", 100, "call", "")
    orgs.append((lined, lined_key.id))

    async def top_ups() -> None:
        n = 0
        while not stop.is_set():
            await asyncio.sleep(0.5)
            n += 1
            await admin.grant(ledger, hot, lined, amount=3 * CREDIT, reason="top up", reference=f"top-{n}")

    book = Book()
    stop = asyncio.Event()
    proc = start_settler(migrated)
    clients = [asyncio.create_task(client(hot, orgs, book, stop, seed)) for seed in range(CLIENTS)]
    clients.append(asyncio.create_task(top_ups()))
    try:
        started = time.monotonic()
        kills = 0
        outage_done = False
        while time.monotonic() - started < TRAFFIC_S:
            await asyncio.sleep(random.uniform(1.0, 2.0))
            if kills < 3:
                proc.send_signal(signal.SIGKILL)  # mid-batch, wherever it is
                proc.wait(timeout=10)
                kills += 1
                proc = start_settler(migrated)
            elif not outage_done:
                await settler_outage(migrated.database_url or "", 2.5)
                outage_done = True
            if any(c.done() for c in clients):
                break
        assert kills == 3 and outage_done
    finally:
        stop.set()
        await asyncio.gather(*clients)
    # Let the holds with short TTLs and the expiring grants run out, then settle all.
    await asyncio.sleep(1.0)
    for org, _ in orgs:
        await hot.balance(org, now=now_ms() + 120_000)  # sweep expired holds and grants
    try:
        await wait_drained(redis, hot, migrated.usage_partitions, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    assert len(book.acknowledged) > 200
    for org, _ in orgs:
        cache = (await hot.balance(org)).payload
        async with ledger.tenant(org) as conn:
            balance = await conn.fetchval("SELECT balance FROM organizations")
            entries = await conn.fetchval("SELECT sum(amount) FROM ledger_entries")
            by_type = dict(await conn.fetch("SELECT type, sum(amount) FROM ledger_entries GROUP BY type"))
            usage = await conn.fetchval("SELECT coalesce(sum(credits), 0) FROM usage_events")
            captured = await conn.fetchval("SELECT coalesce(sum(used), 0) FROM reservations WHERE status <> 'open'")
            open_holds = await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'")
            remaining = await conn.fetchval("SELECT sum(remaining) FROM credit_grants")
            debt, limit = await conn.fetchrow("SELECT debt, credit_limit FROM organizations")
            debt_entries = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM debt_entries")
        assert cache["reserved"] == 0 and open_holds == 0
        assert cache["balance"] == balance == entries, org
        assert -by_type.get("usage", 0) == usage
        assert -by_type.get("reservation_capture", 0) == captured
        expirations = -by_type.get("expiration", 0)
        assert by_type["grant"] - usage - captured - expirations - (-by_type.get("adjustment", 0)) == balance
        assert remaining - debt == balance
        assert cache["debt"] == debt == debt_entries and balance >= -limit
    async with ledger.pool.acquire() as conn:
        settled: set[str] = set()
        for org, _ in orgs:
            async with ledger.tenant(org) as t:
                settled |= {r[0] for r in await t.fetch("SELECT id FROM usage_events")}
    async with ledger.tenant(lined) as t:
        kinds = {r[0] for r in await t.fetch("SELECT DISTINCT type FROM debt_entries")}
    assert {"overdraw", "repayment"} <= kinds, kinds  # it owed, and grants repaid (holds: hold_return too)
    missing = book.acknowledged - settled
    assert not missing, f"{len(missing)} acknowledged consumes never reached the ledger"
