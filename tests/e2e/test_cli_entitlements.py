"""`credits entitlements` as ops run it: real processes, real servers; every change is
in Postgres and in the cache the next check reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from core.config import Config
from hotpath.client import HotPath
from lua import Status

CLI = [sys.executable, "-m", "ops.cli"]


def run(config: Config, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "REDIS_URL": config.redis_url or "",
        "DATABASE_URL": config.database_url or "",
        "REDIS_KEY_PREFIX": config.redis_key_prefix,  # the session's cache, which `hot` reads
        "LOG_LEVEL": "WARNING",
    }
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def out(config: Config, *args: str) -> Any:
    return json.loads(run(config, *args).stdout)


async def gate(hot: HotPath, org: str, feature: str) -> dict[str, Any]:
    result = await hot.check(org, "", feature=feature)
    assert result.status is Status.OK, result
    return dict(result.payload["ent"])


async def test_catalog_overrides_and_the_cache(migrated: Config, hot: HotPath) -> None:
    catalog = out(migrated, "entitlements", "catalog", "--json")
    assert {f["feature"]: f["limit"] for f in catalog["professional"] if f["type"] == "limit"} == {"projects": 5}
    assert "enterprise" in run(migrated, "entitlements", "catalog").stdout
    org = out(migrated, "org", "create", "--name", "Entitled")["organization_id"]
    shown = out(migrated, "entitlements", "show", "--org", org, "--json")
    assert shown["plan_id"] is None and {r["source"] for r in shown["data"]} == {"free"}

    # An override for one organization, seen by the cache at once; then taken back.
    out(migrated, "entitlements", "set", "--org", org, "--feature", "api_access", "--enabled", "--reason", "trial")
    assert (await gate(hot, org, "api_access"))["ok"] == 1
    out(migrated, "entitlements", "set", "--org", org, "--feature", "projects", "--unlimited", "--reason", "deal")
    projects = await gate(hot, org, "projects")
    assert (projects["ok"], projects["l"]) == (1, -1)
    assert out(migrated, "entitlements", "unset", "--org", org, "--feature", "api_access")["removed"] is True
    assert (await gate(hot, org, "api_access"))["ok"] == 0
    audited = [(r["action"], r["target"], r["reason"]) for r in out(migrated, "audit", "--org", org, "--json")["data"]]
    assert ("entitlement.override_set", "api_access", "trial") in audited  # operators' changes are on record
    assert ("entitlement.override_unset", "api_access", None) in audited
    table = run(migrated, "entitlements", "show", "--org", org).stdout
    assert "override" in table and "plan: (none: free defaults)" in table

    # A catalog edit of the free defaults reaches the organizations that have them.
    edited = out(migrated, "entitlements", "plan-set", "--plan", "free", "--feature", "beta_console", "--enabled")
    try:
        assert edited["organizations_updated"] >= 1
        assert (await gate(hot, org, "beta_console"))["ok"] == 1
    finally:
        out(migrated, "entitlements", "plan-remove", "--plan", "free", "--feature", "beta_console")
    assert (await gate(hot, org, "beta_console"))["why"] == "not_included"

    # Usage errors say what is wrong, and change nothing.
    bad = run(migrated, "entitlements", "plan-set", "--plan", "nope", "--feature", "x", "--enabled", check=False)
    assert bad.returncode == 1 and "no plan 'nope'" in bad.stderr
    bad = run(migrated, "entitlements", "set", "--org", org, "--feature", "Bad-Name", "--enabled", "--reason", "r",
              check=False)  # fmt: skip
    assert bad.returncode == 1 and "feature name" in bad.stderr
    bad = run(migrated, "entitlements", "plan-set", "--plan", "starter", "--feature", "projects", "--limit", "-1",
              check=False)  # fmt: skip
    assert bad.returncode == 1 and "at least 0" in bad.stderr


async def test_autotopup_commands(migrated: Config) -> None:
    org = out(migrated, "org", "create", "--name", "Topped")["organization_id"]
    shown = out(migrated, "autotopup", "show", "--org", org, "--json")
    assert shown["configured"] is False and shown["attempts"] == []
    # Disabled settings need no card; enabling does (and says so).
    args = ("--threshold", "25.5", "--package", "small", "--max-per-month", "3", "--monthly-cap-cents", "3000")
    saved = out(migrated, "autotopup", "set", "--org", org, *args, "--disable", "--json")
    assert [r["action"] for r in out(migrated, "audit", "--org", org, "--json")["data"]] == ["autotopup.set"]
    assert (saved["enabled"], saved["threshold"], saved["package_id"], saved["max_per_month"]) == (
        False,
        "25.5",  # credits print as exact decimal text, as in every command
        "small",
        3,
    )
    bad = run(migrated, "autotopup", "set", "--org", org, *args, check=False)
    assert bad.returncode == 1 and "create the customer first" in bad.stderr
    bad = run(migrated, "autotopup", "set", "--org", org, *args[:3], "huge", *args[4:], "--disable", check=False)
    assert bad.returncode == 1 and "no such credit package" in bad.stderr
    assert "threshold" in run(migrated, "autotopup", "show", "--org", org).stdout


async def test_alert_as_days_left(migrated: Config) -> None:
    org = out(migrated, "org", "create", "--name", "Forecast")["organization_id"]
    url = ("--url", "https://example.test/hook")
    saved = out(migrated, "alert", "set", "--org", org, "--days-left", "7.5", *url)
    assert (saved["threshold"], saved["days_left"]) == ("0", "7.5")
    [listed] = out(migrated, "alert", "list", "--org", org, "--json")["data"]
    assert listed["days_left"] == "7.50" and listed["threshold"] == "0"
    for bad in (("--days-left", "0"), ("--days-left", "400"), ("--days-left", "1.234"), ("--days-left", "nan")):
        refused = run(migrated, "alert", "set", "--org", org, *bad, *url, check=False)
        assert refused.returncode == 2 and "days must be between" in refused.stderr, refused.stderr
    neither = run(migrated, "alert", "set", "--org", org, *url, check=False)
    assert neither.returncode == 1 and "--threshold, --days-left or both" in neither.stderr
