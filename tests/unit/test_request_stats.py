"""RequestStats (the sidecar's metrics as plain numbers) exposes what prometheus_client's
own Counter and Histogram would for the same requests."""

from __future__ import annotations

import random

import prometheus_client

from meter.app import LATENCY_BUCKETS_S, RequestStats


def test_same_exposition_as_prometheus_client() -> None:
    ours = prometheus_client.CollectorRegistry()
    stats = RequestStats()
    ours.register(stats)
    theirs = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "credits_http_requests", "HTTP requests by route and status", ["route", "status"], registry=theirs
    )
    histogram = prometheus_client.Histogram(
        "credits_http_request_seconds",
        "HTTP request latency by route",
        ["route"],
        buckets=LATENCY_BUCKETS_S,
        registry=theirs,
    )
    rnd = random.Random(7)
    for _ in range(2000):
        route = rnd.choice(["/api/credits/use", "/api/credits/use/batch", "unmatched"])
        status = rnd.choice([200, 200, 200, 400, 402, 404, 503])
        seconds = rnd.choice([*LATENCY_BUCKETS_S, rnd.random() / 100, rnd.random() * 3])
        stats.observe(route, status, seconds)
        counter.labels(route, str(status)).inc()
        histogram.labels(route).observe(seconds)

    def samples(registry: prometheus_client.CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in registry.collect():
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    mine, reference = samples(ours), samples(theirs)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert abs(mine[key] - value) < 1e-9, key
