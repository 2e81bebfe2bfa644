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

import prometheus_client
from aiohttp import web

from core.money import to_credits
from settler import reconcile
from settler.service import REGISTRY, Settler

SETTLER = web.AppKey("settler", Settler)


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
        "redis": float(to_credits(d.cache)),
        "ledger": float(to_credits(d.ledger)),
        "in_flight": float(to_credits(d.in_flight)),
        "unpushed_grants": float(to_credits(d.unpushed)),
        "difference": float(to_credits(d.difference)),
    }


async def get_reconcile(request: web.Request) -> web.Response:
    _authorize(request)
    org = _organization(request, required=False)
    s = request.app[SETTLER]
    report = await reconcile.run(s.redis, s.hot, s.settlement, [org] if org else None)
    return web.json_response(
        {"checked": report.checked, "drifts": [_drift(d) for d in report.drifts], "lagging": report.lagging}
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
    return web.json_response({"organization_id": org, "repaired": _drift(repaired) if repaired else None})


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
