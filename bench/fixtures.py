"""What the scenarios need: scratch databases, the naive schema, a funded organization
with an unlimited API key, and the Redis bookkeeping to verify charges and clean up."""

from __future__ import annotations

import contextlib
import dataclasses
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from accounts import admin
from core import config as config_module
from core.config import Config
from ops.runtime import Services

ACTION = "tool_call"
ACTION_COST_MILLI = 100  # 0.1 credit per call
GRANT_MILLI = 10**9 * 1000  # 10^9 credits


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def scratch_database(server_url: str, name: str) -> AsyncIterator[str]:
    """CREATE DATABASE name on the server of server_url; DROP it (FORCE) on exit."""
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(server_url, name)
    finally:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# -- the naive design -----------------------------------------------------------------------
NAIVE_SCHEMA = """
CREATE TABLE accounts (
  id integer PRIMARY KEY,
  balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE costs (
  action text PRIMARY KEY,
  credits bigint NOT NULL CHECK (credits >= 0)
);
CREATE TABLE ledger (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  account_id integer NOT NULL REFERENCES accounts(id),
  action text NOT NULL,
  units integer NOT NULL,
  amount bigint NOT NULL,
  balance_after bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_account ON ledger (account_id, id DESC);

-- One call per request: price the action, debit the (single, hot) balance row if it
-- covers the charge, append the ledger row. Row lock held until commit.
CREATE FUNCTION bench_use(p_account integer, p_action text, p_units integer,
                          OUT credits bigint, OUT balance bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_cost bigint;
BEGIN
  SELECT c.credits INTO v_cost FROM costs c WHERE c.action = p_action;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown action %', p_action;
  END IF;
  credits := v_cost * p_units;
  UPDATE accounts a SET balance = a.balance - credits
   WHERE a.id = p_account AND a.balance >= credits
  RETURNING a.balance INTO balance;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'insufficient credits';
  END IF;
  INSERT INTO ledger (account_id, action, units, amount, balance_after)
  VALUES (p_account, p_action, p_units, -credits, balance);
END $$;
"""


async def prepare_naive(dsn: str, account_id: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(NAIVE_SCHEMA)
        await conn.execute("INSERT INTO accounts (id, balance) VALUES ($1, $2)", account_id, GRANT_MILLI)
        await conn.execute("INSERT INTO costs (action, credits) VALUES ($1, $2)", ACTION, ACTION_COST_MILLI)
    finally:
        await conn.close()


async def naive_state(dsn: str, account_id: int) -> tuple[int, int, int]:
    """(balance, ledger rows, sum of ledger amounts) of the hot account."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT balance FROM accounts WHERE id = $1) AS balance,"
            " count(*) AS n, coalesce(sum(amount), 0) AS total FROM ledger WHERE account_id = $1",
            account_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["balance"]), int(row["n"]), int(row["total"])


# -- the credits app -----------------------------------------------------------------------
def credits_config(redis_url: str, database_url: str) -> Config:
    """The project's own configuration, as the sidecar process builds it."""
    env = {"RATE_LIMIT_PER_S": "0", "LOG_LEVEL": "WARNING"}
    return dataclasses.replace(config_module.load(env), redis_url=redis_url, database_url=database_url)


@dataclass(frozen=True)
class HotOrg:
    id: str
    key_id: str
    api_key: str
    stream: str  # its usage stream partition key
    stream_from: str  # the stream's last id before the organization existed
    stream_existed: bool  # whether that stream existed before the benchmark


async def funded_org(s: Services, name: str) -> HotOrg:
    """An organization with 10^9 credits, `tool_call` priced, and an unlimited agent key."""
    org_id, _admin_key = await admin.create_organization(s.ledger, name)
    stream = s.hot.stream_key(s.hot.partition(org_id))
    stream_from, stream_existed = await stream_position(s.redis, stream)
    await admin.grant(s.ledger, s.hot, org_id, amount=GRANT_MILLI, reason="benchmark", reference="bench")
    # The grant push loaded the organization into the cache; price the action in both.
    await s.ledger.set_cost(org_id, ACTION, ACTION_COST_MILLI, "call", "benchmark action")
    await s.hot.configure(org_id, "cost", ACTION, ACTION_COST_MILLI)
    key = await admin.create_key(s.ledger, s.hot, org_id, role="agent", name="bench", rate_limit_per_s=0)
    return HotOrg(org_id, key.id, key.secret, stream, stream_from, stream_existed)


async def cache_balance(s: Services, org: str) -> int:
    result = await s.hot.balance(org)
    if result.status.name != "OK":
        raise RuntimeError(f"balance refused: {result.status.name}")
    return int(result.payload["balance"])


async def forget_org(s: Services, org: HotOrg) -> None:
    """Remove what the organization left in Redis: its entries in the usage stream (the
    stream itself when the benchmark created it), its fixed keys, its idempotency records."""
    await sweep_stream(s.redis, org.stream, org.id, org.stream_from, delete=True, chunk=20)
    if not org.stream_existed:
        await drop_stream_if_empty(s.redis, org.stream)
    await drop_org_cache(s, org.id)


async def drop_org_cache(s: Services, org: str) -> None:
    """Remove every Redis key of the organization (fixed keys and idempotency records)."""
    await s.hot.evict(org)
    batch: list[bytes] = []
    for pattern in (f"cr:{s.hot.tag(org)}:o:{org}:*", s.hot.idempotency_pattern(org)):
        async for key in s.redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await s.redis.unlink(*batch)
                batch = []
    if batch:
        await s.redis.unlink(*batch)


# Counts (and optionally deletes) the entries of one organization after a stream id,
# a bounded chunk per call so Redis is never blocked for long.
_STREAM_SWEEP = """
local rows = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[3]))
local n, last, mine = 0, ARGV[1], {}
for _, row in ipairs(rows) do
  last = row[1]
  local f = row[2]
  for i = 1, #f, 2 do
    if f[i] == 'o' then
      if f[i + 1] == ARGV[2] then
        n = n + 1
        mine[#mine + 1] = row[1]
      end
      break
    end
  end
end
if ARGV[4] == '1' and #mine > 0 then redis.call('XDEL', KEYS[1], unpack(mine)) end
return {n, last, #rows}
"""


async def stream_position(redis: aioredis.Redis, stream: str) -> tuple[str, bool]:
    """(last entry id or '0-0', whether the stream existed)."""
    rows = await redis.xrevrange(stream, count=1)
    if not rows:
        return "0-0", bool(await redis.exists(stream))
    entry_id = rows[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), True


async def sweep_stream(
    redis: aioredis.Redis, stream: str, org: str, after: str, *, delete: bool, chunk: int = 500
) -> int:
    """Entries of `org` in `stream` after id `after`: counted, and deleted if asked."""
    total = 0
    cursor = after
    while True:
        raw = await redis.eval(_STREAM_SWEEP, 1, stream, cursor, org, str(chunk), "1" if delete else "0")  # type: ignore[misc]
        n, last, rows = int(raw[0]), raw[1], int(raw[2])
        total += n
        cursor = last.decode() if isinstance(last, bytes) else str(last)
        if rows < chunk:
            return total


async def drop_stream_if_empty(redis: aioredis.Redis, stream: str) -> None:
    if await redis.exists(stream) and await redis.xlen(stream) == 0:
        await redis.delete(stream)
