"""How fast the webhook endpoint answers Stripe (target: well under 100 ms).

    python -m bench.webhooks [--events 2000] [--concurrency 8]

Starts what it needs like `credits dev` does (embedded Postgres and Valkey unless
REDIS_URL / DATABASE_URL are set, localstripe unless STRIPE_* are set), runs the billing
service on a free port, creates an organization with a Stripe customer, then posts signed
events to /api/billing/stripe/webhook: new events (stored, routed, queued for the
worker) and re-deliveries (deduplicated). Prints one JSON line with the latency
percentiles seen by the sender (client and server share this process, so these are
upper bounds) and the server's own histogram count. Not a test: numbers, not verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from accounts import admin
from api.auth import issue_jwt
from billing import config as billing_config
from billing.config import BillingConfig
from billing.runtime import WEBHOOK_PATH, start_billing, stripe_backend
from core import config as core_config
from core.config import Config
from ops.runtime import connect, servers
from webhooks.signature import sign

DUPLICATE_EVERY = 5  # one delivery in five repeats an earlier event


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(config: Config, stripe: BillingConfig, events: int, concurrency: int) -> dict[str, Any]:
    secret = config.jwt_secret or ""
    webhook_secret = stripe.stripe_webhook_secret or ""
    async with connect(config) as services:
        org, _ = await admin.create_organization(services.ledger, "webhook bench")
    billing = replace(stripe, billing_port=0)
    running = await start_billing(config, billing)
    token = issue_jwt(secret, organization_id=org, subject="bench", role="admin")
    latencies_ms: list[float] = []
    try:
        async with aiohttp.ClientSession(base_url=running.url) as session:
            reply = await session.post(
                "/api/billing/customer",
                json={"email": "bench@example.com"},
                headers={"Authorization": f"Bearer {token}"},
            )
            customer = (await reply.json())["stripe_customer_id"]
            sent: list[bytes] = []
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(events):
                queue.put_nowait(i)

            async def sender() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    if sent and i % DUPLICATE_EVERY == 0:
                        body = sent[i % len(sent)]
                    else:
                        event = {
                            "id": f"evt_bench_{uuid.uuid4().hex[:20]}",
                            "object": "event",
                            "type": "customer.updated",
                            "created": int(time.time()),
                            "data": {"object": {"id": customer, "object": "customer"}},
                        }
                        body = json.dumps(event).encode()
                        sent.append(body)
                    headers = {"Stripe-Signature": sign(body, webhook_secret), "Content-Type": "application/json"}
                    started = time.perf_counter()
                    async with session.post(WEBHOOK_PATH, data=body, headers=headers) as answer:
                        await answer.read()
                        if answer.status != 200:
                            raise RuntimeError(f"webhook answered {answer.status}")
                    latencies_ms.append((time.perf_counter() - started) * 1000)

            await asyncio.gather(*(sender() for _ in range(concurrency)))
    finally:
        await running.stop()
    return {
        "events": events,
        "concurrency": concurrency,
        "p50_ms": round(statistics.median(latencies_ms), 2),
        "p95_ms": round(_percentile(latencies_ms, 0.95), 2),
        "p99_ms": round(_percentile(latencies_ms, 0.99), 2),
        "max_ms": round(max(latencies_ms), 2),
        "target_ms": 100,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description="webhook answer time")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    config = core_config.load()
    if config.jwt_secret is None:
        config = replace(config, jwt_secret="bench-" + uuid.uuid4().hex * 2)
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        config = replace(config, data_dir=Path(tmp))
        with servers(config) as cfg, stripe_backend(billing_config.load(), cfg.data_dir) as billing:
            result = asyncio.run(_run(cfg, billing, args.events, args.concurrency))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
