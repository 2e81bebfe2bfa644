"""The billing service: app factory, resources, the webhook worker, operational endpoints."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import prometheus_client
import redis.asyncio as aioredis
from aiohttp import web

from accounts import entitlements
from api import cors, reference
from api.auth import Authenticator, hot_path_check
from api.errors import Handler, error_middleware
from billing import handlers, openapi
from billing.actions import BillingActions
from billing.appkeys import (
    ACTIONS,
    AUTH,
    AUTO_TOPUPS,
    BILLING_CONFIG,
    CATALOG,
    CONFIG,
    CREDITS,
    EVENTS,
    GATEWAY,
    HOT,
    LEDGER,
    PORTAL_SESSIONS,
    RECEIVER,
    REDIS,
    STORE,
    WORKER,
)
from billing.autotopup import AutoTopups, AutoTopupStore
from billing.catalog import Catalog, sync_catalog
from billing.config import BillingConfig
from billing.credits import Credits
from billing.gateway import StripeError, StripeGateway
from billing.portal_sessions import PortalSessions, signing_key
from billing.store import BillingStore
from billing.stripe_client import StripeClientGateway
from core.config import Config
from core.errors import Unavailable
from hotpath.client import HotPath
from hotpath.servers import open_redis
from ledger.entitlements import EntitlementStore
from ledger.store import Ledger
from webhooks.endpoint import WebhookReceiver
from webhooks.handlers import EventHandlers
from webhooks.store import EventStore
from webhooks.worker import REGISTRY as EVENTS_REGISTRY
from webhooks.worker import EventWorker

log = logging.getLogger(__name__)

BODY_BYTES_MAX = 1024 * 1024
REDIS_POOL_CONNECTIONS_MAX = 64
REGISTRY = prometheus_client.CollectorRegistry()
REQUESTS = prometheus_client.Counter(
    "credits_billing_http_requests", "Billing HTTP requests by route and status", ["route", "status"], registry=REGISTRY
)
LATENCY = prometheus_client.Histogram(
    "credits_billing_http_request_seconds",
    "Billing HTTP request latency by route",
    ["route"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    registry=REGISTRY,
)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    response = await handler(request)
    LATENCY.labels(route).observe(time.perf_counter() - started)
    REQUESTS.labels(route, str(response.status)).inc()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        await request.app[HOT].ping()  # every primary, on a cluster
        checks["redis"] = "ok"
    except (aioredis.RedisError, OSError, Unavailable) as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        await request.app[LEDGER].ping()
        checks["postgres"] = "ok"
    except Exception as exc:  # any failure to reach Postgres means not ready
        checks["postgres"] = f"unreachable: {exc}"
    checks["webhook_worker"] = "ok" if request.app[WORKER].running else "stopped"
    plans = await request.app[CATALOG].plans() if checks["postgres"] == "ok" else []
    checks["catalog"] = "ok" if plans and all(p.stripe_price_id for p in plans) else "not synced with Stripe"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    body = prometheus_client.generate_latest(REGISTRY) + prometheus_client.generate_latest(EVENTS_REGISTRY)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=openapi.document(), content_type="application/json")


Mount = Callable[[web.Application], None]


def create_app(
    config: Config, billing: BillingConfig, *, gateway: StripeGateway | None = None, mounts: Sequence[Mount] = ()
) -> web.Application:
    """The billing service. Needs Redis and Postgres URLs (embedded or real) and Stripe
    settings (configured, or a localstripe started by billing.runtime). `mounts` add
    pages served with it (the customer portal: `portal.app.mount`, handed in by ops,
    since no room below ops imports the portal); they use the resources opened here."""
    if not billing.stripe_configured:
        raise RuntimeError("STRIPE_SECRET_KEY is not set and no localstripe was started")
    webhook_secret = billing.stripe_webhook_secret or ""
    # Metrics outside the error middleware, so that error responses are counted too.
    app = web.Application(
        middlewares=[metrics_middleware, *cors.middlewares(config.cors_origins), error_middleware],
        client_max_size=BODY_BYTES_MAX,
    )
    app[CONFIG] = config
    app[BILLING_CONFIG] = billing

    async def resources(app: web.Application) -> AsyncIterator[None]:
        if config.redis_url is None:
            raise RuntimeError("REDIS_URL is not set and no embedded server was started")
        connections = await open_redis(
            config.redis_url,
            max_connections=REDIS_POOL_CONNECTIONS_MAX,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        redis = connections.redis
        stripe_gateway = gateway or StripeClientGateway(billing)
        try:
            ledger = await Ledger.connect(config.app_dsn(), min_size=2, max_size=10)
            try:
                hot = HotPath.using(connections, ledger, config)
                await hot.check_servers()
                await hot.start()
                catalog = Catalog(ledger.pool)
                if billing.catalog_sync_on_start:
                    try:
                        await sync_catalog(catalog, stripe_gateway)
                    except StripeError as exc:  # serve what is synced; subscribing waits for a sync
                        log.error("catalog_sync_failed", extra={"error": str(exc)})
                features = EntitlementStore(ledger)

                async def subscription_changed(org: str, hot: HotPath = hot) -> None:
                    await entitlements.push_soon(features, hot, org)

                store = BillingStore(ledger, subscription_changed=subscription_changed)
                credits = Credits(
                    store=store,
                    ledger=ledger,
                    hot=hot,
                    catalog=catalog,
                    gateway=stripe_gateway,
                    rollover=billing.plan_credits_rollover,
                )
                actions = BillingActions(store=store, credits=credits, catalog=catalog, gateway=stripe_gateway)
                events = EventStore(ledger)
                worker = EventWorker(
                    events,
                    EventHandlers(
                        store=store, credits=credits, catalog=catalog, gateway=stripe_gateway, actions=actions
                    ),
                    workers=billing.webhook_workers,
                    sweep_interval_s=billing.webhook_sweep_interval_s,
                    attempts_max=billing.webhook_attempts_max,
                )
                app[REDIS] = redis
                app[LEDGER] = ledger
                app[HOT] = hot
                # Billing runs no hot-path script per request: the revoked flag and the rate
                # limit are checked for every request as the sidecar's scripts check them.
                app[AUTH] = Authenticator(ledger, config.jwt_secret, check=hot_path_check(hot, ledger))
                app[GATEWAY] = stripe_gateway
                app[CATALOG] = catalog
                app[STORE] = store
                app[CREDITS] = credits
                app[ACTIONS] = actions
                app[EVENTS] = events
                app[WORKER] = worker
                app[RECEIVER] = WebhookReceiver(events, worker, webhook_secret)
                app[PORTAL_SESSIONS] = PortalSessions(
                    ledger,
                    signing_key(billing.portal_secret, config.jwt_secret),
                    link_ttl_s=billing.portal_link_ttl_s,
                    session_ttl_s=billing.portal_session_ttl_s,
                )
                topups = AutoTopups(
                    AutoTopupStore(ledger),
                    hot=hot,
                    catalog=catalog,
                    gateway=stripe_gateway,
                    credits=credits,
                    billing=store,
                    interval_s=billing.auto_topup_interval_s,
                    cooldown_s=billing.auto_topup_cooldown_s,
                )
                app[AUTO_TOPUPS] = topups
                await worker.start()
                topups.start()
                try:
                    yield
                finally:
                    await topups.stop()
                    await worker.stop()
            finally:
                await ledger.close()
        finally:
            if gateway is None:
                await stripe_gateway.close()
            await connections.close()

    app.cleanup_ctx.append(resources)
    app.add_routes(handlers.routes())
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/api/billing/openapi.json", openapi_json),
            *(
                web.get(path, handler)
                for path, handler in reference.routes("Agent credits billing API", "/api/billing/openapi.json")
            ),
        ]
    )
    for mount in mounts:
        mount(app)
    return app
