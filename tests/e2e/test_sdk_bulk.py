"""Bulk consumption against the real sidecar: per-item failures, context, crashes and
resumption (in process, and a 100,000-item job killed with SIGKILL and run again)."""

from __future__ import annotations

import asyncio
import decimal
import json
import os
import pathlib
import signal
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from accounts import admin
from credits_sdk import (
    AsyncCreditsClient,
    BulkAborted,
    CreditsClient,
    ItemFailure,
    Unauthenticated,
    credits_context,
)
from credits_sdk import Item as I
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.e2e.sdk_support import Agent, Client, available, raw_balance

pytest_plugins = ("tests.e2e.conftest_sdk",)  # its fixtures: aclient, sclient, agent, ...

D = decimal.Decimal
ROOT = pathlib.Path(__file__).resolve().parents[2]
BATCH_JOB = ROOT / "examples" / "batch_job.py"
KILL_AT_ITEMS = 30_000
JOB_ITEMS = 100_000
SUBPROCESS_TIMEOUT_S = 45


def tokens(count: int) -> Iterator[I]:
    for i in range(count):
        yield I(action="llm_input_tokens", metadata={"i": i})


async def test_bulk_reports_item_failures_and_goes_on(client: Client, aclient: AsyncCreditsClient) -> None:
    def items() -> Iterator[I]:
        for i in range(10_000):
            if i % 1000 == 999:
                yield I(action="no_such_action")
            elif i in (1234, 5678, 5679):
                yield I(action="llm_input_tokens", units=0)  # invalid: the sidecar refuses the whole batch
            else:
                yield I(action="llm_input_tokens")

    seen: list[ItemFailure] = []
    report = await aclient.consume_all(
        items(), job_id=f"fail-{uuid.uuid4().hex[:6]}", batch_size=1000, max_in_flight=3, on_failure=seen.append
    )
    assert (report.ok, report.failed) == (9_987, 13)
    assert report.failures_by_code == {"unknown_action": 10, "invalid_request": 3}
    assert sorted(f.index for f in report.failures) == sorted([*range(999, 10_000, 1000), 1234, 5678, 5679])
    assert sorted(seen, key=lambda f: f.index) == sorted(report.failures, key=lambda f: f.index)
    assert next(f for f in report.failures if f.index == 1234).idempotency_key.endswith(":1234")
    assert report.credits == D("9.987")
    assert await available(client, aclient.settings.api_key or "") == D("90.013")


async def test_bulk_insufficient_credits_per_item(client: Client, aclient: AsyncCreditsClient) -> None:
    report = await aclient.consume_all(
        (I(action="generate_content") for _ in range(150)), job_id=f"poor-{uuid.uuid4().hex[:6]}", batch_size=40
    )
    assert (report.ok, report.failed, report.failures_by_code) == (100, 50, {"insufficient_credits": 50})
    assert await available(client, aclient.settings.api_key or "") == D(0)


async def test_bulk_sync_threads_carry_the_context(client: Client, sclient: CreditsClient, agent: Agent) -> None:
    r = await client.post(
        "/api/credits/departments", json={"name": "batch"}, headers={"Authorization": f"Bearer {agent.org.admin_key}"}
    )
    dept = (await r.json())["id"]

    def blocking() -> None:
        with credits_context(department_id=dept):
            report = sclient.consume_all(tokens(5000), job_id="sync-ctx", batch_size=500, max_in_flight=4)
        assert (report.ok, report.credits) == (5000, D(5))
        budget = sclient.balance(department_id=dept).department
        assert budget is not None and budget.spent == D(5)

    await asyncio.to_thread(blocking)
    assert await available(client, agent.key) == D(95)


async def test_bulk_crash_then_rerun_charges_each_item_once(
    client: Client, aclient: AsyncCreditsClient, tmp_path: pathlib.Path
) -> None:
    """No checkpoint: the rerun sends everything again and the keys replay."""

    class Crash(Exception):
        pass

    def crashing(count: int, at: int) -> Iterator[I]:
        for i, item in enumerate(tokens(count)):
            if i == at:
                raise Crash
            yield item

    with pytest.raises(Crash):
        await aclient.consume_all(crashing(10_000, 6_500), job_id="crashy", batch_size=1000)
    charged = D(100) - await available(client, aclient.settings.api_key or "")
    assert D(0) < charged < D(10)
    report = await aclient.consume_all(tokens(10_000), job_id="crashy", batch_size=700)  # another chunking
    assert (report.ok, report.failed) == (10_000, 0)
    assert await available(client, aclient.settings.api_key or "") == D(90)


async def test_bulk_stops_on_a_request_failure(meter_url: str, tmp_path: pathlib.Path) -> None:
    async with AsyncCreditsClient(meter_url, api_key="ck_revoked_or_wrong") as wrong:
        with pytest.raises(BulkAborted) as aborted:
            await wrong.consume_all(tokens(3000), job_id="nope", batch_size=1000, checkpoint=tmp_path / "c")
    assert isinstance(aborted.value.__cause__, Unauthenticated)
    assert aborted.value.report.processed == 0


async def test_batch_job_of_100k_killed_and_resumed(
    client: Client, ledger: Ledger, hot: HotPath, agent: Agent, meter_url: str, tmp_path: pathlib.Path
) -> None:
    """examples/batch_job.py in a subprocess, SIGKILLed once 30,000 items are
    checkpointed, then run again: the balance drops by exactly 100,000 x 0.001."""
    await admin.grant(ledger, hot, agent.org.id, amount=1_000_000, reason="bulk test")  # 1000 credits
    before = await available(client, agent.key)
    checkpoint = tmp_path / "job.ckpt"
    env = {
        **os.environ,
        "METER_URL": meter_url,
        "API_KEY": agent.key,
        "BATCH_ITEMS": str(JOB_ITEMS),
        "BATCH_JOB_ID": f"kill-{uuid.uuid4().hex[:8]}",
        "BATCH_CHECKPOINT": str(checkpoint),
        "PYTHONPATH": str(ROOT),
    }

    first = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BATCH_JOB),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    done_at_kill = 0
    while time.monotonic() < deadline and first.returncode is None:
        if checkpoint.exists():
            done_at_kill = json.loads(checkpoint.read_text())["next_index"]
            if done_at_kill >= KILL_AT_ITEMS:
                break
        await asyncio.sleep(0.005)
    assert first.returncode is None, "the job finished before it could be killed"
    first.send_signal(signal.SIGKILL)
    await first.communicate()
    assert first.returncode == -signal.SIGKILL
    charged_at_kill = before - await available(client, agent.key)
    assert KILL_AT_ITEMS <= done_at_kill < JOB_ITEMS
    # Batches in flight at the kill may have been charged past the checkpoint: the rerun
    # resends them, and their keys replay.
    assert charged_at_kill >= D(done_at_kill) / 1000

    second = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BATCH_JOB),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(second.communicate(), SUBPROCESS_TIMEOUT_S)
    assert second.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["ok"] == JOB_ITEMS and report["failed"] == 0
    assert report["resumed_from"] >= done_at_kill
    assert D(report["credits"]) == D(100)
    # Every item succeeded once (in a run or as a replay), and exactly 100 credits left:
    # no item was charged twice, none was skipped.
    assert before - await available(client, agent.key) == D(100)
    assert (await raw_balance(client, agent.key))["reserved"] == 0
