"""The portal's forms (POST): each decodes its fields into the request type the API
decodes, checks the role the API checks (`require_admin`), and calls the same action
(billing.actions, accounts.admin) the API handler calls. Money-moving forms carry an
idempotency key rendered into the form, run through the billing API's own idempotency
records: a double click, a reload or a retry acts once.

A form answers with a redirect to its page (and a notice), or the page itself when it
shows something once (a new API key's secret, an alert's signing secret). The page's
script (Stripe Elements) asks for JSON instead: the same handlers, `Accept:
application/json`.
"""

from __future__ import annotations

import decimal
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta

from accounts import admin
from api.errors import ApiError, from_validation, invalid
from billing import schemas as s
from billing.handlers import idempotent_with_key, method_view, respond, save_auto_topup, subscription_view
from core.http import IDEMPOTENCY_HEADER
from core.money import PrecisionError, to_credits, to_milli
from ledger.store import Conflict, NotFound
from meter import schemas as credit_schemas
from portal import pages
from portal.context import COOKIE, CSRF_FIELD, Portal

T = TypeVar("T")
KEY_FIELD = "idempotency_key"
HIDDEN = (CSRF_FIELD, KEY_FIELD)
JSON_BODY_BYTES_MAX = 16 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


async def fields(request: web.Request, kind: type[T]) -> T:
    """The form (or the script's JSON) decoded into `kind` as strictly as the API
    decodes its bodies; empty optional fields count as absent."""
    if request.content_type == "application/json":
        raw = await request.read()
        if len(raw) > JSON_BODY_BYTES_MAX:
            raise ApiError(413, "payload_too_large", "request body is too large")
        try:
            return msgspec.json.decode(raw, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise from_validation(exc) from None
    form = await request.post()
    data = {k: v for k, v in form.items() if k not in HIDDEN and isinstance(v, str) and v != ""}
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None


async def form_key(request: web.Request) -> str | None:
    """The idempotency key the form was rendered with (or the script's header)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None and request.content_type != "application/json":
        value = (await request.post()).get(KEY_FIELD)
        key = value if isinstance(value, str) and value else None
    return key


def back(path: str, notice: str | None = None) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{path}?notice={notice}" if notice else path)


def milli(value: decimal.Decimal, param: str) -> int:
    """Credits as the API takes them: exact to 0.001, never rounded, not negative."""
    try:
        amount = to_milli(value)
    except PrecisionError as exc:
        raise invalid(f"credits {exc}", param) from None
    if amount < 0:
        raise invalid("must not be negative", param)
    return amount


async def _run_idempotent(
    request: web.Request, p: Portal, parts: tuple[object, ...], run: Callable[[str], Awaitable[web.Response]]
) -> web.Response:
    return await idempotent_with_key(request, p.require_admin(), await form_key(request), parts, run)


def _json_of(response: web.Response) -> Any:
    assert isinstance(response.body, bytes)
    return msgspec.json.decode(response.body)


# -- session -----------------------------------------------------------------------------
async def sign_out(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    await p.sessions.end(p.session)
    response = web.HTTPSeeOther("/portal/sign-in?signed_out=1")
    response.del_cookie(COOKIE, path="/portal")
    raise response


# -- customer ----------------------------------------------------------------------------
async def create_customer(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    body = await fields(request, s.CustomerRequest)
    await p.actions.create_customer(p.org, email=body.email, name=body.name)
    target = request.query.get("next", "")
    raise back(target if target in ("/portal/buy", "/portal/plans") else "/portal/payment-methods", "customer")


# -- plans -------------------------------------------------------------------------------
async def subscribe(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    body = await fields(request, s.SubscriptionRequest)

    async def run(key: str) -> web.Response:
        done = await p.actions.subscribe(p.org, plan_id=body.plan_id, payment_method_id=body.payment_method_id, key=key)
        return respond(subscription_view(done.subscription, done.client_secret), status=201)

    response = await _run_idempotent(request, p, (body.plan_id, body.payment_method_id), run)
    if wants_json(request):
        return response
    view = _json_of(response)
    if view.get("client_secret"):  # the first invoice needs the customer (3-D Secure): the page finishes it
        return await pages.render_page(request, "plans.html", client_secret=view["client_secret"])
    raise back("/portal/plans", "subscribed")


async def change_plan(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    body = await fields(request, s.ChangePlanRequest)

    async def run(key: str) -> web.Response:
        return respond(subscription_view(await p.actions.change_plan(p.org, plan_id=body.plan_id, key=key)))

    response = await _run_idempotent(request, p, (body.plan_id,), run)
    if wants_json(request):
        return response
    raise back("/portal/plans", "plan_changed")


async def cancel(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)

    async def run(key: str) -> web.Response:
        return respond(subscription_view(await p.actions.cancel(p.org, at_period_end=True, key=key)))

    response = await _run_idempotent(request, p, (True,), run)
    if wants_json(request):
        return response
    raise back("/portal/plans", "cancelled")


async def resume(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)

    async def run(key: str) -> web.Response:
        return respond(subscription_view(await p.actions.resume(p.org, key=key)))

    response = await _run_idempotent(request, p, (), run)
    if wants_json(request):
        return response
    raise back("/portal/plans", "resumed")


# -- buying credits ----------------------------------------------------------------------
async def purchase(request: web.Request) -> web.StreamResponse:
    """The API's purchase: `{payment_id, status, credits, client_secret?}` as JSON for the
    page's script; without a script, back to the page, which shows the payment."""
    p = Portal.of(request)
    body = await fields(request, s.PurchaseRequest)

    async def run(key: str) -> web.Response:
        done = await p.actions.purchase(
            p.org, package_id=body.package_id, payment_method_id=body.payment_method_id, key=key
        )
        return respond(
            s.PurchaseResponse(
                payment_id=done.payment.id,
                status=done.payment.status,
                credits=to_credits(done.package.credits),
                client_secret=done.client_secret,
            )
        )

    response = await _run_idempotent(request, p, (body.package_id, body.payment_method_id), run)
    if wants_json(request):
        return response
    raise web.HTTPSeeOther(f"/portal/buy?payment={_json_of(response)['payment_id']}")


class AutoTopupForm(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False  # a checkbox: absent when not ticked
    threshold: credit_schemas.Credits
    package_id: s.CatalogId
    max_per_month: Annotated[int, Meta(ge=1, le=1000)]
    # A person types dollars ("50" or "49.90"); the API keeps cents.
    monthly_cap: decimal.Decimal


async def set_auto_topup(request: web.Request) -> web.StreamResponse:
    """The API's PUT /auto-topup, from the Buy credits page (same checks, same door)."""
    p = Portal.of(request)
    p.require_admin()
    form = await fields(request, AutoTopupForm)
    cents = form.monthly_cap * 100
    if not cents.is_finite() or not 0 <= cents <= s.MONTHLY_CAP_CENTS_MAX or cents != cents.to_integral_value():
        raise invalid("the monthly cap is in dollars and cents (at most two decimals, 0 or more)", "$.monthly_cap")
    body = s.AutoTopupRequest(
        enabled=form.enabled,
        threshold=form.threshold,
        package_id=form.package_id,
        max_per_month=form.max_per_month,
        monthly_cap_cents=int(cents),
    )
    await save_auto_topup(p.ledger, p.catalog, p.store, p.org, body)
    raise back("/portal/buy", "auto_topup")


# -- payment methods ---------------------------------------------------------------------
async def setup_intent(request: web.Request) -> web.StreamResponse:
    """A SetupIntent's client secret for Stripe Elements (the card never reaches us)."""
    p = Portal.of(request)

    async def run(key: str) -> web.Response:
        intent = await p.actions.setup_intent(p.org, key=key)
        return respond(s.SetupIntentView(client_secret=intent.client_secret, setup_intent_id=intent.id), status=201)

    return await _run_idempotent(request, p, (), run)


async def add_card(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    body = await fields(request, s.PaymentMethodRequest)

    async def run(key: str) -> web.Response:
        await p.actions.add_payment_method(p.org, body.payment_method_id, make_default=body.set_default, key=key)
        rows, default_id = await p.actions.payment_methods(p.org)
        row = next(r for r in rows if r.id == body.payment_method_id)
        return respond(method_view(row, default_id), status=201)

    response = await _run_idempotent(request, p, (body.payment_method_id, body.set_default), run)
    if wants_json(request):
        return response
    raise back("/portal/payment-methods", "card_added")


def _card_id(request: web.Request) -> str:
    try:
        return msgspec.convert(request.match_info["payment_method_id"], s.StripeId)
    except msgspec.ValidationError:
        raise ApiError(404, "not_found", "no such card") from None


async def default_card(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    pm_id = _card_id(request)

    async def run(key: str) -> web.Response:
        await p.actions.set_default_payment_method(p.org, pm_id, key=key)
        return respond(s.DeletedView(id=pm_id, deleted=False))

    await _run_idempotent(request, p, (pm_id,), run)
    raise back("/portal/payment-methods", "card_default")


async def remove_card(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    pm_id = _card_id(request)

    async def run(key: str) -> web.Response:
        await p.actions.detach_payment_method(p.org, pm_id, key=key)
        return respond(s.DeletedView(id=pm_id, deleted=True))

    await _run_idempotent(request, p, (pm_id,), run)
    raise back("/portal/payment-methods", "card_removed")


# -- API keys ----------------------------------------------------------------------------
KeyName = Annotated[str, Meta(max_length=200)]


class KeyForm(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A new API key, with the limits `credits key create` takes."""

    name: KeyName = ""
    role: Literal["agent", "admin"] = "agent"
    department_id: credit_schemas.DepartmentId | None = None
    cap: credit_schemas.Credits | None = None
    rate_limit_per_s: Annotated[float, Meta(ge=0, le=1_000_000)] | None = None
    rate_limit_burst: Annotated[float, Meta(ge=1, le=1_000_000)] | None = None


async def create_key(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    body = await fields(request, KeyForm)
    cap = None if body.cap is None else milli(body.cap, "$.cap")
    try:
        key = await admin.create_key(
            p.ledger,
            p.hot,
            p.org,
            role=body.role,
            name=body.name,
            department_id=body.department_id,
            cap=cap,
            rate_limit_per_s=body.rate_limit_per_s,
            rate_limit_burst=body.rate_limit_burst,
        )
    except NotFound:
        raise invalid("no such department", "$.department_id") from None
    created = {"secret": key.secret, "prefix": key.prefix, "name": body.name, "role": body.role}
    return await pages.render_page(request, "api_keys.html", created=created)


async def revoke_key(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    key_id = request.match_info["key_id"]
    try:
        msgspec.convert(key_id, credit_schemas.DepartmentId)  # a uuid, like a department id
        await admin.revoke_key(p.ledger, p.hot, p.org, key_id)
    except (msgspec.ValidationError, NotFound):
        raise ApiError(404, "not_found", "no such API key") from None
    raise back("/portal/api-keys", "key_revoked")


# -- departments ---------------------------------------------------------------------------
async def create_department(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    body = await fields(request, credit_schemas.DepartmentRequest)
    try:
        await admin.create_department(p.ledger, p.hot, p.org, body.name)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc), "$.name") from None
    raise back("/portal/departments", "department")


class LimitForm(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """PUT /departments/{id}/limits's body, where an empty limit means none."""

    limit: credit_schemas.Credits | None = None
    period: credit_schemas.Period = "month"


async def set_limit(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    dept_id = request.match_info["department_id"]
    body = await fields(request, LimitForm)
    limit = None if body.limit is None else milli(body.limit, "$.limit")
    try:
        msgspec.convert(dept_id, credit_schemas.DepartmentId)
        await admin.set_department_limit(p.ledger, p.hot, p.org, dept_id, limit=limit, period=body.period)
    except (msgspec.ValidationError, NotFound):
        raise ApiError(404, "not_found", "no such department") from None
    raise back("/portal/departments", "limit")


# -- alerts ------------------------------------------------------------------------------
class AlertForm(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    threshold: credit_schemas.Credits = decimal.Decimal(0)
    url: Annotated[str, Meta(pattern=r"^https?://[^\s]+$", max_length=2048)]
    # also low when fewer days than this are left at the recent rate of spend
    days_left: decimal.Decimal | None = None  # 0.01 to 365, exact to 0.01 (the ledger checks the range)


async def set_alert(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    body = await fields(request, AlertForm)
    try:
        days_left = body.days_left
        if days_left is not None and (not days_left.is_finite() or days_left != round(days_left, 2)):
            raise invalid("days left are a number exact to 0.01", "$.days_left")
        secret = await p.ledger.set_alert(
            p.org, threshold=milli(body.threshold, "$.threshold"), webhook_url=body.url, days_left=body.days_left
        )
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return await pages.render_page(request, "alerts.html", secret=secret)


async def delete_alert(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    await p.ledger.delete_alert(p.org)
    raise back("/portal/alerts", "alert_deleted")


async def test_alert(request: web.Request) -> web.StreamResponse:
    p = Portal.of(request)
    p.require_admin()
    try:
        await admin.send_test_alert(p.ledger, p.org)
    except NotFound:
        raise invalid("set an alert URL first") from None
    raise back("/portal/alerts", "alert_test")


def routes() -> list[web.RouteDef]:
    return [
        web.post("/sign-out", sign_out),
        web.post("/customer", create_customer),
        web.post("/plans/subscribe", subscribe),
        web.post("/plans/change", change_plan),
        web.post("/plans/cancel", cancel),
        web.post("/plans/resume", resume),
        web.post("/buy", purchase),
        web.post("/auto-topup", set_auto_topup),
        web.post("/payment-methods/setup-intent", setup_intent),
        web.post("/payment-methods", add_card),
        web.post("/payment-methods/{payment_method_id}/default", default_card),
        web.post("/payment-methods/{payment_method_id}/remove", remove_card),
        web.post("/api-keys", create_key),
        web.post("/api-keys/{key_id}/revoke", revoke_key),
        web.post("/departments", create_department),
        web.post("/departments/{department_id}/limit", set_limit),
        web.post("/alerts", set_alert),
        web.post("/alerts/delete", delete_alert),
        web.post("/alerts/test", test_alert),
    ]
