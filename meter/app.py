"""The metering sidecar: app factory, resources and operational endpoints."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import prometheus_client
import redis.asyncio as aioredis
from aiohttp import web

from core.config import Config
from ledger.store import Ledger
from meter import handlers, openapi
from meter.appkeys import AUTH, CONFIG, HOT, LEDGER, REDIS
from meter.auth import Authenticator
from meter.errors import Handler, error_middleware
from meter.hotpath import HotPath, Unavailable
from meter.redisconn import PipelinedRedis

log = logging.getLogger(__name__)

REGISTRY = prometheus_client.CollectorRegistry()
REQUESTS = prometheus_client.Counter(
    "credits_http_requests", "HTTP requests by route and status", ["route", "status"], registry=REGISTRY
)
LATENCY = prometheus_client.Histogram(
    "credits_http_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
REDIS_POOL_CONNECTIONS_MAX = 256


class RedisPolicyError(RuntimeError):
    """Redis would evict keys under memory pressure: credits would vanish."""


async def check_redis_policy(redis: aioredis.Redis) -> None:
    policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
    if policy != "noeviction":
        raise RedisPolicyError(
            f"Redis runs with maxmemory-policy={policy}; the credits cache needs noeviction "
            "(an evicted balance or usage entry is lost money). Set it and restart."
        )


# Label children bound once per route (and status): labels() takes a lock and checks
# its arguments on every call. Bounded by the routes times the statuses they answer.
_request_counters: dict[tuple[str, int], Any] = {}
_latency_histograms: dict[str, Any] = {}


def _observe(route: str, status: int, seconds: float) -> None:
    histogram = _latency_histograms.get(route)
    if histogram is None:
        histogram = _latency_histograms[route] = LATENCY.labels(route)
    histogram.observe(seconds)
    counter = _request_counters.get((route, status))
    if counter is None:
        counter = _request_counters[(route, status)] = REQUESTS.labels(route, str(status))
    counter.inc()


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: it sees the response error_middleware made of any failure, so error
    statuses are counted too."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # what error_middleware lets through (redirects)
        _observe(route, exc.status, time.perf_counter() - started)
        raise
    _observe(route, response.status, time.perf_counter() - started)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        await request.app[REDIS].ping()
        checks["redis"] = "ok"
    except (aioredis.RedisError, OSError) as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        await request.app[LEDGER].ping()
        checks["postgres"] = "ok"
    except Exception as exc:  # any failure to reach Postgres means not ready
        checks["postgres"] = f"unreachable: {exc}"
    try:
        hot = request.app[HOT]
        loaded = await hot.scripts_loaded()
        checks["scripts"] = "ok" if loaded else "not loaded"
        if not loaded:
            await hot.start()
    except (aioredis.RedisError, OSError, Unavailable) as exc:
        checks["scripts"] = f"unknown: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=prometheus_client.generate_latest(REGISTRY), content_type="text/plain", charset="utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=openapi.document(), content_type="application/json")


def create_app(config: Config) -> web.Application:
    """The sidecar. Needs config.redis_url and config.database_url (embedded or real)."""
    app = web.Application(middlewares=[metrics_middleware, error_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config

    async def resources(app: web.Application) -> AsyncIterator[None]:
        if config.redis_url is None:
            raise RuntimeError("REDIS_URL is not set and no embedded server was started")
        redis = aioredis.Redis.from_url(
            config.redis_url,
            max_connections=REDIS_POOL_CONNECTIONS_MAX,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        # Script calls share one auto-pipelined connection; the rest uses the pool.
        pipe = PipelinedRedis.from_url(config.redis_url)
        try:
            await check_redis_policy(redis)
            ledger = await Ledger.connect(config.app_dsn(), min_size=2, max_size=20)
            try:
                hot = HotPath.from_config(redis, ledger, config, pipe=pipe)
                await hot.start()
                app[REDIS] = redis
                app[LEDGER] = ledger
                app[HOT] = hot
                app[AUTH] = Authenticator(ledger, config.jwt_secret)
                yield
            finally:
                await ledger.close()
        finally:
            await pipe.close()
            await redis.aclose()

    app.cleanup_ctx.append(resources)
    app.add_routes(handlers.routes())
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/api/openapi.json", openapi_json),
        ]
    )
    return app
