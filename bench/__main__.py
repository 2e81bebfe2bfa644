"""`python -m bench`: measure the sidecar against a bare aiohttp ceiling and the naive
Postgres design, at the same concurrency, on this machine, in one run.

Every server runs in its own process (python -m bench.server, uvloop, no access log);
the load generator (wrk, or a Python aiohttp client when wrk is missing) runs in
another. Each scenario: start the server, warm up, measure, verify the charges, stop.

`dev-use` and `dev-batch` run the same load against the topology `credits dev` starts:
`credits serve meter` and `credits serve settler`, each its own process under the same
supervisor (ops/supervisor.py), the settler draining the usage streams into the ledger
while the load runs; they are verified by the ledger catching up with the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil
import redis.asyncio as aioredis

from bench import fixtures, loadgen, report
from bench.loadgen import LoadResult, Request
from bench.report import ScenarioResult
from bench.server import NAIVE_ACCOUNT_ID
from hotpath.client import HotPath
from ops.runtime import Services, connect

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
SCENARIOS = ("bare", "naive", "use", "batch", "dev-use", "dev-batch")
SETTLE_WAIT_S = 300.0  # dev-*: how long the ledger may take to catch up after the load
NOISE_CPU_PCT = 15.0  # CPU (% of one core) used by processes outside the benchmark: worth a warning
USE_BODY = json.dumps({"action": fixtures.ACTION, "units": 1}, separators=(",", ":")).encode()


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# -- server processes -----------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    pid: int
    base_url: str
    log_path: pathlib.Path


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.asynccontextmanager
async def server_process(kind: str, extra: list[str], workdir: pathlib.Path) -> AsyncIterator[Server]:
    """`python -m bench.server kind`: wait for READY, yield, SIGTERM (then SIGKILL) on exit."""
    log_path = workdir / f"server-{kind}.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.server",
            kind,
            *extra,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=_child_env(),
        )
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        except TimeoutError:
            line = b""
        parts = line.decode().split()
        if len(parts) != 3 or parts[0] != "READY":
            raise BenchError(f"{kind} server did not start; its log:\n{_tail(log_path)}")
        yield Server(proc.pid, f"http://{parts[1]}:{parts[2]}", log_path)
        if proc.returncode is not None:
            raise BenchError(f"{kind} server exited early ({proc.returncode}); its log:\n{_tail(log_path)}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds of every local postgres process (backends of the pool included)."""
    out: dict[int, float] = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        if p.info["name"] in ("postgres", "postmaster") and p.info["cpu_times"] is not None:
            t = p.info["cpu_times"]
            out[p.pid] = float(t.user + t.system)
    return out


async def _redis_cpu(redis: aioredis.Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _host_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores)."""
    t = psutil.cpu_times()
    return float(sum(t)) - float(t.idle) - float(getattr(t, "iowait", 0.0))


async def _redis_scripts(redis: aioredis.Redis) -> tuple[int, int]:
    """(script calls, microseconds spent in them) since the server started (all clients):
    EVALSHA and FCALL (the hot path runs its scripts as a function library)."""
    info = await redis.info("commandstats")
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_fcall"):
        stats = info.get(name) or {}
        calls += int(stats.get("calls", 0))
        usec += int(stats.get("usec", 0))
    return calls, usec


# -- the measurement of one scenario -----------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    tool: str
    duration_s: float
    warmup_s: float
    concurrency: int
    threads: int
    workdir: pathlib.Path
    profile_dir: pathlib.Path | None
    profile_format: str


async def _load(settings: Settings, req: Request, duration_s: float) -> LoadResult:
    return await asyncio.to_thread(
        loadgen.run,
        req,
        tool=settings.tool,
        duration_s=duration_s,
        concurrency=settings.concurrency,
        threads=settings.threads,
        workdir=settings.workdir,
    )


@dataclass
class Measured:
    warmup: LoadResult | None
    load: LoadResult
    server_cpu_pct: float
    backend_cpu_pct: float | None
    profile: str | None
    redis_scripts: tuple[int, int] | None = None  # (calls, usec) during the measured window
    host_busy_pct: float = 0.0  # the whole machine, % of one core, measured window


async def measure(
    settings: Settings,
    name: str,
    server: Server,
    req: Request,
    *,
    backend: str,
    redis: aioredis.Redis | None = None,
) -> Measured:
    warm = None
    if settings.warmup_s > 0:
        log(f"{name}: warm-up {settings.warmup_s:g}s")
        warm = await _load(settings, req, settings.warmup_s)
    spy = None
    profile = None
    if settings.profile_dir is not None:
        settings.profile_dir.mkdir(parents=True, exist_ok=True)
        ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[settings.profile_format]
        profile = str(settings.profile_dir / f"{name}.{ext}")
        spy = await asyncio.create_subprocess_exec(
            "py-spy",
            "record",
            "--pid",
            str(server.pid),
            "--duration",
            str(max(1, round(settings.duration_s))),
            "--rate",
            "200",
            "--format",
            settings.profile_format,
            "--output",
            profile,
            "--nonblocking",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    log(f"{name}: measuring {settings.duration_s:g}s at {settings.concurrency} connections ({settings.tool})")
    pg0 = _postgres_cpu() if backend == "postgres" else {}
    rd0 = await _redis_cpu(redis) if redis is not None else 0.0
    sc0 = await _redis_scripts(redis) if redis is not None else (0, 0)
    host0 = _host_busy_s()
    cpu0, t0 = _cpu_s(server.pid), time.monotonic()
    load = await _load(settings, req, settings.duration_s)
    cpu1, t1 = _cpu_s(server.pid), time.monotonic()
    host_busy = _host_busy_s() - host0
    wall = t1 - t0
    backend_pct: float | None = None
    scripts = None
    if backend == "postgres":
        pg1 = _postgres_cpu()
        backend_pct = 100.0 * sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()) / wall
    elif redis is not None:
        backend_pct = 100.0 * (await _redis_cpu(redis) - rd0) / wall
        sc1 = await _redis_scripts(redis)
        scripts = (sc1[0] - sc0[0], sc1[1] - sc0[1])
    if spy is not None:
        await spy.wait()
    return Measured(warm, load, 100.0 * (cpu1 - cpu0) / wall, backend_pct, profile, scripts, 100.0 * host_busy / wall)


def _slack(settings: Settings, runs: int) -> int:
    """Requests the server may have completed after the generator stopped counting: wrk
    cuts off what is in flight when its time is up (at most one per connection)."""
    return 0 if settings.tool != "wrk" else settings.concurrency * runs


def _client_ok(m: Measured) -> int:
    return m.load.ok + (m.warmup.ok if m.warmup else 0)


def _result(
    name: str,
    url: str,
    items: int,
    m: Measured,
    backend: str,
    verified: bool | None,
    detail: str,
    facts: dict[str, Any],
) -> ScenarioResult:
    return ScenarioResult(
        name=name,
        url=url,
        items_per_request=items,
        load=m.load,
        warmup=m.warmup,
        server_cpu_pct=m.server_cpu_pct,
        backend=backend,
        backend_cpu_pct=m.backend_cpu_pct,
        verified=verified,
        verification=detail,
        facts=facts,
        profile=m.profile,
        host_busy_pct=m.host_busy_pct,
    )


# -- scenarios --------------------------------------------------------------------------------
async def scenario_bare(settings: Settings) -> ScenarioResult:
    async with server_process("bare", [], settings.workdir) as srv:
        url = srv.base_url + "/bare"
        m = await measure(
            settings, "bare", srv, Request(url, USE_BODY, {"Content-Type": "application/json"}), backend=""
        )
    return _result("bare", url, 0, m, "", None, "nothing to verify", {})


async def scenario_naive(settings: Settings, server_url: str, db_name: str, pool_size: int) -> ScenarioResult:
    async with fixtures.scratch_database(server_url, db_name) as dsn:
        await fixtures.prepare_naive(dsn, NAIVE_ACCOUNT_ID)
        bal0, _, _ = await fixtures.naive_state(dsn, NAIVE_ACCOUNT_ID)
        extra = ["--naive-dsn", dsn, "--naive-pool-size", str(pool_size)]
        async with server_process("naive", extra, settings.workdir) as srv:
            url = srv.base_url + "/use"
            req = Request(url, USE_BODY, {"Content-Type": "application/json"})
            m = await measure(settings, "naive", srv, req, backend="postgres")
        bal1, rows, total = await fixtures.naive_state(dsn, NAIVE_ACCOUNT_ID)
    charged = bal0 - bal1
    client_ok = _client_ok(m)
    slack = _slack(settings, 2 if m.warmup else 1)
    checks = {
        "balance drop == ledger rows x cost": charged == rows * fixtures.ACTION_COST_MILLI,
        "ledger sum == -balance drop": total == -charged,
        "client 2xx <= ledger rows <= client 2xx + cut-off": client_ok <= rows <= client_ok + slack,
    }
    facts = {
        "balance_drop_milli": charged,
        "ledger_rows": rows,
        "client_2xx": client_ok,
        "cut_off_allowance": slack,
        "pool_size": pool_size,
        "checks": checks,
    }
    ok = all(checks.values())
    detail = f"{rows} ledger rows, balance down {charged} milli" + ("" if ok else f"; failed: {_failed(checks)}")
    return _result("naive", url, 1, m, "postgres", ok, detail, facts)


def _failed(checks: dict[str, bool]) -> str:
    return ", ".join(k for k, v in checks.items() if not v)


_METRIC = re.compile(r"^credits_http_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$", re.M)


async def served_2xx(base_url: str, route: str) -> int:
    """2xx responses of one route, from the sidecar's own /metrics."""
    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as resp:
        text = await resp.text()
    total = 0
    for m in _METRIC.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels.get("route") == route and labels.get("status", "").startswith("2"):
            total += int(float(m.group("value")))
    return total


async def settled_2xx(base_url: str, route: str, timeout_s: float = 10.0) -> int:
    """Wait until requests cut off in flight have finished on the server, then count."""
    deadline = time.monotonic() + timeout_s
    last = await served_2xx(base_url, route)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = await served_2xx(base_url, route)
        if now == last:
            return now
        last = now
    return last


async def scenario_sidecar(
    settings: Settings,
    name: str,
    s: Services,
    org: fixtures.HotOrg,
    *,
    items: int,
    idempotency_keys: bool,
) -> ScenarioResult:
    assert s.config.redis_url is not None and s.config.database_url is not None
    route = "/api/credits/use" if name == "use" else "/api/credits/use/batch"
    if items > 1:
        body = json.dumps({"items": [{"action": fixtures.ACTION, "units": 1}] * items}, separators=(",", ":")).encode()
    else:
        body = USE_BODY
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {org.api_key}"}
    stream_from, _ = await fixtures.stream_position(s.redis, org.stream)
    bal0 = await fixtures.cache_balance(s, org.id)
    extra = ["--redis-url", s.config.redis_url, "--database-url", s.config.database_url]
    async with server_process("sidecar", extra, settings.workdir) as srv:
        url = srv.base_url + route
        m = await measure(
            settings, name, srv, Request(url, body, headers, idempotency_keys), backend="redis", redis=s.redis
        )
        served = await settled_2xx(srv.base_url, route)
    bal1 = await fixtures.cache_balance(s, org.id)
    chunk = 500 if items <= 1 else 20
    entries = await fixtures.sweep_stream(s.redis, org.stream, org.id, stream_from, delete=True, chunk=chunk)
    charged = bal0 - bal1
    per_request = items * fixtures.ACTION_COST_MILLI
    client_ok = _client_ok(m)
    slack = _slack(settings, 2 if m.warmup else 1)
    checks = {
        "balance drop == served 2xx x cost": charged == served * per_request,
        "usage stream entries == served 2xx": entries == served,
        "client 2xx <= served 2xx <= client 2xx + cut-off": client_ok <= served <= client_ok + slack,
    }
    ok = all(checks.values())
    facts = {
        "balance_before_milli": bal0,
        "balance_after_milli": bal1,
        "balance_drop_milli": charged,
        "cost_per_request_milli": per_request,
        "served_2xx": served,
        "client_2xx": client_ok,
        "cut_off_allowance": slack,
        "stream_entries": entries,
        "idempotency_keys": idempotency_keys,
        "checks": checks,
    }
    if m.redis_scripts is not None and m.redis_scripts[0]:
        calls, usec = m.redis_scripts
        facts["redis_evalsha_calls"] = calls  # every client of this Redis server, measured window
        facts["redis_us_per_evalsha"] = round(usec / calls, 1)
    detail = (
        f"balance down {charged} milli = {served} served x {per_request}; {entries} usage entries"
        if ok
        else f"failed: {_failed(checks)} (drop {charged}, served {served} x {per_request}, "
        f"entries {entries}, client 2xx {client_ok}, allowance {slack})"
    )
    return _result(name, url, items, m, "redis", ok, detail, facts)


@contextlib.asynccontextmanager
async def dev_topology(s: Services, workdir: pathlib.Path, prefix: str) -> AsyncIterator[tuple[Server, int]]:
    """The sidecar and a settler as `credits dev` runs them: `credits serve meter` and
    `credits serve settler` under ops.supervisor, with the bench's Redis and database.
    `prefix`: their Redis key prefix, so that the settler sees only this scenario's
    streams (not what other runs left in the same Redis database). Yields the meter (as
    a Server) and the settler's pid."""
    from ops.dev import serve_argv
    from ops.supervisor import ServiceSpec, Supervisor

    assert s.config.redis_url is not None and s.config.database_url is not None
    meter_port, settler_port = _free_port(), _free_port()
    env = {
        **_child_env(),
        "REDIS_URL": s.config.redis_url,
        "DATABASE_URL": s.config.database_url,
        "HOST": "127.0.0.1",
        "METER_PORT": str(meter_port),
        "SETTLER_PORT": str(settler_port),
        "RATE_LIMIT_PER_S": "0",
        "LOG_LEVEL": "WARNING",
        "REDIS_KEY_PREFIX": prefix,
    }
    env.pop("METER_SOCKET", None)
    log_path = workdir / "server-dev.log"
    with log_path.open("w") as output:
        supervisor = Supervisor(
            [
                ServiceSpec("settler", serve_argv("settler"), env, f"http://127.0.0.1:{settler_port}/healthz"),
                ServiceSpec("meter", serve_argv("meter"), env, f"http://127.0.0.1:{meter_port}/readyz"),
            ],
            output=output,
        )
        try:
            await asyncio.to_thread(supervisor.start)
        except Exception as exc:
            raise BenchError(f"the credits dev topology did not start ({exc}); its log:\n{_tail(log_path)}") from exc
        try:
            pids = supervisor.pids()
            meter_pid, settler_pid = pids["meter"], pids["settler"]
            assert meter_pid is not None and settler_pid is not None
            yield Server(meter_pid, f"http://127.0.0.1:{meter_port}", log_path), settler_pid
        finally:
            await asyncio.to_thread(supervisor.stop)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scenario_dev(
    settings: Settings,
    name: str,
    s: Services,
    org: fixtures.HotOrg,
    *,
    items: int,
    idempotency_keys: bool,
) -> ScenarioResult:
    """`use` or `batch` against the sidecar of the `credits dev` topology (a settler in
    its own process settles while the load runs)."""
    route = "/api/credits/use" if items <= 1 else "/api/credits/use/batch"
    if items > 1:
        body = json.dumps({"items": [{"action": fixtures.ACTION, "units": 1}] * items}, separators=(",", ":")).encode()
    else:
        body = USE_BODY
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {org.api_key}"}
    prefix = f"bd{secrets.token_hex(3)}"
    # The organization as the dev topology's cache sees it: loaded from the ledger.
    hot = HotPath.from_config(s.redis, s.ledger, dataclasses.replace(s.config, redis_key_prefix=prefix))
    await hot.start()
    view = Services(dataclasses.replace(s.config, redis_key_prefix=prefix), s.ledger, hot, s.redis)
    try:
        return await _scenario_dev(settings, name, view, org, route, body, headers, items, idempotency_keys, prefix)
    finally:
        await _drop_prefix(s.redis, prefix)


async def _drop_prefix(redis: aioredis.Redis, prefix: str) -> None:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


async def _scenario_dev(
    settings: Settings,
    name: str,
    s: Services,
    org: fixtures.HotOrg,
    route: str,
    body: bytes,
    headers: dict[str, str],
    items: int,
    idempotency_keys: bool,
    prefix: str,
) -> ScenarioResult:
    bal0 = await fixtures.cache_balance(s, org.id)
    ledger0, _ = await s.ledger.ledger_balance(org.id)
    async with dev_topology(s, settings.workdir, prefix) as (srv, settler_pid):
        url = srv.base_url + route
        settler_cpu0 = _cpu_s(settler_pid)
        t0 = time.monotonic()
        m = await measure(
            settings, name, srv, Request(url, body, headers, idempotency_keys), backend="redis", redis=s.redis
        )
        settler_cpu_pct = 100.0 * (_cpu_s(settler_pid) - settler_cpu0) / max(1e-9, time.monotonic() - t0)
        served = await settled_2xx(srv.base_url, route)
        bal1 = await fixtures.cache_balance(s, org.id)
        # The settler catches up: the ledger reaches the cache's balance.
        loaded_at = time.monotonic()
        ledger1 = ledger0
        log(f"{name}: waiting for the settler to settle what was charged")
        while time.monotonic() - loaded_at < SETTLE_WAIT_S:
            ledger1, _ = await s.ledger.ledger_balance(org.id)
            if ledger1 == bal1:
                break
            await asyncio.sleep(0.25)
        caught_up_s = time.monotonic() - loaded_at
    charged = bal0 - bal1
    per_request = items * fixtures.ACTION_COST_MILLI
    client_ok = _client_ok(m)
    slack = _slack(settings, 2 if m.warmup else 1)
    checks = {
        "balance drop == served 2xx x cost": charged == served * per_request,
        "ledger balance == cache balance (settled)": ledger1 == bal1,
        "ledger drop == balance drop": ledger0 - ledger1 == charged,
        "client 2xx <= served 2xx <= client 2xx + cut-off": client_ok <= served <= client_ok + slack,
    }
    ok = all(checks.values())
    facts = {
        "topology": "credits dev: credits serve meter + credits serve settler, each its own process",
        "balance_drop_milli": charged,
        "ledger_drop_milli": ledger0 - ledger1,
        "served_2xx": served,
        "client_2xx": client_ok,
        "cut_off_allowance": slack,
        "settler_cpu_pct": round(settler_cpu_pct, 1),
        "ledger_caught_up_after_s": round(caught_up_s, 1),
        "checks": checks,
    }
    detail = (
        f"balance down {charged} milli = {served} served x {per_request}; the ledger caught up "
        f"{caught_up_s:.1f} s after the load (settler {settler_cpu_pct:.0f}% of a core during it)"
        if ok
        else f"failed: {_failed(checks)} (drop {charged}, served {served}, ledger {ledger0}->{ledger1}, cache {bal1});"
        f" the services' log:\n{_tail(srv.log_path)}"
    )
    return _result(name, url, items, m, "redis", ok, detail, facts)


def print_results(results: dict[str, ScenarioResult]) -> None:
    print(report.table(results))
    print()
    for r in results.values():
        if r.verified is not None:
            print(f"{r.name:6} {'verified' if r.verified else 'VERIFICATION FAILED'}: {r.verification}")
    for r in results.values():
        if r.other_cpu_pct > NOISE_CPU_PCT:
            print(
                f"{r.name:6} WARNING: other processes used {r.other_cpu_pct:.0f}% of a core on this machine "
                "during the measured window; the figures are noisy"
            )
        calls = r.facts.get("redis_evalsha_calls")
        if calls is not None and calls > 1.05 * r.load.requests + 10:
            print(
                f"{r.name:6} WARNING: Redis ran {calls} scripts for {r.load.requests} requests: "
                "other clients used this Redis server during the measured window"
            )
    for r in results.values():
        if "redis_us_per_evalsha" in r.facts:
            print(
                f"{r.name:6} Redis time per script call: {r.facts['redis_us_per_evalsha']} us "
                f"({r.facts['redis_evalsha_calls']} calls in the measured window)"
            )


# -- the run ------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> int:
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    selected = [s for s in SCENARIOS if s in set(args.scenarios.split(","))]
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown or not selected:
        raise BenchError(f"--scenarios: choose from {','.join(SCENARIOS)}")
    wrk = loadgen.wrk_path()
    tool = "python" if args.loadgen == "python" or (args.loadgen == "auto" and wrk is None) else "wrk"
    if tool == "wrk" and wrk is None:
        raise BenchError("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    if tool == "python":
        log("load generator: Python aiohttp client (wrk not found or not chosen); it may be the bottleneck")
    suffix = f"{os.getpid()}_{secrets.token_hex(3)}"
    results: dict[str, ScenarioResult] = {}
    with tempfile.TemporaryDirectory(prefix="credits-bench-") as tmp:
        settings = Settings(
            tool=tool,
            duration_s=args.duration,
            warmup_s=args.warmup,
            concurrency=args.concurrency,
            threads=args.threads,
            workdir=pathlib.Path(tmp),
            profile_dir=args.profile,
            profile_format=args.profile_format,
        )
        meta: dict[str, Any] = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_generator": "wrk" if tool == "wrk" else "python-aiohttp",
            "load_generator_version": loadgen.wrk_version() if tool == "wrk" else "aiohttp",
            "wrk_threads": args.threads if tool == "wrk" else None,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "batch_items": args.batch_items,
            "idempotency_keys": args.idempotency_keys,
            "naive_pool_size": args.naive_pool_size,
            "redis_url": fixtures.redact(redis_url),
            "database_url": fixtures.redact(database_url),
            "event_loop": "uvloop",
        }
        log(
            f"load generator: {meta['load_generator']} {meta['load_generator_version']}; "
            f"{args.concurrency} connections; scenarios {','.join(selected)}"
        )
        if "bare" in selected:
            results["bare"] = await scenario_bare(settings)
        if "naive" in selected:
            results["naive"] = await scenario_naive(
                settings, database_url, f"credits_bench_naive_{suffix}", args.naive_pool_size
            )
        if {"use", "batch", "dev-use", "dev-batch"} & set(selected):
            await _run_sidecar(settings, args, selected, redis_url, database_url, suffix, results)
    valid = all(r.errors == 0 and r.verified is not False for r in results.values())
    print_results(results)
    print(f"load generator: {meta['load_generator']} {meta['load_generator_version']}")
    print("run: " + ("VALID" if valid else "INVALID (errors or failed verification)"))
    if args.json_out is not None:
        report.write_json(args.json_out, report.document(results, meta, valid))
        print(f"json: {args.json_out}")
    if not valid:
        return 1
    if args.strict_targets and not all(r.met for r in report.ratios(results) if r.met is not None):
        return 2
    return 0


async def _run_sidecar(
    settings: Settings,
    args: argparse.Namespace,
    selected: list[str],
    redis_url: str,
    database_url: str,
    suffix: str,
    results: dict[str, ScenarioResult],
) -> None:
    async with fixtures.scratch_database(database_url, f"credits_bench_app_{suffix}") as app_db:
        config = fixtures.credits_config(redis_url, app_db)
        log("credits: migrating the scratch database")
        # connect() runs ledger.migrate.migrate with the role passwords the config holds.
        async with connect(config, run_migrations=True) as s:
            await s.hot.start()
            orgs: list[fixtures.HotOrg] = []
            try:
                for name in ("use", "batch", "dev-use", "dev-batch"):
                    if name not in selected:
                        continue
                    org = await fixtures.funded_org(s, f"bench-{name}-{suffix}")
                    orgs.append(org)
                    items = 1 if name.endswith("use") else args.batch_items
                    scenario = scenario_dev if name.startswith("dev-") else scenario_sidecar
                    results[name] = await scenario(
                        settings, name, s, org, items=items, idempotency_keys=args.idempotency_keys
                    )
            finally:
                for org in orgs:
                    await fixtures.forget_org(s, org)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=_positive(float), default=10.0, help="measured seconds per scenario (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per scenario (2)")
    p.add_argument("--concurrency", type=_positive(int), default=50, help="concurrent connections (50)")
    p.add_argument("--threads", type=_positive(int), default=1, help="wrk threads (1)")
    p.add_argument("--batch-items", type=_positive(int), default=1000, help="items per batch request (1000)")
    p.add_argument("--naive-pool-size", type=_positive(int), default=20, help="asyncpg pool of the naive server (20)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {','.join(SCENARIOS)}")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--idempotency-keys", action="store_true", help="send a fresh Idempotency-Key per request")
    p.add_argument("--json-out", type=pathlib.Path, help="write the results as JSON here")
    p.add_argument("--profile", type=pathlib.Path, help="py-spy the server of each measured window into this dir")
    p.add_argument("--profile-format", choices=["flamegraph", "speedscope", "raw"], default="flamegraph")
    p.add_argument("--strict-targets", action="store_true", help="exit 2 when a ratio misses its target")
    return p


def _main_task(args: argparse.Namespace) -> Awaitable[int]:
    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args)

    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        return uvloop.run(_main_task(args))  # type: ignore[arg-type]
    except BenchError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.stderr.write("bench: interrupted; servers stopped and scratch databases dropped\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
