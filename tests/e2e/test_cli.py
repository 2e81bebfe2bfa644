"""The `credits` command as a person runs it: real processes, real servers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from core.config import Config

CLI = [sys.executable, "-m", "ops.cli"]


def run(config: Config, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "REDIS_URL": config.redis_url or "",
        "DATABASE_URL": config.database_url or "",
        "LOG_LEVEL": "WARNING",
    }
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_org_keys_grants_and_balance(migrated: Config) -> None:
    created = json.loads(run(migrated, "org", "create", "--name", "Acme").stdout)
    assert set(created) == {"organization_id", "api_key"}
    org = created["organization_id"]
    key = json.loads(run(migrated, "key", "create", "--org", org, "--role", "agent", "--cap", "12.5").stdout)
    assert key["api_key"].startswith("ck_") and key["role"] == "agent"
    g1 = json.loads(
        run(migrated, "grant", "--org", org, "--amount", "25.5", "--reason", "support", "--reference", "t-1").stdout
    )
    g2 = json.loads(
        run(migrated, "grant", "--org", org, "--amount", "25.5", "--reason", "support", "--reference", "t-1").stdout
    )
    assert g1["grant_id"] == g2["grant_id"] and g1["created"] and not g2["created"]
    adj = json.loads(run(migrated, "adjust", "--org", org, "--amount", "-5.5", "--reason", "correction").stdout)
    assert adj["amount"] == "-5.5"
    bal = json.loads(run(migrated, "balance", "--org", org, "--json").stdout)
    assert bal["balance"] == "120" and bal["available"] == "120"
    assert bal["ledger_balance"] == bal["ledger_entries_sum"] == "125.5"  # the debit settles with issue #3's settler
    revoked = json.loads(run(migrated, "key", "revoke", "--org", org, "--key", key["key_id"]).stdout)
    assert revoked["revoked"] is True


def test_bad_input_is_a_clear_error(migrated: Config) -> None:
    org = json.loads(run(migrated, "org", "create", "--name", "B").stdout)["organization_id"]
    bad = run(migrated, "grant", "--org", org, "--amount", "0.0001", "--reason", "x", check=False)
    assert bad.returncode == 2 and "not an exact credit amount" in bad.stderr
    bad = run(migrated, "adjust", "--org", org, "--amount", "-1000", "--reason", "x", check=False)
    assert bad.returncode == 1 and "nothing was changed" in bad.stderr
    env = {**os.environ, "USAGE_PARTITIONS": "lots"}
    proc = subprocess.run([*CLI, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "USAGE_PARTITIONS" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dev_runs_the_whole_stack_on_embedded_servers(tmp_path: Path) -> None:
    """`credits dev` on a fresh data directory, twice: data survives the restart."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "JWT_SECRET")}
    env.update({"CREDITS_DATA_DIR": str(tmp_path / "data"), "METER_PORT": str(port), "LOG_LEVEL": "WARNING"})
    env["SETTLER_PORT"] = str(_free_port())
    env["BILLING_PORT"] = str(_free_port())
    balances = []
    for _ in range(2):
        proc = subprocess.Popen([*CLI, "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            info: dict[str, Any] = json.loads(line)
            assert info["meter_url"] == f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {info['api_key']}", "Content-Type": "application/json"}
            req = urllib.request.Request(
                f"{info['meter_url']}/api/credits/use", data=b'{"action": "generate_content"}', headers=headers
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                balances.append(json.loads(r.read())["balance"])
            # The settler runs in the dev stack: the charge reaches the ledger.
            settled = []
            for _ in range(50):
                req = urllib.request.Request(f"{info['meter_url']}/api/credits/usage", headers=headers)
                with urllib.request.urlopen(req, timeout=10) as r:
                    settled = json.loads(r.read())["data"]
                if len(settled) == len(balances):
                    break
                time.sleep(0.2)
            assert len(settled) == len(balances)
            jwt_headers = {"Authorization": f"Bearer {info['jwt']}"}
            req = urllib.request.Request(f"{info['meter_url']}/api/credits/balance", headers=jwt_headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                assert json.loads(r.read())["organization_id"] == info["organization_id"]
            # The demo organization's portal link opens a session (once).
            portal = urllib.parse.urlsplit(info["portal_url"])
            assert portal.port == int(env["BILLING_PORT"]) and portal.path.startswith("/portal/enter/pl1.")
            conn = http.client.HTTPConnection(portal.hostname or "", portal.port, timeout=10)
            try:
                conn.request("GET", portal.path)
                entered = conn.getresponse()
                entered.read()
                assert entered.status == 303 and entered.getheader("Location") == "/portal/overview"
                assert "HttpOnly" in (entered.getheader("Set-Cookie") or "")
            finally:
                conn.close()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
        time.sleep(0.2)
    assert balances == [99, 98]


def test_reconcile_and_alert_commands(migrated: Config) -> None:
    org = json.loads(run(migrated, "org", "create", "--name", "R").stdout)["organization_id"]
    run(migrated, "balance", "--org", org, "--json")  # cached now
    report = json.loads(run(migrated, "reconcile", "--org", org, "--json").stdout)
    assert report == {
        "checked": 1,
        "drifts": [],
        "lagging": [],
        "quarantined": {},
        "dead_letters": report["dead_letters"],  # the whole ledger's: other tests quarantine on purpose
        "lagging_partitions": {},  # for one organization: its own entries' age only
        "repaired": [],
    }
    alert = json.loads(
        run(migrated, "alert", "set", "--org", org, "--threshold", "10", "--url", "https://example.test/hook").stdout
    )
    assert alert["secret"].startswith("whsec_") and alert["threshold"] == "10"
    bad = run(migrated, "alert", "set", "--org", org, "--threshold", "10", "--url", "ftp://x", check=False)
    assert bad.returncode == 1 and "http(s)" in bad.stderr
