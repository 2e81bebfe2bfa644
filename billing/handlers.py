"""HTTP handlers of /api/billing: authenticate, decode, one action, encode.

The organization always comes from the credential (API key or JWT); every read and
write goes through the organization's tenant transaction, so another organization's
ids are simply `not found`. Mutations need the admin role and accept an
Idempotency-Key: the first response is stored (48 h) and replayed, and the key also
derives the idempotency keys sent to Stripe, so a retry never charges twice.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from api.auth import require_admin
from api.errors import ApiError, from_validation, invalid
from api.requests import checked_idempotency_key, idempotency_key
from billing import schemas as s
from billing.appkeys import ACTIONS, AUTH, BILLING_CONFIG, CATALOG, LEDGER, PORTAL_SESSIONS, RECEIVER, STORE
from billing.autotopup import Attempt, AutoTopupStore
from billing.catalog import Catalog
from billing.portal_sessions import ENTRY_PATH
from billing.store import PAGE_LIMIT_MAX, BillingStore, InvalidCursor, PaymentMethodRow, PaymentRow, SubscriptionRow
from core.errors import OutcomeUnknown, Unavailable
from core.http import IDEMPOTENCY_HEADER, REPLAYED_HEADER
from core.money import PrecisionError, to_credits, to_milli
from hotpath.client import fingerprint
from ledger.entitlements import FREE_SCOPE, EntitlementStore, Feature
from ledger.store import POSTGRES_DOWN, Credential, Ledger, StoredResponse

T = TypeVar("T")
_json = msgspec.json.Encoder(decimal_format="number")
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

IDEMPOTENCY_NAMESPACE = "billing:"  # shares the ledger's table with the credits API
PAGE_LIMIT_DEFAULT = 20


# -- plumbing ------------------------------------------------------------------------
def respond(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


async def decode(request: web.Request, kind: type[T]) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    raw = await request.read()
    try:
        result: T = decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc, raw, kind=kind) from None
    return result


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def admin(request: web.Request) -> Credential:
    cred = await request.app[AUTH](request)
    require_admin(cred)
    return cred


async def idempotent(
    request: web.Request, cred: Credential, parts: tuple[object, ...], run: Callable[[str], Awaitable[web.Response]]
) -> web.Response:
    """Run a mutation once per Idempotency-Key (the same key with another body is a 409).
    `run` gets the key to derive Stripe's idempotency keys from: the caller's, or one
    assigned here. When a backing service fails while `run` works, what it did is
    unknown (Stripe may have charged): the 503 says so and names the key, with which a
    retry returns the first result and never pays twice (Stripe's idempotency keys and
    our own records are derived from it)."""
    return await idempotent_with_key(request, cred, idempotency_key(request), parts, run)


async def idempotent_with_key(
    request: web.Request,
    cred: Credential,
    key: str | None,
    parts: tuple[object, ...],
    run: Callable[[str], Awaitable[web.Response]],
) -> web.Response:
    """`idempotent` with the key given (the portal's forms carry theirs in a field)."""
    if key is None:
        return await _unknown_outcome_named(run, ASSIGNED_KEY_PREFIX + uuid.uuid4().hex)
    checked_idempotency_key(key)
    ledger = request.config_dict[LEDGER]  # the portal calls this from its sub-application
    org = cred.organization_id
    record_key = IDEMPOTENCY_NAMESPACE + key
    fp = fingerprint(request.method, request.path, *parts)
    stored = await ledger.stored_response(org, record_key)
    replayed = stored is not None
    if stored is None:
        response = await _unknown_outcome_named(run, key)
        if not 200 <= response.status < 300 or not isinstance(response.body, bytes):
            return response
        stored = await ledger.store_response(org, record_key, StoredResponse(fp, response.status, response.body))
        replayed = stored.body != response.body  # a concurrent request stored its answer first
    if stored.fingerprint != fp:
        raise ApiError(
            409, "idempotency_conflict", "idempotency key reused with different parameters", IDEMPOTENCY_HEADER
        )
    return web.Response(
        body=stored.body,
        status=stored.status,
        content_type="application/json",
        headers={REPLAYED_HEADER: "true"} if replayed else None,
    )


ASSIGNED_KEY_PREFIX = "auto_"
UNREACHABLE: tuple[type[BaseException], ...] = (Unavailable, *POSTGRES_DOWN)
UNKNOWN_OUTCOME = (
    "a backing service did not answer: this request may have taken effect (a payment may have been made)."
    " Retry it with the same Idempotency-Key: the retry returns the first result and never pays twice"
)


async def _unknown_outcome_named(run: Callable[[str], Awaitable[web.Response]], key: str) -> web.Response:
    try:
        return await run(key)
    except OutcomeUnknown as exc:
        exc.idempotency_key = key
        exc.answer = UNKNOWN_OUTCOME
        raise
    except UNREACHABLE as exc:
        raise OutcomeUnknown(str(exc), answer=UNKNOWN_OUTCOME, idempotency_key=key) from exc


def page_params(request: web.Request) -> tuple[int, str | None]:
    raw = request.query.get("limit")
    limit = PAGE_LIMIT_DEFAULT
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            raise invalid("limit must be an integer", "limit") from None
        if not 1 <= limit <= PAGE_LIMIT_MAX:
            raise invalid(f"limit must be between 1 and {PAGE_LIMIT_MAX}", "limit")
    after = request.query.get("starting_after") or None
    if after is not None and (len(after) > 255 or "\x00" in after):
        raise invalid("starting_after must be an object id (at most 255 characters, no NUL)", "starting_after")
    return limit, after


def subscription_view(row: SubscriptionRow, client_secret: str | None = None) -> s.SubscriptionView:
    return s.SubscriptionView(
        id=row.id,
        plan_id=row.plan_id,
        status=row.status,
        current_period_start=iso(row.current_period_start),
        current_period_end=iso(row.current_period_end),
        cancel_at_period_end=row.cancel_at_period_end,
        canceled_at=iso(row.canceled_at or (row.ended_at if row.terminal else None)),
        client_secret=client_secret,
    )


def payment_view(row: PaymentRow) -> s.PaymentView:
    status = row.status
    if status == "succeeded" and row.amount_refunded > 0:
        status = "refunded" if row.amount_refunded >= row.amount else "partially_refunded"
    return s.PaymentView(
        id=row.id,
        amount=row.amount,
        currency=row.currency,
        status=status,
        description=row.description,
        credits=to_credits(row.credits) if row.credits is not None else None,
        amount_refunded=row.amount_refunded,
        created_at=iso(row.created_at) or "",
    )


def method_view(row: PaymentMethodRow, default_id: str | None) -> s.PaymentMethodView:
    return s.PaymentMethodView(
        id=row.id,
        brand=row.brand,
        last4=row.last4,
        exp_month=row.exp_month,
        exp_year=row.exp_year,
        is_default=row.id == default_id,
    )


def _stripe_id(request: web.Request, name: str) -> str:
    raw = request.match_info[name]
    try:
        return msgspec.convert(raw, s.StripeId)
    except msgspec.ValidationError:
        raise ApiError(404, "not_found", f"no such {name.removesuffix('_id').replace('_', ' ')}", name) from None


# -- customer -------------------------------------------------------------------------
async def get_customer(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    row = await request.app[ACTIONS].customer(cred.organization_id)
    return respond(
        s.CustomerView(id=row.id, stripe_customer_id=row.stripe_customer_id or "", email=row.email, name=row.name)
    )


async def post_customer(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.CustomerRequest)

    async def run(key: str) -> web.Response:
        row = await request.app[ACTIONS].create_customer(cred.organization_id, email=body.email, name=body.name)
        return respond(
            s.CustomerView(id=row.id, stripe_customer_id=row.stripe_customer_id or "", email=row.email, name=row.name)
        )

    return await idempotent(request, cred, (body.email, body.name), run)


# -- catalog --------------------------------------------------------------------------
def _definitions(features: list[Feature]) -> list[s.FeatureDefinition]:
    return [
        s.FeatureDefinition(feature=f.feature, type=f.type, enabled=f.enabled, limit=f.limit, value=f.value)
        for f in features
    ]


async def list_plans(request: web.Request) -> web.Response:
    await request.app[AUTH](request)
    plans = await request.app[CATALOG].plans()
    features = await EntitlementStore(request.config_dict[LEDGER]).catalog()
    return respond(
        s.PlanList(
            data=[
                s.PlanView(
                    id=p.id,
                    name=p.name,
                    description=p.description,
                    price_cents=p.price_cents,
                    currency=p.currency,
                    interval=p.interval,
                    credits_per_period=to_credits(p.credits),
                    features=list(p.features),
                    entitlements=_definitions(features.get(p.id, [])),
                )
                for p in plans
            ],
            free_entitlements=_definitions(features.get(FREE_SCOPE, [])),
        )
    )


async def list_packages(request: web.Request) -> web.Response:
    await request.app[AUTH](request)
    packages = await request.app[CATALOG].packages()
    return respond(
        s.PackageList(
            data=[
                s.PackageView(
                    id=p.id, name=p.name, credits=to_credits(p.credits), price_cents=p.price_cents, currency=p.currency
                )
                for p in packages
            ]
        )
    )


# -- subscription ---------------------------------------------------------------------
async def get_subscription(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    row = await request.app[STORE].current_subscription(cred.organization_id)
    if row is None:
        raise ApiError(404, "not_found", "the organization has no subscription")
    return respond(subscription_view(row))


async def post_subscription(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.SubscriptionRequest)

    async def run(key: str) -> web.Response:
        done = await request.app[ACTIONS].subscribe(
            cred.organization_id, plan_id=body.plan_id, payment_method_id=body.payment_method_id, key=key
        )
        return respond(subscription_view(done.subscription, done.client_secret), status=201)

    return await idempotent(request, cred, (body.plan_id, body.payment_method_id), run)


async def put_subscription(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.ChangePlanRequest)

    async def run(key: str) -> web.Response:
        row = await request.app[ACTIONS].change_plan(cred.organization_id, plan_id=body.plan_id, key=key)
        return respond(subscription_view(row))

    return await idempotent(request, cred, (body.plan_id,), run)


async def delete_subscription(request: web.Request) -> web.Response:
    cred = await admin(request)
    raw = request.query.get("at_period_end", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise invalid("at_period_end must be true or false", "at_period_end")
    at_period_end = raw in ("true", "1")

    async def run(key: str) -> web.Response:
        row = await request.app[ACTIONS].cancel(cred.organization_id, at_period_end=at_period_end, key=key)
        return respond(subscription_view(row))

    return await idempotent(request, cred, (at_period_end,), run)


async def resume_subscription(request: web.Request) -> web.Response:
    cred = await admin(request)

    async def run(key: str) -> web.Response:
        row = await request.app[ACTIONS].resume(cred.organization_id, key=key)
        return respond(subscription_view(row))

    return await idempotent(request, cred, (), run)


# -- credit packages ------------------------------------------------------------------
async def purchase_credits(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.PurchaseRequest)

    async def run(key: str) -> web.Response:
        done = await request.app[ACTIONS].purchase(
            cred.organization_id, package_id=body.package_id, payment_method_id=body.payment_method_id, key=key
        )
        return respond(
            s.PurchaseResponse(
                payment_id=done.payment.id,
                status=done.payment.status,
                credits=to_credits(done.package.credits),
                client_secret=done.client_secret,
            )
        )

    return await idempotent(request, cred, (body.package_id, body.payment_method_id), run)


# -- payment methods ------------------------------------------------------------------
async def _methods(request: web.Request, org: str) -> s.PaymentMethodList:
    rows, default_id = await request.app[ACTIONS].payment_methods(org)
    return s.PaymentMethodList(data=[method_view(r, default_id) for r in rows])


async def list_payment_methods(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    return respond(await _methods(request, cred.organization_id))


async def add_payment_method(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.PaymentMethodRequest)

    async def run(key: str) -> web.Response:
        actions = request.app[ACTIONS]
        org = cred.organization_id
        await actions.add_payment_method(org, body.payment_method_id, make_default=body.set_default, key=key)
        rows, default_id = await actions.payment_methods(org)
        row = next(r for r in rows if r.id == body.payment_method_id)
        return respond(method_view(row, default_id), status=201)

    return await idempotent(request, cred, (body.payment_method_id, body.set_default), run)


async def set_default_payment_method(request: web.Request) -> web.Response:
    cred = await admin(request)
    pm_id = _stripe_id(request, "payment_method_id")

    async def run(key: str) -> web.Response:
        actions = request.app[ACTIONS]
        await actions.set_default_payment_method(cred.organization_id, pm_id, key=key)
        rows, default_id = await actions.payment_methods(cred.organization_id)
        return respond(method_view(next(r for r in rows if r.id == pm_id), default_id))

    return await idempotent(request, cred, (pm_id,), run)


async def delete_payment_method(request: web.Request) -> web.Response:
    cred = await admin(request)
    pm_id = _stripe_id(request, "payment_method_id")

    async def run(key: str) -> web.Response:
        await request.app[ACTIONS].detach_payment_method(cred.organization_id, pm_id, key=key)
        return respond(s.DeletedView(id=pm_id, deleted=True))

    return await idempotent(request, cred, (pm_id,), run)


async def create_setup_intent(request: web.Request) -> web.Response:
    cred = await admin(request)

    async def run(key: str) -> web.Response:
        intent = await request.app[ACTIONS].setup_intent(cred.organization_id, key=key)
        return respond(s.SetupIntentView(client_secret=intent.client_secret, setup_intent_id=intent.id), status=201)

    return await idempotent(request, cred, (), run)


# -- history --------------------------------------------------------------------------
async def list_invoices(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    limit, after = page_params(request)
    try:
        rows, more = await request.app[STORE].invoices(cred.organization_id, limit=limit, starting_after=after)
    except InvalidCursor:
        raise invalid("starting_after names no invoice of this organization", "starting_after") from None
    return respond(
        s.InvoiceList(
            data=[
                s.InvoiceView(
                    id=r.id,
                    number=r.number,
                    status=r.status,
                    amount_due=r.amount_due,
                    amount_paid=r.amount_paid,
                    currency=r.currency,
                    period_start=iso(r.period_start),
                    period_end=iso(r.period_end),
                    hosted_invoice_url=r.hosted_invoice_url,
                )
                for r in rows
            ],
            has_more=more,
        )
    )


async def list_payments(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    limit, after = page_params(request)
    try:
        rows, more = await request.app[STORE].payments(cred.organization_id, limit=limit, starting_after=after)
    except InvalidCursor:
        raise invalid("starting_after names no payment of this organization", "starting_after") from None
    return respond(s.PaymentList(data=[payment_view(r) for r in rows], has_more=more))


async def get_payment(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    payment_id = _stripe_id(request, "payment_id")
    row = await request.app[ACTIONS].payment(cred.organization_id, payment_id, refresh=True)
    return respond(payment_view(row))


# -- the portal's door and the frontend's settings ------------------------------------------
async def get_config(request: web.Request) -> web.Response:
    await request.app[AUTH](request)
    billing = request.app[BILLING_CONFIG]
    return respond(
        s.BillingConfigView(stripe_publishable_key=billing.stripe_publishable_key, stripe_js_url=billing.stripe_js_url)
    )


def public_base(request: web.Request) -> str:
    """Where people reach this service: BILLING_PUBLIC_URL, else the request's own origin."""
    configured = request.app[BILLING_CONFIG].billing_public_url
    return configured or f"{request.scheme}://{request.host}"


async def create_portal_session(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.PortalSessionRequest)

    async def run(key: str) -> web.Response:
        link = await request.app[PORTAL_SESSIONS].create_link(
            cred.organization_id, role=body.role, return_url=body.return_url, created_by=cred.id
        )
        return respond(
            s.PortalSessionView(
                id=link.id,
                url=public_base(request) + ENTRY_PATH + link.token,
                expires_at=iso(link.expires_at) or "",
                role=link.role,
                return_url=link.return_url,
            ),
            status=201,
        )

    return await idempotent(request, cred, (body.role, body.return_url), run)


async def revoke_portal_session(request: web.Request) -> web.Response:
    cred = await admin(request)
    link_id = request.match_info["portal_session_id"]
    if not await request.app[PORTAL_SESSIONS].revoke_link(cred.organization_id, link_id):
        raise ApiError(404, "not_found", "no such portal session", "portal_session_id")
    return respond(s.PortalRevokedView(id=link_id, revoked=True))


async def stripe_webhook(request: web.Request) -> web.Response:
    return await request.app[RECEIVER](request)


# -- automatic top-up -------------------------------------------------------------------
def _attempt_view(a: Attempt) -> s.AutoTopupAttemptView:
    return s.AutoTopupAttemptView(
        id=a.id,
        status=a.status,  # type: ignore[arg-type]
        reason=a.failure_reason,  # type: ignore[arg-type]
        package_id=a.package_id,
        credits=to_credits(a.credits),
        amount_cents=a.amount_cents,
        currency=a.currency,
        available_at_trigger=to_credits(a.available_at_trigger),
        payment_id=a.payment_intent_id,
        created_at=iso(a.created_at) or "",
        decided_at=iso(a.decided_at),
    )


async def auto_topup_view(ledger: Ledger, org: str) -> s.AutoTopupView:
    """GET /auto-topup's answer (the portal shows the same)."""
    store = AutoTopupStore(ledger)
    settings = await store.settings(org)
    attempts = [_attempt_view(a) for a in await store.attempts(org)]
    if settings is None:
        return s.AutoTopupView(
            configured=False,
            enabled=False,
            threshold=None,
            package_id=None,
            max_per_month=None,
            monthly_cap_cents=None,
            paused_reason=None,
            attempts=attempts,
        )
    return s.AutoTopupView(
        configured=True,
        enabled=settings.enabled,
        threshold=to_credits(settings.threshold),
        package_id=settings.package_id,
        max_per_month=settings.max_per_month,
        monthly_cap_cents=settings.monthly_cap_cents,
        paused_reason=settings.paused_reason,  # type: ignore[arg-type]
        attempts=attempts,
    )


async def get_auto_topup(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    return respond(await auto_topup_view(request.config_dict[LEDGER], cred.organization_id))


async def save_auto_topup(ledger: Ledger, catalog: Catalog, billing: BillingStore, org: str, body: Any) -> None:
    """Validate and save (the API and the portal): the package exists, and enabling needs
    a customer with a default card (a top-up is paid with it, off-session)."""
    try:
        threshold = to_milli(body.threshold)
    except PrecisionError as exc:
        raise invalid(f"credits {exc}", "$.threshold") from None
    if threshold < 0:
        raise invalid("must be at least 0", "$.threshold")
    if await catalog.package(body.package_id) is None:
        raise ApiError(404, "not_found", "no such credit package", "$.package_id")
    if body.enabled:
        customer = await billing.customer(org)
        if customer is None or customer.stripe_customer_id is None:
            raise ApiError(409, "customer_required", "create the customer first: POST /api/billing/customer")
        if customer.default_payment_method_id is None:
            raise invalid("a top-up is paid with the default card: add one first", "$.enabled")
    await AutoTopupStore(ledger).save(
        org,
        enabled=body.enabled,
        threshold=threshold,
        package_id=body.package_id,
        max_per_month=body.max_per_month,
        monthly_cap_cents=body.monthly_cap_cents,
    )


async def put_auto_topup(request: web.Request) -> web.Response:
    cred = await admin(request)
    body = await decode(request, s.AutoTopupRequest)
    ledger = request.config_dict[LEDGER]
    await save_auto_topup(ledger, request.app[CATALOG], request.app[STORE], cred.organization_id, body)
    return respond(await auto_topup_view(ledger, cred.organization_id))


# -- the table of operations: routes and documentation ----------------------------------
@dataclass(frozen=True)
class Operation:
    """One endpoint: the route and the documentation come from this one record."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    request: type[msgspec.Struct] | None = None
    response: type[msgspec.Struct] | None = None
    status: int = 200
    admin: bool = False
    idempotent: bool = False
    query: tuple[str, ...] = ()
    errors: tuple[int, ...] = (401, 503)
    authenticated: bool = True


B = "/api/billing"
MUTATION_ERRORS = (400, 401, 403, 409, 413, 503)
OPERATIONS = (
    Operation("GET", f"{B}/customer", get_customer, "The organization's Stripe customer", response=s.CustomerView,
              errors=(401, 404, 503)),
    Operation("POST", f"{B}/customer", post_customer, "Create the Stripe customer (idempotent per organization)",
              s.CustomerRequest, s.CustomerView, admin=True, idempotent=True, errors=MUTATION_ERRORS),
    Operation("GET", f"{B}/plans", list_plans, "Subscription plans", response=s.PlanList),
    Operation("GET", f"{B}/subscription", get_subscription, "The current subscription", response=s.SubscriptionView,
              errors=(401, 404, 503)),
    Operation("POST", f"{B}/subscription", post_subscription,
              "Subscribe to a plan; its credits are granted when the invoice is paid",
              s.SubscriptionRequest, s.SubscriptionView, status=201, admin=True, idempotent=True,
              errors=(400, 401, 402, 403, 404, 409, 413, 503)),
    Operation("PUT", f"{B}/subscription", put_subscription,
              "Change the plan: an upgrade is invoiced and its extra credits granted at once; a downgrade waits",
              s.ChangePlanRequest, s.SubscriptionView, admin=True, idempotent=True,
              errors=(400, 401, 402, 403, 404, 409, 413, 503)),
    Operation("DELETE", f"{B}/subscription", delete_subscription,
              "Cancel now, or at the end of the period (?at_period_end=true)", response=s.SubscriptionView,
              admin=True, idempotent=True, query=("at_period_end",), errors=(400, 401, 403, 404, 409, 503)),
    Operation("POST", f"{B}/subscription/resume", resume_subscription,
              "Take back a cancellation at period end: the subscription renews again",
              response=s.SubscriptionView, admin=True, idempotent=True, errors=(401, 403, 404, 409, 503)),
    Operation("GET", f"{B}/credit-packages", list_packages, "Credit packages", response=s.PackageList),
    Operation("POST", f"{B}/purchase-credits", purchase_credits,
              "Buy a credit package; its credits are granted exactly once when the payment succeeds",
              s.PurchaseRequest, s.PurchaseResponse, admin=True, idempotent=True,
              errors=(400, 401, 402, 403, 404, 409, 413, 503)),
    Operation("GET", f"{B}/payment-methods", list_payment_methods, "Saved cards", response=s.PaymentMethodList),
    Operation("POST", f"{B}/payment-methods", add_payment_method,
              "Attach a card (e.g. from a confirmed setup intent) to the organization's customer",
              s.PaymentMethodRequest, s.PaymentMethodView, status=201, admin=True, idempotent=True,
              errors=(400, 401, 402, 403, 404, 409, 413, 503)),
    Operation("POST", f"{B}/payment-methods/{{payment_method_id}}/default", set_default_payment_method,
              "Make a card the default", response=s.PaymentMethodView, admin=True, idempotent=True,
              errors=(401, 403, 404, 409, 503)),
    Operation("DELETE", f"{B}/payment-methods/{{payment_method_id}}", delete_payment_method, "Detach a card",
              response=s.DeletedView, admin=True, idempotent=True, errors=(400, 401, 403, 404, 409, 503)),
    Operation("POST", f"{B}/setup-intent", create_setup_intent, "Start saving a card with Stripe.js",
              response=s.SetupIntentView, status=201, admin=True, idempotent=True, errors=(401, 403, 409, 503)),
    Operation("GET", f"{B}/invoices", list_invoices, "Invoices, newest first", response=s.InvoiceList,
              query=("limit", "starting_after"), errors=(400, 401, 503)),
    Operation("GET", f"{B}/payments", list_payments, "Payments, newest first", response=s.PaymentList,
              query=("limit", "starting_after"), errors=(400, 401, 503)),
    Operation("GET", f"{B}/payments/{{payment_id}}", get_payment,
              "One payment, refreshed from Stripe while not final (grants it if it succeeded)",
              response=s.PaymentView, errors=(401, 404, 503)),
    Operation("GET", f"{B}/config", get_config, "Stripe.js settings for a frontend (the publishable key)",
              response=s.BillingConfigView),
    Operation("POST", f"{B}/portal-sessions", create_portal_session,
              "A single-use link into the customer portal for this organization (valid at most an hour)",
              s.PortalSessionRequest, s.PortalSessionView, status=201, admin=True, idempotent=True,
              errors=MUTATION_ERRORS),
    Operation("DELETE", f"{B}/portal-sessions/{{portal_session_id}}", revoke_portal_session,
              "Revoke a portal link and end every browser session it started", response=s.PortalRevokedView,
              admin=True, errors=(401, 403, 404, 503)),
    Operation("GET", f"{B}/auto-topup", get_auto_topup,
              "Automatic top-up: the settings and the last attempts", response=s.AutoTopupView),
    Operation("PUT", f"{B}/auto-topup", put_auto_topup,
              "Set automatic top-up (saving also resumes top-ups a failure paused)",
              s.AutoTopupRequest, s.AutoTopupView, admin=True, errors=(400, 401, 403, 404, 409, 413, 503)),
    Operation("POST", f"{B}/stripe/webhook", stripe_webhook, "Stripe events (signed); answered at once",
              s.StripeEventBody, s.WebhookAck, errors=(400, 413, 503), authenticated=False),
)  # fmt: skip


def routes() -> list[web.RouteDef]:
    return [web.route(op.method, op.path, op.handler) for op in OPERATIONS]
