"""`python -m bench.hotorg`: one hot organization, driven by several processes against
one Redis, with and without the group commit (hotpath/group.py).

Two ways to drive it, each run twice (CONSUME_COALESCE off, then on):

- `direct`: `--drivers` processes, each with `--concurrency` tasks charging the one
  organization through the sidecar's own door (HotPath over its auto-pipelined
  connection, through ConsumeGroups when coalescing), with an assigned idempotency key
  per charge as the sidecar gives a `/use` without one. No HTTP: what Redis can take.
- `http`: `credits serve meter --workers N` (N sidecar processes on one port), loaded
  by `--drivers` load generator processes (wrk when on PATH, else Python aiohttp) with
  `--concurrency` connections each, `POST /api/credits/use`.

Redis is a server of the benchmark's own (Debian's redis-server, or `--redis-url`),
so `INFO commandstats` counts only these calls: script calls (FCALL) and the time Redis
spent in them over the measured window, hence Redis time per consume and the ceiling
one Redis gives one organization (1 s / that time). Every run is verified: the
balance dropped by exactly the consumes answered 200 times the price, and the usage
stream holds exactly those charges.

    python -m bench.hotorg --duration 10 --drivers 2 --workers 2 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from statistics import median
from typing import Any

import msgspec
import psutil
import redis.asyncio as aioredis

from bench import fixtures, loadgen
from bench.loadgen import Request

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
TODAY_CEILING = 22_000  # consumes/s of one organization before (issue 12: ~45 us of script time per /use)
TARGET_RATIO = 3.0
RESULT_MARK = "HOTORG-RESULT "
USE_BODY = json.dumps({"action": fixtures.ACTION, "units": 1}, separators=(",", ":")).encode()


def log(msg: str) -> None:
    sys.stderr.write(f"[bench.hotorg {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# -- the driver process (direct mode) ------------------------------------------------------
async def drive(args: argparse.Namespace) -> dict[str, Any]:
    """One driver: `concurrency` tasks charging until `end`; counts what completed
    within [start, end) and in all."""
    from hotpath.client import HotPath, fingerprint, new_id
    from hotpath.group import ConsumeGroups
    from hotpath.servers import open_redis
    from ledger.store import Ledger

    config = fixtures.credits_config(args.redis_url, args.database_url)
    ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=2)
    connections = await open_redis(args.redis_url, pipelined=True)
    hot = HotPath.using(connections, ledger, config)
    await hot.start()
    groups = ConsumeGroups(hot) if args.coalesce else None
    consumer: ConsumeGroups | HotPath = groups if groups is not None else hot
    fp = fingerprint("use", fixtures.ACTION, 1, "", None)
    counts = {"ok": 0, "refused": 0, "in_window": 0}
    start, end = args.start, args.start + args.duration

    async def task() -> None:
        while True:
            now = time.time()
            if now >= end:
                return
            # As the sidecar charges a /use without a key: one it assigns (kept 300 s).
            r = await consumer.consume(
                args.org,
                args.key,
                action=fixtures.ACTION,
                units=1,
                idempotency_key="auto_" + new_id(),
                fp=fp,
                assigned=True,
            )
            if r.status.name != "OK":
                counts["refused"] += 1
                continue
            counts["ok"] += 1
            if time.time() >= start:
                counts["in_window"] += 1

    try:
        await asyncio.gather(*(task() for _ in range(args.concurrency)))
    finally:
        await connections.close()
        await ledger.close()
    if groups is not None:
        counts["groups"] = groups.stats.groups
        counts["grouped"] = groups.stats.grouped
        counts["alone"] = groups.stats.alone
    return counts


# -- measuring -------------------------------------------------------------------------------
async def redis_counters(redis: aioredis.Redis) -> dict[str, float]:
    stats = await redis.info("commandstats")
    cpu = await redis.info("cpu")
    fcall = stats.get("cmdstat_fcall") or {}
    return {
        "calls": float(fcall.get("calls", 0)),
        "usec": float(fcall.get("usec", 0)),
        "cpu": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
    }


@dataclass
class Run:
    mode: str  # direct | http
    coalesce: bool
    consumes: int  # answered 200 in the measured window
    seconds: float
    script_calls: int
    script_usec: float
    redis_cpu_pct: float
    host_busy_pct: float
    verified: bool
    detail: str
    extra: dict[str, Any]

    @property
    def per_s(self) -> float:
        return self.consumes / self.seconds if self.seconds else 0.0

    @property
    def us_per_consume(self) -> float:
        """Time Redis spent in the scripts, per consume (commandstats: wall time, so a
        Redis the machine's other processes preempt mid-script counts that too)."""
        return self.script_usec / self.consumes if self.consumes else 0.0

    @property
    def cpu_us_per_consume(self) -> float:
        """Redis's CPU per consume (INFO cpu): the scripts and the network I/O around them."""
        return self.redis_cpu_pct / 100 * self.seconds * 1e6 / self.consumes if self.consumes else 0.0

    @property
    def ceiling(self) -> float:
        """Consumes/s one Redis (one core) would take of this organization: at the larger of
        the two costs per consume."""
        cost = max(self.us_per_consume, self.cpu_us_per_consume)
        return 1e6 / cost if cost else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "coalesce": self.coalesce,
            "consumes_per_s": round(self.per_s),
            "script_calls_per_s": round(self.script_calls / self.seconds) if self.seconds else 0,
            "consumes_per_call": round(self.consumes / self.script_calls, 2) if self.script_calls else 0,
            "us_per_call": round(self.script_usec / self.script_calls, 1) if self.script_calls else 0,
            "redis_us_per_consume": round(self.us_per_consume, 2),
            "redis_cpu_us_per_consume": round(self.cpu_us_per_consume, 2),
            "ceiling_consumes_per_s": round(self.ceiling),
            "redis_cpu_pct": round(self.redis_cpu_pct),
            "host_busy_pct": round(self.host_busy_pct),
            "verified": self.verified,
            "detail": self.detail,
            **self.extra,
        }


def _host_busy_s() -> float:
    t = psutil.cpu_times()
    return float(sum(t)) - float(t.idle) - float(getattr(t, "iowait", 0.0))


async def verify(s: Any, org: fixtures.HotOrg, bal0: int, answered: int, since: str) -> tuple[bool, str]:
    """The balance dropped by exactly answered x price, and the stream holds exactly
    that many charges of the organization, adding up to the drop."""
    bal1 = await fixtures.cache_balance(s, org.id)
    drop = bal0 - bal1
    events = amount = 0
    cursor = "(" + since
    while True:
        rows = await s.redis.xrange(org.stream, min=cursor, max="+", count=2000)
        for _, fields in rows:
            if fields.get(b"o", b"").decode() != org.id:
                continue
            ev = msgspec.msgpack.decode(fields[b"d"])
            items = ev["ev"] if ev.get("t") == "use_batch" else [ev] if ev.get("t") == "use" else []
            events += len(items)
            amount += sum(int(i["amt"]) for i in items)
        if len(rows) < 2000:
            break
        last = rows[-1][0]
        cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    want = answered * fixtures.ACTION_COST_MILLI
    ok = drop == want and events == answered and amount == drop
    detail = f"balance down {drop} = {answered} x {fixtures.ACTION_COST_MILLI}; {events} charges in the stream"
    if not ok:
        detail = f"MISMATCH: drop {drop}, want {want}; stream {events} charges, {amount} milli"
    return ok, detail


async def run_direct(s: Any, org: fixtures.HotOrg, a: argparse.Namespace, coalesce: bool, redis_url: str) -> Run:
    since, _ = await fixtures.stream_position(s.redis, org.stream)
    bal0 = await fixtures.cache_balance(s, org.id)
    start = time.time() + a.warmup + 1.5  # the drivers connect, then warm up until start
    argv = [
        sys.executable,
        "-m",
        "bench.hotorg",
        "drive",
        "--redis-url",
        redis_url,
        "--database-url",
        s.config.database_url,
        "--org",
        org.id,
        "--key",
        org.key_id,
        "--concurrency",
        str(a.concurrency),
        "--start",
        repr(start),
        "--duration",
        str(a.duration),
    ]
    if coalesce:
        argv.append("--coalesce")
    procs = [
        await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, env=_child_env()) for _ in range(a.drivers)
    ]
    await asyncio.sleep(max(0.0, start - time.time()))
    c0, h0, t0 = await redis_counters(s.redis), _host_busy_s(), time.monotonic()
    await asyncio.sleep(max(0.0, start + a.duration - time.time()))
    c1, h1, t1 = await redis_counters(s.redis), _host_busy_s(), time.monotonic()
    outs = []
    for p in procs:
        out, _ = await p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a driver failed ({p.returncode})")
        line = next(ln for ln in out.decode().splitlines() if ln.startswith(RESULT_MARK))
        outs.append(json.loads(line[len(RESULT_MARK) :]))
    answered = sum(o["ok"] for o in outs)
    ok, detail = await verify(s, org, bal0, answered, since)
    extra: dict[str, Any] = {"drivers": a.drivers, "concurrency_each": a.concurrency}
    if coalesce:
        calls = sum(o["groups"] + o["alone"] for o in outs)
        extra["mean_group"] = round(sum(o["grouped"] + o["alone"] for o in outs) / calls, 1) if calls else 0
    seconds = t1 - t0
    return Run(
        "direct",
        coalesce,
        sum(o["in_window"] for o in outs),
        seconds,
        int(c1["calls"] - c0["calls"]),
        c1["usec"] - c0["usec"],
        100 * (c1["cpu"] - c0["cpu"]) / seconds,
        100 * (h1 - h0) / seconds,
        ok,
        detail,
        extra,
    )


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process's children (the meter workers)."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += float(t.user + t.system)
    return total


@contextlib.asynccontextmanager
async def meter_workers(
    s: Any, a: argparse.Namespace, coalesce: bool, redis_url: str
) -> AsyncIterator[tuple[str, int]]:
    port = _free_port()
    env = {
        **_child_env(),
        "REDIS_URL": redis_url,
        "DATABASE_URL": s.config.database_url,
        "METER_PORT": str(port),
        "RATE_LIMIT_PER_S": "0",
        "LOG_LEVEL": "WARNING",
        "CONSUME_COALESCE": "true" if coalesce else "false",
    }
    env.pop("METER_SOCKET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "serve", "meter", "--workers", str(a.workers), env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the meter workers did not become ready")
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_http(s: Any, org: fixtures.HotOrg, a: argparse.Namespace, coalesce: bool, redis_url: str) -> Run:
    since, _ = await fixtures.stream_position(s.redis, org.stream)
    bal0 = await fixtures.cache_balance(s, org.id)
    tool = "wrk" if loadgen.wrk_path() else "python"
    with tempfile.TemporaryDirectory(prefix="bench-hotorg-") as tmp:
        workdir = pathlib.Path(tmp)
        async with meter_workers(s, a, coalesce, redis_url) as (url, meter_pid):
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {org.api_key}"}
            req = Request(url + "/api/credits/use", USE_BODY, headers)

            async def load(seconds: float) -> list[loadgen.LoadResult]:
                return list(
                    await asyncio.gather(
                        *(
                            asyncio.to_thread(
                                loadgen.run,
                                req,
                                tool=tool,
                                duration_s=seconds,
                                concurrency=a.concurrency,
                                threads=1,
                                workdir=workdir,
                            )
                            for _ in range(a.drivers)
                        )
                    )
                )

            warm = await load(a.warmup) if a.warmup > 0 else []
            c0, h0, t0 = await redis_counters(s.redis), _host_busy_s(), time.monotonic()
            w0 = _tree_cpu_s(meter_pid)
            measured = await load(a.duration)
            w1 = _tree_cpu_s(meter_pid)
            c1, h1, t1 = await redis_counters(s.redis), _host_busy_s(), time.monotonic()
            await asyncio.sleep(1.0)  # what wrk cut off in flight completes
    errors = sum(r.errors for r in [*warm, *measured])
    ok_in_window = sum(r.ok for r in measured)
    answered = ok_in_window + sum(r.ok for r in warm)
    slack = 0 if tool != "wrk" else a.drivers * a.concurrency * (2 if warm else 1)
    bal1 = await fixtures.cache_balance(s, org.id)
    charged = (bal0 - bal1) // fixtures.ACTION_COST_MILLI
    ok, detail = await verify(s, org, bal0, charged, since)  # the stream holds exactly what was charged
    ok = ok and answered <= charged <= answered + slack and errors == 0
    detail += f"; client 2xx {answered}, errors {errors}"
    seconds = t1 - t0
    extra = {
        "workers": a.workers,
        "load_generators": a.drivers,
        "connections_each": a.concurrency,
        "tool": tool,
        "p50_ms": round(max(r.p50_ms for r in measured), 2),
        "p99_ms": round(max(r.p99_ms for r in measured), 2),
        "sidecar_cpu_us_per_consume": round((w1 - w0) * 1e6 / ok_in_window, 1) if ok_in_window else 0,
    }
    return Run(
        "http",
        coalesce,
        ok_in_window,
        seconds,
        int(c1["calls"] - c0["calls"]),
        c1["usec"] - c0["usec"],
        100 * (c1["cpu"] - c0["cpu"]) / seconds,
        100 * (h1 - h0) / seconds,
        ok,
        detail,
        extra,
    )


# -- idempotency records ------------------------------------------------------------------
async def _memory_added(s: Any, org: fixtures.HotOrg, write: Any) -> tuple[float, float]:
    """(used_memory added, MEMORY USAGE of the usage stream added) by `write`."""
    stream0 = await s.redis.memory_usage(org.stream, samples=0) or 0
    used0 = (await s.redis.info("memory"))["used_memory"]
    await write()
    used1 = (await s.redis.info("memory"))["used_memory"]
    stream1 = await s.redis.memory_usage(org.stream, samples=0) or 0
    return float(used1 - used0), float(stream1 - stream0)


async def _sample_usage(redis: aioredis.Redis, keys: list[str]) -> float:
    sample = keys[:: max(1, len(keys) // 1000)]
    sizes = [await redis.memory_usage(k, samples=0) or 0 for k in sample]
    return sum(sizes) / len(sizes)


async def measure_records(s: Any, org: fixtures.HotOrg, n: int, redis_url: str) -> dict[str, dict[str, float]]:
    """Bytes per idempotency record: `n` consumes with keys of their own (the records
    they write, kept IDEMPOTENCY_TTL_S), against `n` records as the version before wrote
    them (its key names, "<32-hex fingerprint>\\n<msgpack map>"), written into another
    database of the same server (a keyspace as empty as the first: its tables grow
    alike)."""
    from hotpath.client import fingerprint
    from hotpath.group import ConsumeGroups

    fp = fingerprint("use", fixtures.ACTION, 1, "", None)
    groups = ConsumeGroups(s.hot)
    first: list[dict[str, Any]] = []
    ttl_ms = s.hot.idempotency_ttl_ms

    async def consumes() -> None:
        async def task(start: int) -> None:
            for i in range(start, n, 64):
                r = await groups.consume(
                    org.id, org.key_id, action=fixtures.ACTION, units=1, idempotency_key=f"rec-{i}", fp=fp
                )
                first.append(r.payload)

        await asyncio.gather(*(task(t) for t in range(64)))

    other = aioredis.Redis.from_url(redis_url, db=int(s.redis.connection_pool.connection_kwargs.get("db", 0)) + 1)
    view = dataclasses.replace(s, redis=other)

    async def before() -> None:
        pipe = other.pipeline(transaction=False)
        for i, payload in enumerate(first):
            pipe.set(
                s.hot.legacy_idempotency_key(org.id, f"old-{i}"),
                fp.encode() + b"\n" + msgspec.msgpack.encode(payload),
                px=ttl_ms,
            )
            if i % 1000 == 999:
                await pipe.execute()
        await pipe.execute()

    out: dict[str, dict[str, float]] = {}
    written: list[tuple[aioredis.Redis, list[str]]] = []
    for name, write, prefix, where in (("now", consumes, "rec", s), ("before", before, "old", view)):
        used, stream = await _memory_added(where, org, write)
        naming = s.hot.idempotency_key if prefix == "rec" else s.hot.legacy_idempotency_key
        keys = [naming(org.id, f"{prefix}-{i}") for i in range(n)]
        written.append((where.redis, keys))
        value = sum([len(await where.redis.get(k) or b"") for k in keys[:: max(1, n // 1000)]])
        per = (used - stream) / n
        out[name] = {
            "records": n,
            "used_memory_per_record": round(per, 1),
            "memory_usage_per_record": round(await _sample_usage(where.redis, keys), 1),
            "key_bytes": len(keys[0]),
            "value_bytes": round(value / len(keys[:: max(1, n // 1000)]), 1),
            "mb_per_million": round(per, 1),  # bytes/record x 1e6 / 1e6
            "gb_48h_at_25k_per_s": round(per * 25_000 * 48 * 3600 / 1e9),
        }
    for redis, keys in written:
        for i in range(0, n, 1000):
            await redis.unlink(*keys[i : i + 1000])
    await other.aclose()
    return out


def records_table(records: dict[str, dict[str, float]]) -> str:
    lines = [
        "Idempotency records (one per consume with a key; kept 48 h):",
        f"{'format':<8} {'key B':>6} {'value B':>8} {'MEMORY USAGE':>13} {'used_memory':>12} {'MB / 1M consumes':>17}"
        f" {'48 h at 25k/s':>14}",
    ]
    for name, r in records.items():
        lines.append(
            f"{name:<8} {r['key_bytes']:>6} {r['value_bytes']:>8} {r['memory_usage_per_record']:>13}"
            f" {r['used_memory_per_record']:>12} {r['mb_per_million']:>17} {r['gb_48h_at_25k_per_s']:>11,} GB"
        )
    if "now" in records and "before" in records:
        ratio = records["before"]["used_memory_per_record"] / records["now"]["used_memory_per_record"]
        lines.append(f"records: {ratio:.2f}x smaller than before (used_memory per record)")
    return "\n".join(lines)


# -- servers -----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[str]:
    """A Redis of the benchmark's own (no other client's calls in its commandstats)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server), or pass --redis-url")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-hotorg-redis-") as tmp:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            tmp,
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = aioredis.Redis.from_url(url)
            for _ in range(100):
                with contextlib.suppress(aioredis.ConnectionError, OSError):
                    await client.ping()
                    break
                await asyncio.sleep(0.05)
            await client.aclose()
            yield url
        finally:
            proc.terminate()
            await proc.wait()


def table(runs: list[Run]) -> str:
    head = (
        f"{'mode':<7} {'coalesce':<8} {'consumes/s':>11} {'calls/s':>9} {'per call':>8} {'us/call':>8}"
        f" {'script us/consume':>17} {'cpu us/consume':>14} {'ceiling/s':>10} {'redis cpu':>9} {'host busy':>9}"
        f" {'sidecar cpu us':>14}  verified"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        d = r.row()
        lines.append(
            f"{r.mode:<7} {'on' if r.coalesce else 'off':<8} {d['consumes_per_s']:>11,} {d['script_calls_per_s']:>9,}"
            f" {d['consumes_per_call']:>8} {d['us_per_call']:>8} {d['redis_us_per_consume']:>17}"
            f" {d['redis_cpu_us_per_consume']:>14}"
            f" {d['ceiling_consumes_per_s']:>10,} {d['redis_cpu_pct']:>8}% {d['host_busy_pct']:>8}%"
            f" {d.get('sidecar_cpu_us_per_consume', '-'):>14}  " + ("yes" if r.verified else "NO: " + r.detail)
        )
    return "\n".join(lines)


def ratios(runs: list[Run]) -> list[str]:
    """Per mode: the medians of the runs with and without coalescing, and the spread of
    the pairwise ratios (each pair ran back to back) when there are several."""
    out = []
    for mode in ("direct", "http"):
        offs = [r for r in runs if r.mode == mode and not r.coalesce and r.consumes]
        ons = [r for r in runs if r.mode == mode and r.coalesce and r.consumes]
        if not offs or not ons:
            continue
        rate_off, rate_on = median(r.per_s for r in offs), median(r.per_s for r in ons)
        us_off, us_on = median(r.us_per_consume for r in offs), median(r.us_per_consume for r in ons)
        cpu_off, cpu_on = median(r.cpu_us_per_consume for r in offs), median(r.cpu_us_per_consume for r in ons)
        ceil_off, ceil_on = median(r.ceiling for r in offs), median(r.ceiling for r in ons)
        runs_note = f" (medians of {len(ons)} runs each)" if len(ons) > 1 else ""
        out.append(
            f"{mode}: coalescing {rate_on / rate_off:.2f}x the consumes/s ({rate_on:,.0f} vs {rate_off:,.0f}),"
            f" {us_off / us_on:.2f}x less script time per consume ({us_on:.2f} vs {us_off:.2f} us),"
            f" {cpu_off / cpu_on:.2f}x less Redis CPU ({cpu_on:.2f} vs {cpu_off:.2f} us){runs_note}"
        )
        verdict = "met" if ceil_on >= TARGET_RATIO * TODAY_CEILING else "MISSED"
        out.append(
            f"{mode}: one Redis's ceiling for one organization {ceil_on:,.0f} consumes/s coalesced,"
            f" {ceil_off:,.0f} not: {ceil_on / TODAY_CEILING:.1f}x today's ~{TODAY_CEILING:,}"
            f" (target >= {TARGET_RATIO:g}x: {verdict}); {ceil_on / ceil_off:.1f}x this run's uncoalesced"
        )
        if len(ons) > 1 and len(offs) == len(ons):
            pairs = [(on.ceiling / off.ceiling, on.per_s / off.per_s) for off, on in zip(offs, ons, strict=True)]
            out.append(
                f"{mode}: pair by pair, ceiling {min(c for c, _ in pairs):.1f}x to {max(c for c, _ in pairs):.1f}x,"
                f" consumes/s {min(r for _, r in pairs):.2f}x to {max(r for _, r in pairs):.2f}x"
            )
    return out


async def main_async(a: argparse.Namespace) -> int:
    from ops.runtime import connect

    database_server = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    db = f"credits_bench_hotorg_{secrets.token_hex(4)}"
    async with contextlib.AsyncExitStack() as stack:
        redis_url = a.redis_url or await stack.enter_async_context(private_redis())
        dsn = await stack.enter_async_context(fixtures.scratch_database(database_server, db))
        config = fixtures.credits_config(redis_url, dsn)
        s = await stack.enter_async_context(connect(config))
        await s.hot.start()
        org = await fixtures.funded_org(s, "bench-hotorg")
        log(f"redis {redis_url}, database {db}, organization {org.id}")
        runs: list[Run] = []
        records: dict[str, dict[str, float]] = {}
        try:
            for mode in a.modes.split(","):
                if mode == "records":
                    log(f"records: {a.records:,} consumes with keys of their own, and as many records as before")
                    records = await measure_records(s, org, a.records, redis_url)
                    continue
                for _ in range(a.repeat):
                    for coalesce in (False, True):
                        log(f"{mode}, coalesce {'on' if coalesce else 'off'}: warm-up {a.warmup:g}s, {a.duration:g}s")
                        runner = run_direct if mode == "direct" else run_http
                        runs.append(await runner(s, org, a, coalesce, redis_url))
                        log(f"  {runs[-1].per_s:,.0f} consumes/s, {runs[-1].us_per_consume:.2f} us of Redis each")
        finally:
            await fixtures.forget_org(s, org)
    print(f"One hot organization, one Redis ({'own redis-server' if not a.redis_url else 'given'}), this machine:")
    print(f"  {os.cpu_count()} cores; duration {a.duration:g}s after {a.warmup:g}s warm-up")
    print(table(runs))
    for line in ratios(runs):
        print(line)
    if records:
        print(records_table(records))
    if a.json_out:
        doc = {"runs": [r.row() for r in runs], "records": records}
        await asyncio.to_thread(pathlib.Path(a.json_out).write_text, json.dumps(doc, indent=2) + "\n")
    return 0 if all(r.verified for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotorg", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("drive", help="(internal) one driver process")
    d.add_argument("--redis-url", required=True)
    d.add_argument("--database-url", required=True)
    d.add_argument("--org", required=True)
    d.add_argument("--key", required=True)
    d.add_argument("--concurrency", type=int, default=64)
    d.add_argument("--start", type=float, required=True)
    d.add_argument("--duration", type=float, required=True)
    d.add_argument("--coalesce", action="store_true")
    p.add_argument("--modes", default="direct,http,records", help="direct,http,records")
    p.add_argument("--repeat", type=int, default=1, help="run each pair (off, on) this many times")
    p.add_argument("--records", type=int, default=100_000, help="records: consumes with keys of their own")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--drivers", type=int, default=2, help="driver (direct) or load generator (http) processes")
    p.add_argument("--workers", type=int, default=2, help="http: sidecar processes (credits serve meter --workers)")
    p.add_argument("--concurrency", type=int, default=64, help="tasks (direct) or connections (http) per process")
    p.add_argument("--redis-url", help="default: a redis-server of the benchmark's own")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    import uvloop

    if a.command == "drive":
        counts = uvloop.run(drive(a))
        print(RESULT_MARK + json.dumps(counts), flush=True)
        return 0
    return int(uvloop.run(main_async(a)))


if __name__ == "__main__":
    sys.exit(main())
