"""The settler's periodic jobs: each one runs once per interval across settlers (a
lease per job), a failing job does not stop the others, and every job the settler
relies on is scheduled."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from typing import Any

import fakeredis

from core.config import load
from settler.service import Job, Settler


def settler_with(redis: Any, consumer: str) -> Settler:
    config = replace(load({}), redis_url="redis://unused/0")
    return Settler(config, redis, None, None, None, consumer=consumer)  # type: ignore[arg-type]


def test_every_job_the_settler_relies_on_is_scheduled() -> None:
    s = settler_with(fakeredis.FakeAsyncRedis(), "a")
    assert {j.name for j in s.jobs()} == {"push_outbox", "expire_due", "watch_lag", "alerts", "reconcile", "anomalies"}
    assert all(j.interval_s > 0 for j in s.jobs())


async def test_one_settler_runs_a_job_per_interval_and_a_failure_does_not_stop_the_others() -> None:
    redis = fakeredis.FakeAsyncRedis()
    loop = asyncio.get_running_loop()
    runs: list[tuple[float, str]] = []

    async def tick(name: str) -> None:
        runs.append((loop.time(), name))

    async def boom() -> None:
        raise RuntimeError("a job that fails")

    settlers = [settler_with(redis, c) for c in ("a", "b", "c")]
    for s in settlers:
        s.jobs = lambda s=s: (  # type: ignore[method-assign]
            Job("often", 0.2, lambda s=s: tick(s.consumer)),
            Job("broken", 0.2, boom),
        )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.schedule(stop)) for s in settlers]
    for _ in range(200):  # until four runs happened (however slow the machine is)
        if len(runs) >= 4:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(runs) >= 4  # the failing job did not stop the schedule
    # The lease lets one settler run it per interval: never two runs in one interval.
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(runs)]
    assert min(gaps) >= 0.19, gaps
