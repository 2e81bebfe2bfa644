"""How the pages write amounts and times (Jinja filters), and what every page knows
(the context processor): the session's role, its CSRF token, the navigation."""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from core.money import to_credits
from portal.context import CSRF_FIELD, SESSION

# The one navigation, named as the pages are.
NAV = (
    ("overview", "Overview"),
    ("usage", "Usage"),
    ("transactions", "Transactions"),
    ("plans", "Plans"),
    ("buy", "Buy credits"),
    ("payment-methods", "Payment methods"),
    ("invoices", "Invoices"),
    ("api-keys", "API keys"),
    ("departments", "Departments"),
    ("alerts", "Alerts"),
)


# What base.html and error.html name per web app (the ops console has its own).
PORTAL_FURNITURE = {
    "brand": "Billing portal",
    "nav_label": "Portal",
    "nav_base": "/portal/",
    "sign_out_action": "/portal/sign-out",
    "home_url": "/portal/overview",
    "home_label": "Go to the overview",
    "sign_in_url": "/portal/sign-in",
    "sign_in_label": "How to open the portal",
}


def credits(milli: int | None) -> str:
    """Millicredits as credits, grouped, exact: 1234500 -> '1,234.5'."""
    if milli is None:
        return "–"
    value = to_credits(milli)
    text = f"{value:,.3f}".rstrip("0").rstrip(".")
    return text


def signed_credits(milli: int) -> str:
    return ("+" if milli > 0 else "−" if milli < 0 else "") + credits(abs(milli))


def money(cents: int, currency: str = "usd") -> str:
    amount = decimal.Decimal(cents) / 100
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency.lower())
    return f"{symbol}{amount:,.2f}" if symbol else f"{amount:,.2f} {currency.upper()}"


def date(value: dt.datetime | None) -> str:
    return "–" if value is None else value.astimezone(dt.UTC).strftime("%-d %b %Y")


def datetime(value: dt.datetime | None) -> str:
    return "–" if value is None else value.astimezone(dt.UTC).strftime("%-d %b %Y, %H:%M UTC")


def isodate(value: str) -> str:
    """An API timestamp (ISO 8601, UTC) as the pages write dates."""
    return date(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))


def iso(value: dt.datetime | None) -> str:
    return "" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


FILTERS: dict[str, Callable[..., str]] = {
    "credits": credits,
    "signed_credits": signed_credits,
    "money": money,
    "date": date,
    "datetime": datetime,
    "iso": iso,
    "isodate": isodate,
}


def context(request: web.Request) -> dict[str, Any]:
    session = request.get(SESSION)
    is_admin = session is not None and session.role == "admin"
    return {
        **PORTAL_FURNITURE,
        "role_label": "Admin" if is_admin else "Viewer: read only",
        "nav": NAV,
        "session": session,
        "is_admin": is_admin,
        "csrf_field": CSRF_FIELD,
        "csrf_token": session.csrf_token if session is not None else "",
        "return_url": session.return_url if session is not None else None,
    }
