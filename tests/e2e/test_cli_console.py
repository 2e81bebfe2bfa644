"""The operator commands of `credits` (issue 11) as a person runs them: operator
create|link|list|revoke, org show, grant void, audit, each with --json; the money
commands leave audit rows naming the operator or the system user."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import uuid

from core.config import Config
from tests.conftest import JWT_SECRET
from tests.e2e.test_cli import CLI, run


def with_secret(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    """As `run`, with the JWT secret the token and portal-link commands sign with."""
    env = {**os.environ, "REDIS_URL": config.redis_url or "", "DATABASE_URL": config.database_url or "",
           "JWT_SECRET": JWT_SECRET, "LOG_LEVEL": "WARNING"}  # fmt: skip
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _json(config: Config, *args: str) -> dict:  # type: ignore[type-arg]
    return json.loads(run(config, *args).stdout)  # type: ignore[no-any-return]


def test_operator_commands_and_an_audited_grant_void_and_revoke(migrated: Config) -> None:
    email = f"ops-{uuid.uuid4().hex[:6]}@example.com"
    created = _json(migrated, "operator", "create", "--email", email, "--name", "Grace", "--json")
    assert created["email"] == email and "/console/enter/op1_" in created["url"]
    text = run(migrated, "operator", "link", "--email", email.upper()).stdout
    assert "works once" in text and "/console/enter/op1_" in text
    again = run(migrated, "operator", "create", "--email", email, check=False)
    assert again.returncode == 1 and "is an operator already" in again.stderr
    listed = _json(migrated, "operator", "list", "--json")
    mine = next(o for o in listed["data"] if o["email"] == email)
    assert mine["password_set"] is False and mine["disabled_at"] is None

    org = _json(migrated, "org", "create", "--name", "Audited")["organization_id"]
    g = _json(
        migrated, "grant", "--org", org, "--amount", "40", "--reason", "pilot", "--reference", "p-1",
        "--priority", "5", "--operator", email, "--json",
    )  # fmt: skip
    shown = _json(migrated, "org", "show", "--org", org, "--json")
    assert shown["balance"]["ledger"] == "140" and shown["balance"]["cache"] == "140"
    grant = next(x for x in shown["grants"] if x["id"] == g["grant_id"])
    assert grant["priority"] == 5 and grant["remaining"] == "40" and grant["source"] == "admin"
    assert {k["role"] for k in shown["keys"]} == {"admin"}
    voided = _json(migrated, "grant", "void", "--org", org, "--grant", g["grant_id"], "--reason", "mistake", "--json")
    assert voided["amount"] == "-40"
    shown = _json(migrated, "org", "show", "--org", org, "--json")
    assert shown["balance"]["cache"] == "100"
    key = shown["keys"][0]["id"]
    _json(migrated, "key", "revoke", "--org", org, "--key", key, "--reason", "rotated", "--operator", email)

    audit = _json(migrated, "audit", "--org", org, "--json")
    system = f"system:{getpass.getuser()}@{socket.gethostname()}"
    assert [(r["action"], r["actor"], r["outcome"]) for r in audit["data"]] == [
        ("key.revoke", f"operator:{email}", "applied"),
        ("grant.void", system, "applied"),
        ("credits.grant", f"operator:{email}", "applied"),
    ]
    assert audit["data"][2]["amount"] == "40" and audit["data"][2]["reason"] == "pilot"
    assert audit["data"][1]["amount"] == "-40" and audit["data"][1]["via"] == "cli"
    table = run(migrated, "audit", "--org", org, "--action", "credits.").stdout.splitlines()
    assert table[0].split()[:3] == ["id", "at", "actor"] and len(table) == 2

    # A disabled operator acts no more, and nothing moves in their name.
    revoked = _json(migrated, "operator", "revoke", "--email", email, "--json")
    assert revoked["disabled"] is True
    refused = run(migrated, "grant", "--org", org, "--amount", "1", "--reason", "x", "--operator", email, check=False)
    assert refused.returncode == 1 and "not an active operator" in refused.stderr
    assert _json(migrated, "balance", "--org", org, "--json")["balance"] == "100"  # the void settles later
    missing = run(migrated, "grant", "--org", org, "--amount", "1", check=False)
    assert missing.returncode == 1 and "--reason" in missing.stderr


def test_credentials_alerts_and_quarantine_commands_are_audited(migrated: Config) -> None:
    org = _json(migrated, "org", "create", "--name", "Audited too")["organization_id"]
    key = _json(migrated, "key", "create", "--org", org, "--role", "agent", "--name", "bot")["key_id"]
    with_secret(migrated, "token", "--org", org, "--role", "viewer", "--subject", "alice", "--ttl", "15m")
    _json(migrated, "alert", "set", "--org", org, "--threshold", "20", "--url", "https://hooks.example/x/s3cret")
    run(migrated, "alert", "delete", "--org", org)
    link = json.loads(with_secret(migrated, "portal-link", "--org", org, "--role", "viewer").stdout)
    assert "/portal/enter/" in link["url"]
    rows = _json(migrated, "audit", "--org", org, "--json")["data"]
    assert [(r["action"], r["target"]) for r in reversed(rows)] == [
        ("key.create", f"key:{key}"),
        ("token.issue", "jwt:alice"),
        ("alert.set", None),
        ("alert.delete", None),
        ("portal_link.create", rows[0]["target"]),
    ]
    assert rows[0]["target"].startswith("link:") and rows[0]["detail"] == {"role": "viewer"}
    alert_set = next(r for r in rows if r["action"] == "alert.set")
    assert alert_set["amount"] == "20" and alert_set["detail"] == {
        "url": "https://hooks.example",
        "days_left": None,
    }  # never the path
    assert "s3cret" not in json.dumps(rows)
    missing = run(migrated, "deadletter", "replay", "999999999", "--reason", "try", check=False)
    assert missing.returncode == 1
    refused = _json(migrated, "audit", "--action", "deadletter.", "--limit", "1", "--json")["data"][0]
    assert refused["target"] == "deadletter:999999999" and refused["outcome"] == "refused"
