"""The ops console over plain HTTP (no browser): every credit form (grant with expiry
and priority, adjust down, void an unspent grant, revoke a key, repair the cache),
each confirmed, idempotent by reference, audited and seen in the ledger; bad input
changes nothing; the health page's retry button; links and sessions refused."""

from __future__ import annotations

import re
import uuid

import pytest

from billing.appkeys import HOT, LEDGER
from billing.config import BillingConfig
from core.config import Config
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures", "tests.e2e.console_support")

from tests.e2e.billing_fixtures import Client, cache_balance  # noqa: E402
from tests.e2e.console_support import new_operator, owner_value, signed_in  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures", "tests.e2e.console_support")
CREDIT = 1000


async def audit_of(config: Config, org: Org) -> list[tuple[str, str]]:
    rows = await owner_value(
        config,
        "SELECT array_agg(action || ' ' || outcome ORDER BY id) FROM operator_audit WHERE organization_id = $1",
        uuid.UUID(org.id),
    )
    return [tuple(r.split(" ")) for r in rows or []]  # type: ignore[misc]


async def test_every_credit_form_confirms_acts_once_and_is_audited(
    console_client: Client, migrated: Config, org: Org
) -> None:
    ledger: Ledger = console_client.app[LEDGER]
    hot: HotPath = console_client.app[HOT]
    session, b, email = await signed_in(console_client, migrated)
    async with session:
        page = f"/console/organizations/{org.id}"
        status, text, _ = await b.get(page)
        assert status == 200 and "Grant credits" in text

        # A grant with an expiry and a priority, confirmed.
        grant = {"amount": "30.5", "reason": "trial", "reference": "t-1", "expires_at": "2031-01-01T00:00",
                 "priority": "3"}  # fmt: skip
        status, _, r = await b.confirm(page + "/grant", grant)
        assert status == 303 and r.headers["Location"] == page + "?notice=grant"
        row = await owner_value(
            migrated,
            "SELECT row(amount, priority, expires_at = '2031-01-01T00:00Z') FROM credit_grants"
            " WHERE organization_id = $1 AND reference = 't-1'",
            uuid.UUID(org.id),
        )
        assert tuple(row) == (30_500, 3, True)
        assert await cache_balance(hot, org) == 130_500

        # A form whose reference was cleared gets one at its confirmation: confirming twice grants once.
        status, text, _ = await b.post(page + "/grant", {"amount": "1", "reason": "no ref", "reference": ""})
        generated = re.search(r'name="reference" value="(console-[0-9a-f]{12})"', text)
        assert status == 200 and generated, text
        for _ in range(2):
            confirmed = {"amount": "1", "reason": "no ref", "reference": generated.group(1), "confirmed": "yes"}
            assert (await b.post(page + "/grant", confirmed))[0] == 303
        assert await cache_balance(hot, org) == 131_500
        status, _, _ = await b.confirm(page + "/adjust", {"amount": "1", "reason": "undo", "reference": "a-0"})
        assert status == 303 and await cache_balance(hot, org) == 130_500

        # Take 10.5 away; then more than is available: refused, nothing taken, on record.
        status, _, r = await b.confirm(page + "/adjust", {"amount": "10.5", "reason": "overage", "reference": "a-1"})
        assert status == 303 and r.headers["Location"].endswith("notice=adjust")
        status, text, _ = await b.confirm(
            page + "/adjust", {"amount": "5000", "reason": "too much", "reference": "a-2"}
        )
        assert status == 409 and "only 120 credits are available" in text
        assert await cache_balance(hot, org) == 120_000
        status, _, _ = await b.confirm(page + "/adjust", {"amount": "10.5", "reason": "overage", "reference": "a-1"})
        assert status == 303 and await cache_balance(hot, org) == 120_000  # the same reference: once

        # Void what the trial grant has left.
        grant_id = str(
            await owner_value(
                migrated, "SELECT id FROM credit_grants WHERE organization_id = $1 AND reference = 't-1'",
                uuid.UUID(org.id),
            )
        )  # fmt: skip
        status, _, r = await b.confirm(page + "/void", {"target": grant_id, "reason": "trial over"})
        assert status == 303 and r.headers["Location"].endswith("notice=void")
        balance = await cache_balance(hot, org)
        assert balance < 120_000

        # Revoke the admin key; the second time says so.
        status, _, r = await b.confirm(page + "/revoke", {"target": org.admin_key_id, "reason": "leaked"})
        assert r.headers["Location"].endswith("notice=revoke")
        assert not await ledger.api_key_active(org.id, org.admin_key_id)
        status, _, r = await b.confirm(page + "/revoke", {"target": org.admin_key_id, "reason": "leaked"})
        assert r.headers["Location"].endswith("notice=revoke_replayed")

        # Repair: the cache agrees with the ledger (plus what is unsettled): nothing to do, on record.
        status, _, r = await b.confirm(page + "/repair", {"reason": "support asked"})
        assert status == 303 and r.headers["Location"].endswith("notice=repair_clean")

        assert (await audit_of(migrated, org)) == [
            ("credits.grant", "applied"),
            ("credits.grant", "applied"),
            ("credits.grant", "replayed"),
            ("credits.adjust", "applied"),
            ("credits.adjust", "applied"),
            ("credits.adjust", "refused"),
            ("credits.adjust", "applied"),  # the repeat of a-1: applied once, answered again
            ("grant.void", "applied"),
            ("key.revoke", "applied"),
            ("key.revoke", "replayed"),
            ("cache.repair", "replayed"),
        ]
        actor = await owner_value(
            migrated, "SELECT DISTINCT actor FROM operator_audit WHERE organization_id = $1", uuid.UUID(org.id)
        )
        assert actor == f"operator:{email}"


async def test_bad_input_changes_nothing(console_client: Client, migrated: Config, org: Org) -> None:
    hot: HotPath = console_client.app[HOT]
    session, b, _ = await signed_in(console_client, migrated)
    async with session:
        page = f"/console/organizations/{org.id}"
        for form, said in (
            ({"amount": "10", "reason": ""}, "Reason: required"),
            ({"amount": "1.0001", "reason": "x"}, "to 0.001"),
            ({"amount": "-3", "reason": "x"}, "more than zero"),
            ({"amount": "3", "reason": "x", "priority": "high"}, "Priority"),
            ({"amount": "3", "reason": "x", "priority": "900", "confirmed": "yes"}, "priority is between 0 and 899"),
            ({"amount": "3", "reason": "x", "expires_at": "2001-01-01T00:00", "confirmed": "yes"}, "in the future"),
        ):
            status, text, _ = await b.post(page + "/grant", form)
            assert status == 400 and said in text, (form, text)
        status, text, _ = await b.post(page + "/void", {"target": "nope", "reason": "x"})
        assert status == 400 and "not an id" in text
        status, _, _ = await b.post(f"/console/organizations/{uuid.uuid4()}/grant", {"amount": "1", "reason": "x"})
        assert status == 404
        status, _, _ = await b.post(page + "/grant", {"amount": "5", "reason": "x", "confirmed": "yes"}, csrf=False)
        assert status == 403
        assert await cache_balance(hot, org) == 100_000


async def test_links_sessions_and_sign_out(console_client: Client, migrated: Config) -> None:
    session, b, _ = await signed_in(console_client, migrated)
    async with session:
        assert (await b.get("/console/enter/nope"))[0] == 400
        assert (await b.post("/console/enter/op1_" + "x" * 43, {}, csrf=False))[0] == 404
        assert (await b.get("/console/audit"))[0] == 200
        assert (await b.get("/console/audit.csv"))[0] == 200
        status, _, r = await b.post("/console/sign-out", {})
        assert status == 303 and r.headers["Location"] == "/console/sign-in"
        status, _, r = await b.get("/console/organizations")
        assert status == 303 and r.headers["Location"] == "/console/sign-in"
    _, entry = await new_operator(migrated)
    r = await console_client.post(entry, allow_redirects=False, headers={"Origin": "https://evil.example"})
    assert r.status == 403  # a link redeemed from another site's page
    for _ in range(2):  # fetching the link (a mail scanner) does not use it
        assert (await console_client.get(entry, allow_redirects=False)).status == 200
    assert (await console_client.post(entry, allow_redirects=False)).status == 303
    r = await console_client.post(
        "/console/sign-in", data={"email": "a@b.c", "password": "x" * 12}, headers={"Origin": "https://evil.example"}
    )
    assert r.status == 403  # a sign-in form posted from another site


async def test_a_failed_webhook_event_is_retried_from_the_health_page(
    console_client: Client, migrated: Config, org: Org
) -> None:
    event_id = f"evt_console_{uuid.uuid4().hex[:8]}"
    conn_value = await owner_value(
        migrated,
        "INSERT INTO stripe_events (id, organization_id, type, status, stripe_created, payload, attempts, last_error)"
        " VALUES ($1, $2, 'invoice.paid', 'failed', now(), '{}'::jsonb, 8, 'handler failed') RETURNING id",
        event_id,
        uuid.UUID(org.id),
    )
    assert conn_value == event_id
    from dataclasses import replace

    from settler.service import Settler

    settler = await Settler.open(replace(migrated, settler_port=0))
    try:
        await settler.reconcile()  # one round, as the settlers' periodic job runs it
    finally:
        await settler.close()
    session, b, _ = await signed_in(console_client, migrated)
    async with session:
        status, text, _ = await b.get("/console/health")
        assert status == 200 and event_id in text and "handler failed" in text
        assert "The settlers last reconciled" in text
        status, _, r = await b.post(f"/console/health/events/{org.id}/{event_id}/retry", {})
        assert status == 303 and r.headers["Location"] == "/console/health?notice=retry"
    state = await owner_value(migrated, "SELECT status FROM stripe_events WHERE id = $1", event_id)
    assert state in ("pending", "processing", "failed", "done")  # due again: the worker has it
    assert ("webhook.retry", "applied") in await audit_of(migrated, org)


async def test_usage_findings_are_listed_and_decided(console_client: Client, migrated: Config, org: Org) -> None:
    from ledger.settlement import Settlement
    from settler.anomalies import AnomalyDetector
    from tests.integration.test_anomalies import HOUR, METHOD, NOW, steady, traffic

    key = str(uuid.uuid4())
    await traffic(migrated, org.id, key, {**steady(5 * CREDIT, seed=9), HOUR: 300 * CREDIT})
    settlement = await Settlement.connect(migrated.settler_dsn(), min_size=1, max_size=1)
    try:
        assert await AnomalyDetector(settlement.pool, METHOD).scan(NOW) >= 2
    finally:
        await settlement.close()
    anomaly_id = str(
        await owner_value(
            migrated,
            "SELECT id FROM usage_anomalies WHERE organization_id = $1 AND scope = 'api_key'",
            uuid.UUID(org.id),
        )
    )
    session, b, _ = await signed_in(console_client, migrated)
    async with session:
        status, text, _ = await b.get("/console/anomalies")
        assert status == 200 and anomaly_id in text and key[:13] in text
        status, text, _ = await b.get(f"/console/organizations/{org.id}")
        assert status == 200 and "Usage findings" in text and f"API key {key}" in text
        status, _, r = await b.post(f"/console/anomalies/{org.id}/{anomaly_id}/acknowledged", {"note": "load test"})
        assert status == 303 and r.headers["Location"] == "/console/anomalies?notice=acknowledged"
        status, text, _ = await b.get("/console/anomalies?state=acknowledged")
        assert anomaly_id in text and "load test" in text
        assert (await b.get("/console/anomalies?state=bogus"))[0] == 400
    assert await owner_value(migrated, "SELECT state FROM usage_anomalies WHERE id = $1", uuid.UUID(anomaly_id)) == (
        "acknowledged"
    )
    assert ("anomaly.acknowledge", "applied") in await audit_of(migrated, org)


async def test_billing_serves_without_the_console_role_and_the_console_says_why(
    migrated: Config, billing_config: BillingConfig
) -> None:
    from dataclasses import replace

    from aiohttp.test_utils import TestClient, TestServer

    from billing.app import create_app
    from portal import console
    from portal.app import mount as mount_portal

    assert migrated.database_url is not None
    # A role the server refuses (with trust auth, a wrong password would still be let in).
    refused_dsn = migrated.console_dsn().replace("credits_console:", "credits_nobody:")
    wrong = replace(migrated, console_database_url=refused_dsn)
    async with TestClient(TestServer(create_app(wrong, billing_config, mounts=(mount_portal, console.mount)))) as c:
        assert (await c.get("/readyz")).status == 200  # billing itself runs
        assert (await c.get("/console/organizations", allow_redirects=False)).status == 303  # no cookie: no query
        r = await c.get(
            "/console/organizations", headers={"Cookie": "credits_console=" + "x" * 43}, allow_redirects=False
        )
        assert r.status == 503 and "CONSOLE_DB_PASSWORD" in await r.text()


async def test_an_operator_ends_their_other_sessions_only(console_client: Client, migrated: Config) -> None:
    import aiohttp
    import asyncpg

    from ledger.operators import OperatorAdmin
    from tests.e2e.console_support import OperatorBrowser

    first_http, first, email = await signed_in(console_client, migrated)
    _, someone_else, _ = await signed_in(console_client, migrated)
    async with first_http, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as second_http:
        conn = await asyncpg.connect(migrated.database_url)
        try:
            link = await OperatorAdmin(conn).link(email, created_by="test")
        finally:
            await conn.close()
        second = OperatorBrowser(second_http, first.base)
        assert (await second.post("/console/enter/" + link.token, {}, csrf=False))[0] == 303
        assert (await second.get("/console/organizations"))[0] == 200
        sessions = await owner_value(
            migrated,
            "SELECT array_agg(s.id ORDER BY s.created_at) FROM operator_sessions s JOIN operators o"
            " ON o.id = s.operator_id WHERE o.email = $1 AND s.revoked_at IS NULL",
            email,
        )
        mine, seconds = str(sessions[0]), str(sessions[1])
        status, text, _ = await first.get("/console/password")
        assert status == 200 and "This one" in text and text.count("/end") == 1
        assert (await first.post(f"/console/sessions/{mine}/end", {}))[0] == 400  # sign out instead
        others = await owner_value(
            migrated,
            "SELECT s.id FROM operator_sessions s JOIN operators o ON o.id = s.operator_id"
            " WHERE o.email <> $1 AND s.revoked_at IS NULL LIMIT 1",
            email,
        )
        status, _, r = await first.post(f"/console/sessions/{others}/end", {})
        assert status == 303 and r.headers["Location"].endswith("notice=session_gone")  # not theirs: untouched
        assert await owner_value(migrated, "SELECT revoked_at FROM operator_sessions WHERE id = $1", others) is None
        status, _, r = await first.post(f"/console/sessions/{seconds}/end", {})
        assert r.headers["Location"].endswith("notice=session_ended")
        status, _, r = await second.get("/console/organizations")
        assert status == 303 and r.headers["Location"] == "/console/sign-in"
        assert (await first.get("/console/organizations"))[0] == 200
    await someone_else.session.close()
    assert (
        await owner_value(
            migrated, "SELECT count(*) FROM operator_audit WHERE action = 'operator.session_end' AND actor = $1",
            f"operator:{email}",
        )
        == 1
    )  # fmt: skip


async def test_an_organizations_page_shows_a_paused_top_up_and_its_overrides(
    console_client: Client, migrated: Config, org: Org
) -> None:
    """What the features keep per organization reaches the console through its own read
    policies (migration 0033): a top-up paused by a declined card, the failed attempt,
    an entitlement override with its usage."""
    org_id = uuid.UUID(org.id)
    await owner_value(
        migrated,
        "WITH s AS (INSERT INTO auto_topup_settings (organization_id, enabled, threshold, package_id, max_per_month,"
        " monthly_cap_cents, armed, paused_reason) VALUES ($1, true, 25000, 'small', 3, 3000, false, 'card_declined')"
        " RETURNING 1), a AS (INSERT INTO auto_topup_attempts (id, organization_id, trigger_seq, package_id, credits,"
        " amount_cents, currency, available_at_trigger, status, failure_reason) VALUES (gen_random_uuid(), $1, 1,"
        " 'small', 100000, 990, 'usd', 20000, 'failed', 'card_declined') RETURNING 1),"
        " o AS (INSERT INTO organization_entitlements (organization_id, feature, type, limit_value, reason)"
        " VALUES ($1, 'projects', 'limit', 12, 'deal') RETURNING 1),"
        " u AS (INSERT INTO entitlement_usage (organization_id, feature, usage) VALUES ($1, 'projects', 4) RETURNING 1)"
        " SELECT (SELECT count(*) FROM s) + (SELECT count(*) FROM a)"
        " + (SELECT count(*) FROM o) + (SELECT count(*) FROM u)",
        org_id,
    )
    session, b, _ = await signed_in(console_client, migrated)
    async with session:
        status, text, _ = await b.get(f"/console/organizations/{org.id}")
    assert status == 200, text
    assert "buy small when available falls below 25 credits, at most 3 a month" in text
    assert "Paused: card declined" in text
    assert "100 credits for $9.90: failed (card declined)" in text
    assert "<code>projects</code>: 12 (used 4), deal" in text
