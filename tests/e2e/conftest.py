"""A real sidecar (create_app) on a local port, with real Redis and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.config import Config
from meter.app import create_app


@pytest.fixture(scope="session")
async def client(migrated: Config) -> AsyncIterator[TestClient[object, object]]:
    server = TestServer(create_app(migrated))
    async with TestClient(server) as c:
        yield c
