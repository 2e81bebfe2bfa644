"""arq silently drops settings it does not know: check the ones the settler relies on."""

from __future__ import annotations

from dataclasses import replace

from core.config import load
from settler import worker


def test_worker_settings_are_applied() -> None:
    config = replace(load({}), redis_url="redis://127.0.0.1:1/0")
    w = worker.build_worker(config)
    try:
        names = {c.name for c in w.cron_jobs}
        assert {"cron:push_outbox", "cron:expire_due", "cron:watch_lag", "cron:reconcile", "cron:alerts"} <= names
        assert all(c.unique for c in w.cron_jobs)
        assert w.queue_name == worker.QUEUE
        assert w.max_tries == 1
        assert w.job_timeout_s == worker.JOB_TIMEOUT_S
        assert w.on_startup is not None and w.on_shutdown is not None
    finally:
        w.main_task = None
