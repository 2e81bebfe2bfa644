"""Helpers for the portal's tests: ask for a portal link as a platform would, and a
plain HTTP "browser" (its own cookie jar, no redirects followed) to open it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.conftest import Org
from tests.e2e.billing_fixtures import Client, call

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


async def portal_link(client: Client, org: Org | str, *, role: str = "admin", **body: Any) -> dict[str, Any]:
    status, link = await call(client, "POST", "/api/billing/portal-sessions", org, {"role": role, **body})
    assert status == 201, link
    return link


class Browser:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.csrf = ""

    def url(self, path: str) -> str:
        return path if path.startswith("http") else self.base + path

    async def get(self, path: str, **kw: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.url(path), allow_redirects=False, **kw) as r:
            text = await r.text()
            found = CSRF_META.search(text)
            if found:
                self.csrf = found.group(1)
            return r.status, text, r

    async def post(
        self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True, **kw: Any
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        form = dict(data or {})
        if csrf:
            form.setdefault("csrf_token", self.csrf)
        async with self.session.post(self.url(path), data=form, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r

    async def enter(self, url: str) -> aiohttp.ClientResponse:
        status, _, r = await self.get(url)
        assert status == 303, (status, _)
        await self.get("/portal/overview")  # picks up the CSRF token
        return r


@asynccontextmanager
async def browser(client: Client) -> AsyncIterator[Browser]:
    base = str(client.server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Browser(session, base)


async def status_with_cookie(url: str, cookie: str) -> int:
    """GET with exactly this portal cookie (no jar): a replayed or forged cookie."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(url, headers={"Cookie": f"credits_portal={cookie}"}, allow_redirects=False) as r,
    ):
        return r.status
