"""Every hot path test again, with script calls over the sidecar's auto-pipelined
connection (hotpath/connection.py) instead of the redis-py pool."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from core.config import Config
from hotpath.client import HotPath
from hotpath.connection import PipelinedRedis
from ledger.store import Ledger
from tests.integration.test_hotpath import *  # noqa: F403  (the tests themselves)


@pytest.fixture
async def hot(redis: aioredis.Redis, ledger: Ledger, config: Config) -> AsyncIterator[HotPath]:
    assert config.redis_url is not None
    pipe = PipelinedRedis.from_url(config.redis_url)
    path = HotPath.from_config(redis, ledger, config, pipe=pipe)
    await path.start()
    yield path
    await pipe.close()
