"""The faults tier: the model-based test of the money (test_model.py), settler
handovers (test_handover.py) and the chaos experiments on servers of their own
(test_chaos.py). The experiments' figures are printed as a table at the end of the run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.config import Config
from tests.conftest import Servers, _with_database
from tests.faults.chaos import RESULTS, table
from tests.faults.world import World, open_world


@pytest.fixture(scope="module")
async def own_database(servers: Servers) -> AsyncIterator[str]:
    """A database of the module's own on the session's Postgres (created on the test
    loop: an asyncio.run() here, mid-session, would unset the session's loop)."""
    name = f"credits_faults_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(servers.database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield _with_database(servers.database_url, name)
    finally:
        conn = await asyncpg.connect(servers.database_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def world(config: Config, own_database: str) -> AsyncIterator[World]:
    async for w in open_world(config, own_database):
        yield w


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault experiments: what the clients were told against the ledger")
    for line in table(RESULTS):
        terminalreporter.write_line(line)
    for f in RESULTS.values():
        for note in [*f.notes, *f.settler_exits]:
            terminalreporter.write_line(f"{f.experiment}: {note}")
