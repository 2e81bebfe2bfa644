"""POST /api/billing/stripe/webhook: verify, store once, answer. Nothing slow here.

The request does one round trip to Postgres (store the event, deduplicated by id, and
route it to its organization) and nudges the worker; Stripe gets its 200 in a few
milliseconds (`credits_billing_webhook_seconds` measures it; the target is < 100 ms).
A bad signature is a 400 with no effect at all: nothing is stored.
"""

from __future__ import annotations

import logging
import time

import prometheus_client
from aiohttp import web

from api.errors import ApiError
from webhooks.events import EventError, decode_event
from webhooks.signature import HEADER, SignatureError, verify
from webhooks.store import EventStore
from webhooks.worker import REGISTRY, EventWorker

log = logging.getLogger(__name__)

WEBHOOK_BODY_BYTES_MAX = 1024 * 1024  # Stripe's events are far smaller
WEBHOOK_SECONDS = prometheus_client.Histogram(
    "credits_billing_webhook_seconds",
    "Time from request to answer for Stripe webhooks (target: < 0.1 s)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
RECEIVED = prometheus_client.Counter(
    "credits_billing_webhooks", "Stripe webhooks by outcome", ["outcome"], registry=REGISTRY
)


class WebhookReceiver:
    def __init__(self, events: EventStore, worker: EventWorker, secret: str) -> None:
        self.events = events
        self.worker = worker
        self.secret = secret

    async def __call__(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if request.content_length is not None and request.content_length > WEBHOOK_BODY_BYTES_MAX:
            raise ApiError(413, "payload_too_large", "webhook body too large")
        payload = await request.read()
        try:
            verify(payload, request.headers.get(HEADER), self.secret)
        except SignatureError as exc:
            RECEIVED.labels("bad_signature").inc()
            log.warning("webhook_bad_signature", extra={"error": str(exc)})
            raise ApiError(400, "invalid_signature", str(exc), HEADER) from None
        try:
            event = decode_event(payload)
        except EventError as exc:
            RECEIVED.labels("malformed").inc()
            raise ApiError(400, "invalid_request", str(exc)) from None
        received = await self.events.receive(event, payload)
        if received.duplicate:
            outcome = "duplicate"
        elif received.organization_id is None:
            outcome = "ignored"
        else:
            outcome = "stored"
            self.worker.notify(received.organization_id, event.id)
        elapsed_s = time.perf_counter() - started
        WEBHOOK_SECONDS.observe(elapsed_s)
        RECEIVED.labels(outcome).inc()
        # Events of no organization (the catalog's own product.created, ...) only at DEBUG.
        log.log(
            logging.DEBUG if outcome == "ignored" else logging.INFO,
            "webhook_received",
            extra={
                "stripe_event": event.id,
                "type": event.type,
                "outcome": outcome,
                "elapsed_ms": round(elapsed_s * 1000, 2),
            },
        )
        return web.json_response({"received": True})
