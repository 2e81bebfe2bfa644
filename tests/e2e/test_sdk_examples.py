"""Each example in examples/ runs as a person would run it: a subprocess with METER_URL
and API_KEY in its environment, against the test sidecar."""

from __future__ import annotations

import asyncio
import decimal
import json
import os
import pathlib
import sys

import pytest

from tests.e2e.sdk_support import Agent, Client, raw_balance

pytest_plugins = ("tests.e2e.conftest_sdk",)  # its fixtures: agent, meter_url, ...

D = decimal.Decimal
ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE_TIMEOUT_S = 60


async def run_example(name: str, meter_url: str, api_key: str, **extra: str) -> dict[str, object]:
    env = {**os.environ, "METER_URL": meter_url, "API_KEY": api_key, "PYTHONPATH": str(ROOT), **extra}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / name),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), EXAMPLE_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    last: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return last


@pytest.mark.parametrize(
    ("example", "extra", "cost"),
    [
        ("metered_agent.py", {}, D("9.8")),  # 2 x (search 0.5 + 1760 tokens x 0.002 + content 1)
        ("long_task.py", {}, D("5.5")),  # 3.5 from the reservation + 2 for 1000 tokens
        ("batch_job.py", {"BATCH_ITEMS": "3000", "BATCH_SIZE": "250"}, D(3)),
    ],
)
async def test_example_runs_against_the_sidecar(
    client: Client,
    meter_url: str,
    agent: Agent,
    tmp_path: pathlib.Path,
    example: str,
    extra: dict[str, str],
    cost: decimal.Decimal,
) -> None:
    result = await run_example(example, meter_url, agent.key, BATCH_CHECKPOINT=str(tmp_path / "job.ckpt"), **extra)
    assert D(str(result["available_before"])) - D(str(result["available_after"])) == cost
    assert await raw_balance(client, agent.key) == {
        "balance": D(100) - cost,
        "reserved": D(0),
        "available": D(100) - cost,
    }
