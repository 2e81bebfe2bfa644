"""The chaos harness: a stack of servers the experiment owns, a real sidecar, real
settler processes, many clients, and the books that say what happened.

The servers are the project's embedded ones (ops.embedded.EmbeddedServers) in a
temporary directory, never the machine's shared Redis or Postgres. Each experiment
gets a database and a Redis key prefix of its own on them.

- The sidecar runs in this process (aiohttp's TestServer around meter.app.create_app):
  it binds a free port itself (no port race), takes the experiment's Config directly
  (DURABILITY among it), and keeps its own Redis connections (the auto-pipelined one
  with its 5 s timeout, and the pool), so a Redis crash or pause reaches it exactly as
  it reaches a sidecar process. Nothing here blocks the event loop: the faults run in
  a thread.
- Settlers are real `credits serve settler` processes, so one can be paused (SIGSTOP)
  while it holds a settlement transaction open.
- Clients send POST /use and /use/batch with an Idempotency-Key and retry a 503, a
  502/504 or a lost connection with the SAME key, as the SDK does, until they get an
  answer that is not "try again". Every attempt is recorded.

At the end, with settlement drained, the books give: acknowledged (event ids answered
200), lost (acknowledged, not in the ledger), double (one request with more than one
event in the ledger, or a replay answering another id), charged though refused (a
ledger event of a request whose final answer was a refusal), drift (reconciliation,
summed), and the 503 answers by what they claimed, with how many of the ones that said
"nothing was charged" had in fact charged (the retry replayed a stored success).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from accounts import admin
from core import config as config_module
from hotpath.client import HotPath, now_ms
from ledger.migrate import migrate
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from meter.app import create_app
from ops.embedded import EmbeddedServers
from settler import reconcile
from settler.stream import lag
from tests.conftest import _with_database

CREDIT = 1000
NOT_CHARGED = "nothing was charged"
PARTITIONS = 4
ACTION = "tool_call"
ACTION_COST = 100  # millicredits per unit
SIDECAR_TIMEOUT_S = 30.0  # a client's wait for one answer
RETRY_FOR_S = 120.0  # a client keeps retrying one request this long after the load stops
DRAIN_DEADLINE_S = 180.0  # generous bounds on waits for progress, never assertions on speed
PROGRESS_DEADLINE_S = 120.0
JWT_SECRET = "chaos-secret-" + "x" * 40


@dataclass
class Attempt:
    status: int | None  # None: no answer (connection lost, refused, timed out)
    message: str = ""
    replayed: bool = False


@dataclass
class Call:
    kind: str  # use | batch | balance
    org: str
    key: str
    items: int
    attempts: list[Attempt] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # event ids answered 200 (per item for a batch)
    ok_items: set[str | None] = field(default_factory=set)  # items answered charged (None: a /use)
    final: str = ""  # charged | refused | gave up | read | unavailable


@dataclass
class Figures:
    """One experiment's results (one row of the results table)."""

    experiment: str
    requests: int = 0  # charging requests (each with its retries)
    acknowledged: int = 0  # event ids answered 200
    lost: int = 0
    double: int = 0
    charged_though_refused: int = 0
    drift: int = 0  # millicredits, summed over organizations
    unsettled: int = 0  # entries still unsettled when the drain deadline passed
    answers_503: collections.Counter[str] = field(default_factory=collections.Counter)
    said_not_charged_but_charged: int = 0
    no_answer: int = 0  # attempts without an answer (connection errors, timeouts)
    balance_reads: int = 0
    balance_503: int = 0
    cache_vs_ledger: list[str] = field(default_factory=list)  # organizations where they differ
    acknowledged_during_fault: int | None = None
    stale_commits: int | None = None  # batches committed by a settler that had lost its lease
    paused_s: float | None = None  # how long the settler was paused
    settler_exits: list[str] = field(default_factory=list)  # settlers that died (restarted, as a supervisor would)
    not_durable: int = 0  # DURABILITY=local: charges whose WAITAOF failed or came back short (each answered 503)
    notes: list[str] = field(default_factory=list)

    @property
    def said_not_charged(self) -> int:
        return sum(n for message, n in self.answers_503.items() if NOT_CHARGED in message)

    @property
    def other_503(self) -> int:
        return sum(n for message, n in self.answers_503.items() if NOT_CHARGED not in message)


RESULTS: dict[str, Figures] = {}  # printed at the end of the session (tests/faults/conftest.py)

TABLE_HEADER = (
    "| experiment | requests | acknowledged | lost | double | charged though refused | drift "
    '| 503 "nothing was charged" | of which charged | other 503 | no answer |'
)


def table(results: dict[str, Figures]) -> list[str]:
    lines = [TABLE_HEADER, "| --- | " + " | ".join(["---"] * 10) + " |"]
    for f in results.values():
        lines.append(
            f"| {f.experiment} | {f.requests:,} | {f.acknowledged:,} | {f.lost} | {f.double} | "
            f"{f.charged_though_refused} | {f.drift} | {f.said_not_charged} | {f.said_not_charged_but_charged} | "
            f"{f.other_503} | {f.no_answer} |"
        )
    return lines


class DurabilityLog(logging.Handler):
    """Counts the sidecar's durability_wait_failed / _short events: each is a charge
    applied in memory without the fsync DURABILITY=local waits for, answered 503
    outcome_unknown (NotDurable), never 200."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() in ("durability_wait_failed", "durability_wait_short"):
            self.count += 1


class Stack:
    """The embedded servers every experiment of the module runs on (its own)."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.servers = EmbeddedServers(directory / "servers")

    def start(self) -> None:
        self.urls = self.servers.start()

    def stop(self) -> None:
        self.servers.stop()


class Experiment:
    """One experiment: its database and prefix, organizations, sidecar, settlers, clients."""

    def __init__(self, stack: Stack, name: str, *, durability: str = "async", orgs: int = 4, clients: int = 32) -> None:
        self.stack = stack
        self.name = name
        self.durability = durability
        self.n_orgs = orgs
        self.n_clients = clients
        self.figures = Figures(name)
        self.calls: list[Call] = []
        self.settlers: list[subprocess.Popen[bytes]] = []
        self._stop = asyncio.Event()
        self._clients: list[asyncio.Task[None]] = []
        self._acks = 0
        self._give_up_at = float("inf")
        self._restarted: set[int] = set()  # settlers found dead and replaced
        self.log_dir = stack.directory / f"logs-{name}"

    # -- setup -------------------------------------------------------------------
    async def __aenter__(self) -> Experiment:
        urls = self.stack.urls
        db = f"chaos_{self.name.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(urls.database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{db}"')
        finally:
            await conn.close()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "JWT_SECRET": JWT_SECRET,
            "RATE_LIMIT_PER_S": "0",
            "REDIS_KEY_PREFIX": f"x{uuid.uuid4().hex[:8]}",
            "USAGE_PARTITIONS": str(PARTITIONS),
            "DURABILITY": self.durability,
            "SETTLE_BATCH_ENTRIES": "50",
        }
        self.config = replace(
            config_module.load(env), redis_url=urls.redis_url, database_url=_with_database(urls.database_url, db)
        )
        assert self.config.database_url is not None
        await migrate(
            self.config.database_url,
            app_password=self.config.app_db_password,
            settler_password=self.config.settler_db_password,
        )
        self.orgs: list[tuple[str, str]] = []  # (organization id, API key)
        async with self.checker() as (_redis, ledger, hot, _settlement):
            for i in range(self.n_orgs):
                org, key = await admin.create_organization(ledger, f"{self.name}-{i}")
                await ledger.set_cost(org, ACTION, ACTION_COST, "call", "")
                await admin.grant(ledger, hot, org, amount=1_000_000 * CREDIT, reason="chaos float")
                self.orgs.append((org, key.secret))
        self.durability_log = DurabilityLog()
        logging.getLogger("hotpath.client").addHandler(self.durability_log)
        self.sidecar = TestServer(create_app(self.config))
        await self.sidecar.start_server()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.n_clients * 2),
            timeout=aiohttp.ClientTimeout(total=SIDECAR_TIMEOUT_S),
        )
        self.start_settler()
        await self.settlers_ready()
        # Every key is known to the sidecar before any fault (a key never seen needs Postgres).
        for org, secret in self.orgs:
            call = Call("use", org, uuid.uuid4().hex, 1)
            await self._charge(call, secret, random.Random(0), "/api/credits/use", self._use_body(call, 1))
            assert call.final == "charged", call
            self.calls.append(call)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        self._give_up_at = 0
        for task in self._clients:
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self.session.close()
        await self.sidecar.close()
        logging.getLogger("hotpath.client").removeHandler(self.durability_log)
        for proc in self.settlers:
            stop_process(proc)

    @contextlib.asynccontextmanager
    async def checker(self) -> Any:
        """The test's own connections (opened when needed, so no fault breaks them)."""
        assert self.config.redis_url is not None
        redis = aioredis.Redis.from_url(self.config.redis_url)
        ledger = await Ledger.connect(self.config.app_dsn(), min_size=1, max_size=4)
        settlement = await Settlement.connect(self.config.settler_dsn(), min_size=1, max_size=4)
        hot = HotPath.from_config(redis, ledger, self.config)
        try:
            await hot.start()
            yield redis, ledger, hot, settlement
        finally:
            await settlement.close()
            await ledger.close()
            await redis.aclose()

    def start_settler(self) -> subprocess.Popen[bytes]:
        """`credits serve settler` as its own process, on the experiment's servers."""
        env = {k: v for k, v in os.environ.items() if not k.endswith(("DATABASE_URL", "REDIS_URL"))}
        env.update(
            REDIS_URL=self.config.redis_url or "",
            DATABASE_URL=self.config.database_url or "",
            REDIS_KEY_PREFIX=self.config.redis_key_prefix,
            USAGE_PARTITIONS=str(PARTITIONS),
            SETTLE_BATCH_ENTRIES="50",
            SETTLER_PORT="0",
            LOG_LEVEL="WARNING",
        )
        log = open(self.log_dir / f"settler-{len(self.settlers)}.log", "ab")  # noqa: SIM115 - the child's
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "serve", "settler"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=pathlib.Path(__file__).parents[2],
            )
        finally:
            log.close()
        self.settlers.append(proc)
        return proc

    async def settlers_ready(self) -> None:
        """Wait (bounded) until settlers hold every partition's lease: settling runs."""
        async with self.checker() as (redis, _ledger, hot, _settlement):

            async def leased() -> bool:
                leases = [await redis.exists(hot.partition_key(p, "settler-lease")) for p in range(PARTITIONS)]
                return all(leases)

            await wait_for(leased, PROGRESS_DEADLINE_S, "settlers to lease every partition")

    def settler_log(self, index: int) -> str:
        path = self.log_dir / f"settler-{index}.log"
        return path.read_bytes()[-3000:].decode(errors="replace") if path.exists() else ""

    # -- load --------------------------------------------------------------------
    def start_load(self) -> None:
        self._clients = [asyncio.create_task(self._client(i)) for i in range(self.n_clients)]

    async def stop_load(self) -> None:
        """No new requests; the ones under way keep retrying until answered (bounded)."""
        self._stop.set()
        self._give_up_at = time.monotonic() + RETRY_FOR_S
        await asyncio.gather(*self._clients)

    def partition(self, organization_id: str) -> int:
        return zlib.crc32(organization_id.encode()) % PARTITIONS  # as HotPath.partition

    @property
    def acknowledged_count(self) -> int:
        return self._acks

    async def until_acknowledged(self, more: int) -> None:
        """Wait (bounded) until `more` further charges were acknowledged: traffic flows."""
        target = self._acks + more
        await wait_for(lambda: self._acks >= target, PROGRESS_DEADLINE_S, f"{more} more acknowledged charges")

    async def _client(self, n: int) -> None:
        rnd = random.Random(n)
        while not self._stop.is_set():
            org, secret = self.orgs[0] if rnd.random() < 0.6 else rnd.choice(self.orgs)
            roll = rnd.random()
            if roll < 0.1:
                await self._balance(org, secret)
                continue
            if roll < 0.25:
                call = Call("batch", org, uuid.uuid4().hex, rnd.randint(2, 8))
                body = {
                    "atomic": rnd.random() < 0.5,
                    "items": [
                        {"action": ACTION, "units": rnd.randint(1, 3), "metadata": {"rq": call.key, "i": str(i)}}
                        for i in range(call.items)
                    ],
                }
                path = "/api/credits/use/batch"
            else:
                call = Call("use", org, uuid.uuid4().hex, 1)
                body = self._use_body(call, rnd.randint(1, 5))
                path = "/api/credits/use"
            self.calls.append(call)
            await self._charge(call, secret, rnd, path, body)

    @staticmethod
    def _use_body(call: Call, units: int) -> dict[str, Any]:
        return {"action": ACTION, "units": units, "metadata": {"rq": call.key}}

    async def _charge(self, call: Call, secret: str, rnd: random.Random, path: str, body: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": call.key}
        for attempt in itertools.count():
            if time.monotonic() > self._give_up_at:
                call.final = "gave up"
                return
            try:
                async with self.session.post(self.sidecar.make_url(path), json=body, headers=headers) as resp:
                    payload = await resp.json(content_type=None)
                    status = resp.status
                    replayed = resp.headers.get("Idempotent-Replayed") == "true"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                call.attempts.append(Attempt(None, f"{type(exc).__name__}: {exc}"))
            else:
                message = payload.get("error", {}).get("message", "") if isinstance(payload, dict) else ""
                call.attempts.append(Attempt(status, message, replayed))
                if status == 200:
                    if call.kind == "use":
                        call.ids, call.ok_items = [payload["id"]], {None}
                    else:
                        ok = [r for r in payload["results"] if r["ok"]]
                        call.ids, call.ok_items = [r["id"] for r in ok], {str(r["index"]) for r in ok}
                    call.final = "charged"
                    self._acks += len(call.ids)
                    return
                if status not in (429, 502, 503, 504):
                    call.final = "refused"
                    return
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt) * (0.5 + rnd.random()))

    async def _balance(self, org: str, secret: str) -> None:
        call = Call("balance", org, "", 0)
        try:
            async with self.session.get(
                self.sidecar.make_url("/api/credits/balance"), headers={"Authorization": f"Bearer {secret}"}
            ) as resp:
                await resp.read()
                call.attempts.append(Attempt(resp.status))
                call.final = "read" if resp.status == 200 else "unavailable"
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.attempts.append(Attempt(None, str(exc)))
            call.final = "unavailable"
        self.calls.append(call)
        await asyncio.sleep(0.05)

    # -- faults ------------------------------------------------------------------
    async def fault(self, fn: Callable[[], object]) -> None:
        """A blocking fault (kill, restart, stop) in a thread: the sidecar and the
        clients run on this loop and must keep running through it."""
        await asyncio.to_thread(fn)

    # -- the end -----------------------------------------------------------------
    async def drain(self) -> None:
        """Wait (bounded) until every partition is settled, restarting a settler that died."""
        async with self.checker() as (redis, _ledger, hot, _settlement):
            deadline = time.monotonic() + DRAIN_DEADLINE_S
            while True:
                for i, proc in enumerate(self.settlers):
                    if proc.poll() is not None and i not in self._restarted:
                        reason = exit_reason(self.settler_log(i))
                        self.figures.settler_exits.append(f"settler {i} exited with {proc.returncode}: {reason}")
                        self._restarted.add(i)
                        self.start_settler()
                try:
                    counts = [(await lag(redis, hot, p, now_ms()))[0] for p in range(PARTITIONS)]
                except (aioredis.ConnectionError, OSError):
                    counts = [-1]
                if sum(counts) == 0:
                    return
                if time.monotonic() > deadline:
                    self.figures.unsettled = sum(c for c in counts if c > 0)
                    self.figures.notes.append(f"not drained after {DRAIN_DEADLINE_S:.0f} s: {counts} unsettled entries")
                    for p, n in enumerate(counts):
                        if n > 0:
                            self.figures.notes.append(f"partition {p}: {await self._pending(redis, hot, p)}")
                    return
                await asyncio.sleep(0.3)

    async def _pending(self, redis: aioredis.Redis, hot: HotPath, partition: int) -> str:
        """Who holds a partition's unsettled entries: the lease, and each consumer's
        pending count and idle time."""
        stream = hot.stream_key(partition)
        lease = await redis.get(hot.partition_key(partition, "settler-lease"))
        consumers = await redis.xinfo_consumers(stream, "settlers")
        held = [(c["name"], c["pending"], c["idle"]) for c in consumers if c["pending"]]
        return f"lease {lease!r}; pending by consumer (name, entries, idle ms): {held}"

    async def verify(self) -> Figures:
        """The books against the ledger, once drained. Fills and returns the figures."""
        f = self.figures
        charging = [c for c in self.calls if c.kind != "balance"]
        f.requests = len(charging)
        f.balance_reads = sum(1 for c in self.calls if c.kind == "balance")
        f.balance_503 = sum(1 for c in self.calls if c.kind == "balance" and c.attempts[0].status == 503)
        acked: dict[str, Call] = {}
        for c in charging:
            for a in c.attempts:
                if a.status == 503:
                    f.answers_503[a.message] += 1
                elif a.status is None:
                    f.no_answer += 1
            for event_id in c.ids:
                acked[event_id] = c
            if c.final == "charged" and c.attempts[-1].replayed:
                earlier = c.attempts[:-1]
                # Every earlier attempt said "nothing was charged" (none went unanswered),
                # yet the retry replayed a stored success: one of them had charged.
                if earlier and all(a.status == 503 and NOT_CHARGED in a.message for a in earlier):
                    f.said_not_charged_but_charged += 1
        f.acknowledged = len(acked)
        f.not_durable = self.durability_log.count
        if self.durability != "async":
            f.notes.append(
                f"charges whose WAITAOF failed or came back short (answered 503 outcome_unknown): {f.not_durable}"
            )
        by_key = {c.key: c for c in charging}
        orgs = [org for org, _ in self.orgs]
        assert self.config.database_url is not None
        conn = await asyncpg.connect(self.config.database_url)
        try:
            rows = await conn.fetch(
                "SELECT id, metadata->>'rq' AS rq, metadata->>'i' AS i FROM usage_events"
                " WHERE organization_id = ANY($1::uuid[])",
                orgs,
            )
            balances = {
                str(r["id"]): (int(r["balance"]), int(r["entries"]))
                for r in await conn.fetch(
                    "SELECT o.id, o.balance, (SELECT coalesce(sum(amount), 0) FROM ledger_entries e"
                    " WHERE e.organization_id = o.id) AS entries FROM organizations o WHERE o.id = ANY($1::uuid[])",
                    orgs,
                )
            }
        finally:
            await conn.close()
        in_ledger = {r["id"] for r in rows}
        f.lost = len(set(acked) - in_ledger)
        per_request = collections.Counter((r["rq"], r["i"]) for r in rows)
        f.double = sum(n - 1 for n in per_request.values() if n > 1)
        for c in charging:  # a replay must answer the first id, never a new one
            if c.final == "charged" and len(set(c.ids)) != len(c.ids):
                f.double += 1
        # A ledger event of a request (or batch item) whose final answer was not "charged".
        f.charged_though_refused = sum(
            1 for r in rows if r["rq"] not in by_key or r["i"] not in by_key[r["rq"]].ok_items
        )
        async with self.checker() as (redis, _ledger, hot, settlement):
            report = await reconcile.run(redis, hot, settlement, orgs)
            f.drift = sum(abs(d.difference) for d in report.drifts)
            if report.lagging:
                f.notes.append(f"reconciliation lagging: {report.lagging}")
            for org in orgs:
                cache = await hot.balance(org)
                ledger_balance, entries = balances[org]
                if cache.status is not Status.OK or not (cache.payload["balance"] == ledger_balance == entries):
                    f.cache_vs_ledger.append(f"{org}: cache {cache.payload.get('balance')}, ledger {balances[org]}")
        RESULTS[f.experiment] = f
        return f


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\b.*")


def exit_reason(log: str) -> str:
    """The last exception line of a dead process's output."""
    lines = [line for line in log.splitlines() if _EXCEPTION_LINE.match(line)]
    return lines[-1] if lines else (log.strip().splitlines() or ["(no output)"])[-1]


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], deadline_s: float, what: str) -> None:
    """Poll until `predicate` holds; fail with `what` only after a generous deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {deadline_s:.0f} s")
        await asyncio.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGCONT (it may be paused), SIGTERM, then SIGKILL: only our own child."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
