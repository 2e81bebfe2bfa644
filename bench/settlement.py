"""Settlement benchmark: events/s into the ledger against a bare COPY of the same rows,
and settlement lag (acknowledged consume -> ledger row) while the hot path runs.

    python -m bench.settlement [--events 200000] [--lag-seconds 10] [--concurrency 50]

Not a test: it prints figures and ratios for this machine, in one run. Uses REDIS_URL
and DATABASE_URL (defaults: redis://127.0.0.1:6379/8, postgresql://postgres@127.0.0.1:5432/test)
and a scratch database it drops afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from accounts import admin
from core import config as config_module
from core.config import Config
from hotpath.client import BatchItem, HotPath
from hotpath.connection import PipelinedRedis
from ledger.migrate import migrate
from ledger.settlement import Staged
from ledger.store import Ledger
from lua import Status
from settler.service import Settler

CREDIT = 1000


def _base_urls() -> tuple[str, str]:
    return (
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/8"),
        os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )


def _with_db(url: str, name: str) -> str:
    import urllib.parse

    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc, "/" + name, p.query, ""))


async def _setup(
    config: Config, partitions: int, pipe: PipelinedRedis | None = None
) -> tuple[Ledger, HotPath, aioredis.Redis, list[tuple[str, str]]]:
    assert config.database_url and config.redis_url
    await migrate(config.database_url, app_password=config.app_db_password, settler_password=config.settler_db_password)
    ledger = await Ledger.connect(config.app_dsn(), max_size=8)
    redis = aioredis.Redis.from_url(config.redis_url, max_connections=200)
    hot = HotPath.from_config(redis, ledger, config, pipe=pipe)
    await hot.start()
    orgs = []
    for i in range(partitions):
        org, _ = await admin.create_organization(ledger, f"bench-settle-{i}")
        await admin.grant(ledger, hot, org, amount=10**9 * CREDIT, reason="bench", reference="bench")
        key = await admin.create_key(ledger, hot, org, role="agent", rate_limit_per_s=0)
        await hot.configure(org, "cost", "tool_call", 100)
        await ledger.set_cost(org, "tool_call", 100, "call", "")
        orgs.append((org, key.id))
    return ledger, hot, redis, orgs


async def _settle_partition(settler: Settler, partition: int, entries: int) -> None:
    """Run the settler's own loop (read-ahead and all) on one partition until it has
    settled `entries` entries; the alert check after each batch stays on, as deployed."""
    ps = settler.partition_settler(partition)
    stop = asyncio.Event()
    alerts = ps.on_settled

    async def on_settled(orgs: set[str]) -> None:
        if alerts is not None:
            await alerts(orgs)
        if ps.stats.settled_entries >= entries:
            stop.set()

    ps.on_settled = on_settled
    await ps.run(stop)
    await ps.release()


async def _fill(hot: HotPath, orgs: list[tuple[str, str]], events: int) -> None:
    per_call = 1000
    items = [BatchItem("tool_call", 1, "", "", None, "")] * per_call
    made = 0
    while made < events:
        for org, cred in orgs:
            r = await hot.consume_batch(org, cred, items, atomic=False)
            assert r.status is Status.OK
            made += per_call


async def _usage_events(ledger: Ledger, orgs: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for org, _ in orgs:
        async with ledger.tenant(org) as t:
            rows.extend(tuple(r.values()) for r in await t.fetch("SELECT * FROM usage_events ORDER BY created_at, id"))
    return rows


async def throughput(config: Config, events: int) -> dict[str, float]:
    ledger, hot, redis, orgs = await _setup(config, 4)
    settler = await Settler.open(replace(config, settle_batch_entries=10))

    # One partition after the other: one settling loop, one transaction at a time (the
    # like of one COPY stream). Only the settlement is timed.
    await _fill(hot, orgs, events)
    backlog = {p: int(await redis.xlen(hot.stream_key(p))) for p in range(config.usage_partitions)}
    started = time.perf_counter()
    for p, entries in backlog.items():
        if entries:
            await _settle_partition(settler, p, entries)
    settle_s = time.perf_counter() - started
    rows = await _usage_events(ledger, orgs)
    events_settled = len(rows)

    # The settler service as deployed: every partition's loop at once.
    await _fill(hot, orgs, events)
    backlog = {p: int(await redis.xlen(hot.stream_key(p))) for p in range(config.usage_partitions)}
    started = time.perf_counter()
    await asyncio.gather(*(_settle_partition(settler, p, n) for p, n in backlog.items() if n))
    service_s = time.perf_counter() - started
    service_events = len(await _usage_events(ledger, orgs)) - events_settled
    await settler.close()

    # The bare COPY: the same rows into a table with the same columns and indexes, in
    # transactions of the settler's batch size.
    owner = await asyncpg.connect(config.database_url)
    try:
        await owner.execute("CREATE TABLE copy_target (LIKE usage_events INCLUDING DEFAULTS INCLUDING INDEXES)")
        cols = [a.name for a in (await owner.prepare("SELECT * FROM usage_events")).get_attributes()]
        started = time.perf_counter()
        for i in range(0, len(rows), 10_000):
            async with owner.transaction():
                await owner.copy_records_to_table("copy_target", records=rows[i : i + 10_000], columns=cols)
        copy_s = time.perf_counter() - started
    finally:
        await owner.close()
    await ledger.close()
    await redis.aclose()
    return {
        "events": events_settled,
        "settle_events_per_s": events_settled / settle_s,
        "service_events_per_s": service_events / service_s,
        "copy_rows_per_s": len(rows) / copy_s,
        "ratio": (events_settled / settle_s) / (len(rows) / copy_s),
        "service_ratio": (service_events / service_s) / (len(rows) / copy_s),
    }


def _lag_worker(config_json: str, out_path: str) -> None:
    """Run in a subprocess: the settler, recording lag per settled event."""
    config = replace(config_module.load({}), **json.loads(config_json))
    lags_ms: list[float] = []

    async def main() -> None:
        settler = await Settler.open(config)
        original = settler.settlement.settle

        async def settle(staged: Staged, **kw: Any) -> Any:
            result = await original(staged, **kw)
            done = dt.datetime.now(dt.UTC)
            for row in staged.uses:
                lags_ms.append((done - row[8]).total_seconds() * 1000)
            return result

        settler.settlement.settle = settle  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await settler.supervise(stop)
        await settler.close()
        pathlib.Path(out_path).write_text(json.dumps(lags_ms))  # noqa: ASYNC240 - once, at the end

    asyncio.run(main())


async def lag(config: Config, seconds: float, concurrency: int) -> dict[str, float]:
    # The sidecar's own way to Redis (one auto-pipelined connection): the hot path at
    # the speed it serves, not at one redis-py round trip per consume.
    assert config.redis_url is not None
    pipe = PipelinedRedis.from_url(config.redis_url)
    ledger, hot, redis, orgs = await _setup(config, 4, pipe)
    out = f"/tmp/bench-lag-{os.getpid()}.json"
    cfg = {
        "redis_url": config.redis_url,
        "database_url": config.database_url,
        "redis_key_prefix": config.redis_key_prefix,
    }
    proc = subprocess.Popen([sys.executable, "-m", "bench.settlement", "--lag-worker", json.dumps(cfg), out])  # noqa: ASYNC220
    await asyncio.sleep(2.0)
    stop = asyncio.Event()
    count = 0

    async def client(i: int) -> None:
        nonlocal count
        org, cred = orgs[i % len(orgs)]
        while not stop.is_set():
            r = await hot.consume(org, cred, action="tool_call", units=1)
            assert r.status is Status.OK
            count += 1

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(2.0)  # let it settle the tail
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    lags = sorted(json.loads(pathlib.Path(out).read_text()))  # noqa: ASYNC240 - once, at the end
    pathlib.Path(out).unlink()  # noqa: ASYNC240
    await ledger.close()
    await redis.aclose()
    await pipe.close()
    q = statistics.quantiles(lags, n=100)
    return {
        "consumes": count,
        "consumes_per_s": count / seconds,
        "settled": len(lags),
        "lag_p50_ms": q[49],
        "lag_p99_ms": q[98],
        "lag_max_ms": lags[-1],
    }


async def run(args: argparse.Namespace) -> None:
    redis_url, base_db = _base_urls()
    name = f"credits_bench_settle_{uuid.uuid4().hex[:8]}"
    admin_conn = await asyncpg.connect(base_db)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = config_module.load({"RATE_LIMIT_PER_S": "0", "REDIS_KEY_PREFIX": f"b{uuid.uuid4().hex[:6]}"})
        config = replace(base, redis_url=redis_url, database_url=_with_db(base_db, name))
        t = await throughput(config, args.events)
        print(f"bare COPY of the same rows: {t['copy_rows_per_s']:,.0f} rows/s ({t['events']:,} rows)")
        verdict = "met" if t["ratio"] >= 0.5 else "MISSED"
        print(
            f"settlement, one partition at a time: {t['settle_events_per_s']:,.0f} events/s"
            f" = {t['ratio']:.2f}x COPY (target 0.5) {verdict}"
        )
        print(
            f"settlement, the service (every partition at once): {t['service_events_per_s']:,.0f} events/s"
            f" = {t['service_ratio']:.2f}x COPY"
        )
        config = replace(config, redis_key_prefix=f"b{uuid.uuid4().hex[:6]}")
        lg = await lag(config, args.lag_seconds, args.concurrency)
        verdict = "met" if lg["lag_p99_ms"] < 1000 else "MISSED"
        print(
            f"lag while the hot path runs at {lg['consumes_per_s']:,.0f} consumes/s ({args.concurrency} clients):"
            f" p50 {lg['lag_p50_ms']:.0f} ms, p99 {lg['lag_p99_ms']:.0f} ms, max {lg['lag_max_ms']:.0f} ms"
            f" over {lg['settled']:,} of {lg['consumes']:,} events (target p99 < 1000 ms) {verdict}"
        )
    finally:
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--lag-worker":
        _lag_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.settlement")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=50)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
