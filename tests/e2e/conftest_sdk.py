"""Fixtures for the SDK's end-to-end tests, loaded by tests/e2e/test_sdk_*.py with
``pytest_plugins = ("tests.e2e.conftest_sdk",)``: the SDK pointed at the session's real
sidecar (the ``client`` fixture's TestServer), over TCP, a Unix socket or a lossy proxy.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web

from accounts import admin
from core.config import Config
from credits_sdk import AsyncCreditsClient, CreditsClient
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org
from tests.e2e.sdk_support import Agent, Client, DroppingProxy, meter_url_of

SETTLE_ROUNDS_MAX = 100
SETTLE_LEASE_WAIT_S = 20.0  # more than the settler's 15 s lease


@pytest.fixture
def meter_url(client: Client) -> str:
    return meter_url_of(client)


@pytest.fixture
async def agent(ledger: Ledger, hot: HotPath, org: Org) -> Agent:
    key = await admin.create_key(ledger, hot, org.id, role="agent", rate_limit_per_s=0)
    return Agent(org=org, key=key.secret)


@pytest.fixture
async def aclient(meter_url: str, agent: Agent) -> AsyncIterator[AsyncCreditsClient]:
    async with AsyncCreditsClient(meter_url, api_key=agent.key) as sdk:
        yield sdk


@pytest.fixture
def sclient(meter_url: str, agent: Agent) -> Iterator[CreditsClient]:
    """A blocking client: call it from a worker thread (asyncio.to_thread), never from
    the event loop, which is serving the sidecar."""
    with CreditsClient(meter_url, api_key=agent.key) as sdk:
        yield sdk


@pytest.fixture
async def unix_socket(client: Client) -> AsyncIterator[str]:
    """The same sidecar, also listening on a Unix socket."""
    folder = tempfile.mkdtemp(prefix="sdk-")  # short: socket paths are limited to ~100 bytes
    path = f"{folder}/meter.sock"
    runner = client.server.runner
    assert runner is not None
    site = web.UnixSite(runner, path)
    await site.start()
    try:
        yield path
    finally:
        await site.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def dropping_proxy(client: Client) -> AsyncIterator[DroppingProxy]:
    proxy = DroppingProxy(client.server.host, client.server.port or 0, drops=0)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def settle(client: Client, migrated: Config) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    """Drain an organization's usage stream into the ledger, as the settler would, so
    that GET /usage (settled events) shows what was charged. Skips the test when this
    sidecar has no settlement yet."""
    try:
        from ledger.settlement import Settlement
        from meter.appkeys import HOT, REDIS
        from settler.stream import PartitionSettler
    except ImportError as exc:
        pytest.skip(f"no settlement in this tree yet (issue #3): {exc}")
    settlement = await Settlement.connect(migrated.settler_dsn())

    async def drain(organization_id: str) -> None:
        hot = client.app[HOT]
        worker = PartitionSettler(
            client.app[REDIS], settlement, hot, hot.partition(organization_id), consumer="sdk-e2e"
        )
        # Another test's settler may still hold this partition's lease (they expire after
        # LEASE_TTL_MS): wait for it rather than fail on a hash collision of org ids.
        deadline = time.monotonic() + SETTLE_LEASE_WAIT_S
        while not await worker.acquire():
            if time.monotonic() > deadline:
                raise AssertionError(f"partition {worker.partition}'s settler lease stayed taken")
            await asyncio.sleep(0.1)
        try:
            for _ in range(SETTLE_ROUNDS_MAX):
                if await worker.settle_once(block_ms=1) == 0:
                    return
        finally:
            await worker.release()
        raise AssertionError("the usage stream did not drain")

    try:
        yield drain
    finally:
        await settlement.close()
