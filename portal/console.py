"""The ops console (/console): the web room's second app, for operators.

It shares the portal's machinery: the same templates (base.html, macros, error page),
assets (/portal/static/), protections (portal.security: the CSP and headers, CSRF by
the session's token and the request's Origin, HTML errors) and the same shape of
session (a server-side record named by a cookie's secret), but its own principals:
operators (ledger/operators.py), never a tenant. A portal session, API key or JWT
opens nothing here: the console's cookie is its own, set for /console only, and looked
up in operator_sessions. A browser without a session is sent (303) to the sign-in page.

It reads across organizations through credits_console (read only: ledger/console_reads.py)
and changes money only through accounts/audited.py, the functions the CLI calls
(ledger first, then the cache, an audit row each). Every form asks for confirmation
first, and carries a reference rendered into it, so a second submit does nothing more.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import logging
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp_jinja2
import asyncpg
import jinja2
from aiohttp import web

from accounts import admin, audited
from billing.appkeys import CONFIG, HOT, LEDGER, REDIS
from core.config import Config
from core.errors import Unavailable
from core.money import PrecisionError, to_credits, to_milli
from hotpath.client import HotPath
from ledger.console_reads import ConsoleReads
from ledger.operators import (
    Actor,
    AuditEntry,
    AuditFilter,
    LinkRefused,
    OperatorError,
    OperatorSession,
    OperatorSessions,
    audit_rows,
    record,
)
from ledger.store import POSTGRES_DOWN, Ledger
from lua import Status
from portal import format
from portal.context import CSRF_FIELD
from portal.security import csrf_ok, html_error, is_tls, same_origin, secure_headers

log = logging.getLogger(__name__)

PREFIX = "/console"
COOKIE = "credits_console"
ENTRY = "/console/enter/"
PUBLIC = ("/console/sign-in", ENTRY)
SAFE_METHODS = ("GET", "HEAD")
FORM_BYTES_MAX = 64 * 1024
SEARCH_SHOWN = 25
AUDIT_PER_PAGE = 100
CSV_ROWS_MAX = 100_000
CSV_COLUMNS = (
    "id", "at", "actor", "via", "action", "organization_id", "target", "amount", "reason", "reference", "outcome",
    "source",
)  # fmt: skip
HERE = pathlib.Path(__file__).parent

SESSION = web.RequestKey("operator_session", OperatorSession)
SECRET = web.RequestKey("operator_cookie", str)
SESSIONS = web.AppKey("operator_sessions", OperatorSessions)
READS = web.AppKey("console_reads", ConsoleReads)

NAV = (
    ("organizations", "Organizations"),
    ("anomalies", "Usage audit"),
    ("audit", "Audit"),
    ("health", "Health"),
    ("password", "Password"),
)
FURNITURE = {
    "brand": "Ops console",
    "nav_label": "Console",
    "nav_base": "/console/",
    "sign_out_action": "/console/sign-out",
    "home_url": "/console/organizations",
    "home_label": "Go to the organizations",
    "sign_in_url": "/console/sign-in",
    "sign_in_label": "Sign in to the console",
}
REFUSED_LINKS = {
    "malformed": (400, "This is not a console sign-in link."),
    "unknown": (404, "This sign-in link is not valid."),
    "used": (410, "This sign-in link has been used already: each works once. Ask for a new one."),
    "expired": (410, "This sign-in link has expired. Ask for a new one (credits operator link)."),
    "disabled": (403, "This operator is disabled."),
}
NOTICES = {
    "signed_in": "Signed in.",
    "password": "Password saved: you can sign in with it from now on.",
    "grant": "Credits granted.",
    "grant_replayed": "This reference was granted already: nothing more was granted.",
    "adjust": "Credits taken away.",
    "void": "Grant voided: what it had left is taken away.",
    "revoke": "API key revoked.",
    "revoke_replayed": "That key was revoked already.",
    "repair": "The cache was rebuilt from the ledger.",
    "repair_clean": "The cache agrees with the ledger: nothing to repair.",
    "retry": "The event is due again: the billing worker retries it within a second.",
    "session_ended": "That session has ended.",
    "session_gone": "That session had ended already.",
    "acknowledged": "Finding acknowledged.",
    "dismissed": "Finding dismissed.",
    "open": "Finding open again.",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FormError(ValueError):
    """A field is wrong: the message names it; nothing was done."""


def context(request: web.Request) -> dict[str, Any]:
    session = request.get(SESSION)
    return {
        **FURNITURE,
        "nav": NAV,
        "session": session,
        "role_label": session.email if session else "",
        "is_admin": False,
        "csrf_field": CSRF_FIELD,
        "csrf_token": session.csrf_token if session else "",
        "return_url": None,
    }


def error(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return html_error(request, status, title, message, context=context)


def render(request: web.Request, template: str, page: str, title: str, status: int = 200, **ctx: Any) -> web.Response:
    notice = NOTICES.get(request.query.get("notice", ""))
    values = {**context(request), "page": page, "title": title, "notice": notice, **ctx}
    return aiohttp_jinja2.render_template(template, request, values, status=status)


def source(request: web.Request) -> str:
    return request.remote or ""


def actor(request: web.Request) -> Actor:
    return Actor("console", request[SESSION].email, source(request))


# -- the guard ---------------------------------------------------------------------------
async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC):
        if request.method not in SAFE_METHODS and not same_origin(request):
            return error(request, 403, "Request refused", "This form did not come from the console.")
        return await handler(request)
    cookie = request.cookies.get(COOKIE)
    session = await request.app[SESSIONS].session(cookie) if cookie else None
    if session is None:
        if request.method in SAFE_METHODS:
            raise web.HTTPSeeOther("/console/sign-in")
        return error(request, 401, "Signed out", "Your console session has ended. Sign in again.")
    request[SESSION] = session
    request[SECRET] = cookie or ""
    if request.method not in SAFE_METHODS and not (same_origin(request) and await csrf_ok(request, session.csrf_token)):
        log.warning("console_csrf_refused", extra={"operator": session.email, "path": request.path})
        return error(
            request, 403, "Request refused", "This form did not come from your console session. Reload and try again."
        )
    return await handler(request)


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            secure_headers(request, exc)
            raise
        response = error(request, exc.status, exc.reason, "There is no such page in the console.")
    except FormError as exc:
        response = error(request, 400, "Check the form", str(exc))
    except (admin.AdminError, OperatorError) as exc:
        response = error(request, 409 if "only" in str(exc) else 400, "Not done", f"{exc}. Nothing was changed.")
    except Exception as exc:
        if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):  # a wrong role password
            log.error("console_role_refused", extra={"error": str(exc), "path": request.path})
            response = error(
                request, 503, "Unavailable", "The console cannot sign in to the database (CONSOLE_DB_PASSWORD)."
            )
        elif isinstance(exc, (Unavailable, *POSTGRES_DOWN)):
            log.warning("console_dependency_unavailable", extra={"error": str(exc), "path": request.path})
            response = error(request, 503, "Unavailable", "A backing service is unreachable; nothing changed.")
        else:
            log.error("console_unhandled_error", exc_info=exc, extra={"path": request.path})
            response = error(request, 500, "Something went wrong", "The page failed; it has been logged.")
    secure_headers(request, response)
    return response


# -- signing in --------------------------------------------------------------------------
def _set_cookie(request: web.Request, response: web.StreamResponse, secret: str) -> None:
    sessions = request.app[SESSIONS]
    response.set_cookie(
        COOKIE,
        secret,
        path=PREFIX,
        httponly=True,
        secure=is_tls(request),
        samesite="Lax",  # Strict would drop it on the redirect after a link opened from a mail
        max_age=sessions.session_ttl_s,
    )


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    return render(request, "console/sign_in.html", "sign-in", "Sign in to the ops console", email="", failed=False)


async def sign_in(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    email, password = str(form.get("email", "")), str(form.get("password", ""))
    started = await request.app[SESSIONS].sign_in(
        email, password, source=source(request), user_agent=request.headers.get("User-Agent", "")
    )
    if started is None:
        return render(
            request, "console/sign_in.html", "sign-in", "Sign in to the ops console", 401, email=email, failed=True
        )
    response = web.HTTPSeeOther("/console/organizations?notice=signed_in")
    _set_cookie(request, response, started.cookie)
    raise response


async def enter_page(request: web.Request) -> web.StreamResponse:
    """The link's page: a button, so that a mail scanner fetching the link (a GET)
    does not use it up; the browser's POST redeems it."""
    token = request.match_info["token"]
    if not token.startswith("op1_") or len(token) > 200:
        status, message = REFUSED_LINKS["malformed"]
        return error(request, status, "This link cannot be used", message)
    response = render(request, "console/enter.html", "sign-in", "Sign in to the ops console", token=token)
    response.headers["Referrer-Policy"] = "no-referrer"  # the token is in this page's address
    return response


async def enter(request: web.Request) -> web.StreamResponse:
    try:
        started = await request.app[SESSIONS].redeem(
            request.match_info["token"], source=source(request), user_agent=request.headers.get("User-Agent", "")
        )
    except LinkRefused as exc:
        status, message = REFUSED_LINKS[exc.reason]
        return error(request, status, "This link cannot be used", message)
    response = web.HTTPSeeOther("/console/password?notice=signed_in")
    _set_cookie(request, response, started.cookie)
    response.headers["Referrer-Policy"] = "no-referrer"
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    await request.app[SESSIONS].end(request[SECRET], source=source(request))
    response = web.HTTPSeeOther("/console/sign-in")
    response.del_cookie(COOKIE, path=PREFIX)
    raise response


async def password_page(request: web.Request) -> web.StreamResponse:
    sessions = await request.app[SESSIONS].sessions_of(request[SESSION].operator_id)
    return render(request, "console/password.html", "password", "Password", sessions=sessions)


async def end_session(request: web.Request) -> web.StreamResponse:
    try:
        session_id = str(uuid.UUID(request.match_info["session"]))
    except ValueError:
        raise web.HTTPNotFound() from None
    if session_id == request[SESSION].id:
        raise FormError("This is the session you are using: sign out instead")
    ended = await request.app[SESSIONS].end_own(request[SECRET], session_id, source=source(request))
    raise web.HTTPSeeOther("/console/password?notice=" + ("session_ended" if ended else "session_gone"))


async def set_password(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    password, again = str(form.get("password", "")), str(form.get("confirm_password", ""))
    if password != again:
        raise FormError("The two passwords differ")
    await request.app[SESSIONS].set_password(request[SECRET], password, source=source(request))
    raise web.HTTPSeeOther("/console/organizations?notice=password")


# -- organizations -----------------------------------------------------------------------
async def _cache(hot: HotPath, organization_id: str) -> dict[str, int] | None:
    result = await hot.balance(organization_id)
    if result.status is not Status.OK:
        return None
    p = result.payload
    return {"balance": int(p["balance"]), "reserved": int(p["reserved"]), "available": int(p["available"])}


async def to_organizations(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/console/organizations")


async def organizations(request: web.Request) -> web.StreamResponse:
    query = request.query.get("q", "")[:200]
    rows = await request.app[READS].search(query, limit=SEARCH_SHOWN)
    hot = request.config_dict[HOT]
    caches = {r.id: await _cache(hot, r.id) for r in rows}
    return render(
        request, "console/organizations.html", "organizations", "Organizations", q=query, rows=rows, caches=caches
    )


def usage_chart(rows: list[dict[str, Any]], now: dt.datetime) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The organization's last 30 days: per day totals (the table), and credits per day
    stacked by action (the chart, as the portal's usage.js draws it)."""
    from ledger.console_reads import SPEND_DAYS

    today = now.astimezone(dt.UTC).date()
    dates = [today - dt.timedelta(days=SPEND_DAYS - 1 - i) for i in range(SPEND_DAYS)]
    by_action: dict[str, dict[dt.date, int]] = {}
    totals: dict[dt.date, list[int]] = {d: [0, 0] for d in dates}
    for r in rows:
        day = r["day"].astimezone(dt.UTC).date()
        if day not in totals:
            continue
        by_action.setdefault(r["action"] or "reservation", {})[day] = int(r["credits"])
        totals[day][0] += int(r["credits"])
        totals[day][1] += int(r["events"])
    days = [{"day": d, "credits": c, "events": e} for d, (c, e) in totals.items() if c or e]
    chart = {
        "labels": [d.strftime("%-d %b") for d in dates],
        "datasets": [
            {"label": action, "data": [float(to_credits(per.get(d, 0))) for d in dates]}
            for action, per in sorted(by_action.items())
        ],
    }
    return days, chart


def _org_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["org"]))
    except ValueError:
        raise web.HTTPNotFound() from None


async def organization(request: web.Request) -> web.StreamResponse:
    org_id = _org_id(request)
    org = await request.app[READS].organization(org_id)
    if org is None:
        raise web.HTTPNotFound()
    cache = await _cache(request.config_dict[HOT], org_id)
    audit = await audit_rows(request.app[READS].pool, AuditFilter(organization_id=org_id), limit=20)
    days, chart = usage_chart(org["usage_by_day"], dt.datetime.now(dt.UTC))
    from settler.anomalies import anomalies

    findings = await anomalies(request.app[READS].pool, organization_id=org_id, limit=10)
    return render(
        request,
        "console/organization.html",
        "organizations",
        org["name"],
        org=org,
        cache=cache,
        audit=audit,
        days=days,
        chart=chart,
        findings=findings,
        reference=f"console-{uuid.uuid4().hex[:12]}",
        now=dt.datetime.now(dt.UTC),
    )


# -- credit management (confirm, then act) -------------------------------------------------
def _amount(text: str) -> int:
    try:
        value = to_milli(decimal.Decimal(text.strip()))
    except (decimal.InvalidOperation, PrecisionError):
        raise FormError(f"Amount: not an exact number of credits (to 0.001): {text!r}") from None
    if value <= 0:
        raise FormError("Amount: must be more than zero")
    return value


def _expiry(text: str) -> dt.datetime | None:
    if not text.strip():
        return None
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise FormError(f"Expires: not a date and time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)  # the form's times are UTC


def _priority(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise FormError(f"Priority: a whole number from 0 to {admin.PRIORITY_MAX}") from None


ACTIONS = ("grant", "adjust", "void", "revoke", "repair")
TITLES = {
    "grant": "Grant credits",
    "adjust": "Take credits away",
    "void": "Void a grant",
    "revoke": "Revoke an API key",
    "repair": "Repair the cache from the ledger",
}


async def act(request: web.Request) -> web.StreamResponse:
    org_id = _org_id(request)
    what = request.match_info["action"]
    if what not in ACTIONS:
        raise web.HTTPNotFound()
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str) and k != CSRF_FIELD}
    reason = form.get("reason", "").strip()
    if not reason:
        raise FormError("Reason: required (it is kept in the ledger and the audit trail)")
    if len(reason) > 500:
        raise FormError("Reason: at most 500 characters")
    reference = form.get("reference", "").strip() or None
    if reference is not None and len(reference) > 255:
        raise FormError("Reference: at most 255 characters")
    # Decode everything before anything runs, for the confirmation and for the action.
    amount = _amount(form.get("amount", "")) if what in ("grant", "adjust") else None
    expires_at = _expiry(form.get("expires_at", "")) if what == "grant" else None
    priority = _priority(form.get("priority", "")) if what == "grant" else None
    target = form.get("target", "")
    if what in ("void", "revoke"):
        try:
            target = str(uuid.UUID(target))
        except ValueError:
            raise FormError("Which grant or key: not an id") from None
    if form.get("confirmed") != "yes":
        if reference is None and what in ("grant", "adjust"):  # fixed now, so that confirming twice acts once
            reference = f"console-{uuid.uuid4().hex[:12]}"
            form["reference"] = reference
        org = await request.app[READS].organization(org_id)
        if org is None:
            raise web.HTTPNotFound()
        return render(
            request,
            "console/confirm.html",
            "organizations",
            TITLES[what],
            org=org,
            action=what,
            fields=form,
            amount=amount,
            expires_at=expires_at,
            priority=priority,
            target=target,
            reason=reason,
            reference=reference,
        )
    ledger: Ledger = request.config_dict[LEDGER]
    hot: HotPath = request.config_dict[HOT]
    who = actor(request)
    notice = what
    if what == "grant":
        assert amount is not None
        g = await audited.grant(
            ledger, hot, who, org_id, amount=amount, reason=reason, reference=reference,
            expires_at=expires_at, priority=priority,
        )  # fmt: skip
        notice = "grant" if g.created else "grant_replayed"
    elif what == "adjust":
        assert amount is not None
        await audited.adjust(ledger, hot, who, org_id, amount=-amount, reason=reason, reference=reference)
    elif what == "void":
        await audited.void_grant(ledger, hot, who, org_id, target, reason=reason, reference=reference)
    elif what == "revoke":
        revoked = await audited.revoke_key(ledger, hot, who, org_id, target, reason=reason)
        notice = "revoke" if revoked else "revoke_replayed"
    else:
        from settler import reconcile

        repaired = await audited.repair_cache(ledger, hot, who, org_id, reason=reason, repair=reconcile.repair)
        notice = "repair" if repaired is not None else "repair_clean"
    raise web.HTTPSeeOther(f"/console/organizations/{org_id}?notice={notice}")


# -- audit ---------------------------------------------------------------------------------
def _audit_filter(request: web.Request) -> AuditFilter:
    q = request.query
    org = q.get("org", "").strip() or None
    if org is not None:
        try:
            org = str(uuid.UUID(org))
        except ValueError:
            raise FormError("Organization: not an id") from None
    outcome = q.get("outcome") or None
    if outcome is not None and outcome not in ("applied", "replayed", "refused"):
        raise FormError("Outcome: applied, replayed or refused")
    before = q.get("before")
    return AuditFilter(
        organization_id=org,
        actor=q.get("actor", "").strip() or None,
        action=q.get("action", "").strip() or None,
        outcome=outcome,
        before_id=int(before) if before and before.isdigit() else None,
    )


async def audit_page(request: web.Request) -> web.StreamResponse:
    f = _audit_filter(request)
    rows = await audit_rows(request.app[READS].pool, f, limit=AUDIT_PER_PAGE + 1)
    more = len(rows) > AUDIT_PER_PAGE
    rows = rows[:AUDIT_PER_PAGE]
    query = {k: v for k, v in request.query.items() if k not in ("before", "notice") and v}
    return render(
        request, "console/audit.html", "audit", "Audit", rows=rows, f=f, query=query,
        next_before=rows[-1].id if more else None,
    )  # fmt: skip


async def audit_csv(request: web.Request) -> web.StreamResponse:
    f = _audit_filter(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/csv; charset=utf-8", "Content-Disposition": 'attachment; filename="audit.csv"'}
    )
    secure_headers(request, response)
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    written, before = 0, f.before_id
    while written < CSV_ROWS_MAX:
        page = await audit_rows(request.app[READS].pool, AuditFilter(**{**_fields(f), "before_id": before}), limit=1000)
        for r in page:
            writer.writerow(
                [r.id, format.iso(r.at), r.actor, r.via, r.action, r.organization_id or "", r.target,
                 "" if r.amount is None else format.credits(r.amount).replace(",", ""), r.reason, r.reference,
                 r.outcome, r.source]
            )  # fmt: skip
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        written += len(page)
        if len(page) < 1000:
            break
        before = page[-1].id
    await response.write_eof()
    return response


def _fields(f: AuditFilter) -> dict[str, Any]:
    return {k: getattr(f, k) for k in AuditFilter.__dataclass_fields__}


# -- health --------------------------------------------------------------------------------
async def health(request: web.Request) -> web.StreamResponse:
    from redis.exceptions import ResponseError

    from hotpath.client import now_ms
    from settler.stream import GROUP, lag

    config: Config = request.config_dict[CONFIG]
    redis = request.config_dict[REDIS]
    hot: HotPath = request.config_dict[HOT]
    partitions = []
    now = now_ms()
    for p in range(hot.partitions):
        stream = hot.stream_key(p)
        entries, age_s = await lag(redis, hot, p, now)
        length = int(await redis.xlen(stream))
        try:
            pending = int((await redis.xpending(stream, GROUP))["pending"])
        except ResponseError:  # no stream or group yet: nothing pending
            pending = 0
        partitions.append({"partition": p, "unsettled": entries, "lag_s": age_s, "length": length, "pending": pending})
    raw = await redis.hgetall(f"{config.redis_key_prefix}:settler:reconcile:drifts")  # type: ignore[misc]
    drifts = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}
    last_raw = await redis.get(f"{config.redis_key_prefix}:settler:reconcile:last")
    last = json.loads(last_raw) if last_raw else None
    last_at = dt.datetime.fromisoformat(last["at"]) if last else None
    reads: ConsoleReads = request.app[READS]
    state = await reads.health()
    names = await reads.organization_names(list(drifts))
    return render(
        request, "console/health.html", "health", "Health", partitions=partitions, drifts=drifts, names=names,
        lag_alert_s=config.settlement_lag_alert_s, last_at=last_at, last_checked=last["checked"] if last else 0,
        **state,
    )  # fmt: skip


async def retry_event(request: web.Request) -> web.StreamResponse:
    from webhooks.store import EventStore

    org_id = _org_id(request)
    event_id = request.match_info["event"]
    requeued = await EventStore(request.config_dict[LEDGER]).requeue(org_id, event_id)
    entry = AuditEntry("webhook.retry", "applied" if requeued else "replayed", org_id, target=f"event:{event_id}")
    await record(request.config_dict[LEDGER].pool, actor(request), entry)
    raise web.HTTPSeeOther("/console/health?notice=retry")


# -- the usage audit -------------------------------------------------------------------------
async def anomalies_page(request: web.Request) -> web.StreamResponse:
    from settler.anomalies import STATES, anomalies

    state = request.query.get("state", "open")
    if state not in (*STATES, "all"):
        raise FormError("State: open, acknowledged, dismissed or all")
    config: Config = request.config_dict[CONFIG]
    rows = await anomalies(request.app[READS].pool, state=None if state == "all" else state)
    return render(
        request, "console/anomalies.html", "anomalies", "Usage audit", rows=rows, state=state, states=STATES,
        config=config,
    )  # fmt: skip


async def decide_anomaly(request: web.Request) -> web.StreamResponse:
    org_id = _org_id(request)
    decision = request.match_info["decision"]
    if decision not in ("acknowledged", "dismissed", "open"):
        raise web.HTTPNotFound()
    try:
        anomaly_id = str(uuid.UUID(request.match_info["anomaly"]))
    except ValueError:
        raise web.HTTPNotFound() from None
    form = await request.post()
    note = str(form.get("note", "")).strip()
    await audited.decide_anomaly(
        request.config_dict[LEDGER], actor(request), org_id, anomaly_id, state=decision, note=note
    )
    raise web.HTTPSeeOther(f"/console/anomalies?notice={decision}")


# -- the app -------------------------------------------------------------------------------
def mount(app: web.Application) -> None:
    """Add the ops console under /console to the billing application `app` (which
    holds the ledger, the hot path and Redis: the console's money path and reads of
    the cache); the console's own role and its sessions are opened here."""
    config: Config = app[CONFIG]
    sub = web.Application(middlewares=[console_middleware], client_max_size=FORM_BYTES_MAX)
    env = aiohttp_jinja2.setup(
        sub,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(format.FILTERS)

    async def resources(sub: web.Application) -> AsyncIterator[None]:
        # min_size=0: billing starts (and takes payments) even when the console's role
        # cannot connect; the console's pages then say so.
        reads = await ConsoleReads.connect(config.console_dsn(), min_size=0, max_size=4)
        sub[READS] = reads
        sub[SESSIONS] = OperatorSessions(reads.pool)
        try:
            yield
        finally:
            await reads.close()

    sub.cleanup_ctx.append(resources)
    sub.add_routes(
        [
            web.get("/", to_organizations),
            web.get("/sign-in", sign_in_page),
            web.post("/sign-in", sign_in),
            web.get("/enter/{token}", enter_page),
            web.post("/enter/{token}", enter),
            web.post("/sign-out", sign_out),
            web.get("/password", password_page),
            web.post("/password", set_password),
            web.post("/sessions/{session}/end", end_session),
            web.get("/organizations", organizations),
            web.get("/organizations/{org}", organization),
            web.post("/organizations/{org}/{action}", act),
            web.get("/audit", audit_page),
            web.get("/audit.csv", audit_csv),
            web.get("/health", health),
            web.post("/health/events/{org}/{event}/retry", retry_event),
            web.get("/anomalies", anomalies_page),
            web.post("/anomalies/{org}/{anomaly}/{decision}", decide_anomaly),
        ]
    )
    app.add_subapp(PREFIX, sub)
    app.router.add_get(PREFIX, to_organizations)
