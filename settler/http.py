"""The settler's small HTTP door for operations: /healthz, /metrics (lag, drift,
settled events) and the reconciliation endpoint.

    GET  /api/admin/reconcile[?organization_id=ID]   report drift (all or one)
    POST /api/admin/reconcile?organization_id=ID     repair one organization from the ledger

Reconciliation spans every organization, so it is not a tenant endpoint: it answers
only `Authorization: Bearer $OPS_TOKEN` and is off while OPS_TOKEN is unset.
"""

from __future__ import annotations

import hmac
import uuid

import msgspec
import prometheus_client
from aiohttp import web

from core.money import to_credits
from settler import reconcile
from settler.metrics import REGISTRY
from settler.service import Settler

SETTLER = web.AppKey("settler", Settler)
_encode = msgspec.json.Encoder(decimal_format="number").encode


def _authorize(request: web.Request) -> None:
    token = request.app[SETTLER].config.ops_token
    if token is None:
        raise web.HTTPForbidden(
            text='{"error": {"type": "permission_error", "code": "forbidden", '
            '"message": "OPS_TOKEN is not set: the ops endpoints are off", "param": null}}',
            content_type="application/json",
        )
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise web.HTTPUnauthorized(
            text='{"error": {"type": "authentication_error", "code": "unauthenticated", '
            '"message": "send Authorization: Bearer <OPS_TOKEN>", "param": null}}',
            content_type="application/json",
        )


def _organization(request: web.Request, *, required: bool) -> str | None:
    raw = request.query.get("organization_id")
    if raw is None:
        if required:
            raise web.HTTPBadRequest(
                text='{"error": {"type": "invalid_request_error", "code": "invalid_request", '
                '"message": "organization_id is required", "param": "organization_id"}}',
                content_type="application/json",
            )
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": {"type": "invalid_request_error", "code": "invalid_request", '
            '"message": "organization_id must be a uuid", "param": "organization_id"}}',
            content_type="application/json",
        ) from None


def _drift(d: reconcile.Drift) -> dict[str, object]:
    return {
        "organization_id": d.organization_id,
        "redis": to_credits(d.cache),
        "ledger": to_credits(d.ledger),
        "in_flight": to_credits(d.in_flight),
        "unpushed_grants": to_credits(d.unpushed),
        "quarantined": to_credits(d.quarantined),
        "difference": to_credits(d.difference),
        "debt_difference": to_credits(d.debt_difference),
    }


def _json(body: object, status: int = 200) -> web.Response:
    """Credits as exact JSON numbers (never floats), like every other answer."""
    return web.Response(body=_encode(body), status=status, content_type="application/json")


async def get_reconcile(request: web.Request) -> web.Response:
    _authorize(request)
    org = _organization(request, required=False)
    s = request.app[SETTLER]
    report = await reconcile.run(s.redis, s.hot, s.settlement, [org] if org else None)
    return _json(
        {
            "checked": report.checked,
            "clean": report.clean,
            "drifts": [_drift(d) for d in report.drifts],
            "lagging": report.lagging,
            "quarantined": {o: to_credits(amount) for o, amount in report.quarantined.items()},
            "dead_letters": report.dead_letters,
            "lagging_partitions": {str(p): round(age, 1) for p, age in report.lagging_partitions.items()},
        }
    )


async def post_reconcile(request: web.Request) -> web.Response:
    _authorize(request)
    org = _organization(request, required=True)
    assert org is not None
    s = request.app[SETTLER]
    try:
        repaired = await reconcile.repair(s.hot, s.settlement, org)
    except RuntimeError as exc:
        return web.json_response(
            {"error": {"type": "conflict_error", "code": "in_flight", "message": str(exc), "param": "organization_id"}},
            status=409,
        )
    return _json({"organization_id": org, "repaired": _drift(repaired) if repaired else None})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=prometheus_client.generate_latest(REGISTRY), content_type="text/plain", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "partitions_owned": sorted(request.app[SETTLER].owned)})


def create_app(settler: Settler) -> web.Application:
    app = web.Application()
    app[SETTLER] = settler
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/api/admin/reconcile", get_reconcile),
            web.post("/api/admin/reconcile", post_reconcile),
        ]
    )
    return app
