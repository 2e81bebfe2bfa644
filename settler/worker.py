"""The settler as an arq worker: partition settlers start with the worker, periodic
jobs are arq cron jobs.

arq keeps only settings that match Worker's signature (a misspelt one is dropped
silently), so the Worker is built here with explicit arguments, and
tests/unit/test_settler_worker.py checks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker

from core.config import Config
from settler.service import Settler

log = logging.getLogger(__name__)

QUEUE = "credits:settler"
JOB_TIMEOUT_S = 60
EVERY_SECOND = set(range(60))
EVERY_2_S = set(range(0, 60, 2))
EVERY_5_S = set(range(0, 60, 5))
EVERY_30_S = {0, 30}


async def push_outbox(ctx: dict[str, Any]) -> int:
    settler: Settler = ctx["settler"]
    return await settler.push_outbox()


async def expire_due(ctx: dict[str, Any]) -> int:
    settler: Settler = ctx["settler"]
    return await settler.expire_due()


async def watch_lag(ctx: dict[str, Any]) -> float:
    settler: Settler = ctx["settler"]
    return await settler.watch_lag()


async def alerts(ctx: dict[str, Any]) -> int:
    settler: Settler = ctx["settler"]
    return await settler.alerts_tick()


async def reconcile(ctx: dict[str, Any]) -> int:
    settler: Settler = ctx["settler"]
    return await settler.reconcile()


def build_worker(config: Config, *, handle_signals: bool = True) -> Worker:
    assert config.redis_url is not None

    async def startup(ctx: dict[str, Any]) -> None:
        settler = await Settler.open(config)
        stop = asyncio.Event()
        ctx["settler"] = settler
        ctx["stop"] = stop
        ctx["supervisor"] = asyncio.create_task(settler.supervise(stop), name="settler-supervisor")
        if config.settler_port:
            from aiohttp import web

            from settler.http import create_app

            runner = web.AppRunner(create_app(settler), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, config.host, config.settler_port).start()
            ctx["http"] = runner
        log.info("settler started as %s on %d partitions", settler.consumer, config.usage_partitions)

    async def shutdown(ctx: dict[str, Any]) -> None:
        stop: asyncio.Event | None = ctx.get("stop")
        if stop is not None:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ctx["supervisor"]
        runner = ctx.get("http")
        if runner is not None:
            await runner.cleanup()
        settler: Settler | None = ctx.get("settler")
        if settler is not None:
            await settler.close()

    return Worker(
        functions=[],
        queue_name=QUEUE,
        cron_jobs=[
            cron(push_outbox, second=EVERY_2_S, unique=True, timeout=JOB_TIMEOUT_S, run_at_startup=True),
            cron(expire_due, second=EVERY_5_S, unique=True, timeout=JOB_TIMEOUT_S),
            cron(watch_lag, second=EVERY_SECOND, unique=True, timeout=JOB_TIMEOUT_S),
            cron(alerts, second=EVERY_SECOND, unique=True, timeout=JOB_TIMEOUT_S),
            cron(reconcile, second=EVERY_30_S, unique=True, timeout=JOB_TIMEOUT_S),
        ],
        redis_settings=RedisSettings.from_dsn(config.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        handle_signals=handle_signals,
        max_jobs=4,
        job_timeout=JOB_TIMEOUT_S,
        keep_result=60,
        poll_delay=0.5,
        max_tries=1,
    )
