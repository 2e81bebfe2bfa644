"""Connections of a faults module's own, on the session's servers: its own database
and Redis key prefix, so nothing else in the session settles, leases or trims its
partitions (and it never touches theirs). The fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis.asyncio as aioredis

from core.config import Config
from hotpath.client import HotPath
from ledger.migrate import migrate
from ledger.settlement import Settlement
from ledger.store import Ledger

T = TypeVar("T")
STEP_TIMEOUT_S = 120  # a bound on one call from another thread, not a timing assertion


@dataclass
class World:
    config: Config
    loop: asyncio.AbstractEventLoop
    redis: aioredis.Redis
    ledger: Ledger
    settlement: Settlement
    hot: HotPath

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the test's loop from another thread (the state machine's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=STEP_TIMEOUT_S)


async def open_world(config: Config, database_url: str) -> AsyncIterator[World]:
    cfg = replace(config, database_url=database_url, redis_key_prefix=f"fm{uuid.uuid4().hex[:8]}", usage_partitions=2)
    await migrate(database_url, app_password=cfg.app_db_password, settler_password=cfg.settler_db_password)
    assert cfg.redis_url is not None
    redis = aioredis.Redis.from_url(cfg.redis_url)
    ledger = await Ledger.connect(cfg.app_dsn(), min_size=1, max_size=4)
    settlement = await Settlement.connect(cfg.settler_dsn(), min_size=1, max_size=4)
    hot = HotPath.from_config(redis, ledger, cfg)
    await hot.start()
    try:
        yield World(cfg, asyncio.get_running_loop(), redis, ledger, settlement, hot)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{cfg.redis_key_prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])
        await settlement.close()
        await ledger.close()
        await redis.aclose()
