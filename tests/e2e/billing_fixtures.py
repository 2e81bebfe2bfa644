"""Billing test fixtures: a localstripe server the suite starts itself, the billing
service (create_app, with the customer portal mounted as ops mounts it) on a local
port with its webhook endpoint registered there, and a
`StripeDriver` that plays the parts the tests need from outside: the customer's browser
(Stripe.js: cards, 3-D Secure), Stripe's clock (renewals, period ends) and Stripe's
dashboard (refunds, disputes), plus a signer for hand-made webhook deliveries.

Test modules import the fixtures they use from here (tests/e2e/conftest.py is shared).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.auth import issue_jwt
from billing import config as billing_config_module
from billing.app import create_app
from billing.config import BillingConfig, StripeFlavor
from billing.localstripe import LocalStripe, LocalStripeKeys
from billing.runtime import WEBHOOK_PATH
from core.config import Config
from hotpath.client import HotPath
from ledger.store import Ledger
from portal.app import mount as mount_portal
from tests.conftest import JWT_SECRET, Org
from webhooks.signature import sign

Client = TestClient[Any, Any]
T = TypeVar("T")

VISA = "4242424242424242"
VISA_3DS = "4000002760003184"  # authentication required (EU card)
VISA_3DS_2 = "4000000000003220"  # authentication required (3DS2)
DECLINED = "4000000000000341"  # attaches, then every charge is declined
WAIT_S = 15.0


# -- servers --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    with LocalStripe() as server:
        yield server


@pytest.fixture(scope="session")
def stripe_keys(localstripe: LocalStripe) -> LocalStripeKeys:
    assert localstripe.keys is not None
    return localstripe.keys


@pytest.fixture(scope="session")
def billing_config(stripe_keys: LocalStripeKeys) -> BillingConfig:
    base = billing_config_module.load({})
    configured = base.with_stripe(
        api_base=stripe_keys.api_base,
        secret_key=stripe_keys.secret_key,
        webhook_secret=stripe_keys.webhook_secret,
        publishable_key=stripe_keys.publishable_key,
        flavor=StripeFlavor.LOCALSTRIPE,
    )
    # Automatic top-ups run when a test ticks them (tests/e2e/test_auto_topup.py), not on a timer.
    return replace(configured, webhook_sweep_interval_s=0.25, webhook_workers=2, auto_topup_interval_s=0)


@pytest.fixture(scope="session")
async def billing_client(
    migrated: Config, billing_config: BillingConfig, localstripe: LocalStripe
) -> AsyncIterator[Client]:
    server = TestServer(create_app(migrated, billing_config, mounts=(mount_portal,)))
    async with TestClient(server) as client:
        localstripe.register_webhook(str(server.make_url(WEBHOOK_PATH)))
        yield client


@pytest.fixture(scope="session")
async def stripe_driver(stripe_keys: LocalStripeKeys) -> AsyncIterator[StripeDriver]:
    driver = StripeDriver(stripe_keys)
    yield driver
    await driver.close()


# -- helpers --------------------------------------------------------------------------
def token(org: Org | str, role: str = "admin") -> str:
    org_id = org.id if isinstance(org, Org) else org
    return issue_jwt(JWT_SECRET, organization_id=org_id, subject=f"user-{org_id[:8]}", role=role)


def bearer(org: Org | str, role: str = "admin", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(org, role)}", **headers}


async def call(
    client: Client, method: str, path: str, org: Org | str, body: Any = None, *, role: str = "admin", **headers: str
) -> tuple[int, Any]:
    response = await client.request(method, path, json=body, headers=bearer(org, role, **headers))
    text = await response.text()
    return response.status, json.loads(text) if text else None


async def wait_for(check: Callable[[], Awaitable[T | None]], *, timeout_s: float = WAIT_S, what: str = "") -> T:
    """Poll until `check` returns something (webhooks arrive ~1 s after the action)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.1)


async def grants(ledger: Ledger, org: Org, source: str | None = None) -> list[dict[str, Any]]:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch(
            "SELECT * FROM credit_grants WHERE $1::text IS NULL OR source = $1 ORDER BY created_at", source
        )
    return [dict(r) for r in rows]


async def cache_balance(hot: HotPath, org: Org) -> int:
    """Millicredits in the cache (the hot path's view, what agents spend)."""
    result = await hot.balance(org.id)
    return int(result.payload["balance"])


async def billing_rows(ledger: Ledger, org: Org, table: str) -> list[dict[str, Any]]:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch(f"SELECT * FROM {table}")
    return [dict(r) for r in rows]


async def settled(ledger: Ledger, org: Org) -> bool:
    """Every stored webhook event of the organization has been processed."""
    async with ledger.tenant(org.id) as conn:
        pending = await conn.fetchval("SELECT count(*) FROM stripe_events WHERE status = 'pending'")
    return int(pending) == 0


async def events_of(ledger: Ledger, org: Org) -> list[dict[str, Any]]:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT id, type, status, attempts FROM stripe_events ORDER BY received_at")
    return [dict(r) for r in rows]


async def with_card(client: Client, org: Org, driver: StripeDriver, number: str = VISA) -> str:
    """The organization's customer, with a new card as its default; the card's id."""
    status, body = await call(client, "POST", "/api/billing/customer", org, {"email": f"billing@{org.id[:8]}.test"})
    assert status == 200, body
    pm = await driver.card(number)
    status, body = await call(
        client, "POST", "/api/billing/payment-methods", org, {"payment_method_id": pm, "set_default": True}
    )
    assert status == 201, body
    return pm


def make_event(kind: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    return {
        "id": f"evt_test_{uuid.uuid4().hex[:20]}",
        "object": "event",
        "type": kind,
        "created": created or int(time.time()),
        "api_version": "2017-08-15",
        "livemode": False,
        "data": {"object": obj},
    }


async def deliver(
    client: Client, secret: str, event: dict[str, Any] | bytes, *, timestamp: int | None = None
) -> tuple[int, Any]:
    """POST an event to the webhook endpoint, signed as Stripe signs it."""
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    response = await client.post(
        WEBHOOK_PATH,
        data=body,
        headers={"Stripe-Signature": sign(body, secret, timestamp=timestamp), "Content-Type": "application/json"},
    )
    return response.status, await response.json()


@dataclass
class StripeDriver:
    """Plays the browser, Stripe's clock and Stripe's dashboard against localstripe."""

    keys: LocalStripeKeys
    _session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, data: dict[str, Any] | None = None, **query: str) -> Any:
        form = _flatten(data or {})
        async with self.session.request(
            method,
            self.keys.api_base + path,
            data=form or None,
            params=query or None,
            headers={"Authorization": f"Bearer {self.keys.secret_key}"},
        ) as response:
            body = await response.json()
            assert response.status == 200, (response.status, body)
            return body

    async def card(self, number: str) -> str:
        pm = await self.request(
            "POST",
            "/v1/payment_methods",
            {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}},
        )
        return str(pm["id"])

    async def authenticate(self, payment_intent: str, client_secret: str, *, success: bool) -> dict[str, Any]:
        """The customer finishing (or failing) 3-D Secure in the browser (localstripe's hook)."""
        async with self.session.post(
            f"{self.keys.api_base}/v1/payment_intents/{payment_intent}/_authenticate",
            data={
                "client_secret": client_secret,
                "success": "true" if success else "false",
                "key": self.keys.publishable_key,
            },
        ) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 200, body
            return body

    async def renew(self, customer: str, subscription: str) -> dict[str, Any]:
        """Stripe's clock at the end of a period: the next invoice, charged to the
        default card (localstripe has no clock; its periods never advance)."""
        invoice = await self.request("POST", "/v1/invoices", {"customer": customer, "subscription": subscription})
        paid: dict[str, Any] = await self.request("POST", f"/v1/invoices/{invoice['id']}/pay")
        return paid

    async def end_subscription(self, subscription: str) -> dict[str, Any]:
        """Stripe's clock at the end of a period canceled at period end."""
        ended: dict[str, Any] = await self.request("DELETE", f"/v1/subscriptions/{subscription}")
        return ended

    async def refund(self, payment_intent: str, amount: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"payment_intent": payment_intent}
        if amount is not None:
            data["amount"] = amount
        refund: dict[str, Any] = await self.request("POST", "/v1/refunds", data)
        return refund

    async def charge_of(self, payment_intent: str) -> dict[str, Any]:
        pi = await self.request("GET", f"/v1/payment_intents/{payment_intent}")
        charge = pi["latest_charge"]
        charge_id = charge["id"] if isinstance(charge, dict) else charge
        found: dict[str, Any] = await self.request("GET", f"/v1/charges/{charge_id}")
        return found

    async def events(self, *, about: set[str]) -> list[dict[str, Any]]:
        """localstripe's event log, filtered to events naming one of `about`'s ids."""
        listed = await self.request("GET", "/v1/events", limit="100")
        found = []
        for event in listed["data"]:
            obj = event["data"]["object"]
            ids = {obj.get("id"), obj.get("customer"), obj.get("subscription"), obj.get("payment_intent")}
            if ids & about:
                found.append(event)
        return found


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}[{key}]" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out.update(_flatten({str(i): item}, name) if isinstance(item, dict) else {f"{name}[{i}]": str(item)})
        elif value is not None:
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def iso_to_epoch(value: str) -> int:
    return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
