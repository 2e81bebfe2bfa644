"""Automatic top-up against localstripe and the real billing service: one top-up per
crossing however many clients and runners see it, granted once however often Stripe's
webhook arrives, stopped by its monthly cap, and stopped (with one topup.failed) by a
card that is declined or wants its holder."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from billing.appkeys import BILLING_CONFIG, CATALOG, CREDITS, GATEWAY, STORE
from billing.autotopup import AutoTopups, AutoTopupStore
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures", "tests.e2e.portal_support")

from tests.e2e.billing_fixtures import (  # noqa: E402
    DECLINED,
    VISA_3DS,
    Client,
    StripeDriver,
    call,
    deliver,
    make_event,
    wait_for,
    with_card,
)
from tests.e2e.portal_support import browser, portal_link  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures",)

CREDIT = 1000
T = "/api/billing/auto-topup"


def runner(client: Client, ledger: Ledger, hot: HotPath, *, cooldown_s: float = 3600.0) -> AutoTopups:
    """A top-up runner as a billing process runs one (any number may run at once)."""
    app = client.app
    return AutoTopups(
        AutoTopupStore(ledger),
        hot=hot,
        catalog=app[CATALOG],
        gateway=app[GATEWAY],
        credits=app[CREDITS],
        billing=app[STORE],
        interval_s=0,
        cooldown_s=cooldown_s,
    )


async def enable(client: Client, org: Org, **overrides: Any) -> dict[str, Any]:
    body = {
        "enabled": True,
        "threshold": 50,
        "package_id": "small",  # 100 credits for $9.90
        "max_per_month": 5,
        "monthly_cap_cents": 10_000,
        **overrides,
    }
    status, view = await call(client, "PUT", T, org, body)
    assert status == 200, view
    return dict(view)


async def available(hot: HotPath, org: Org) -> int:
    return int((await hot.balance(org.id)).payload["available"])


async def purchases(ledger: Ledger, org: Org) -> list[dict[str, Any]]:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT * FROM credit_grants WHERE source = 'purchase'")
    return [dict(r) for r in rows]


async def webhooks(ledger: Ledger, org: Org, kind: str) -> list[dict[str, Any]]:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT payload FROM webhook_deliveries WHERE event_type = $1", kind)
    return [json.loads(r["payload"]) for r in rows]


async def with_alert_url(ledger: Ledger, org: Org) -> None:
    """The organization's signed webhooks go to its alert URL (the settler sends them)."""
    await ledger.set_alert(org.id, threshold=0, webhook_url="http://127.0.0.1:9/hooks")


async def test_settings_are_validated_and_read_back(
    billing_client: Client, stripe_driver: StripeDriver, org: Org
) -> None:
    status, view = await call(billing_client, "GET", T, org)
    assert status == 200 and view["configured"] is False and view["attempts"] == []
    settings = {"enabled": True, "threshold": 50, "package_id": "small", "max_per_month": 5, "monthly_cap_cents": 1000}
    status, err = await call(billing_client, "PUT", T, org, settings)
    assert status == 409 and err["error"]["code"] == "customer_required"  # no customer, no card: nothing saved
    await with_card(billing_client, org, stripe_driver)
    for bad, param in (
        ({"package_id": "gigantic"}, "$.package_id"),
        ({"threshold": 0.0001}, "$.threshold"),
        ({"max_per_month": 0}, "$.max_per_month"),
        ({"monthly_cap_cents": -1}, "$.monthly_cap_cents"),
        ({"monthly_cap_cents": 10**19}, "$.monthly_cap_cents"),  # past what the ledger's bigint holds
        ({"threshold": 10**16}, "$.threshold"),
    ):
        status, err = await call(billing_client, "PUT", T, org, {**settings, **bad})
        assert status in (400, 404) and err["error"]["param"] == param, err
    view = await enable(billing_client, org, threshold=12.5)
    assert (view["configured"], view["enabled"], view["threshold"], view["package_id"]) == (True, True, 12.5, "small")
    status, _ = await call(billing_client, "PUT", T, org, settings, role="viewer")
    assert status == 403


async def test_a_burst_across_the_threshold_starts_one_top_up(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver)
    await with_alert_url(ledger, org)
    await enable(billing_client, org)
    runners = [runner(billing_client, ledger, hot) for _ in range(3)]

    async def consume() -> None:
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)

    async def ticking() -> None:
        for _ in range(5):
            await asyncio.gather(*(r.tick() for r in runners))

    # 60 clients take 60 of the 100 credits while three runners watch.
    await asyncio.gather(*(consume() for _ in range(60)), ticking())
    await asyncio.gather(*(r.tick() for r in runners))
    status, view = await call(billing_client, "GET", T, org)
    assert [a["status"] for a in view["attempts"]] == ["succeeded"], view
    attempt = view["attempts"][0]
    assert attempt["credits"] == 100 and attempt["amount_cents"] == 990 and attempt["available_at_trigger"] < 50
    [grant] = await purchases(ledger, org)
    assert grant["amount"] == 100 * CREDIT
    assert await available(hot, org) == 140 * CREDIT
    assert [e["type"] for e in await webhooks(ledger, org, "topup.succeeded")] == ["topup.succeeded"]
    # Stripe's webhook for the payment, delivered five times: granted once still.
    pi = await stripe_driver.request("GET", f"/v1/payment_intents/{attempt['payment_id']}")
    event = make_event("payment_intent.succeeded", pi)
    webhook_secret = billing_client.app[BILLING_CONFIG].stripe_webhook_secret
    assert webhook_secret is not None
    for _ in range(5):
        status, _ = await deliver(billing_client, webhook_secret, event)
        assert status == 200
    await wait_for(lambda: _processed(ledger, org, event["id"]), what="the webhook processed")
    assert len(await purchases(ledger, org)) == 1
    assert await available(hot, org) == 140 * CREDIT
    # Still above the threshold, and within the cooldown: nothing more.
    await asyncio.gather(*(r.tick() for r in runners))
    assert len(await AutoTopupStore(ledger).attempts(org.id)) == 1


async def _processed(ledger: Ledger, org: Org, event_id: str) -> bool:
    async with ledger.tenant(org.id) as conn:
        status = await conn.fetchval("SELECT status FROM stripe_events WHERE id = $1", event_id)
    return status == "done"


async def test_the_monthly_cap_stops_the_next_one(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver)
    await with_alert_url(ledger, org)
    await enable(billing_client, org, threshold=150, max_per_month=1)
    run = runner(billing_client, ledger, hot, cooldown_s=0)
    assert await run.tick() == 1  # 100 < 150: the first top-up
    assert await available(hot, org) == 200 * CREDIT
    await run.tick()  # back above the threshold: armed again (no cooldown here)
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=100)
    assert await run.tick() == 1  # a crossing, but the month's one top-up is spent
    for _ in range(3):
        assert await run.tick() == 0  # paused: nothing more, and no second topup.failed
    attempts = await AutoTopupStore(ledger).attempts(org.id)
    assert [(a.status, a.failure_reason) for a in attempts] == [("failed", "cap_reached"), ("succeeded", None)]
    assert len(await purchases(ledger, org)) == 1
    [failed] = await webhooks(ledger, org, "topup.failed")
    assert (failed["reason"], failed["max_per_month"]) == ("cap_reached", 1)
    _, view = await call(billing_client, "GET", T, org)
    assert view["paused_reason"] == "cap_reached"
    # Raising the cap (saving the settings) resumes them.
    await enable(billing_client, org, threshold=150, max_per_month=2)
    assert await run.tick() == 1
    assert len(await purchases(ledger, org)) == 2


@pytest.mark.parametrize(("card", "reason"), [(DECLINED, "card_declined"), (VISA_3DS, "authentication_required")])
async def test_a_card_that_fails_raises_topup_failed_once(
    billing_client: Client,
    stripe_driver: StripeDriver,
    org: Org,
    ledger: Ledger,
    hot: HotPath,
    card: str,
    reason: str,
) -> None:
    await with_card(billing_client, org, stripe_driver, card)
    await with_alert_url(ledger, org)
    await enable(billing_client, org, threshold=150)
    runners = [runner(billing_client, ledger, hot, cooldown_s=0) for _ in range(2)]
    for _ in range(3):
        await asyncio.gather(*(r.tick() for r in runners))
    attempts = await AutoTopupStore(ledger).attempts(org.id)
    assert [(a.status, a.failure_reason) for a in attempts] == [("failed", reason)]
    assert await purchases(ledger, org) == []
    assert await available(hot, org) == 100 * CREDIT
    [failed] = await webhooks(ledger, org, "topup.failed")
    assert failed["reason"] == reason and failed["attempt_id"] == attempts[0].id
    _, view = await call(billing_client, "GET", T, org)
    assert view["paused_reason"] == reason and view["attempts"][0]["reason"] == reason


async def test_the_portal_sets_it_and_shows_a_failure(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, ledger: Ledger, hot: HotPath
) -> None:
    await with_card(billing_client, org, stripe_driver, DECLINED)
    link = await portal_link(billing_client, org)
    async with browser(billing_client) as b:
        await b.enter(link["url"])
        status, html, _ = await b.get("/portal/buy")
        assert status == 200 and "Set up automatic top-up" in html
        form = {"enabled": "true", "threshold": "150", "package_id": "small", "max_per_month": "2",
                "monthly_cap": "50"}  # fmt: skip
        status, _, _ = await b.post("/portal/auto-topup", {**form, "threshold": "1.0001"})
        assert status == 400  # more precision than the ledger keeps: refused, nothing saved
        for cap in ("49.999", "-1", "1e20", "NaN"):
            status, _, _ = await b.post("/portal/auto-topup", {**form, "monthly_cap": cap})
            assert status == 400, cap  # dollars and cents only: refused, nothing saved
        status, html, _ = await b.get("/portal/buy")
        assert "Set up automatic top-up" in html
        status, _, _ = await b.post("/portal/auto-topup", form)
        assert status == 303
        await runner(billing_client, ledger, hot).tick()
        status, html, _ = await b.get("/portal/buy")
        assert "Automatic top-up is paused: your card was declined" in html
        assert "failed: card declined" in html
        cap = re.search(r'<input id="t-cap" name="monthly_cap"[^>]* value="([^"]*)"', html)
        assert cap and cap.group(1) == "50.00"  # shown back in dollars
    async with browser(billing_client) as viewer:
        await viewer.enter((await portal_link(billing_client, org, role="viewer"))["url"])
        status, html, _ = await viewer.get("/portal/buy")
        assert "paused" in html and "Save automatic top-up" not in html
        status, _, _ = await viewer.post("/portal/auto-topup", form)
        assert status == 403


async def test_one_organizations_settings_are_its_own(
    billing_client: Client, stripe_driver: StripeDriver, org: Org, other_org: Org
) -> None:
    """The organization is the credential's: another's key reads and sets only its own."""
    await with_card(billing_client, org, stripe_driver)
    await enable(billing_client, org, threshold=40)
    status, theirs = await call(billing_client, "GET", T, other_org)
    assert status == 200 and theirs["configured"] is False and theirs["attempts"] == []
    settings = {"enabled": False, "threshold": 5, "package_id": "small", "max_per_month": 1, "monthly_cap_cents": 0}
    status, saved = await call(billing_client, "PUT", T, other_org, settings)
    assert status == 200 and (saved["enabled"], saved["threshold"]) == (False, 5)  # its own, off
    status, err = await call(billing_client, "PUT", T, other_org, {**settings, "enabled": True})
    assert status == 409 and err["error"]["code"] == "customer_required"  # not the card of the other organization
    status, mine = await call(billing_client, "GET", T, org)
    assert (mine["enabled"], mine["threshold"]) == (True, 40)
