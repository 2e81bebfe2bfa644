"""The settler as a process (`credits serve settler`): its partition settlers, its
periodic jobs and its ops endpoint, until SIGINT or SIGTERM.

Periodic jobs used to be arq cron jobs. arq enqueues a job with a multi-key
transaction, which Redis Cluster refuses across slots, and it has no cluster client;
the jobs need only "one settler runs this once per interval", which one key per job
gives (Settler.schedule). Nothing else of arq was used, so the settler runs on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from core.config import Config
from hotpath.servers import open_redis_waiting
from settler.service import Settler

log = logging.getLogger(__name__)


async def run(config: Config, *, stop: asyncio.Event | None = None, handle_signals: bool = True) -> None:
    """Settle until `stop` is set (or a signal arrives, with handle_signals)."""
    if config.redis_url is None:
        raise RuntimeError("REDIS_URL is not set and no embedded server was started")
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    # The settler starts while Redis is down, and waits for it (as it does for Postgres).
    connections = await open_redis_waiting(config.redis_url, stop, **Settler.redis_options(config))
    if connections is None:
        return
    settler = await Settler.open(config, connections)
    try:
        await settler.hot.check_layout()  # another USAGE_PARTITIONS than the cache's: refuse
    except Exception:
        await settler.close()
        raise
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if config.settler_port:
            from settler.http import create_app

            runner = web.AppRunner(create_app(settler), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, config.host, config.settler_port).start()
        tasks = [
            asyncio.create_task(settler.supervise(stop), name="settler-supervisor"),
            asyncio.create_task(settler.schedule(stop), name="settler-schedule"),
        ]
        log.info("settler_started", extra={"consumer": settler.consumer, "partitions": config.usage_partitions})
        await stop.wait()
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=30)
        if runner is not None:
            await runner.cleanup()
        await settler.close()
        log.info("settler_stopped", extra={"consumer": settler.consumer})
