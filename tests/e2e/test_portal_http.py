"""The customer portal over plain HTTP: getting in (single-use signed links, cookie
sessions, revocation), the rules every page keeps (roles, CSRF, isolation, headers),
and the API that hands out the links. The same click-throughs in a real browser are
in test_portal_browser.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import uuid

import pytest

from accounts import admin
from billing.appkeys import HOT, LEDGER, PORTAL_SESSIONS
from core.config import Config
from ledger.store import Ledger
from tests.conftest import JWT_SECRET, Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures", "tests.e2e.portal_support")

from tests.e2e.billing_fixtures import Client, StripeDriver, bearer, call, with_card  # noqa: E402
from tests.e2e.portal_support import browser, portal_link, status_with_cookie  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures",)

PAGES = (
    "overview",
    "usage",
    "transactions",
    "plans",
    "buy",
    "payment-methods",
    "invoices",
    "api-keys",
    "departments",
    "alerts",
)
NAV_LABELS = (
    "Overview",
    "Usage",
    "Transactions",
    "Plans",
    "Buy credits",
    "Payment methods",
    "Invoices",
    "API keys",
    "Departments",
    "Alerts",
)


async def test_a_link_is_single_use_and_starts_a_cookie_session(billing_client: Client, org: Org) -> None:
    link = await portal_link(billing_client, org, return_url="https://platform.example/account")
    assert link["url"].startswith(str(billing_client.server.make_url("/portal/enter/")))
    expires = dt.datetime.fromisoformat(link["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=60)
    async with browser(billing_client) as b:
        status, _, r = await b.get(link["url"])
        assert status == 303 and r.headers["Location"] == "/portal/overview"  # the token stays behind
        assert r.headers["Referrer-Policy"] == "no-referrer"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/portal" in cookie
        assert "Secure" not in cookie  # plain HTTP here; over TLS it is Secure
        status, html, _ = await b.get("/portal/overview")
        assert status == 200 and "Balance" in html and "100" in html
        assert 'href="https://platform.example/account"' in html
        assert link["url"].rsplit("/", 1)[1] not in html  # no token in the page
        status, html, _ = await b.get(link["url"])  # a second use
        assert status == 410 and "used already" in html
    async with browser(billing_client) as other:  # nor in another browser
        status, html, _ = await other.get(link["url"])
        assert status == 410 and "used already" in html
        status, _, r = await other.get("/portal/overview")
        assert status == 303 and r.headers["Location"] == "/portal/sign-in"
        status, html, _ = await other.get("/portal/sign-in")
        assert status == 200 and "opens from a link" in html


async def test_tampered_expired_and_other_organization_links_are_refused(
    billing_client: Client, org: Org, other_org: Org
) -> None:
    link = await portal_link(billing_client, org)
    token = link["url"].rsplit("/", 1)[1]
    version, org_hex, link_hex, exp, sig = token.split(".")
    sessions = billing_client.app[PORTAL_SESSIONS]
    base = str(billing_client.server.make_url("/portal/enter/"))
    cases = {
        "tampered signature": (base + token[:-2] + ("AA" if not token.endswith("AA") else "BB"), 403, "changed"),
        "tampered expiry": (base + ".".join([version, org_hex, link_hex, str(int(exp) + 60), sig]), 403, "changed"),
        "other organization, same link": (
            base + sessions.sign(other_org.id, link["id"], dt.datetime.fromtimestamp(int(exp), dt.UTC)),
            404,
            "not valid",
        ),
        "expired": (
            base + sessions.sign(org.id, link["id"], dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)),
            410,
            "expired",
        ),
        "malformed": (base + "not-a-token", 400, "not a portal link"),
    }
    async with browser(billing_client) as b:
        for name, (url, want, text) in cases.items():
            status, html, r = await b.get(url)
            assert (status, text in html) == (want, True), name
            assert "Set-Cookie" not in r.headers, name
        status, _, _ = await b.get("/portal/overview")
        assert status == 303  # none of them started a session
        status, _, _ = await b.get(link["url"])  # and the real link still works once
        assert status == 303


async def test_the_row_expiry_holds_even_with_a_valid_signature(billing_client: Client, org: Org) -> None:
    """A link is refused once its row says it expired, whatever the token claims."""
    link = await portal_link(billing_client, org)
    async with billing_client.app[LEDGER].tenant(org.id) as conn:
        await conn.execute(
            "UPDATE portal_links SET expires_at = now() - interval '1 second',"
            " created_at = now() - interval '2 seconds' WHERE id = $1",
            uuid.UUID(link["id"]),
        )
    async with browser(billing_client) as b:
        status, html, _ = await b.get(link["url"])
        assert status == 410 and "expired" in html


async def test_portal_sessions_api_checks_role_and_body(billing_client: Client, org: Org, ledger: Ledger) -> None:
    status, body = await call(billing_client, "POST", "/api/billing/portal-sessions", org, {}, role="agent")
    assert status == 403 and body["error"]["code"] == "forbidden"
    agent_key = await admin.create_key(ledger, billing_client.app[HOT], org.id, role="agent")
    r = await billing_client.post(
        "/api/billing/portal-sessions", json={}, headers={"Authorization": f"Bearer {agent_key.secret}"}
    )
    assert r.status == 403
    r = await billing_client.post(
        "/api/billing/portal-sessions", json={}, headers={"Authorization": f"Bearer {org.admin_key}"}
    )
    link = await r.json()
    assert r.status == 201 and link["role"] == "viewer" and link["return_url"] is None  # least privilege by default
    for bad, param in (
        ({"role": "owner"}, "$.role"),
        ({"return_url": "javascript:alert(1)"}, "$.return_url"),
        ({"return_url": "https://x.example/" + "a" * 2100}, "$.return_url"),
        ({"colour": "red"}, "$.colour"),
    ):
        status, body = await call(billing_client, "POST", "/api/billing/portal-sessions", org, bad)
        assert status == 400 and body["error"]["param"] == param, (bad, body)
    key = f"pl-{uuid.uuid4().hex}"
    r = await billing_client.post(
        "/api/billing/portal-sessions", json={"role": "admin"}, headers=bearer(org, **{"Idempotency-Key": key})
    )
    first = await r.json()
    r = await billing_client.post(
        "/api/billing/portal-sessions", json={"role": "admin"}, headers=bearer(org, **{"Idempotency-Key": key})
    )
    assert (await r.json()) == first and r.headers["Idempotent-Replayed"] == "true"
    status, body = await call(billing_client, "GET", "/api/billing/config", org)
    assert status == 200 and body["stripe_publishable_key"].startswith("pk_")
    assert body["stripe_js_url"].endswith("/js.stripe.com/v3/")


async def test_revoking_a_link_ends_its_sessions(billing_client: Client, org: Org, other_org: Org) -> None:
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, body = await call(billing_client, "DELETE", f"/api/billing/portal-sessions/{link['id']}", other_org)
        assert status == 404  # another organization's link is not found
        status, _, _ = await b.get("/portal/overview")
        assert status == 200
        status, body = await call(billing_client, "DELETE", f"/api/billing/portal-sessions/{link['id']}", org)
        assert status == 200 and body == {"id": link["id"], "revoked": True}
        status, _, r = await b.get("/portal/overview")
        assert status == 303 and r.headers["Location"] == "/portal/sign-in"
        status, html, _ = await b.post("/portal/departments", {"name": "after-revoke"})
        assert status == 401 and "ended" in html


async def test_sign_out_ends_the_session(billing_client: Client, org: Org) -> None:
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        cookie = next(c for c in b.session.cookie_jar if c.key == "credits_portal").value
        status, _, _ = await b.post("/portal/sign-out")
        assert status == 303
        status, _, _ = await b.get("/portal/overview")
        assert status == 303
        # the old cookie, replayed: the server-side record is revoked
        assert await status_with_cookie(b.url("/portal/overview"), cookie) == 303


async def test_every_page_has_the_navigation_and_strict_headers(billing_client: Client, org: Org) -> None:
    link = await portal_link(billing_client, org, role="viewer")
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        for name in PAGES:
            status, html, r = await b.get(f"/portal/{name}")
            assert status == 200, (name, html[:2000])
            for label in NAV_LABELS:
                assert f">{label}</a>" in html, (name, label)
            assert f'class="page-{name}"' in html and 'aria-current="page"' in html
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
            assert "script-src 'self' http://127.0.0.1:" in csp  # Stripe.js from localstripe's stand-in
            assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "<script>" not in html and " style=" not in html and " onclick=" not in html  # nothing inline
            assert "Viewer" in html


async def test_a_viewer_sees_but_cannot_change(
    billing_client: Client, org: Org, stripe_driver: StripeDriver, ledger: Ledger
) -> None:
    pm = await with_card(billing_client, org, stripe_driver)
    link = await portal_link(billing_client, org, role="viewer")
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, html, _ = await b.get("/portal/buy")
        assert status == 200 and 'id="buy-form"' not in html and "Small" in html
        for path, form in (
            ("/portal/buy", {"package_id": "small", "payment_method_id": pm, "idempotency_key": "portal-v1"}),
            ("/portal/plans/subscribe", {"plan_id": "starter", "idempotency_key": "portal-v2"}),
            ("/portal/api-keys", {"name": "x", "role": "admin"}),
            ("/portal/departments", {"name": "viewer-dept"}),
            ("/portal/alerts", {"threshold": "5", "url": "http://127.0.0.1:9/h"}),
            (f"/portal/payment-methods/{pm}/remove", {"idempotency_key": "portal-v3"}),
        ):
            status, html, _ = await b.post(path, form)
            assert status == 403 and "ask for an admin link" in html, path
    status, payments = await call(billing_client, "GET", "/api/billing/payments", org)
    assert payments["data"] == []
    status, methods = await call(billing_client, "GET", "/api/billing/payment-methods", org)
    assert [m["id"] for m in methods["data"]] == [pm]


async def test_forms_without_the_csrf_token_or_from_elsewhere_are_refused(billing_client: Client, org: Org) -> None:
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, html, _ = await b.post("/portal/departments", {"name": "no-token"}, csrf=False)
        assert status == 403 and "did not come from your portal session" in html
        status, _, _ = await b.post("/portal/departments", {"name": "bad-token", "csrf_token": "x" * 43})
        assert status == 403
        status, _, _ = await b.post(
            "/portal/departments", {"name": "cross-site"}, headers={"Origin": "https://evil.example"}
        )
        assert status == 403
        status, _, r = await b.post("/portal/departments", {"name": "with-token"})
        assert status == 303 and r.headers["Location"] == "/portal/departments?notice=department"
    async with billing_client.app[LEDGER].tenant(org.id) as conn:
        names = {r["name"] for r in await conn.fetch("SELECT name FROM departments")}
    assert names == {"with-token"}


async def test_one_organization_cannot_reach_another(
    billing_client: Client, org: Org, other_org: Org, stripe_driver: StripeDriver, ledger: Ledger
) -> None:
    theirs_pm = await with_card(billing_client, other_org, stripe_driver)
    hot = billing_client.app[HOT]
    their_key = await admin.create_key(ledger, hot, other_org.id, role="agent", name="theirs")
    their_dept = await admin.create_department(ledger, hot, other_org.id, "their-dept")
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, html, _ = await b.get("/portal/api-keys")
        assert "theirs" not in html and their_key.prefix not in html
        status, html, _ = await b.get("/portal/payment-methods")
        assert theirs_pm not in html
        status, html, _ = await b.get(f"/portal/usage?department_id={their_dept.id}")
        assert status == 200 and "their-dept" not in html
        for path, form in (
            (f"/portal/api-keys/{their_key.id}/revoke", {}),
            (f"/portal/departments/{their_dept.id}/limit", {"limit": "1", "period": "day"}),
            (f"/portal/payment-methods/{theirs_pm}/default", {"idempotency_key": "portal-iso-1"}),
            (f"/portal/payment-methods/{theirs_pm}/remove", {"idempotency_key": "portal-iso-2"}),
        ):
            status, html, _ = await b.post(path, form)
            assert status == 404, (path, status, html[:500])
        status, html, _ = await b.get(
            f"/portal/payments/pi_{uuid.uuid4().hex}.json", headers={"Accept": "application/json"}
        )
        assert status == 404
    key_row = await ledger.api_key(other_org.id, their_key.id)
    assert key_row["revoked_at"] is None
    status, methods = await call(billing_client, "GET", "/api/billing/payment-methods", other_org)
    assert [m["id"] for m in methods["data"]] == [theirs_pm]
    # a cookie edited to name the other organization finds no session there
    async with browser(billing_client) as b:
        await b.enter((await portal_link(billing_client, org))["url"])
        cookie = next(c for c in b.session.cookie_jar if c.key == "credits_portal").value
        forged = uuid.UUID(other_org.id).hex + "." + cookie.split(".", 1)[1]
        assert await status_with_cookie(b.url("/portal/overview"), forged) == 303
        assert await status_with_cookie(b.url("/portal/overview"), cookie) == 200  # the real one still works


async def test_admin_forms_do_what_the_api_does(billing_client: Client, org: Org, ledger: Ledger) -> None:
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, _, _ = await b.post("/portal/departments", {"name": "research"})
        assert status == 303
        status, html, _ = await b.post("/portal/departments", {"name": "research"})
        assert status == 409 and "exists" in html
        depts = await ledger.departments(org.id)
        dept = depts[0]
        status, html, _ = await b.post(f"/portal/departments/{dept.id}/limit", {"limit": "12.0005", "period": "week"})
        assert status == 400 and "0.001" in html  # more precision than the ledger keeps is refused, not rounded
        status, _, _ = await b.post(f"/portal/departments/{dept.id}/limit", {"limit": "12.5", "period": "week"})
        assert status == 303
        status, html, _ = await b.get("/portal/departments")
        assert "12.5" in html and "week" in html
        status, html, _ = await b.post(
            "/portal/api-keys", {"name": "bots", "role": "agent", "department_id": dept.id, "cap": "50"}
        )
        assert status == 200 and "only time it is shown" in html
        secret = html.split('id="new-secret" class="secret" type="text" readonly value="', 1)[1].split('"', 1)[0]
        assert secret.startswith("ck_")
        status, html, _ = await b.get("/portal/api-keys")
        assert secret not in html and secret[:10] in html and "bots" in html
        status, html, _ = await b.post("/portal/api-keys", {"role": "owner"})
        assert status == 400
        status, html, _ = await b.post("/portal/alerts", {"threshold": "25", "url": "ftp://example.com"})
        assert status == 400
        status, html, _ = await b.post("/portal/alerts/test", {})
        assert status == 400 and "set an alert URL first" in html
        status, html, _ = await b.post("/portal/alerts", {"threshold": "25", "url": "http://127.0.0.1:9/hook"})
        assert status == 200 and "whsec_" in html
        status, _, _ = await b.post("/portal/alerts/test", {})
        assert status == 303
        async with ledger.tenant(org.id) as conn:
            queued = await conn.fetchval("SELECT count(*) FROM webhook_deliveries WHERE event_type = 'alert.test'")
        assert queued == 1
        status, html, _ = await b.get("/portal/alerts")
        assert "whsec_" not in html and "25" in html


@pytest.mark.parametrize("path", ["/portal/usage?from=2026-13-01", "/portal/usage?from=2026-02-01&to=2026-01-01",
                                  "/portal/usage?action=Bad Action", "/portal/transactions?type=gift",
                                  "/portal/transactions?starting_after=abc", "/portal/nowhere"])  # fmt: skip
async def test_bad_filters_get_a_clear_page(billing_client: Client, org: Org, path: str) -> None:
    link = await portal_link(billing_client, org, role="viewer")
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, html, r = await b.get(path)
        assert status in (400, 404) and "<h1>" in html and "Content-Security-Policy" in r.headers, (path, status)


def _cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "REDIS_URL": config.redis_url or "",
        "DATABASE_URL": config.database_url or "",
        "JWT_SECRET": JWT_SECRET,
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_credits_portal_link_prints_a_link_the_billing_service_accepts(
    billing_client: Client, migrated: Config, org: Org
) -> None:
    done = await asyncio.to_thread(_cli, migrated, "portal-link", "--org", org.id, "--role", "viewer")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["role"] == "viewer" and printed["url"].startswith("http://127.0.0.1:8081/portal/enter/pl1.")
    token = printed["url"].rsplit("/", 1)[1]
    async with browser(billing_client) as b:
        await b.enter(b.url("/portal/enter/" + token))  # signed by another process, with the same secret
        status, html, _ = await b.get("/portal/overview")
        assert status == 200 and "Viewer: read only" in html
    bad = await asyncio.to_thread(_cli, migrated, "portal-link", "--org", str(uuid.uuid4()))
    assert bad.returncode == 1 and "not found" in bad.stderr
    bad = await asyncio.to_thread(_cli, migrated, "portal-link", "--org", "acme")
    assert bad.returncode == 2 and "--org: not an id" in bad.stderr  # a usage error, named by argparse
    bad = await asyncio.to_thread(_cli, migrated, "portal-link", "--org", org.id, "--return-url", "javascript:x")
    assert bad.returncode == 1 and "--return-url" in bad.stderr


async def test_a_link_opened_at_once_in_several_browsers_starts_one_session(billing_client: Client, org: Org) -> None:
    link = await portal_link(billing_client, org)

    async def open_it() -> int:
        async with browser(billing_client) as b:
            status, _, _ = await b.get(link["url"])
            return status

    statuses = await asyncio.gather(*(open_it() for _ in range(8)))
    assert sorted(statuses) == [303] + [410] * 7
    async with billing_client.app[LEDGER].tenant(org.id) as conn:
        started = await conn.fetchval("SELECT count(*) FROM portal_sessions WHERE link_id = $1", uuid.UUID(link["id"]))
    assert started == 1


async def test_the_overview_shows_a_credit_line_and_what_is_owed(billing_client: Client, org: Org) -> None:
    link = await portal_link(billing_client, org, role="viewer")
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        _, html, _ = await b.get("/portal/overview")
        assert "Credit line" not in html and "Owed" not in html  # none: nothing to show
        hot, ledger = billing_client.app[HOT], billing_client.app[LEDGER]
        await admin.set_credit_limit(ledger, hot, org.id, limit=25_000, reason="portal")
        used = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=104)
        assert used.payload["available"] == -4_000
        status, html, _ = await b.get("/portal/overview")
        assert status == 200
        assert "Credit line" in html and "Owed" in html and ">25<" in html and ">4<" in html, html[:3000]
