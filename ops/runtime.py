"""Connecting an ops command to the ledger and the hot path (ops/stack.py finds where
Redis and Postgres are)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from core.config import Config
from core.errors import Unavailable
from hotpath.client import HotPath
from hotpath.servers import RedisConnections, open_redis
from ledger.migrate import migrate
from ledger.store import Ledger
from ops.stack import servers

__all__ = ["Services", "connect", "servers"]


@dataclass
class Services:
    config: Config
    ledger: Ledger
    hot: HotPath
    redis: aioredis.Redis


@contextlib.asynccontextmanager
async def connect(config: Config, *, run_migrations: bool = True) -> AsyncIterator[Services]:
    """Ledger + hot path for ops commands (config must carry both URLs)."""
    assert config.redis_url is not None and config.database_url is not None
    if run_migrations:
        await migrate(
            config.database_url,
            app_password=config.app_db_password,
            settler_password=config.settler_db_password,
            console_password=config.console_db_password,
        )
    ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=4)
    try:
        connections = await open_redis(config.redis_url)
    except Unavailable:  # commands that need only the ledger still run; the others say so
        connections = RedisConnections(aioredis.Redis.from_url(config.redis_url))
    try:
        hot = HotPath.using(connections, ledger, config)
        yield Services(config, ledger, hot, connections.redis)
    finally:
        await connections.close()
        await ledger.close()
