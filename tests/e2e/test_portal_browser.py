"""The customer portal in a real browser: Playwright for Python driving Debian's
Chromium against the billing service (with the portal), the sidecar, a real settler
and the local Stripe stand-in, clicking what a person clicks (elements found by role
and accessible name). A full-page screenshot of each page goes to
.data/screenshots/portal/ (git-ignored) for a person to look at.

Without a browser the tests skip, saying why; with CI set they fail instead, so CI
cannot pass by skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import os
import pathlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from billing.appkeys import HOT, LEDGER, PORTAL_SESSIONS
from core.config import Config
from settler.service import Settler
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures", "tests.e2e.portal_support")

from tests.e2e.billing_fixtures import VISA_3DS, Client, call, wait_for  # noqa: E402
from tests.e2e.portal_support import portal_link  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures",)
pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = pathlib.Path(__file__).resolve().parents[2] / ".data" / "screenshots" / "portal"
EXPECT_TIMEOUT_MS = 20_000  # webhooks arrive about a second after the action, settlement within one
MASTERCARD = "5555555555554444"
VISA = "4242424242424242"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
async def chromium() -> AsyncIterator[Any]:
    if not await asyncio.to_thread(CHROMIUM.exists):
        _unavailable(f"no browser at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def settler(migrated: Config) -> AsyncIterator[Settler]:
    """A real settler (the service, owning every partition) while the test runs."""
    running = await Settler.open(replace(migrated, settler_port=0))
    stop = asyncio.Event()
    task = asyncio.create_task(running.supervise(stop))
    try:
        yield running
    finally:
        stop.set()
        await task
        await running.close()


class Person:
    """One browser context (its own cookies), the page in it, what it logged."""

    def __init__(self, context: Any, page: Any, name: str) -> None:
        self.context = context
        self.page = page
        self.name = name
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))

    def _console(self, message: Any) -> None:
        text = message.text
        if message.type == "error" or "Content Security Policy" in text or "Refused to" in text:
            if "status of 40" in text:  # a refused form or request this test made on purpose
                return
            self.problems.append(f"console {message.type}: {text}")

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(SCREENSHOTS / f"{self.name}-{name}.png"), full_page=True)


@contextlib.asynccontextmanager
async def person(chromium: Any, name: str, **context: Any) -> AsyncIterator[Person]:
    ctx = await chromium.new_context(viewport=context.pop("viewport", {"width": 1280, "height": 900}), **context)
    try:
        yield Person(ctx, await ctx.new_page(), name)
    finally:
        await ctx.close()


async def nav(p: Person, label: str) -> None:
    await p.page.get_by_role("navigation", name="Portal").get_by_role("link", name=label, exact=True).click()
    await p.page.wait_for_load_state()


async def enter_card(p: Person, number: str) -> None:
    """Type a card into the card field (Stripe Elements; here its local stand-in)."""
    fields = p.page.locator("#card-element")
    await fields.get_by_role("textbox", name="number").fill(number)
    await fields.get_by_role("textbox", name="exp_month").fill("12")
    await fields.get_by_role("textbox", name="exp_year").fill("34")
    await fields.get_by_role("textbox", name="cvc").fill("123")
    await fields.get_by_role("textbox", name="postal_code").fill("10115")


def said(page: Any, text: str) -> Any:
    """The status message (a notice after a form, or a script's live region) saying `text`."""
    return page.get_by_role("status").filter(has_text=text)


async def balance_text(p: Person) -> str:
    await nav(p, "Overview")
    return str(await p.page.get_by_test_id("balance").inner_text())


async def test_an_admin_pays_subscribes_manages_and_sees_usage(
    chromium: Any, billing_client: Client, client: Client, settler: Settler, org: Org
) -> None:
    from playwright.async_api import expect

    link = await portal_link(billing_client, org, role="admin", return_url="https://platform.example/account")
    async with person(chromium, "admin") as p:
        page = p.page
        await page.goto(link["url"])
        await expect(page).to_have_url(str(billing_client.server.make_url("/portal/overview")))
        await expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        await expect(page.get_by_test_id("balance")).to_have_text("100")
        await expect(page.get_by_role("link", name="Back to your account")).to_have_attribute(
            "href", "https://platform.example/account"
        )
        await p.shot("01-overview")

        # Buy the Small package with a new card entered in Elements: 100 credits arrive.
        await nav(p, "Buy credits")
        await page.get_by_label("Billing email").fill("billing@acme.test")
        await page.get_by_role("button", name="Save billing details").click()
        await expect(page.get_by_role("group", name="Package")).to_be_visible()
        await p.shot("02-buy-empty")
        await page.get_by_role("radio", name="Small").check()
        await expect(page.get_by_role("radio", name="A new card")).to_be_checked()
        await enter_card(p, VISA)
        await page.get_by_role("button", name="Buy").click()
        status = page.get_by_role("status").filter(has_text="credits added")
        await expect(status).to_have_text("Payment received: 100 credits added. Balance: 200 credits.")
        await expect(page.locator("#balance-now")).to_have_text("200")
        await p.shot("03-buy-small-paid")

        # Medium with a card that needs 3-D Secure: Stripe.js's own flow, twice (saving, paying),
        # on the same page (a second purchase is a new one, not a replay of the first).
        await page.get_by_role("radio", name="Medium").check()
        await page.get_by_role("radio", name="A new card").check()
        await enter_card(p, VISA_3DS)
        await page.get_by_role("button", name="Buy").click()
        await page.get_by_role("button", name="Complete authentication").click()  # the card, when saved
        await page.get_by_role("button", name="Complete authentication").click()  # the payment
        await expect(page.get_by_role("status").filter(has_text="credits added")).to_have_text(
            "Payment received: 500 credits added. Balance: 700 credits."
        )
        await p.shot("04-buy-medium-3ds-paid")

        # Subscribe to Starter (default card): 500 credits.
        await nav(p, "Plans")
        await p.shot("05-plans-none")
        await page.get_by_role("button", name="Subscribe to Starter").click()
        await expect(said(page, "Subscribed")).to_be_visible()
        await expect(page.get_by_text("You are on Starter")).to_be_visible()
        await wait_for(lambda: _balance_is(p, "1,200"), what="Starter's 500 credits")
        await nav(p, "Plans")
        # Cancel at period end, then resume.
        await page.get_by_text("Cancel Starter…").click()
        await page.get_by_role("button", name="Cancel at the end of the period").click()
        await expect(said(page, "will end at the end of the current period")).to_be_visible()
        await p.shot("06-plans-cancelled")
        await page.get_by_role("button", name="Resume Starter").click()
        await expect(said(page, "will renew again")).to_be_visible()
        await expect(page.get_by_role("button", name="Upgrade to Professional")).to_be_visible()
        await p.shot("07-plans-resumed")
        status_code, sub = await call(billing_client, "GET", "/api/billing/subscription", org)
        assert status_code == 200 and sub["plan_id"] == "starter" and sub["cancel_at_period_end"] is False

        # A second card, then make it the default.
        await nav(p, "Payment methods")
        await enter_card(p, MASTERCARD)
        await page.get_by_role("checkbox", name="Make it the default card").uncheck()
        await page.get_by_role("button", name="Save card").click()
        await expect(said(page, "Card saved.")).to_be_visible()
        await page.get_by_role("button", name="Make the card ending 4444 the default").click()
        await expect(said(page, "Default card changed.")).to_be_visible()
        row = page.get_by_role("row").filter(has_text="ending 4444")
        await expect(row.get_by_text("Default", exact=True)).to_be_visible()
        await p.shot("08-payment-methods")
        _, methods = await call(billing_client, "GET", "/api/billing/payment-methods", org)
        assert [m["last4"] for m in methods["data"] if m["is_default"]] == ["4444"]

        # An API key: created (shown once), used with the sidecar, seen in usage after
        # settlement (chart, tables, CSV), revoked.
        await nav(p, "API keys")
        await page.get_by_label("Name").fill("research agents")
        await page.get_by_role("button", name="Create key").click()
        secret = await page.get_by_label("research agents (agent)").input_value()
        assert secret.startswith("ck_")
        await p.shot("09-api-key-created")
        for action, units in (("generate_content", 3), ("web_search", 2), ("generate_content", 1)):
            r = await client.post(
                "/api/credits/use",
                json={"action": action, "units": units},
                headers={"Authorization": f"Bearer {secret}"},
            )
            assert r.status == 200, await r.text()
        await nav(p, "API keys")
        await expect(page.get_by_text(secret)).to_have_count(0)  # never again
        await wait_for(lambda: _settled_usage(billing_client, org, 3), what="the key's usage settled")
        await nav(p, "Usage")
        by_action = page.get_by_role("region", name="Usage by action")
        await expect(by_action.get_by_role("row").filter(has_text="generate_content")).to_contain_text("4")
        await expect(page.get_by_role("region", name="Usage by API key")).to_contain_text("research agents")
        await expect(page.get_by_role("img", name="Credits per day, stacked by action")).to_be_visible()
        await p.shot("10-usage")
        datasets = await page.evaluate("() => window.Chart?.getChart('usage-chart')?.data.datasets.map(d => d.label)")
        assert datasets == ["generate_content", "web_search"], p.problems
        async with page.expect_download() as download_info:
            await page.get_by_role("link", name="Download the events as CSV").click()
        download = await download_info.value
        text = await asyncio.to_thread(pathlib.Path(await download.path()).read_text)
        rows = list(csv.DictReader(io.StringIO(text)))
        assert sorted((r["action"], r["units"], r["credits"]) for r in rows) == [
            ("generate_content", "1", "1"),
            ("generate_content", "3", "3"),
            ("web_search", "2", "1"),
        ]
        await nav(p, "API keys")
        prefix = secret[:10]
        await page.get_by_role("row").filter(has_text=prefix).get_by_text("Revoke…").click()
        await page.get_by_role("button", name=f"Revoke {prefix}…").click()
        await expect(said(page, "API key revoked")).to_be_visible()
        r = await client.post(
            "/api/credits/use", json={"action": "web_search"}, headers={"Authorization": f"Bearer {secret}"}
        )
        assert r.status == 401
        await p.shot("11-api-key-revoked")

        # Departments and their limits; alerts with a test event.
        await nav(p, "Departments")
        await page.get_by_label("Name").fill("research")
        await page.get_by_role("button", name="Create department").click()
        await page.get_by_label("Credits per period").fill("50")
        await page.get_by_label("Period", exact=True).select_option("week")
        await page.get_by_role("button", name="Save limit of research").click()
        await expect(said(page, "Department limit saved.")).to_be_visible()
        await expect(page.get_by_role("region", name="Departments and limits")).to_contain_text("50")
        await p.shot("12-departments")
        await nav(p, "Alerts")
        await page.get_by_label("Threshold").fill("10")
        await page.get_by_label("URL").fill("http://127.0.0.1:9/hooks/credits")
        await page.get_by_role("button", name="Save alert").click()
        assert (await page.get_by_role("textbox", name="Signing secret").input_value()).startswith("whsec_")
        await page.get_by_role("button", name="Send a test event").click()
        await expect(said(page, "test event is on its way")).to_be_visible()
        await p.shot("13-alerts")

        for label, shot in (("Transactions", "14-transactions"), ("Invoices", "15-invoices")):
            await nav(p, label)
            await p.shot(shot)
        await expect(page.get_by_role("region", name="Invoices")).to_contain_text("paid")
        await nav(p, "Transactions")
        await page.get_by_label("Type").select_option("grant")
        await page.get_by_role("button", name="Show").click()
        await expect(page.get_by_role("region", name="Ledger entries")).to_contain_text("purchase:pi_")
        await nav(p, "Overview")
        await expect(page.get_by_text("Starter")).to_be_visible()
        await p.shot("16-overview-after")
        assert p.problems == []


async def _balance_is(p: Person, text: str) -> bool:
    return await balance_text(p) == text


async def _settled_usage(billing_client: Client, org: Org, events: int) -> bool:
    async with billing_client.app[LEDGER].tenant(org.id) as conn:
        n = await conn.fetchval("SELECT count(*) FROM usage_events")
    return int(n) >= events


async def test_a_phone_and_a_keyboard_can_use_it(chromium: Any, billing_client: Client, org: Org) -> None:
    from playwright.async_api import expect

    link = await portal_link(billing_client, org, role="viewer")
    async with person(chromium, "phone", viewport={"width": 390, "height": 844}, is_mobile=True) as p:
        page = p.page
        await page.goto(link["url"])
        for label, name in (("Overview", "overview"), ("Usage", "usage"), ("Plans", "plans"), ("API keys", "keys")):
            await nav(p, label)
            overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (label, overflow)  # nothing wider than the phone (tables scroll inside)
            await p.shot(f"{name}")
        # keyboard: the skip link comes first and lands on the content; the navigation follows
        await nav(p, "Overview")
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("main")).to_be_focused()
        await page.keyboard.press("Shift+Tab")  # from the content, back to the navigation's last link
        await expect(page.get_by_role("link", name="Alerts")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Alerts", level=1)).to_be_visible()
        assert p.problems == []


async def test_what_the_portal_refuses(
    chromium: Any, billing_client: Client, org: Org, other_org: Org, stripe_driver: Any
) -> None:
    from playwright.async_api import expect

    from accounts import admin
    from tests.e2e.billing_fixtures import with_card

    pm = await with_card(billing_client, org, stripe_driver)
    their_key = await admin.create_key(billing_client.app[LEDGER], billing_client.app[HOT], other_org.id, role="agent")
    viewer = await portal_link(billing_client, org, role="viewer")
    async with person(chromium, "refused") as p:
        page = p.page
        # a viewer sees the packages but cannot pay, even by posting the form itself
        await page.goto(viewer["url"])
        await nav(p, "Buy credits")
        await expect(page.get_by_text("You are signed in as a viewer")).to_be_visible()
        await expect(page.get_by_role("button", name="Buy")).to_have_count(0)
        await p.shot("viewer-buy")
        answer = await page.evaluate(
            """async (pm) => {
                const csrf = document.querySelector('meta[name="csrf-token"]').content;
                const r = await fetch('/portal/buy', {method: 'POST', headers: {'Content-Type': 'application/json',
                  'Accept': 'application/json', 'X-CSRF-Token': csrf, 'Idempotency-Key': 'portal-viewer-pays'},
                  body: JSON.stringify({package_id: 'small', payment_method_id: pm})});
                return [r.status, (await r.json()).error.code];
            }""",
            pm,
        )
        assert answer == [403, "forbidden"]
        # a session of one organization cannot reach another's objects
        answer = await page.evaluate(
            """async (key) => {
                const csrf = document.querySelector('meta[name="csrf-token"]').content;
                const body = new URLSearchParams({csrf_token: csrf});
                const r = await fetch(`/portal/api-keys/${key}/revoke`, {method: 'POST', body});
                return r.status;
            }""",
            their_key.id,
        )
        assert answer in (403, 404)  # a viewer is refused first; test_portal_http covers an admin (404)
        # a form without the CSRF token is refused
        admin_link = await portal_link(billing_client, org, role="admin")
        await page.goto(admin_link["url"])
        await nav(p, "Departments")
        await page.locator('form[action="/portal/departments"] input[name="csrf_token"]').evaluate("e => e.remove()")
        await page.get_by_label("Name").fill("no-token")
        await page.get_by_role("button", name="Create department").click()
        await expect(page.get_by_role("heading", name="Request refused")).to_be_visible()
        await p.shot("csrf-refused")
        # the same link again, a tampered one, an expired one
        await page.goto(admin_link["url"])
        await expect(page.get_by_text("This link has been used already")).to_be_visible()
        await p.shot("link-reused")
        token = admin_link["url"].rsplit("/", 1)[1]
        await page.goto(admin_link["url"].rsplit("/", 1)[0] + "/" + token[:-3] + "abc")
        await expect(page.get_by_text("This link has been changed since it was made")).to_be_visible()
        sessions = billing_client.app[PORTAL_SESSIONS]
        fresh = await portal_link(billing_client, org)
        expired = sessions.sign(org.id, fresh["id"], dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5))
        await page.goto(admin_link["url"].rsplit("/", 1)[0] + "/" + expired)
        await expect(page.get_by_text("This link has expired")).to_be_visible()
        await p.shot("link-expired")
    async with person(chromium, "stranger") as p:  # no session at all
        await p.page.goto(str(billing_client.server.make_url("/portal/usage")))
        await expect(p.page.get_by_role("heading", name="Open the portal")).to_be_visible()
        await p.shot("sign-in")
        # another organization's link opens that organization only
        theirs = await portal_link(billing_client, other_org, role="viewer")
        await p.page.goto(theirs["url"])
        await nav(p, "API keys")
        await expect(p.page.get_by_role("region", name="API keys")).to_contain_text(their_key.prefix)
    assert shutil.which(str(CHROMIUM)) is not None


async def test_a_plan_whose_first_payment_needs_3ds(
    chromium: Any, billing_client: Client, org: Org, stripe_driver: Any
) -> None:
    from playwright.async_api import expect

    from tests.e2e.billing_fixtures import VISA_3DS_2, with_card

    await with_card(billing_client, org, stripe_driver, VISA_3DS_2)
    link = await portal_link(billing_client, org, role="admin")
    async with person(chromium, "plan-3ds") as p:
        page = p.page
        await page.goto(link["url"])
        await nav(p, "Plans")
        await page.get_by_role("button", name="Subscribe to Starter").click()
        await expect(page.get_by_role("heading", name="Confirm your card")).to_be_visible()
        await p.shot("01-plans-confirm")
        await page.get_by_role("button", name="Confirm the payment").click()
        await page.get_by_role("button", name="Complete authentication").click()
        await expect(said(page, "Subscribed")).to_be_visible()
        await wait_for(lambda: _balance_is(p, "600"), what="Starter's 500 credits after 3-D Secure")
        await nav(p, "Plans")
        await expect(page.get_by_text("You are on Starter")).to_be_visible()
        await p.shot("02-plans-active")
        assert p.problems == []
