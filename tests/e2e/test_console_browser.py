"""The ops console in a real browser (Playwright driving Debian's Chromium, as the
portal's tests do): an operator signs in with a one-time link, sets a password, signs
in with it, finds an organization, grants 250 credits with a reason (confirmed), sees
the balance, the ledger entry and the audit row; the same reference grants once; a
tenant's portal session opens no console page; a signed-out browser is redirected; a
form without the CSRF token is refused. Screenshots go to .data/screenshots/console/.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import pathlib
import uuid
from typing import Any

import pytest

from core.config import Config
from portal.format import credits as format_credits
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures", "tests.e2e.portal_support", "tests.e2e.console_support")

from tests.e2e.billing_fixtures import Client  # noqa: E402
from tests.e2e.console_support import new_operator, owner_value  # noqa: E402
from tests.e2e.portal_support import portal_link  # noqa: E402
from tests.e2e.test_portal_browser import Person  # noqa: E402

# chromium from the portal's browser tests, console_client from console_support
pytest_plugins = ("tests.e2e.billing_fixtures", "tests.e2e.test_portal_browser", "tests.e2e.console_support")
pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

SCREENSHOTS = pathlib.Path(__file__).resolve().parents[2] / ".data" / "screenshots" / "console"
PASSWORD = "a long console passphrase"
CREDIT = 1000


class Operator(Person):
    async def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{self.name}-{name}.png"), full_page=True)


async def open_person(chromium: Any, name: str) -> Operator:
    ctx = await chromium.new_context(viewport={"width": 1280, "height": 900})
    return Operator(ctx, await ctx.new_page(), name)


def nav(p: Person, label: str) -> Any:
    return p.page.get_by_role("navigation", name="Console").get_by_role("link", name=label, exact=True).click()


async def grant(p: Person, amount: str, reason: str, reference: str) -> None:
    page = p.page
    form = page.get_by_role("form", name="Grant credits")
    await form.get_by_label("Amount").fill(amount)
    await form.get_by_label("Reason").fill(reason)
    await form.get_by_label("Reference").fill(reference)
    await form.get_by_role("button", name="Review the grant").click()


async def test_an_operator_grants_credits_and_sees_them_everywhere(
    chromium: Any, console_client: Client, migrated: Config, org: Org
) -> None:
    from playwright.async_api import expect

    base = str(console_client.server.make_url("")).rstrip("/")
    email, entry = await new_operator(migrated)
    p = await open_person(chromium, "operator")
    try:
        page = p.page
        # Signed out: every console page sends the browser to the sign-in page (303).
        await page.goto(base + "/console/organizations")
        await expect(page).to_have_url(base + "/console/sign-in")
        await expect(page.get_by_role("heading", name="Sign in to the ops console", level=1)).to_be_visible()
        await p.shot("01-sign-in")

        # The one-time link: a session, then a password.
        await page.goto(base + entry)
        await p.shot("02-link")
        await page.get_by_role("button", name="Continue to the console").click()
        await expect(page).to_have_url(base + "/console/password?notice=signed_in")
        await expect(page.get_by_role("banner")).to_contain_text(email)
        await page.get_by_label("New password").fill(PASSWORD)
        await page.get_by_label("The same again").fill(PASSWORD)
        await page.get_by_role("button", name="Save password").click()
        await expect(page.get_by_role("status")).to_have_text("Password saved: you can sign in with it from now on.")
        await page.get_by_role("button", name="Sign out").click()
        await expect(page).to_have_url(base + "/console/sign-in")
        await page.goto(base + entry)  # a link works once
        await page.get_by_role("button", name="Continue to the console").click()
        await expect(page.get_by_text("has been used already")).to_be_visible()
        await p.shot("02-link-used")

        # A wrong password, then the right one.
        await page.goto(base + "/console/sign-in")
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Password", exact=True).fill("not the passphrase at all")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_contain_text("Wrong email or password")
        await page.get_by_label("Password", exact=True).fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("status")).to_have_text("Signed in.")

        # A few days of usage (generated, as settlement rolls it up), for the search and the chart.
        from settler.anomalies import hour_of
        from tests.integration.test_anomalies import steady, traffic

        now = hour_of(dt.datetime.now(dt.UTC))
        await traffic(migrated, org.id, org.admin_key_id, {**steady(2 * CREDIT, hours=72, seed=7, until=now), now: 0})
        spent = await owner_value(
            migrated, "SELECT sum(credits) FROM usage_hourly WHERE organization_id = $1", uuid.UUID(org.id)
        )

        # Find the organization by name, open it.
        org_name = await owner_value(migrated, "SELECT name FROM organizations WHERE id = $1", uuid.UUID(org.id))
        search = page.get_by_role("search", name="Find an organization")
        await search.get_by_label("Name or id").fill(org_name)
        await search.get_by_role("button", name="Search").click()
        found = page.get_by_role("region", name="Organizations found").get_by_role("row").filter(has_text=org_name)
        await expect(found).to_contain_text("100")
        await expect(found.get_by_role("cell").nth(5)).to_have_text(format_credits(spent))
        await p.shot("03-organizations")
        await found.get_by_role("link", name=org_name).click()
        await expect(page.get_by_role("heading", name=org_name, level=1)).to_be_visible()
        await expect(page.get_by_test_id("cache-balance")).to_have_text("100")
        await expect(page.get_by_role("img", name="Credits per day, stacked by action")).to_be_visible()
        datasets = await page.evaluate("() => window.Chart?.getChart('usage-chart')?.data.datasets.map(d => d.label)")
        assert datasets == ["generate_content"], p.problems

        # Grant 250 with a reason: a confirmation first, then the balance, the ledger and the audit.
        await grant(p, "250", "support ticket 42", "ticket-42")
        await expect(page.get_by_role("heading", name="Check, then confirm")).to_be_visible()
        await expect(page.get_by_test_id("confirm-amount")).to_have_text("+250 credits")
        await p.shot("04-confirm-grant")
        await page.get_by_role("button", name="Confirm: grant credits").click()
        await expect(page.get_by_role("status")).to_have_text("Credits granted.")
        await expect(page.get_by_test_id("cache-balance")).to_have_text("350")
        await expect(page.get_by_test_id("ledger-balance")).to_have_text("350")
        entry_row = page.get_by_role("region", name="Ledger entries").get_by_role("row").filter(has_text="ticket-42")
        await expect(entry_row).to_contain_text("+250")
        await expect(entry_row).to_contain_text("support ticket 42")
        recent = page.get_by_role("region", name="Recent operator actions").get_by_role("row").nth(1)
        await expect(recent).to_contain_text(f"operator:{email}")
        await expect(recent).to_contain_text("credits.grant")
        await expect(recent).to_contain_text("+250")
        await p.shot("05-granted")

        # The same reference again (a second submit): nothing more.
        await grant(p, "250", "support ticket 42", "ticket-42")
        await page.get_by_role("button", name="Confirm: grant credits").click()
        await expect(page.get_by_role("status")).to_have_text(
            "This reference was granted already: nothing more was granted."
        )
        await expect(page.get_by_test_id("cache-balance")).to_have_text("350")
        await expect(page.get_by_test_id("ledger-balance")).to_have_text("350")
        grants = await owner_value(
            migrated,
            "SELECT count(*) FROM credit_grants WHERE organization_id = $1 AND reference = 'ticket-42'",
            uuid.UUID(org.id),
        )
        assert grants == 1

        # The audit page: the row, filtered; the CSV.
        await nav(p, "Audit")
        await page.get_by_label("Organization id").fill(org.id)
        await page.get_by_role("button", name="Show").click()
        rows = page.get_by_role("region", name="Audit trail").get_by_role("row")
        await expect(rows.filter(has_text="applied").filter(has_text="credits.grant")).to_contain_text(
            "support ticket 42"
        )
        await expect(rows.filter(has_text="replayed")).to_contain_text("ticket-42")
        await p.shot("06-audit")
        async with page.expect_download() as download_info:
            await page.get_by_role("link", name="Download as CSV").click()
        download = await download_info.value
        text = await asyncio.to_thread(pathlib.Path(await download.path()).read_text)
        exported = list(csv.DictReader(io.StringIO(text)))
        assert [(r["action"], r["outcome"], r["amount"]) for r in exported] == [
            ("credits.grant", "replayed", "0"),
            ("credits.grant", "applied", "250"),
        ]
        assert exported[1]["actor"] == f"operator:{email}" and exported[1]["via"] == "console"

        await nav(p, "Health")
        await expect(page.get_by_role("region", name="Settlement per partition")).to_be_visible()
        await expect(page.get_by_role("heading", name="Reconciliation")).to_be_visible()
        await p.shot("07-health")

        # CSRF: a form without the session's token is refused, and grants nothing.
        await nav(p, "Organizations")
        await page.goto(base + f"/console/organizations/{org.id}")
        await page.locator('form[action$="/grant"] input[name="csrf_token"]').evaluate("e => e.remove()")
        await grant(p, "1000", "no token", "csrf-1")
        await expect(page.get_by_role("heading", name="Request refused")).to_be_visible()
        await p.shot("08-csrf-refused")
        forged = await p.context.request.post(
            base + f"/console/organizations/{org.id}/grant",
            form={"amount": "1000", "reason": "forged", "reference": "csrf-2", "confirmed": "yes"},
            max_redirects=0,
        )
        assert forged.status == 403
        await page.goto(base + f"/console/organizations/{org.id}")
        await expect(page.get_by_test_id("ledger-balance")).to_have_text("350")
        assert [x for x in p.problems if "status of 410" not in x] == []  # 410: the used link, on purpose
    finally:
        await p.context.close()


async def test_tenant_credentials_open_no_console_page(chromium: Any, console_client: Client, org: Org) -> None:
    from playwright.async_api import expect

    base = str(console_client.server.make_url("")).rstrip("/")
    link = await portal_link(console_client, org, role="admin")
    p = await open_person(chromium, "tenant")
    try:
        page = p.page
        await page.goto(link["url"])
        await expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        portal_cookie = next(c for c in await p.context.cookies() if c["name"] == "credits_portal")
        for path in ("/console", "/console/organizations", f"/console/organizations/{org.id}", "/console/audit"):
            await page.goto(base + path)
            await expect(page).to_have_url(base + "/console/sign-in")
        # The portal's cookie presented as the console's opens nothing either.
        await p.context.add_cookies(
            [{"name": "credits_console", "value": portal_cookie["value"], "url": base + "/console"}]
        )
        await page.goto(base + "/console/health")
        await expect(page).to_have_url(base + "/console/sign-in")
        await p.shot("tenant-refused")
        # Nor does the organization's API key or JWT.
        for header in (f"Bearer {org.admin_key}",):
            r = await console_client.get(
                "/console/organizations", headers={"Authorization": header}, allow_redirects=False
            )
            assert r.status == 303 and r.headers["Location"] == "/console/sign-in"
        posted = await console_client.post(
            f"/console/organizations/{org.id}/grant",
            data={"amount": "5", "reason": "tenant", "confirmed": "yes"},
            headers={"Authorization": f"Bearer {org.admin_key}"},
            allow_redirects=False,
        )
        assert posted.status == 401
    finally:
        await p.context.close()


async def test_an_operator_acknowledges_a_usage_finding(
    chromium: Any, console_client: Client, migrated: Config, org: Org
) -> None:
    from playwright.async_api import expect

    from ledger.settlement import Settlement
    from settler.anomalies import AnomalyDetector
    from tests.integration.test_anomalies import HOUR, METHOD, NOW, steady, traffic

    await traffic(migrated, org.id, org.admin_key_id, {**steady(4 * CREDIT, seed=11), HOUR: 250 * CREDIT})
    settlement = await Settlement.connect(migrated.settler_dsn(), min_size=1, max_size=1)
    try:
        assert await AnomalyDetector(settlement.pool, METHOD).scan(NOW) >= 2
    finally:
        await settlement.close()
    org_name = await owner_value(migrated, "SELECT name FROM organizations WHERE id = $1", uuid.UUID(org.id))
    base = str(console_client.server.make_url("")).rstrip("/")
    _, entry = await new_operator(migrated)
    p = await open_person(chromium, "anomalies")
    try:
        page = p.page
        await page.goto(base + entry)
        await page.get_by_role("button", name="Continue to the console").click()
        await nav(p, "Usage audit")
        findings = page.get_by_role("region", name="Usage findings").get_by_role("row").filter(has_text=org_name)
        await expect(findings).to_have_count(2)
        await expect(findings.filter(has_text="API key")).to_contain_text("250")
        await p.shot("01-usage-audit")
        await (
            page.get_by_role("button", name=f"Acknowledge the finding of {org_name}", exact=False)
            .filter(has_text="Acknowledge")
            .first.click()
        )
        await expect(page.get_by_role("status")).to_have_text("Finding acknowledged.")
        await expect(findings).to_have_count(1)
        await page.get_by_label("State").select_option("acknowledged")
        await page.get_by_role("button", name="Show").click()
        await expect(findings.first).to_contain_text("acknowledged")
        await p.shot("02-acknowledged")
        assert p.problems == []
    finally:
        await p.context.close()
