"""The event worker: slow webhook work, out of the HTTP request, never lost.

Why an in-process worker fed from a durable table rather than an arq job: the event
must be stored before Stripe is answered anyway (that row is what makes a delivery
exactly-once), so the table already is a queue, and a second queue in Redis would be a
second place to keep consistent with it (and Redis is the hot path's, with its own
durability trade-offs). Each billing process runs this worker; several processes share
the table safely, because an event is taken with a lease (an UPDATE that only one
claimant wins) and every effect of processing is idempotent.

The path of an event: the webhook handler stores it (pending) and nudges the worker
through a bounded in-memory queue; a worker claims it for a lease, processes it, and
marks it done. If the process dies anywhere after the store, the row stays pending and
the sweeper, which lists due events every `sweep_interval_s`, finds it once its lease
has run out. A failing event is retried with exponential backoff, then marked failed
(and logged) after `attempts_max` attempts. Events of one organization go to one
worker task (sharded by organization id), so within a process they run in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib

import prometheus_client

from billing.credits import RetryLater
from billing.gateway import StripeUnavailable
from webhooks.handlers import EventHandlers
from webhooks.store import EventStore

log = logging.getLogger(__name__)

QUEUE_ENTRIES_MAX = 1000  # per worker task; beyond it the sweeper picks events up
LEASE_S = 120.0  # an event's processing must end within this (it is cancelled at LEASE_S - margin)
LEASE_MARGIN_S = 10.0
RETRY_DELAY_S_MAX = 300.0
RETRY_LATER_DELAY_S = 1.0

REGISTRY = prometheus_client.CollectorRegistry()
PROCESSED = prometheus_client.Counter(
    "credits_billing_events_processed",
    "Stripe events processed, by type and outcome",
    ["type", "outcome"],
    registry=REGISTRY,
)
PROCESS_SECONDS = prometheus_client.Histogram(
    "credits_billing_event_process_seconds",
    "Time to process one Stripe event in the worker",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)


class EventWorker:
    def __init__(
        self,
        events: EventStore,
        handlers: EventHandlers,
        *,
        workers: int,
        sweep_interval_s: float,
        attempts_max: int,
        lease_s: float = LEASE_S,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self.events = events
        self.handlers = handlers
        self.sweep_interval_s = sweep_interval_s
        self.attempts_max = attempts_max
        self.lease_s = lease_s
        self._queues: list[asyncio.Queue[tuple[str, str]]] = [
            asyncio.Queue(maxsize=QUEUE_ENTRIES_MAX) for _ in range(workers)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def notify(self, org: str, event_id: str) -> None:
        """A new event is stored: process it soon (best effort; the sweeper is the backstop)."""
        queue = self._queues[zlib.crc32(org.encode()) % len(self._queues)]
        try:
            queue.put_nowait((org, event_id))
        except asyncio.QueueFull:
            log.warning("event_queue_full", extra={"stripe_event": event_id})

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._consume(q), name=f"stripe-events-{i}") for i, q in enumerate(self._queues)
        ]
        self._tasks.append(loop.create_task(self._sweep(), name="stripe-events-sweeper"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _consume(self, queue: asyncio.Queue[tuple[str, str]]) -> None:
        while True:
            org, event_id = await queue.get()
            try:
                await self.process(org, event_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker task must survive anything; the row stays due
                log.exception("event_worker_error", extra={"stripe_event": event_id})

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                for org, event_id in await self.events.due():
                    self.notify(org, event_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # Postgres unreachable: try again next round
                log.exception("event_sweep_error")

    async def process(self, org: str, event_id: str) -> None:
        """Claim, handle and record one event (a no-op if done or leased elsewhere)."""
        claimed = await self.events.claim(org, event_id, lease_s=self.lease_s)
        if claimed is None:
            return
        started = time.perf_counter()
        obj = claimed.payload.get("data", {}).get("object", {})
        try:
            async with asyncio.timeout(self.lease_s - LEASE_MARGIN_S):
                acted = await self.handlers.handle(org, claimed.type, obj if isinstance(obj, dict) else {})
        except asyncio.CancelledError:
            raise
        except RetryLater as exc:  # soon, then backing off like any failure
            delay_s = min(RETRY_DELAY_S_MAX, RETRY_LATER_DELAY_S * 2.0 ** (claimed.attempts - 1))
            await self._retry(org, claimed.id, claimed.type, claimed.attempts, str(exc), delay_s)
            return
        except Exception as exc:
            if not isinstance(exc, StripeUnavailable):
                log.exception(
                    "event_failed", extra={"stripe_event": claimed.id, "type": claimed.type, "organization_id": org}
                )
            delay_s = min(RETRY_DELAY_S_MAX, 2.0**claimed.attempts)
            await self._retry(org, claimed.id, claimed.type, claimed.attempts, f"{type(exc).__name__}: {exc}", delay_s)
            return
        await self.events.finish(org, claimed.id)
        PROCESS_SECONDS.observe(time.perf_counter() - started)
        PROCESSED.labels(claimed.type, "done" if acted else "skipped").inc()
        log.info("event_processed", extra={"stripe_event": claimed.id, "type": claimed.type, "organization_id": org})

    async def _retry(self, org: str, event_id: str, kind: str, attempts: int, error: str, delay_s: float) -> None:
        give_up = attempts >= self.attempts_max
        await self.events.retry(org, event_id, error=error, delay_s=delay_s, give_up=give_up)
        PROCESSED.labels(kind, "failed" if give_up else "retry").inc()
        fields = {"stripe_event": event_id, "type": kind, "organization_id": org, "attempts": attempts, "error": error}
        if give_up:
            log.error("event_gave_up", extra=fields)
        else:
            log.info("event_retry", extra={**fields, "retry_in_s": round(delay_s, 1)})
