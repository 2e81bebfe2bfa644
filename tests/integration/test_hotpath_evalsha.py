"""Every hot path test again, with the scripts sent by EVALSHA (the fallback for a
Redis without functions) instead of the function library."""

from __future__ import annotations

import pytest

from core.config import Config
from hotpath.client import HotPath, Mode
from hotpath.servers import RedisConnections
from ledger.store import Ledger
from tests.integration.test_hotpath import *  # noqa: F403  (the tests themselves)


@pytest.fixture
async def hot(redis_connections: RedisConnections, ledger: Ledger, config: Config) -> HotPath:
    path = HotPath(
        redis_connections.redis,
        ledger,
        partitions=config.usage_partitions,
        default_rate_per_s=config.rate_limit_per_s,
        default_burst=config.rate_limit_burst,
        idempotency_ttl_s=config.idempotency_ttl_s,
        key_prefix=config.redis_key_prefix,
        cluster=redis_connections.cluster,
        mode=Mode.EVALSHA,
    )
    await path.start()
    return path
