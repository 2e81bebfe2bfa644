"""Helpers for the ops console's tests: the billing service with the portal and the
console mounted, operators made as `credits operator create` makes them, and a plain
HTTP browser (its own cookie jar, no redirects followed) signed in to the console."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing.app import create_app
from billing.config import BillingConfig
from core.config import Config
from ledger.operators import OperatorAdmin
from portal import console
from portal.app import mount as mount_portal
from tests.e2e.billing_fixtures import Client

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@pytest.fixture(scope="module")
async def console_client(migrated: Config, billing_config: BillingConfig) -> AsyncIterator[Client]:
    server = TestServer(create_app(migrated, billing_config, mounts=(mount_portal, console.mount)))
    async with TestClient(server) as client:
        yield client


async def owner_value(config: Config, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(config.database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def new_operator(config: Config) -> tuple[str, str]:
    """(email, the sign-in link's path)."""
    email = f"ops-{uuid.uuid4().hex[:6]}@example.com"
    conn = await asyncpg.connect(config.database_url)
    try:
        link = await OperatorAdmin(conn).create(email, name="Ops", created_by="test")
    finally:
        await conn.close()
    return email, console.ENTRY + link.token


class OperatorBrowser:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.csrf = ""

    async def get(self, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, allow_redirects=False) as r:
            text = await r.text()
            found = CSRF_META.search(text)
            if found:
                self.csrf = found.group(1)
            return r.status, text, r

    async def post(
        self, path: str, data: dict[str, str], *, csrf: bool = True
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        form = {**data, **({"csrf_token": self.csrf} if csrf else {})}
        async with self.session.post(self.base + path, data=form, allow_redirects=False) as r:
            return r.status, await r.text(), r

    async def confirm(self, path: str, data: dict[str, str]) -> tuple[int, str, aiohttp.ClientResponse]:
        """A form's two steps: the confirmation page, then the confirmed action."""
        status, text, _ = await self.post(path, data)
        assert status == 200 and "Check, then confirm" in text, text
        return await self.post(path, {**data, "confirmed": "yes"})


async def signed_in(client: Client, config: Config) -> tuple[aiohttp.ClientSession, OperatorBrowser, str]:
    base = str(client.server.make_url("")).rstrip("/")
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    email, entry = await new_operator(config)
    browser = OperatorBrowser(session, base)
    status, text, _ = await browser.get(entry)  # a page with a button: fetching the link does not use it
    assert status == 200 and "Continue to the console" in text, status
    status, _, r = await browser.post(entry, {}, csrf=False)
    assert status == 303 and r.headers["Location"].startswith("/console/password"), status
    await browser.get("/console/organizations")
    return session, browser, email
