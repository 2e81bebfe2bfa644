"""Every hot path test again, with script calls over the sidecar's auto-pipelined
connection (hotpath/connection.py) instead of the redis-py pool."""

from __future__ import annotations

import pytest

from core.config import Config
from hotpath.client import HotPath
from hotpath.servers import RedisConnections
from ledger.store import Ledger
from tests.integration.test_hotpath import *  # noqa: F403  (the tests themselves)


@pytest.fixture
async def hot(pipelined: RedisConnections, ledger: Ledger, config: Config) -> HotPath:
    path = HotPath.using(pipelined, ledger, config)
    await path.start()
    return path
