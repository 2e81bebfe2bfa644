"""The metering sidecar: app factory, resources and operational endpoints."""

from __future__ import annotations

import bisect
import gc
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import prometheus_client
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from api import cors, reference
from api.auth import Authenticator, SharedCredentials
from api.errors import Handler, shape_error
from core.config import Config
from hotpath.client import HotPath, Unavailable
from hotpath.group import ConsumeGroups, GroupStats
from hotpath.servers import open_redis
from ledger.store import POSTGRES_DOWN, Ledger
from meter import handlers, openapi
from meter.appkeys import AUTH, CONFIG, CONSUMER, HOT, LEDGER, REDIS, SOURCES, SPEND_RATES
from meter.forecasts import SpendRates
from meter.sources import GrantSources

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class RouteStats:
    """One route's answers by status and its latency histogram, as plain numbers."""

    __slots__ = ("buckets_s", "latency", "statuses")

    def __init__(self, buckets_s: tuple[float, ...]) -> None:
        self.buckets_s = buckets_s
        self.statuses: dict[int, int] = {}
        self.latency = [0.0] * (len(buckets_s) + 2)  # per bucket (not cumulative), +Inf, then the sum

    def observe(self, status: int, seconds: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        latency = self.latency
        latency[bisect.bisect_left(self.buckets_s, seconds)] += 1
        latency[-1] += seconds


class RequestStats(Collector):
    """HTTP requests by route and status, and latency by route, kept as plain numbers
    (one event loop, one thread: no locks) and turned into Prometheus metrics only when
    /metrics is read. prometheus_client's own Counter and Histogram take a lock and
    check their labels on every request, the sidecar's busiest path."""

    def __init__(self, buckets_s: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets_s = tuple(sorted(buckets_s))
        self.routes: dict[str, RouteStats] = {}

    def route(self, route: str) -> RouteStats:
        """The route's numbers (bound once per route, then observed per request)."""
        stats = self.routes.get(route)
        if stats is None:
            stats = self.routes[route] = RouteStats(self.buckets_s)
        return stats

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.route(route).observe(status, seconds)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "credits_http_requests", "HTTP requests by route and status", labels=["route", "status"]
        )
        latency = HistogramMetricFamily(
            "credits_http_request_seconds", "HTTP request latency by route", labels=["route"]
        )
        bounds = [repr(b) for b in self.buckets_s] + ["+Inf"]  # as prometheus_client writes them
        for name, stats in sorted(self.routes.items()):
            for status, n in sorted(stats.statuses.items()):
                requests.add_metric([name, str(status)], n)
            if stats.statuses:
                cumulative = list(itertools.accumulate(stats.latency[:-1]))
                latency.add_metric([name], list(zip(bounds, cumulative, strict=True)), sum_value=stats.latency[-1])
        yield requests
        yield latency


class GroupCollector(Collector):
    """The group commit's counters (hotpath/group.py), read when /metrics is."""

    def __init__(self, stats: GroupStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield CounterMetricFamily(
            "credits_consume_alone", "consumes sent alone (nothing of their organization in flight)", value=s.alone
        )
        yield CounterMetricFamily("credits_consume_groups", "group commits (consume_group calls)", value=s.groups)
        yield CounterMetricFamily(
            "credits_consume_grouped", "consumes sent in group commits, waiting for the call before", value=s.grouped
        )


REGISTRY = prometheus_client.CollectorRegistry()
STATS = RequestStats()
REGISTRY.register(STATS)
GROUP_STATS = GroupStats()
REGISTRY.register(GroupCollector(GROUP_STATS))
REDIS_POOL_CONNECTIONS_MAX = 256


def at_the_edge(route: str, handler: Handler) -> Handler:
    """The route's handler with what every answer gets: any failure in the one error
    shape (api/errors.py), and the answer counted, error statuses included.
    Wrapping each route, rather than a middleware, costs a request one coroutine less
    (aiohttp adds a layer of its own whenever there is a middleware) and no route lookup."""

    stats = STATS.route(route)

    async def edge(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Exception as exc:
            try:
                response = shape_error(request, exc)
            except web.HTTPException as passed:  # not a failure (a redirect): counted, raised
                stats.observe(passed.status, time.perf_counter() - started)
                raise
        stats.observe(response.status, time.perf_counter() - started)
        return response

    return edge


async def unmatched(request: web.Request) -> web.StreamResponse:
    """The last route, for any path and method no other route takes: 405 when another
    route has the path, 404 otherwise."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != UNMATCHED_PATH:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


UNMATCHED_PATH = "/{tail}"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready = can charge: Redis reachable and the scripts loaded. Postgres down is
    `degraded`, not unready: the hot path keeps serving from Redis (ledger reads and
    keys never seen answer 503), and a load balancer that dropped every sidecar for a
    ledger outage would stop every agent."""
    checks: dict[str, str] = {}
    try:
        await request.app[HOT].ping()  # every primary, on a cluster
        checks["redis"] = "ok"
    except (aioredis.RedisError, OSError, Unavailable) as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        await request.app[LEDGER].ping()
        checks["postgres"] = "ok"
    except Exception as exc:  # any failure to reach Postgres
        checks["postgres"] = f"unreachable: {exc}"
    try:
        hot = request.app[HOT]
        loaded = await hot.scripts_loaded()
        checks["scripts"] = "ok" if loaded else "not loaded"
        if not loaded:
            await hot.start()
    except (aioredis.RedisError, OSError, Unavailable) as exc:
        checks["scripts"] = f"unknown: {exc}"
    ready = checks["redis"] == "ok" and checks["scripts"] == "ok"
    status = ("ok" if checks["postgres"] == "ok" else "degraded") if ready else "unavailable"
    return web.json_response({"status": status, "checks": checks}, status=200 if ready else 503)


async def _ledger(config: Config) -> Ledger:
    """The ledger pool, warm when Postgres answers; when it does not, an empty pool that
    connects once it is back (the sidecar serves the hot path meanwhile)."""
    try:
        return await Ledger.connect(config.app_dsn(), min_size=2, max_size=20)
    except POSTGRES_DOWN as exc:
        log.warning("postgres_unreachable_at_start", extra={"error": str(exc)})
        return await Ledger.connect(config.app_dsn(), min_size=0, max_size=20)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=prometheus_client.generate_latest(REGISTRY), content_type="text/plain", charset="utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=openapi.document(), content_type="application/json")


def create_app(config: Config) -> web.Application:
    """The sidecar. Needs config.redis_url and config.database_url (embedded or real)."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=cors.middlewares(config.cors_origins))
    app[CONFIG] = config

    async def resources(app: web.Application) -> AsyncIterator[None]:
        if config.redis_url is None:
            raise RuntimeError("REDIS_URL is not set and no embedded server was started")
        # Script calls share one auto-pipelined connection (per primary on a cluster);
        # the rest uses the pool.
        connections = await open_redis(
            config.redis_url,
            pipelined=True,
            timeout_s=config.redis_timeout_s,
            max_connections=REDIS_POOL_CONNECTIONS_MAX,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        redis = connections.redis
        try:
            ledger = await _ledger(config)
            try:
                hot = HotPath.using(connections, ledger, config)
                await hot.check_servers()
                await hot.start()
                app[REDIS] = redis
                app[LEDGER] = ledger
                app[HOT] = hot
                app[CONSUMER] = ConsumeGroups(hot, stats=GROUP_STATS) if config.consume_coalesce else hot
                app[AUTH] = Authenticator(ledger, config.jwt_secret, SharedCredentials(redis, config.redis_key_prefix))
                app[SOURCES] = GrantSources(ledger)
                app[SPEND_RATES] = SpendRates(ledger)
                # What exists now lives as long as the process: keep it out of every
                # garbage collection from here on (they run every few hundred requests).
                gc.freeze()
                yield
            finally:
                await ledger.close()
        finally:
            await connections.close()

    app.cleanup_ctx.append(resources)
    for op in handlers.OPERATIONS:
        app.router.add_route(op.method, op.path, at_the_edge(op.path, op.handler))
    for path, handler in (
        ("/healthz", healthz),
        ("/readyz", readyz),
        ("/metrics", metrics),
        ("/api/openapi.json", openapi_json),
    ):
        app.router.add_get(path, at_the_edge(path, handler))  # HEAD too
    for path, page in reference.routes("Agent credits API", "/api/openapi.json"):
        app.router.add_get(path, at_the_edge(path, page))
    app.router.add_route("*", "/{tail:.*}", at_the_edge("unmatched", unmatched))  # last: what no route takes
    return app
