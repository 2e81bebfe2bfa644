"""The portal's pages (GET): each reads through the doors the API reads through and
hands a template a dict, as the API handler next to it hands msgspec a Struct."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
import msgspec
from aiohttp import web

from api.errors import ApiError, invalid
from billing.appkeys import BILLING_CONFIG, PORTAL_SESSIONS
from billing.handlers import auto_topup_view, payment_view
from billing.portal_sessions import ENTRY_PATH
from billing.store import PAGE_LIMIT_MAX, InvalidCursor, PaymentMethodRow
from core.money import to_credits
from hotpath.client import period_bounds
from ledger.store import ApiKeyRow, Department, SummaryRow, UsageRow
from lua import Status
from meter import schemas as credit_schemas
from portal import format
from portal.context import COOKIE, Portal
from portal.format import credits
from portal.security import is_tls, secure_headers

TRANSACTIONS_PER_PAGE = 50
EVENTS_PER_PAGE = 25
HISTORY_PER_PAGE = 20
DEPARTMENTS_SHOWN_MAX = 100
USAGE_RANGE_DAYS_MAX = 366
HOURLY_RANGE_DAYS_MAX = 2  # a range this short is charted per hour
CSV_PAGE_ROWS = 1000
CSV_ROWS_MAX = 1_000_000  # one download's bound; narrow the range for more
RECENT_DAYS = 30
CAPTURE_LABEL = "reservation"  # a capture whose reservation named no action
CSV_COLUMNS = ("id", "kind", "created_at", "action", "units", "credits", "department_id", "department", "metadata")
LEDGER_TYPES = ("grant", "usage", "reservation_capture", "expiration", "adjustment", "refund")

Page = Callable[[web.Request], Awaitable[dict[str, Any]]]


_PAGES: dict[str, tuple[str, str, Page]] = {}  # template -> (page name, title, context)


def page(template: str, name: str, title: str) -> Callable[[Page], Callable[[web.Request], Awaitable[web.Response]]]:
    """A handler that returns a dict, rendered into `template` with the page's name
    (its <body> class and the current navigation link) and title."""

    def wrap(fn: Page) -> Callable[[web.Request], Awaitable[web.Response]]:
        _PAGES[template] = (name, title, fn)

        async def handler(request: web.Request) -> web.Response:
            return await render_page(request, template)

        handler.__name__ = fn.__name__
        return handler

    return wrap


async def render_page(request: web.Request, template: str, **extra: Any) -> web.Response:
    """A page as its GET shows it, plus what a form's answer adds (a secret shown once)."""
    name, title, fn = _PAGES[template]
    ctx = await fn(request)
    return aiohttp_jinja2.render_template(
        template, request, {**format.context(request), "page": name, "title": title, **ctx, **extra}
    )


def new_key() -> str:
    """An idempotency key for one rendering of a form: submitting it twice acts once."""
    return "portal-" + uuid.uuid4().hex


NOTICES = {
    "customer": "Billing details saved.",
    "subscribed": "Subscribed. The plan's credits arrive as soon as its first invoice is paid.",
    "plan_changed": "Plan changed.",
    "cancelled": "Your subscription will end at the end of the current period.",
    "resumed": "Your subscription will renew again.",
    "card_added": "Card saved.",
    "card_default": "Default card changed.",
    "card_removed": "Card removed.",
    "key_revoked": "API key revoked: it is refused from now on.",
    "department": "Department created.",
    "limit": "Department limit saved.",
    "alert_deleted": "Alert removed.",
    "alert_test": "A test event is on its way to your alert URL (signed, like a real alert).",
    "purchase": "Payment received: the credits are in your balance.",
    "auto_topup": "Automatic top-up saved.",
}


def notice(request: web.Request) -> str | None:
    return NOTICES.get(request.query.get("notice", ""))


# -- getting in ----------------------------------------------------------------------
async def enter(request: web.Request) -> web.StreamResponse:
    """Redeem a portal link once: set the session cookie, leave the token behind."""
    started = await request.config_dict[PORTAL_SESSIONS].redeem(request.match_info["token"])
    billing = request.config_dict[BILLING_CONFIG]
    response = web.HTTPSeeOther("/portal/overview")
    response.set_cookie(
        COOKIE,
        started.cookie,
        path="/portal",
        httponly=True,
        secure=is_tls(request),
        samesite=billing.portal_cookie_samesite,
        max_age=int((started.session.expires_at - dt.datetime.now(dt.UTC)).total_seconds()),
    )
    response.headers["Referrer-Policy"] = "no-referrer"  # the token must not travel on
    raise response


@page("sign_in.html", "sign-in", "Open the portal")
async def sign_in(request: web.Request) -> dict[str, Any]:
    return {"notice": "You are signed out." if request.query.get("signed_out") else None}


# -- overview ------------------------------------------------------------------------
async def balance_of(p: Portal) -> dict[str, Any]:
    result = await p.hot.balance(p.org, p.cred.id)
    if result.status is not Status.OK:
        raise ApiError(503, "unavailable", f"the balance could not be read ({result.status.name})")
    payload = result.payload
    grants = payload["grants"]
    sources = await p.ledger.grant_sources(p.org, [g["id"] for g in grants])
    return {
        "balance": int(payload["balance"]),
        "reserved": int(payload["reserved"]),
        "available": int(payload["available"]),
        "credit_limit": int(payload.get("credit_limit") or 0),  # a credit line (set by operations)
        "debt": int(payload.get("debt") or 0),
        "grants": [
            {
                "id": g["id"],
                "source": sources.get(g["id"], "unknown"),
                "remaining": int(g["remaining"]),
                "expires_at": dt.datetime.fromtimestamp(int(g["expires_ms"]) / 1000, dt.UTC)
                if int(g["expires_ms"])
                else None,
            }
            for g in grants
        ],
    }


@page("overview.html", "overview", "Overview")
async def overview(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    now = dt.datetime.now(dt.UTC)
    bal = await balance_of(p)
    daily = await p.reads.usage_summary(p.org, start=now - dt.timedelta(days=RECENT_DAYS), end=now, group_by="day")
    spent_30d = sum(r.credits for r in daily)
    # The recent rate: over the days since the first day with usage in the window (an
    # organization a day old has not been spending for thirty).
    first = dt.date.fromisoformat(daily[0].key) if daily else now.date()
    per_day = spent_30d / ((now.date() - first).days + 1)
    sub = await p.store.current_subscription(p.org)
    plan = await p.catalog.plan(sub.plan_id) if sub is not None and sub.plan_id else None
    return {
        **bal,
        "spent_30d": spent_30d,
        # spending stops at minus the credit line, not at zero
        "days_left": max(0, int((bal["available"] + bal["credit_limit"]) / per_day)) if per_day > 0 else None,
        "per_day": round(per_day),
        "subscription": sub if sub is not None and not sub.terminal else None,
        "plan": plan,
    }


async def balance_json(request: web.Request) -> web.Response:
    """The balance for the page's script (credits arriving after a payment)."""
    p = Portal.of(request)
    bal = await balance_of(p)
    return web.json_response(
        {k: str(to_credits(bal[k])) for k in ("balance", "reserved", "available")}
        | {"balance_text": credits(bal["balance"]), "available_text": credits(bal["available"])}
    )


# -- usage ---------------------------------------------------------------------------
class UsageFilters(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    from_: dt.date | None = msgspec.field(name="from", default=None)
    to: dt.date | None = None
    action: credit_schemas.Action | None = None
    department_id: credit_schemas.DepartmentId | None = None
    starting_after: credit_schemas.Identifier | None = None


def usage_filters(request: web.Request) -> tuple[UsageFilters, dt.datetime, dt.datetime]:
    raw = {k: v for k, v in request.query.items() if v != ""}
    try:
        f = msgspec.convert(raw, UsageFilters, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid(f"the filter is not valid: {exc}") from None
    today = dt.datetime.now(dt.UTC).date()
    last = f.to or today
    first = f.from_ or last - dt.timedelta(days=RECENT_DAYS - 1)
    if first > last:
        raise invalid("the range starts after it ends", "from")
    if (last - first).days + 1 > USAGE_RANGE_DAYS_MAX:
        raise invalid(f"choose a range of at most {USAGE_RANGE_DAYS_MAX} days", "from")
    start = dt.datetime.combine(first, dt.time(), dt.UTC)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC)
    return msgspec.structs.replace(f, from_=first, to=last), start, end


def buckets(start: dt.datetime, end: dt.datetime, hourly: bool) -> list[str]:
    step = dt.timedelta(hours=1) if hourly else dt.timedelta(days=1)
    out = []
    t = start
    while t < end:
        out.append(t.strftime("%Y-%m-%dT%H:00:00Z") if hourly else t.strftime("%Y-%m-%d"))
        t += step
    return out


def chart(rows: list[SummaryRow], labels: list[str], hourly: bool) -> dict[str, Any]:
    """Credits per bucket, one series per action: what the chart draws."""
    actions = sorted({r.sub_key for r in rows})
    index = {label: i for i, label in enumerate(labels)}
    series = {a: [0.0] * len(labels) for a in actions}
    for r in rows:
        i = index.get(r.key)
        if i is not None:
            series[r.sub_key][i] += float(to_credits(r.credits))
    return {
        "unit": "hour" if hourly else "day",
        "labels": [label[11:16] + " " + label[5:10] if hourly else label for label in labels],
        "datasets": [{"label": a or CAPTURE_LABEL, "data": series[a]} for a in actions],
    }


def key_label(credential_id: str, keys: dict[str, ApiKeyRow]) -> str:
    key = keys.get(credential_id)
    if key is not None:
        return f"{key.name or 'unnamed'} ({key.prefix}…)"
    if credential_id.startswith("jwt:"):
        return f"frontend user {credential_id[4:]}"
    return credential_id or "–"


def dept_label(department_id: str | None, depts: dict[str, Department]) -> str:
    if not department_id:
        return "No department"
    dept = depts.get(department_id)
    return dept.name if dept is not None else department_id


@page("usage.html", "usage", "Usage")
async def usage(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    f, start, end = usage_filters(request)
    hourly = (end - start).days <= HOURLY_RANGE_DAYS_MAX
    common: dict[str, Any] = {"start": start, "end": end, "action": f.action, "department_id": f.department_id}
    series = await p.reads.usage_summary(p.org, group_by="hour" if hourly else "day", then_by="action", **common)
    by_action = await p.reads.usage_summary(p.org, group_by="action", **common)
    by_dept = await p.reads.usage_summary(p.org, group_by="department", **common)
    by_key = await p.reads.usage_summary(p.org, group_by="api_key", **common)
    try:
        events, more = await p.reads.usage(
            p.org,
            start=start,
            end=end,
            department_id=f.department_id,
            action=f.action,
            limit=EVENTS_PER_PAGE,
            starting_after=f.starting_after,
        )
    except LookupError:
        raise invalid("that page of events no longer exists; start again", "starting_after") from None
    depts = {d.id: d for d in await p.ledger.departments(p.org)}
    keys = {k.id: k for k in await p.ledger.api_keys(p.org)}
    actions = sorted({c.action for c in await p.ledger.costs(p.org)} | {r.key for r in by_action if r.key})
    chosen = (("from", f.from_), ("to", f.to), ("action", f.action), ("department_id", f.department_id))
    query = {k: v for k, v in chosen if v}
    return {
        "filters": f,
        "hourly": hourly,
        "chart": chart(series, buckets(start, end, hourly), hourly),
        "total": sum(r.credits for r in by_action),
        "events_count": sum(r.events for r in by_action),
        "by_action": [(r.key or CAPTURE_LABEL, r) for r in by_action],
        "by_dept": [(dept_label(r.key, depts), r) for r in by_dept],
        "by_key": [(key_label(r.key, keys), r) for r in by_key],
        "events": [(e, dept_label(e.department_id, depts)) for e in events],
        "more": more,
        "next_after": events[-1].id if more and events else None,
        "actions": actions,
        "departments": list(depts.values()),
        "query": query,
    }


def _csv_cell(value: object) -> str:
    """A cell a spreadsheet shows as text: a leading = + - @ would start a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def usage_csv(request: web.Request) -> web.StreamResponse:
    """The events (and captures) of the range, oldest last, in pages of the ledger."""
    p = Portal.of(request)
    f, start, end = usage_filters(request)
    depts = {d.id: d for d in await p.ledger.departments(p.org)}
    name = f"usage-{f.from_}-{f.to}.csv"
    response = web.StreamResponse(
        headers={"Content-Type": "text/csv; charset=utf-8", "Content-Disposition": f'attachment; filename="{name}"'}
    )
    secure_headers(request, response)
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    after: str | None = None
    written = 0
    while written < CSV_ROWS_MAX:
        rows: list[UsageRow]
        rows, more = await p.reads.usage(
            p.org,
            start=start,
            end=end,
            department_id=f.department_id,
            action=f.action,
            limit=min(CSV_PAGE_ROWS, CSV_ROWS_MAX - written),
            starting_after=after,
        )
        for r in rows:
            writer.writerow(
                [
                    _csv_cell(c)
                    for c in (
                        r.id,
                        r.kind,
                        r.created_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                        r.action,
                        r.units,
                        to_credits(r.credits),
                        r.department_id or "",
                        dept_label(r.department_id, depts) if r.department_id else "",
                        r.metadata,
                    )
                ]
            )
        written += len(rows)
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        if not more or not rows:
            break
        after = rows[-1].id
    await response.write_eof()
    return response


# -- transactions ----------------------------------------------------------------------
@page("transactions.html", "transactions", "Transactions")
async def transactions(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    type_ = request.query.get("type") or None
    if type_ is not None and type_ not in LEDGER_TYPES:
        raise invalid(f"type must be one of {', '.join(LEDGER_TYPES)}", "type")
    after_raw = request.query.get("starting_after") or None
    if after_raw is not None and not (after_raw.isdigit() and len(after_raw) < 19):
        raise invalid("starting_after must be a transaction id", "starting_after")
    rows, more = await p.reads.transactions(
        p.org, type_=type_, limit=TRANSACTIONS_PER_PAGE, starting_after=int(after_raw) if after_raw else None
    )
    return {
        "rows": rows,
        "more": more,
        "type": type_,
        "types": LEDGER_TYPES,
        "next_after": rows[-1].id if more and rows else None,
        "paged": after_raw is not None,
    }


# -- plans -----------------------------------------------------------------------------
@page("plans.html", "plans", "Plans")
async def plans(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    catalog = await p.catalog.plans()
    sub = await p.store.current_subscription(p.org)
    live = sub if sub is not None and not sub.terminal else None
    current = next((pl for pl in catalog if live is not None and pl.id == live.plan_id), None)
    customer = await p.store.customer(p.org)
    choices = []
    for pl in catalog:
        if live is None:
            direction = "subscribe"
        elif current is not None and pl.id == current.id:
            direction = "current"
        elif current is None or (pl.credits, pl.price_cents) > (current.credits, current.price_cents):
            direction = "upgrade"  # the rule billing.actions.change_plan applies
        else:
            direction = "downgrade"
        extra = pl.credits - current.credits if current is not None and direction == "upgrade" else 0
        choices.append({"plan": pl, "direction": direction, "extra_credits": extra})
    return {
        "plans": choices,
        "subscription": live,
        "current": current,
        "has_card": customer is not None and customer.default_payment_method_id is not None,
        "has_customer": customer is not None and customer.stripe_customer_id is not None,
        "idempotency_key": new_key(),
        "notice": notice(request),
        "client_secret": None,
        "rollover": p.billing.plan_credits_rollover,
        "stripe_key": p.billing.stripe_publishable_key,
        "stripe_js_url": p.billing.stripe_js_url,
    }


# -- buying credits ----------------------------------------------------------------------
async def _cards(p: Portal) -> tuple[list[PaymentMethodRow], str | None]:
    return await p.actions.payment_methods(p.org)


@page("buy.html", "buy", "Buy credits")
async def buy(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    cards, default_id = await _cards(p)
    customer = await p.store.customer(p.org)
    bal = await balance_of(p)
    payment = None
    payment_id = request.query.get("payment")
    if payment_id:
        try:
            payment = payment_view(await p.actions.payment(p.org, payment_id, refresh=True))
        except ApiError:
            payment = None
    return {
        "packages": await p.catalog.packages(),
        "cards": cards,
        "default_id": default_id,
        "has_customer": customer is not None and customer.stripe_customer_id is not None,
        "balance": bal["balance"],
        "available": bal["available"],
        "idempotency_key": new_key(),
        "stripe_key": p.billing.stripe_publishable_key,
        "stripe_js_url": p.billing.stripe_js_url,
        "payment": payment,
        "notice": notice(request),
        "auto_topup": await auto_topup_view(p.ledger, p.org),
    }


async def payment_json(request: web.Request) -> web.Response:
    """One payment, refreshed from Stripe until final (and granted if it succeeded)."""
    p = Portal.of(request)
    payment_id = request.match_info["payment_id"]
    view = payment_view(await p.actions.payment(p.org, payment_id, refresh=True))
    return web.Response(body=msgspec.json.encode(view), content_type="application/json")


# -- payment methods ---------------------------------------------------------------------
@page("payment_methods.html", "payment-methods", "Payment methods")
async def payment_methods(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    cards, default_id = await _cards(p)
    customer = await p.store.customer(p.org)
    return {
        "cards": cards,
        "default_id": default_id,
        "customer": customer if customer is not None and customer.stripe_customer_id else None,
        "idempotency_key": new_key(),
        "stripe_key": p.billing.stripe_publishable_key,
        "stripe_js_url": p.billing.stripe_js_url,
        "notice": notice(request),
    }


# -- invoices and payments ---------------------------------------------------------------
def _cursor(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name) or None
    if raw is not None and (len(raw) > 255 or not raw.replace("_", "").isalnum()):
        raise invalid(f"{name} is not an id", name)
    return raw


@page("invoices.html", "invoices", "Invoices")
async def invoices(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    inv_after = _cursor(request, "invoices_after")
    pay_after = _cursor(request, "payments_after")
    limit = min(HISTORY_PER_PAGE, PAGE_LIMIT_MAX)
    try:
        inv, inv_more = await p.store.invoices(p.org, limit=limit, starting_after=inv_after)
        pays, pay_more = await p.store.payments(p.org, limit=limit, starting_after=pay_after)
    except InvalidCursor:
        raise invalid("that page does not exist; start again") from None
    return {
        "invoices": inv,
        "invoices_next": inv[-1].id if inv_more and inv else None,
        "payments": [payment_view(r) for r in pays],
        "payments_next": pays[-1].id if pay_more and pays else None,
        "paged": inv_after is not None or pay_after is not None,
    }


# -- API keys, departments, alerts --------------------------------------------------------
@page("api_keys.html", "api-keys", "API keys")
async def api_keys(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    depts = {d.id: d for d in await p.ledger.departments(p.org)}
    return {
        "keys": await p.ledger.api_keys(p.org),
        "departments": depts,
        "notice": notice(request),
        "created": None,
    }


async def department_rows(p: Portal) -> list[dict[str, Any]]:
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    rows = []
    for d in (await p.ledger.departments(p.org))[:DEPARTMENTS_SHOWN_MAX]:
        result = await p.hot.balance(p.org, p.cred.id, department_id=d.id)
        spent = int(result.payload["dept"]["spent"]) if result.status is Status.OK else None
        start, end = period_bounds(d.period, now_ms)
        rows.append(
            {
                "dept": d,
                "spent": spent,
                "remaining": None if d.limit is None or spent is None else max(0, d.limit - spent),
                "period_start": start,
                "period_end": end,
            }
        )
    return rows


@page("departments.html", "departments", "Departments")
async def departments(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    return {"rows": await department_rows(p), "notice": notice(request), "shown_max": DEPARTMENTS_SHOWN_MAX}


@page("alerts.html", "alerts", "Alerts")
async def alerts(request: web.Request) -> dict[str, Any]:
    p = Portal.of(request)
    return {"alert": await p.ledger.alert(p.org), "notice": notice(request), "secret": None}


def routes() -> list[web.RouteDef]:
    return [
        web.get(ENTRY_PATH.removeprefix("/portal") + "{token}", enter),
        web.get("/sign-in", sign_in),
        web.get("/overview", overview),
        web.get("/balance.json", balance_json),
        web.get("/usage", usage),
        web.get("/usage.csv", usage_csv),
        web.get("/transactions", transactions),
        web.get("/plans", plans),
        web.get("/buy", buy),
        web.get("/payments/{payment_id}.json", payment_json),
        web.get("/payment-methods", payment_methods),
        web.get("/invoices", invoices),
        web.get("/api-keys", api_keys),
        web.get("/departments", departments),
        web.get("/alerts", alerts),
    ]
