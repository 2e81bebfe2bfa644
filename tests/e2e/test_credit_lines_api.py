"""Credit lines as operations and clients see them: `credits credit-line set|show` (a
real process) and GET /api/credits/balance's credit_limit and debt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from core.config import Config
from tests.conftest import Org

pytest.register_assert_rewrite("tests.e2e.billing_fixtures")

from tests.e2e.billing_fixtures import Client  # noqa: E402

pytest_plugins = ("tests.e2e.billing_fixtures",)

M = "/api/credits"


def cli(config: Config, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "REDIS_URL": config.redis_url or "",
        "DATABASE_URL": config.database_url or "",
        "REDIS_KEY_PREFIX": config.redis_key_prefix,  # the same cache as the services under test
        "LOG_LEVEL": "WARNING",
    }
    proc = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


async def request(client: Client, method: str, path: str, org: Org, body: Any = None) -> tuple[int, Any]:
    r = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {org.admin_key}"})
    text = await r.text()
    return r.status, json.loads(text) if text else None


async def test_a_credit_line_set_by_ops_lets_usage_go_below_zero_and_shows_on_the_balance(
    client: Client, org: Org, migrated: Config
) -> None:
    status, body = await request(client, "GET", f"{M}/balance", org)
    assert status == 200 and (body["credit_limit"], body["debt"], body["available"]) == (0, 0, 100)
    shown = json.loads(cli(migrated, "credit-line", "show", "--org", org.id, "--json").stdout)
    assert (shown["credit_limit"], shown["debt"], shown["entries"]) == ("0", "0", [])

    set_ = json.loads(
        cli(migrated, "credit-line", "set", "--org", org.id, "--limit", "20", "--reason", "invoice", "--json").stdout
    )
    assert set_["credit_limit"] == "20" and set_["changes"][0]["reason"] == "invoice"
    status, used = await request(client, "POST", f"{M}/use", org, {"action": "generate_content", "units": 112})
    assert status == 200 and used["available"] == -12
    status, refused = await request(client, "POST", f"{M}/use", org, {"action": "generate_content", "units": 9})
    assert status == 402 and refused["error"]["code"] == "insufficient_credits"
    status, body = await request(client, "GET", f"{M}/balance", org)
    assert status == 200
    assert (body["balance"], body["available"], body["credit_limit"], body["debt"]) == (-12, -12, 20, 12)
    shown = json.loads(cli(migrated, "credit-line", "show", "--org", org.id, "--json").stdout)
    assert (shown["credit_limit"], shown["debt"], shown["available"]) == ("20", "12", "-12")
    text = cli(migrated, "credit-line", "show", "--org", org.id).stdout
    assert "credit_limit" in text and "(no debt yet)" in text  # nothing settled yet: the ledger holds no entry


def test_the_cli_refuses_a_negative_limit_and_an_unknown_organization(migrated: Config) -> None:
    bad = cli(
        migrated, "credit-line", "set", "--org", "0b9d4c1e-0000-4000-8000-000000000000", "--limit", "-5", check=False
    )
    assert bad.returncode != 0 and "zero or more" in bad.stderr
    unknown = cli(migrated, "credit-line", "show", "--org", "0b9d4c1e-0000-4000-8000-000000000000", check=False)
    assert unknown.returncode != 0 and "organization" in unknown.stderr
