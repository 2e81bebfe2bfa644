"""Resolving where Redis and Postgres are: the configured URLs, the embedded servers of
a running `credits dev`, or embedded servers started for this process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from core.config import Config
from hotpath.client import HotPath
from ledger.migrate import migrate
from ledger.store import Ledger

log = logging.getLogger(__name__)
URLS_FILE = "urls.json"


def _urls_file(config: Config) -> pathlib.Path:
    return config.data_dir / URLS_FILE


def _running_stack(config: Config) -> tuple[str, str] | None:
    """URLs published by a `credits dev` that is still running on this data dir."""
    path = _urls_file(config)
    try:
        data = json.loads(path.read_text())
        pid = int(data["pid"])
        os.kill(pid, 0)
        return str(data["redis_url"]), str(data["database_url"])
    except (OSError, ValueError, KeyError):
        return None


def publish_urls(config: Config) -> None:
    assert config.redis_url is not None and config.database_url is not None
    path = _urls_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"pid": os.getpid(), "redis_url": config.redis_url, "database_url": config.database_url}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def unpublish_urls(config: Config) -> None:
    with contextlib.suppress(FileNotFoundError):
        _urls_file(config).unlink()


@contextlib.contextmanager
def servers(config: Config) -> Iterator[Config]:
    """The config with both URLs set: configured, a running dev stack's, or embedded
    servers started here and stopped on exit."""
    if not config.embedded:
        yield config
        return
    running = _running_stack(config)
    if running is not None:
        yield config.with_urls(*running)
        return
    from ops.embedded import EmbeddedServers  # imported late: only the embedded mode needs it

    embedded = EmbeddedServers(config.data_dir)
    urls = embedded.start()
    try:
        yield config.with_urls(
            redis_url=config.redis_url or urls.redis_url, database_url=config.database_url or urls.database_url
        )
    finally:
        embedded.stop()


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
            config.database_url, app_password=config.app_db_password, settler_password=config.settler_db_password
        )
    ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=4)
    redis = aioredis.Redis.from_url(config.redis_url)
    try:
        hot = HotPath.from_config(redis, ledger, config)
        yield Services(config, ledger, hot, redis)
    finally:
        await redis.aclose()
        await ledger.close()
