"""HTTP handlers of /api/credits: decode, authorize, one script call, encode."""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from accounts import admin, entitlements
from api.auth import refuse_viewer, require_admin
from api.errors import ApiError, from_validation, invalid
from api.requests import idempotency_key
from core.errors import OutcomeUnknown
from core.http import IDEMPOTENCY_HEADER, REPLAYED_HEADER
from core.money import PrecisionError, format_credits, to_credits, to_milli
from hotpath.client import BatchItem, Result, fingerprint, new_id, now_ms, period_bounds
from ledger.entitlements import Entitlement, EntitlementStore, LimitReached, NotALimit
from ledger.store import POSTGRES_DOWN, Conflict, Credential, Department, LedgerReads, NotFound, StoredResponse
from lua import Status
from meter import schemas as s
from meter.appkeys import AUTH, CONFIG, CONSUMER, HOT, LEDGER, SOURCES, SPEND_RATES

T = TypeVar("T")
_json = msgspec.json.Encoder(decimal_format="number")
_json_encode = _json.encode
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

_REPLAYED = {REPLAYED_HEADER: "true"}

ITEM_CODES: dict[Status, tuple[int, str, str]] = {
    Status.UNKNOWN_ACTION: (400, "unknown_action", "no cost is configured for this action"),
    Status.DEPARTMENT_NOT_FOUND: (404, "not_found", "no such department in this organization"),
    Status.INSUFFICIENT_CREDITS: (402, "insufficient_credits", "not enough available credits"),
    Status.DEPARTMENT_LIMIT: (402, "department_limit_exceeded", "the department's budget for this period is spent"),
    Status.CAP_EXCEEDED: (402, "key_cap_exceeded", "this API key's spending cap is reached"),
    Status.IDEMPOTENCY_CONFLICT: (409, "idempotency_conflict", "idempotency key reused with different parameters"),
}


def decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    return dec


def respond(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def credits(milli: int) -> decimal.Decimal:
    return to_credits(milli)


def milli(value: decimal.Decimal, param: str, *, minimum: int = 0) -> int:
    try:
        amount = to_milli(value)
    except PrecisionError as exc:
        raise invalid(f"credits {exc}", param) from None
    if amount < minimum:
        raise invalid(f"must be at least {to_credits(minimum)}", param)
    return amount


def arrived_body(request: web.Request) -> bytes | None:
    """The body when all of it has arrived (a small body comes with its headers), taken
    as is: request.read() costs a request several coroutines and copies. None: await
    request.read(). Over the size limit, the same 413 as request.read()."""
    content = request.content
    if not content.is_eof():
        return None
    raw = content.read_nowait()
    limit = request.app[CONFIG].max_body_bytes  # the app's client_max_size
    if len(raw) > limit:
        raise web.HTTPRequestEntityTooLarge(limit, len(raw))
    return raw


async def decode(request: web.Request, kind: type[T]) -> T:
    raw = arrived_body(request)
    if raw is None:
        raw = await request.read()
    try:
        return decoder(kind).decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc, raw, kind=kind) from None


ASSIGNED_KEY_PREFIX = "auto_"


def key_or_assigned(request: web.Request) -> tuple[str | None, bool]:
    """The request's Idempotency-Key, or one assigned to it (and whether it was): should
    no answer come from Redis, the 503 returns the key, and a retry with it replays the
    first result instead of charging again. None when assigning is off
    (IDEMPOTENCY_AUTO_TTL_S=0)."""
    key = idempotency_key(request)
    if key is not None:
        return key, False
    if request.app[CONFIG].idempotency_auto_ttl_s <= 0:
        return None, False
    return ASSIGNED_KEY_PREFIX + new_id(), True


async def with_key(call: Awaitable[Result], key: str | None) -> Result:
    """The call's result; an OutcomeUnknown names the key to retry with."""
    try:
        return await call
    except OutcomeUnknown as exc:
        exc.idempotency_key = key
        raise


def department_for(cred: Credential, requested: str | None) -> str:
    """A key scoped to a department charges there; it may not name another."""
    if cred.department_id is None:
        return requested or ""
    if requested is not None and requested != cred.department_id:
        raise ApiError(403, "forbidden", "this key is scoped to another department", "$.department_id")
    return cred.department_id


def fail(result: Result, *, department_param: str = "$.department_id") -> ApiError:
    """A script's refusal as the API error (nothing was charged)."""
    p = result.payload
    status = result.status
    if status is Status.RATE_LIMITED:
        retry_s = max(1, math.ceil(int(p.get("retry_after_ms", 1000)) / 1000))
        return ApiError(
            429, "rate_limited", "too many requests for this credential", headers={"Retry-After": str(retry_s)}
        )
    if status is Status.UNAUTHENTICATED:
        return ApiError(401, "unauthenticated", "this credential was revoked")
    if status is Status.IDEMPOTENCY_CONFLICT:
        return ApiError(
            409, "idempotency_conflict", "idempotency key reused with different parameters", IDEMPOTENCY_HEADER
        )
    if status is Status.UNKNOWN_ACTION:
        return ApiError(400, "unknown_action", "no cost is configured for this action", "$.action")
    if status is Status.DEPARTMENT_NOT_FOUND:
        return ApiError(404, "not_found", "no such department in this organization", department_param)
    if status is Status.INSUFFICIENT_CREDITS:
        return ApiError(
            402,
            "insufficient_credits",
            f"needs {credits(int(p['needed']))} credits, {credits(int(p['available']))} available",
        )
    if status is Status.DEPARTMENT_LIMIT:
        return ApiError(
            402,
            "department_limit_exceeded",
            f"needs {credits(int(p['needed']))} credits, "
            f"{credits(int(p['remaining']))} left in the department's period",
            department_param,
        )
    if status is Status.CAP_EXCEEDED:
        return ApiError(
            402,
            "key_cap_exceeded",
            f"needs {credits(int(p['needed']))} credits, {credits(int(p['remaining']))} left under this key's cap",
        )
    if status is Status.NOT_FOUND:
        return ApiError(404, "not_found", "no such reservation", "$.reservation_id")
    if status is Status.RESERVATION_CLOSED:
        return ApiError(
            409,
            "reservation_closed",
            f"the reservation is already closed ({p.get('how', 'closed')})",
            "$.reservation_id",
        )
    if status is Status.NOT_YOURS:
        return ApiError(
            403, "forbidden", "this reservation was made by another credential (or needs an admin)", "$.reservation_id"
        )
    if status is Status.USED_EXCEEDS_HOLD:
        return invalid(f"used is more than the reservation's {credits(int(p['amount']))} credits", "$.used")
    if status is Status.NOT_LOADED:
        return ApiError(503, "unavailable", "organization state could not be loaded; nothing was charged")
    return ApiError(500, "internal_error", f"unexpected script status {status.name}")


def mark_replay(response: web.Response, result: Result) -> web.Response:
    if result.status is Status.REPLAY:
        response.headers[REPLAYED_HEADER] = "true"
    return response


def ok(result: Result) -> dict[str, Any]:
    if result.status not in (Status.OK, Status.REPLAY):
        raise fail(result)
    return result.payload


def pack_metadata(metadata: dict[str, Any] | None, param: str = "$.metadata") -> str:
    """Metadata travels as JSON text (Redis' cmsgpack predates msgpack's bin type),
    at most METADATA_BYTES_MAX of it (each key and value is bounded by its type)."""
    if not metadata:
        return ""
    text = _json.encode(metadata)
    if len(text) > s.METADATA_BYTES_MAX:
        raise invalid(f"metadata is {len(text)} bytes as JSON, more than {s.METADATA_BYTES_MAX}", param)
    return text.decode()


# -- /use ------------------------------------------------------------------------
_CHARGES_KEPT_MAX = 1024
_charge_text: dict[int, bytes] = {}  # the few amounts an agent's actions cost, as JSON


def use_response_json(event_id: str, action: str, units: int, charged: int, balance: int, available: int) -> bytes:
    """The JSON of s.UseResponse written directly, without a Decimal per amount: the
    same bytes msgspec writes for the Struct (tests/unit/test_fast_paths.py compares them)."""
    charged_text = _charge_text.get(charged)
    if charged_text is None:
        charged_text = format_credits(charged).encode()
        if len(_charge_text) < _CHARGES_KEPT_MAX:
            _charge_text[charged] = charged_text
    balance_text = format_credits(balance).encode()
    # Without open reservations the two are equal.
    available_text = balance_text if available == balance else format_credits(available).encode()
    return b'{"id":%b,"action":%b,"units":%d,"credits":%b,"balance":%b,"available":%b}' % (
        _json_encode(event_id),
        _json_encode(action),
        units,
        charged_text,
        balance_text,
        available_text,
    )


_decode_use = msgspec.json.Decoder(s.UseRequest).decode


async def use(request: web.Request) -> web.Response:
    app = request.app
    auth = app[AUTH]
    cred = auth.cached(request) or await auth(request)
    if cred.role == "viewer":  # inline: the hot path spares itself a call
        refuse_viewer(cred)
    raw = arrived_body(request)
    if raw is None:
        raw = await request.read()
    try:
        body = _decode_use(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc, raw, kind=s.UseRequest) from None
    key, assigned = key_or_assigned(request)
    dept = department_for(cred, body.department_id)
    # The fingerprint tells a retry from a reuse of the key: no key, nothing to tell.
    fp = "" if key is None else fingerprint("use", body.action, body.units, dept, body.metadata)
    try:
        result = await app[CONSUMER].consume(
            cred.organization_id,
            cred.id,
            action=body.action,
            units=body.units,
            department_id=dept,
            metadata=pack_metadata(body.metadata),
            idempotency_key=key,
            fp=fp,
            assigned=assigned,
        )
    except OutcomeUnknown as exc:
        exc.idempotency_key = key
        raise
    if result.status is not Status.OK and result.status is not Status.REPLAY:
        raise fail(result)
    p = result.payload
    if "balance" not in p:  # a batch item's record from before items kept their balance
        now = (await app[HOT].balance(cred.organization_id, cred.id)).payload
        p = {**p, "balance": now["balance"], "available": now["available"]}
    return web.Response(
        body=use_response_json(p["id"], body.action, body.units, p["credits"], p["balance"], p["available"]),
        content_type="application/json",
        headers=_REPLAYED if result.status is Status.REPLAY else None,
    )


async def use_batch(request: web.Request) -> web.Response:
    app = request.app
    auth = app[AUTH]
    cred = auth.cached(request) or await auth(request)
    refuse_viewer(cred)
    body = await decode(request, s.BatchRequest)
    limit = app[CONFIG].max_batch_items
    if len(body.items) > limit:
        raise ApiError(413, "payload_too_large", f"at most {limit} items per batch", "$.items")
    key, assigned = key_or_assigned(request)
    items = batch_items(cred, body.items)
    # The fingerprint tells a retry from a reuse of the key: no key, nothing to tell.
    fp = ""
    if key is not None:
        fields = [(it.action, it.units, it.department_id, it.metadata, it.idempotency_key) for it in body.items]
        fp = fingerprint("use_batch", body.atomic, fields)
    result = await with_key(
        app[HOT].consume_batch_compact(
            cred.organization_id, cred.id, items, atomic=body.atomic, idempotency_key=key, fp=fp, assigned=assigned
        ),
        key,
    )
    if result.status is Status.ITEM_FAILED:
        p = result.payload
        index = int(p["i"])
        http, code, message = ITEM_CODES[Status(int(p["err"]))]
        param = {"unknown_action": "action", "not_found": "department_id", "department_limit_exceeded": "department_id"}
        field = param.get(code, "")
        raise ApiError(
            http,
            code,
            f"item {index}: {message}; nothing was charged",
            f"$.items[{index}]" + (f".{field}" if field else ""),
        )
    if result.status is not Status.OK and result.status is not Status.REPLAY:
        raise fail(result)
    return mark_replay(respond(batch_response(result.payload, items)), result)


def batch_items(cred: Credential, requested: list[s.BatchItem]) -> list[BatchItem]:
    """The request's items as the hot path takes them: departments resolved, metadata
    as JSON text, fingerprints for the items that carry a key (and only for those)."""
    seen: set[str] = set()
    items: list[BatchItem] = []
    scoped = cred.department_id
    for i, it in enumerate(requested):
        dept = it.department_id
        if scoped is not None:
            if dept is not None and dept != scoped:
                param = f"$.items[{i}].department_id"
                raise ApiError(403, "forbidden", "this key is scoped to another department", param)
            dept = scoped
        elif dept is None:
            dept = ""
        item_key = it.idempotency_key
        fp = ""
        if item_key is not None:
            if item_key in seen:
                raise invalid("idempotency_key repeats within the batch", f"$.items[{i}].idempotency_key")
            seen.add(item_key)
            fp = fingerprint("use", it.action, it.units, dept, it.metadata)
        metadata = pack_metadata(it.metadata, f"$.items[{i}].metadata") if it.metadata else ""
        items.append(BatchItem(it.action, it.units, dept, metadata, item_key, fp))
    return items


def batch_response(p: dict[str, Any], items: list[BatchItem]) -> s.BatchResponse:
    """The response from consume_batch's compact answer: only failures and replays are
    spelled out there; every other item succeeded."""
    memo: dict[int, decimal.Decimal] = {}  # a batch repeats a few amounts many times

    def amount(milli: int) -> decimal.Decimal:
        value = memo.get(milli)
        if value is None:
            value = memo[milli] = credits(milli)
        return value

    results: list[s.BatchResult] = []
    if "results" in p:  # a replay of a batch answered by an earlier version
        rows = p["results"]
    else:
        base = p["b"]
        costs = p["c"] or {}  # an empty Lua table packs as an array
        exceptions = {int(f["i"]): f for f in p["f"]}
        exceptions.update((int(r[0]), {"i": r[0], "ok": True, "id": r[1], "credits": r[2]}) for r in p["r"])
        if not exceptions:  # the common case: every item charged
            for i, item in enumerate(items):
                results.append(
                    s.BatchResult(index=i, ok=True, id=f"{base}-{i}", credits=amount(costs[item.action] * item.units))
                )
            return s.BatchResponse(results=results, balance=credits(p["balance"]), available=credits(p["available"]))
        rows = (
            exceptions.get(i) or {"i": i, "ok": True, "id": f"{base}-{i}", "credits": costs[item.action] * item.units}
            for i, item in enumerate(items)
        )
    for r in rows:
        if r.get("ok", False):
            results.append(s.BatchResult(index=int(r["i"]), ok=True, id=r["id"], credits=amount(int(r["credits"]))))
        else:
            _, code, message = ITEM_CODES[Status(int(r["err"]))]
            if "need" in r:
                message += f" (needs {credits(int(r['need']))}, {credits(int(r['have']))} left)"
            results.append(s.BatchResult(index=int(r["i"]), ok=False, error=s.ItemError(code=code, message=message)))
    return s.BatchResponse(results=results, balance=credits(p["balance"]), available=credits(p["available"]))


# -- reservations ----------------------------------------------------------------
async def reserve(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    refuse_viewer(cred)
    body = await decode(request, s.ReserveRequest)
    amount = milli(body.amount, "$.amount", minimum=1)
    key, assigned = key_or_assigned(request)
    dept = department_for(cred, body.department_id)
    fp = fingerprint("reserve", amount, body.ttl_seconds, dept, body.action, body.metadata)
    result = await with_key(
        request.app[HOT].reserve(
            cred.organization_id,
            cred.id,
            amount=amount,
            ttl_ms=body.ttl_seconds * 1000,
            department_id=dept,
            action=body.action or "",
            metadata=pack_metadata(body.metadata),
            idempotency_key=key,
            fp=fp,
            assigned=assigned,
        ),
        key,
    )
    p = ok(result)
    view = s.ReserveResponse(
        id=p["id"],
        amount=credits(p["amount"]),
        expires_at=iso(p["expires_ms"]),
        balance=credits(p["balance"]),
        available=credits(p["available"]),
    )
    return mark_replay(respond(view), result)


async def release(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    refuse_viewer(cred)
    body = await decode(request, s.ReleaseRequest)
    used = milli(body.used, "$.used")
    key, assigned = key_or_assigned(request)
    fp = fingerprint("release", body.reservation_id, used)
    result = await with_key(
        request.app[HOT].release(
            cred.organization_id,
            cred.id,
            reservation_id=body.reservation_id,
            used=used,
            any_hold=cred.role == "admin",  # an admin may end any hold of the organization
            idempotency_key=key,
            fp=fp,
            assigned=assigned,
        ),
        key,
    )
    p = ok(result)
    view = s.ReleaseResponse(
        id=p["id"],
        used=credits(p["used"]),
        released=credits(p["released"]),
        balance=credits(p["balance"]),
        available=credits(p["available"]),
    )
    return mark_replay(respond(view), result)


# -- balance ---------------------------------------------------------------------
def _dept_param(request: web.Request, cred: Credential) -> str:
    raw = request.query.get("department_id")
    if raw is not None:
        try:
            msgspec.convert(raw, s.DepartmentId)
        except msgspec.ValidationError:
            raise invalid("department_id must be a department id (uuid)", "department_id") from None
    return department_for(cred, raw)


def _budget(dept_id: str, d: dict[str, Any], soft: Department | None = None) -> s.DepartmentBudget:
    """The cache's view of a department's period; `soft`: its row when its budget is soft
    (the cache enforces no limit then, so the limit is the row's)."""
    limit = int(d["limit"])
    if soft is not None and soft.limit is not None:
        limit = soft.limit
    spent = int(d["spent"])
    return s.DepartmentBudget(
        id=dept_id,
        limit=None if limit < 0 else credits(limit),
        period=d["period"],
        spent=credits(spent),
        remaining=None if limit < 0 else credits(max(0, limit - spent)),
        mode="soft" if soft is not None else "hard",
        alert_percent=soft.alert_percent if soft is not None else None,
    )


async def _soft_budget(request: web.Request, org: str, dept_id: str, d: dict[str, Any]) -> Department | None:
    """The department's row when the cache enforces no limit and its budget may be soft
    (read from Postgres only then; while it cannot answer, shown as the cache has it)."""
    if int(d["limit"]) >= 0:
        return None
    try:
        dept = await request.app[LEDGER].department(org, dept_id)
    except NotFound:
        return None
    except POSTGRES_DOWN:
        return None
    return dept if dept.mode == "soft" else None


async def balance(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    dept = _dept_param(request, cred)
    org = cred.organization_id
    result = await request.app[HOT].balance(org, cred.id, department_id=dept)
    p = ok_or(result, department_param="department_id")
    grants = p["grants"]
    sources = await request.app[SOURCES].lookup(org, [g["id"] for g in grants])
    spend = await request.app[SPEND_RATES].recent(org)
    # With a credit line, spending stops at minus the limit, not at zero.
    room = int(p["available"]) + int(p.get("credit_limit") or 0)
    runs_out = None if spend is None else spend.runs_out_at(room, dt.datetime.now(dt.UTC))
    soft = await _soft_budget(request, org, dept, p["dept"]) if dept else None
    return respond(
        s.BalanceResponse(
            organization_id=org,
            balance=credits(p["balance"]),
            reserved=credits(p["reserved"]),
            available=credits(p["available"]),
            grants=[
                s.GrantView(
                    id=g["id"],
                    source=sources.get(g["id"], "unknown"),
                    remaining=credits(int(g["remaining"])),
                    expires_at=iso(int(g["expires_ms"])) if int(g["expires_ms"]) else None,
                )
                for g in grants
            ],
            department=_budget(dept, p["dept"], soft) if dept else None,
            runs_out_at=None if runs_out is None else runs_out.strftime("%Y-%m-%dT%H:%M:%SZ"),
            credit_limit=credits(int(p.get("credit_limit") or 0)),
            debt=credits(int(p.get("debt") or 0)),
        )
    )


def ok_or(result: Result, *, department_param: str) -> dict[str, Any]:
    if result.status is not Status.OK:
        raise fail(result, department_param=department_param)
    return result.payload


# -- costs -----------------------------------------------------------------------
async def _request_token(request: web.Request, cred: Credential) -> None:
    ok_or(await request.app[HOT].take_request_token(cred.organization_id, cred.id), department_param="department_id")


async def list_costs(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    await _request_token(request, cred)
    rows = await request.app[LEDGER].costs(cred.organization_id)
    return respond(
        s.CostList(
            data=[
                s.CostView(action=c.action, credits=credits(c.credits), unit=c.unit, description=c.description)
                for c in rows
            ]
        )
    )


async def put_cost(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    require_admin(cred)
    action = request.match_info["action"]
    try:
        msgspec.convert(action, s.Action)
    except msgspec.ValidationError:
        raise invalid("action must match ^[a-z][a-z0-9_.:-]{0,63}$", "action") from None
    body = await decode(request, s.CostRequest)
    amount = milli(body.credits, "$.credits")
    await _request_token(request, cred)
    org = cred.organization_id
    cost = await admin.set_cost(
        request.app[LEDGER], request.app[HOT], org, action, credits=amount, unit=body.unit, description=body.description
    )
    return respond(
        s.CostView(action=cost.action, credits=credits(cost.credits), unit=cost.unit, description=cost.description)
    )


# -- departments -----------------------------------------------------------------
async def list_departments(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    await _request_token(request, cred)
    rows = await request.app[LEDGER].departments(cred.organization_id)
    return respond(s.DepartmentList(data=[s.DepartmentView(id=d.id, name=d.name) for d in rows]))


async def create_department(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    require_admin(cred)
    body = await decode(request, s.DepartmentRequest)
    key = idempotency_key(request)
    org = cred.organization_id
    ledger = request.app[LEDGER]
    fp = fingerprint("create_department", body.name)
    await _request_token(request, cred)
    if key is None:
        return await _create_department(request, org, body.name)
    # Requests with one key take turns: the second finds the first's answer and replays
    # it, instead of failing on the name the first just took.
    async with ledger.idempotency_lock(org, key):
        stored = await ledger.stored_response(org, key)
        if stored is not None:
            return _replay(stored, fp, replayed=True)
        response = await _create_department(request, org, body.name)
        assert isinstance(response.body, bytes)
        await ledger.store_response(org, key, StoredResponse(fp, response.status, response.body))
    return response


async def _create_department(request: web.Request, org: str, name: str) -> web.Response:
    try:
        dept = await admin.create_department(request.app[LEDGER], request.app[HOT], org, name)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc), "$.name") from None
    return respond(s.DepartmentView(id=dept.id, name=dept.name), status=201)


def _replay(stored: StoredResponse, fp: str, *, replayed: bool) -> web.Response:
    if stored.fingerprint != fp:
        raise ApiError(
            409, "idempotency_conflict", "idempotency key reused with different parameters", IDEMPOTENCY_HEADER
        )
    return web.Response(
        body=stored.body, status=stored.status, content_type="application/json", headers=_REPLAYED if replayed else None
    )


def _dept_id(request: web.Request) -> str:
    raw = request.match_info["department_id"]
    try:
        return msgspec.convert(raw, s.DepartmentId)
    except msgspec.ValidationError:
        raise ApiError(404, "not_found", "no such department", "department_id") from None


async def _limit_view(request: web.Request, cred: Credential, dept_id: str) -> s.LimitView:
    result = await request.app[HOT].balance(cred.organization_id, cred.id, department_id=dept_id)
    p = ok_or(result, department_param="department_id")
    budget = _budget(dept_id, p["dept"], await _soft_budget(request, cred.organization_id, dept_id, p["dept"]))
    start, end = period_bounds(budget.period, now_ms())
    return s.LimitView(
        department_id=dept_id,
        limit=budget.limit,
        period=budget.period,
        spent=budget.spent,
        remaining=budget.remaining,
        period_start=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        period_end=end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        mode=budget.mode,
        alert_percent=budget.alert_percent,
    )


async def get_limits(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    dept_id = _dept_id(request)
    if cred.department_id is not None and cred.department_id != dept_id:
        raise ApiError(403, "forbidden", "this key is scoped to another department", "department_id")
    return respond(await _limit_view(request, cred, dept_id))


async def put_limits(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    require_admin(cred)
    dept_id = _dept_id(request)
    body = await decode(request, s.LimitRequest)
    limit = None if body.limit is None else milli(body.limit, "$.limit")
    alert_percent = body.alert_percent
    if body.mode == "hard" and alert_percent is not None:
        raise invalid("alert_percent is for soft budgets (mode: soft)", "$.alert_percent")
    if body.mode == "soft":
        if limit is None:
            raise invalid("a soft budget needs a limit to alert at", "$.limit")
        alert_percent = alert_percent or s.SOFT_ALERT_PERCENT_DEFAULT
    await _request_token(request, cred)
    org = cred.organization_id
    try:
        await admin.set_department_limit(
            request.app[LEDGER],
            request.app[HOT],
            org,
            dept_id,
            limit=limit,
            period=body.period,
            mode=body.mode,
            alert_percent=alert_percent,
        )
    except NotFound:
        raise ApiError(404, "not_found", "no such department", "department_id") from None
    return respond(await _limit_view(request, cred, dept_id))


# -- reading the ledger (settled events, from Postgres) -----------------------------------
def query(request: web.Request, kind: type[T]) -> T:
    """Query parameters decoded like bodies: unknown ones refused, param names the field."""
    try:
        return msgspec.convert(dict(request.query), kind, strict=False)
    except msgspec.ValidationError as exc:
        err = from_validation(exc, kind=kind)
        if err.param and err.param.startswith("$."):
            err.param = err.param[2:]
        raise err from None


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def usage(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    q = query(request, s.UsageQuery)
    dept = department_for(cred, q.department_id) or None
    await _request_token(request, cred)
    try:
        rows, more = await LedgerReads(request.app[LEDGER]).usage(
            cred.organization_id,
            start=q.from_,
            end=q.to,
            department_id=dept,
            action=q.action,
            limit=q.limit,
            starting_after=q.starting_after,
        )
    except NotFound:
        raise ApiError(
            404, "not_found", "starting_after names no usage event of this organization", "starting_after"
        ) from None
    return respond(
        s.UsageList(
            data=[
                s.UsageEvent(
                    id=r.id,
                    action=r.action,
                    units=r.units,
                    credits=credits(r.credits),
                    department_id=r.department_id,
                    metadata=msgspec.Raw(r.metadata.encode()),
                    created_at=_iso(r.created_at),
                    kind="capture" if r.kind == "capture" else "use",
                )
                for r in rows
            ],
            has_more=more,
        )
    )


async def usage_summary(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    q = query(request, s.SummaryQuery)
    dept = department_for(cred, q.department_id) or None
    await _request_token(request, cred)
    rows = await LedgerReads(request.app[LEDGER]).usage_summary(
        cred.organization_id, start=q.from_, end=q.to, group_by=q.group_by, action=q.action, department_id=dept
    )
    return respond(
        s.UsageSummary(
            data=[s.SummaryItem(key=r.key, events=r.events, units=r.units, credits=credits(r.credits)) for r in rows],
            total_credits=credits(sum(r.credits for r in rows)),
        )
    )


async def transactions(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    if cred.department_id is not None:  # ledger entries are the organization's, not a department's
        raise ApiError(403, "forbidden", "a key scoped to a department cannot read the organization's ledger")
    q = query(request, s.TransactionsQuery)
    await _request_token(request, cred)
    rows, more = await LedgerReads(request.app[LEDGER]).transactions(
        cred.organization_id,
        type_=q.type,
        limit=q.limit,
        starting_after=int(q.starting_after) if q.starting_after else None,
    )
    return respond(
        s.TransactionList(
            data=[
                s.Transaction(
                    id=str(r.id),
                    type=r.type,
                    amount=credits(r.amount),
                    balance_after=credits(r.balance_after),
                    reference=r.reference,
                    created_at=_iso(r.created_at),
                )
                for r in rows
            ],
            has_more=more,
        )
    )


# -- entitlements (issue 13) -------------------------------------------------------
_CHARGE_REASONS: dict[Status, s.CheckReason] = {
    Status.INSUFFICIENT_CREDITS: "insufficient_credits",
    Status.DEPARTMENT_LIMIT: "department_limit_exceeded",
    Status.CAP_EXCEEDED: "key_cap_exceeded",
}


def _remaining(limit: int, usage: int) -> int | None:
    return None if limit < 0 else max(0, limit - usage)


def _check_response(feature: str, gate: dict[str, Any], *, charge: s.CheckCharge | None = None) -> s.CheckResponse:
    """The gate a script read (lib.lua, entitlement_gate) as the API answers it."""
    kind = gate.get("t") or None
    allowed = int(gate.get("ok", 0)) == 1
    body = s.CheckResponse(allowed=allowed, feature=feature, reason=None if allowed else gate.get("why"), type=kind)
    if kind == "boolean":
        body.enabled = int(gate["e"]) == 1
    elif kind == "limit":
        limit, usage = int(gate["l"]), int(gate["u"])
        body.limit = None if limit < 0 else limit
        body.usage = usage
        body.remaining = _remaining(limit, usage)
    elif kind == "config":
        body.value = str(gate["v"])
    body.charge = charge
    return body


async def check(request: web.Request) -> web.Response:
    app = request.app
    cred = await app[AUTH](request)
    body = await decode(request, s.CheckRequest)
    store = EntitlementStore(app[LEDGER])
    org = cred.organization_id
    if body.action is None:
        result = await entitlements.check(store, app[HOT], org, cred.id, feature=body.feature)
        gate = ok_or(result, department_param="$.department_id")["ent"]
        return respond(_check_response(body.feature, gate))
    refuse_viewer(cred)
    key, assigned = key_or_assigned(request)
    dept = department_for(cred, body.department_id)
    fp = "" if key is None else fingerprint("check", body.feature, body.action, body.units, dept, body.metadata)
    result = await with_key(
        entitlements.check_consume(
            store,
            app[HOT],
            org,
            cred.id,
            feature=body.feature,
            action=body.action,
            units=body.units,
            department_id=dept,
            metadata=pack_metadata(body.metadata),
            idempotency_key=key,
            fp=fp,
            assigned=assigned,
        ),
        key,
    )
    if result.status is Status.FEATURE_DENIED:
        return respond(_check_response(body.feature, result.payload))
    reason = _CHARGE_REASONS.get(result.status)
    if reason is not None:  # the feature allows it; the credits do not: nothing charged
        gate = await entitlements.check(store, app[HOT], org, "", feature=body.feature)
        refused = _check_response(body.feature, gate.payload.get("ent", {}))
        refused.allowed, refused.reason = False, reason
        return respond(refused)
    p = ok(result)
    charge = s.CheckCharge(
        id=p["id"],
        action=body.action,
        units=body.units,
        credits=credits(int(p["credits"])),
        balance=credits(int(p["balance"])),
        available=credits(int(p["available"])),
    )
    gate = dict(p.get("ent") or {})
    gate["ok"] = 1  # charged: allowed (a replay says so whatever the features say now)
    return mark_replay(respond(_check_response(body.feature, gate, charge=charge)), result)


def _entitlement_view(e: Entitlement, plan_id: str) -> s.EntitlementView:
    f = e.feature
    source: s.FeatureSource = "override" if e.overridden else ("plan" if plan_id else "free")
    view = s.EntitlementView(feature=f.feature, type=f.type, source=source)
    if f.type == "boolean":
        view.enabled = f.enabled
    elif f.type == "limit":
        view.limit = f.limit
        view.usage = e.usage
        view.remaining = None if f.limit is None else max(0, f.limit - e.usage)
    else:
        view.value = f.value
    return view


async def list_entitlements(request: web.Request) -> web.Response:
    cred = await request.app[AUTH](request)
    await _request_token(request, cred)
    ents = await EntitlementStore(request.app[LEDGER]).effective(cred.organization_id)
    return respond(
        s.EntitlementList(
            plan_id=ents.plan_id or None, data=[_entitlement_view(e, ents.plan_id) for e in ents.features]
        )
    )


async def change_usage(request: web.Request) -> web.Response:
    app = request.app
    cred = await app[AUTH](request)
    refuse_viewer(cred)
    try:
        feature = msgspec.convert(request.match_info["feature"], s.Feature)
    except msgspec.ValidationError:
        raise ApiError(404, "not_found", "no such feature", "feature") from None
    body = await decode(request, s.UsageChangeRequest)
    key = idempotency_key(request)
    await _request_token(request, cred)
    store = EntitlementStore(app[LEDGER])
    try:
        change = await entitlements.change_usage(
            store,
            app[HOT],
            cred.organization_id,
            feature,
            body.delta,
            key=key,
            fingerprint=fingerprint("usage", feature, body.delta),
        )
    except LimitReached as exc:
        raise ApiError(
            402,
            "entitlement_limit_reached",
            f"{feature}: {exc.usage} used of {exc.limit}; {exc.delta} more would pass the plan's limit",
            "$.delta",
        ) from None
    except NotALimit as exc:
        if exc.type is None:
            raise ApiError(404, "not_found", str(exc), "feature") from None
        raise invalid(str(exc), "feature") from None
    except ValueError:
        raise ApiError(
            409, "idempotency_conflict", "idempotency key reused with different parameters", IDEMPOTENCY_HEADER
        ) from None
    response = respond(
        s.UsageChangeResponse(
            feature=change.feature,
            delta=change.delta,
            usage=change.usage,
            limit=change.limit,
            remaining=None if change.limit is None else max(0, change.limit - change.usage),
        )
    )
    if change.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


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
    errors: tuple[int, ...] = (400, 401, 429, 503)


OPERATIONS = (
    Operation(
        "GET",
        "/api/credits/balance",
        balance,
        "Balance, reserved, available and live grants",
        response=s.BalanceResponse,
        query=("department_id",),
        errors=(400, 401, 403, 404, 429, 503),
    ),
    Operation(
        "POST",
        "/api/credits/use",
        use,
        "Consume credits for one action",
        s.UseRequest,
        s.UseResponse,
        idempotent=True,
        errors=(400, 401, 402, 403, 404, 409, 413, 429, 503),
    ),
    Operation(
        "POST",
        "/api/credits/use/batch",
        use_batch,
        "Consume credits for many actions (atomic or best effort)",
        s.BatchRequest,
        s.BatchResponse,
        idempotent=True,
        errors=(400, 401, 402, 403, 404, 409, 413, 429, 503),
    ),
    Operation(
        "POST",
        "/api/credits/reserve",
        reserve,
        "Hold credits for a long task",
        s.ReserveRequest,
        s.ReserveResponse,
        idempotent=True,
        errors=(400, 401, 402, 403, 404, 409, 413, 429, 503),
    ),
    Operation(
        "POST",
        "/api/credits/release",
        release,
        "Charge what a reservation used, free the rest",
        s.ReleaseRequest,
        s.ReleaseResponse,
        idempotent=True,
        errors=(400, 401, 403, 404, 409, 413, 429, 503),
    ),
    Operation(
        "GET",
        "/api/credits/usage",
        usage,
        "Settled usage events and reservation captures, newest first (cursor pages)",
        response=s.UsageList,
        query=("from", "to", "department_id", "action", "limit", "starting_after"),
        errors=(400, 401, 403, 404, 429, 503),
    ),
    Operation(
        "GET",
        "/api/credits/usage/summary",
        usage_summary,
        "Settled usage and captures grouped by action, department, day, hour or api_key",
        response=s.UsageSummary,
        query=("from", "to", "group_by", "action", "department_id"),
    ),
    Operation(
        "GET",
        "/api/credits/transactions",
        transactions,
        "Ledger entries, newest first (cursor pages); not for department-scoped keys",
        response=s.TransactionList,
        query=("type", "limit", "starting_after"),
        errors=(400, 401, 403, 429, 503),
    ),
    Operation("GET", "/api/credits/costs", list_costs, "Cost of every action", response=s.CostList),
    Operation(
        "PUT",
        "/api/credits/costs/{action}",
        put_cost,
        "Set an action's cost (admin)",
        s.CostRequest,
        s.CostView,
        admin=True,
        errors=(400, 401, 403, 413, 429, 503),
    ),
    Operation("GET", "/api/credits/departments", list_departments, "Departments", response=s.DepartmentList),
    Operation(
        "POST",
        "/api/credits/departments",
        create_department,
        "Create a department (admin)",
        s.DepartmentRequest,
        s.DepartmentView,
        status=201,
        admin=True,
        idempotent=True,
        errors=(400, 401, 403, 409, 413, 429, 503),
    ),
    Operation(
        "GET",
        "/api/credits/departments/{department_id}/limits",
        get_limits,
        "A department's budget for the current period",
        response=s.LimitView,
        errors=(401, 403, 404, 429, 503),
    ),
    Operation(
        "PUT",
        "/api/credits/departments/{department_id}/limits",
        put_limits,
        "Set a department's budget (admin)",
        s.LimitRequest,
        s.LimitView,
        admin=True,
        errors=(400, 401, 403, 404, 413, 429, 503),
    ),
    Operation(
        "GET",
        "/api/credits/entitlements",
        list_entitlements,
        "The organization's features: its plan's (or the free defaults) with its overrides, and usage",
        response=s.EntitlementList,
        errors=(401, 429, 503),
    ),
    Operation(
        "POST",
        "/api/credits/check",
        check,
        "May this credential use a feature (from the cache); with an action, charge it too, atomically",
        s.CheckRequest,
        s.CheckResponse,
        idempotent=True,
        errors=(400, 401, 403, 404, 409, 413, 429, 503),
    ),
    Operation(
        "POST",
        "/api/credits/entitlements/{feature}/usage",
        change_usage,
        "Count usage of a limit feature (delta may be negative); refused past the limit",
        s.UsageChangeRequest,
        s.UsageChangeResponse,
        idempotent=True,
        errors=(400, 401, 402, 403, 404, 409, 413, 429, 503),
    ),
)
