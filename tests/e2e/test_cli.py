"""The `credits` command as a person runs it: real processes, real servers."""

from __future__ import annotations

import decimal
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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
    listed = json.loads(run(migrated, "key", "list", "--org", org, "--json").stdout)
    by_id = {k["id"]: k for k in listed["data"]}
    assert by_id[key["key_id"]]["cap"] == "12.5" and by_id[key["key_id"]]["revoked_at"] is None
    assert all("ck_" not in json.dumps(k).replace(k["prefix"], "") for k in listed["data"])  # never a secret
    revoked = json.loads(run(migrated, "key", "revoke", "--org", org, "--key", key["key_id"]).stdout)
    assert revoked["revoked"] is True
    listed = json.loads(run(migrated, "key", "list", "--org", org, "--json").stdout)
    assert {k["id"]: k for k in listed["data"]}[key["key_id"]]["revoked_at"] is not None
    active = json.loads(run(migrated, "key", "list", "--org", org, "--active", "--json").stdout)
    assert key["key_id"] not in {k["id"] for k in active["data"]}
    table = run(migrated, "key", "list", "--org", org).stdout
    assert table.splitlines()[0].split()[:4] == ["id", "prefix", "name", "role"]


def test_org_list_sees_every_organization(migrated: Config) -> None:
    a = json.loads(run(migrated, "org", "create", "--name", "List A").stdout)["organization_id"]
    b = json.loads(run(migrated, "org", "create", "--name", "List B").stdout)["organization_id"]
    ids: list[str] = []
    after: str | None = None
    for _ in range(1000):  # pages of 2 until the end: every organization, once
        page = json.loads(
            run(migrated, "org", "list", "--limit", "2", "--json", *(["--after", after] if after else [])).stdout
        )
        ids += [o["id"] for o in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert {a, b} <= set(ids) and len(ids) == len(set(ids)) and ids == sorted(ids)
    listed = json.loads(run(migrated, "org", "list", "--limit", "1000", "--json").stdout)["data"]
    row = next(o for o in listed if o["id"] == a)
    assert row["name"] == "List A" and row["balance"] == "100" and row["active_keys"] == 1


def test_token_signs_a_frontend_jwt_for_any_organization(migrated: Config) -> None:
    import jwt

    from tests.conftest import JWT_SECRET

    org = json.loads(run(migrated, "org", "create", "--name", "T").stdout)["organization_id"]
    env_secret = {"JWT_SECRET": JWT_SECRET}
    out = subprocess.run(
        [*CLI, "token", "--org", org, "--role", "viewer", "--ttl", "15m", "--json"],
        env={**os.environ, "REDIS_URL": migrated.redis_url or "", "DATABASE_URL": migrated.database_url or "",
             **env_secret},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    claims = jwt.decode(made["token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["org"] == org and claims["role"] == "viewer" and claims["exp"] - claims["iat"] == 900
    bad = run(migrated, "token", "--org", org, "--ttl", "forever", check=False)
    assert bad.returncode == 2 and "not a lifetime" in bad.stderr
    unknown = run(migrated, "token", "--org", "00000000-0000-4000-8000-000000000000", check=False)
    assert unknown.returncode == 1 and "not found" in unknown.stderr


def test_bad_input_is_a_clear_error(migrated: Config) -> None:
    org = json.loads(run(migrated, "org", "create", "--name", "B").stdout)["organization_id"]
    bad = run(migrated, "grant", "--org", org, "--amount", "0.0001", "--reason", "x", check=False)
    assert bad.returncode == 2 and "not an exact credit amount" in bad.stderr
    bad = run(migrated, "adjust", "--org", org, "--amount", "-1000", "--reason", "x", check=False)
    assert bad.returncode == 1 and "nothing was changed" in bad.stderr
    for args in (["key", "list", "--org", "nope"], ["alert", "list", "--org", "x"], ["org", "list", "--after", "1"],
                 ["token", "--org", org, "--department", "research"]):  # fmt: skip
        bad = run(migrated, *args, check=False)
        assert bad.returncode == 2 and "not an id" in bad.stderr and "Traceback" not in bad.stderr, args
    missing = run(migrated, "key", "list", "--org", "00000000-0000-4000-8000-000000000000", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    env = {**os.environ, "USAGE_PARTITIONS": "lots"}
    proc = subprocess.run([*CLI, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "USAGE_PARTITIONS" in proc.stderr


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
    queued = json.loads(run(migrated, "alert", "test", "--org", org, "--json").stdout)
    assert queued["type"] == "alert.test" and queued["event_id"].startswith("evt_")
    [listed] = json.loads(run(migrated, "alert", "list", "--org", org, "--json").stdout)["data"]
    assert listed["threshold"] == "10" and listed["url"] == "https://example.test/hook" and listed["state"] == "ok"
    assert listed["deliveries_pending"] == 1 and "secret" not in listed
    assert org in {a["organization_id"] for a in json.loads(run(migrated, "alert", "list", "--json").stdout)["data"]}
    deleted = json.loads(run(migrated, "alert", "delete", "--org", org, "--json").stdout)
    assert deleted == {"organization_id": org, "deleted": True}
    assert json.loads(run(migrated, "alert", "list", "--org", org, "--json").stdout)["data"] == []
    again = run(migrated, "alert", "delete", "--org", org, check=False)
    assert again.returncode == 1 and "no alert" in again.stderr
    untested = run(migrated, "alert", "test", "--org", org, check=False)
    assert untested.returncode == 1 and "no alert" in untested.stderr


# -- finding the stack ---------------------------------------------------------------------
def _bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No URLs, and a state file of the test's own: a new user's machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "JWT_SECRET")}
    env.pop("CREDITS_DATA_DIR", None)
    env.update({"XDG_STATE_HOME": str(tmp_path / "state"), "LOG_LEVEL": "WARNING", **extra})
    return env


def test_without_a_stack_commands_say_so_and_create_nothing(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _bare_env(tmp_path)
    for args in (["migrate"], ["org", "create", "--name", "X"], ["org", "list"], ["grant", "--org",
                 "00000000-0000-4000-8000-000000000000", "--amount", "1", "--reason", "r"]):  # fmt: skip
        proc = subprocess.run([*CLI, *args], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, (args, proc.stderr)
        assert "no credits stack is running" in proc.stderr and "credits dev" in proc.stderr
        assert "migrate --embedded" in proc.stderr
    assert list(elsewhere.iterdir()) == []  # no database appeared in the current directory


def test_migrate_embedded_creates_one_that_commands_find_from_anywhere(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    env = _bare_env(tmp_path)
    made = subprocess.run([*CLI, "migrate", "--embedded"], env=env, cwd=project, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "0001_ledger.sql" in json.loads(made.stdout)["applied"]
    assert (project / ".data" / "postgres" / "PG_VERSION").exists()
    org = subprocess.run([*CLI, "org", "create", "--name", "Found"], env=env, cwd=elsewhere, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert org.returncode == 0, org.stderr
    assert list(elsewhere.iterdir()) == []
    listed = subprocess.run([*CLI, "org", "list", "--json"], env=env, cwd=elsewhere, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert json.loads(org.stdout)["organization_id"] in {o["id"] for o in json.loads(listed.stdout)["data"]}


# -- credits dev -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """`credits dev --json` with LOG_FORMAT=json: its announcement and its log lines."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "dev", "--json", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first, "credits dev stopped before announcing:\n" + "\n".join(self.lines)
        self.info: dict[str, Any] = json.loads(first)

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in list(self.lines)]  # every line: one JSON object
        return [e for e in parsed if name is None or e["event"] == name]

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {name} in:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return code


def _call(url: str, token: str, body: dict[str, Any] | None = None, method: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]


def test_dev_runs_each_service_in_its_own_supervised_process(tmp_path: Path) -> None:
    """`credits dev` on a fresh data directory, twice: one JSON log format for every
    process, quiet while idle, a killed service restarted, data, ports and Stripe keys
    kept across the restart, and `. .data/dev.env` ready for the shell."""
    ports = {"--meter-port": _free_port(), "--billing-port": _free_port(), "--settler-port": _free_port()}
    env = _bare_env(tmp_path, LOG_LEVEL="INFO", LOG_FORMAT="json")
    project = tmp_path / "project"
    project.mkdir()
    flags = [str(x) for kv in ports.items() for x in kv]
    balances: list[Any] = []
    announced: list[dict[str, Any]] = []
    for round_ in range(2):
        stack = Stack(project, env, *(flags if round_ == 0 else []))  # the second start remembers the ports
        try:
            info = stack.info
            stack.wait_for("stack_ready")  # logged before the announcement; stderr is read by a thread
            announced.append(info)
            assert info["meter_url"] == f"http://127.0.0.1:{ports['--meter-port']}"
            assert info["next"] == ". .data/dev.env"
            assert info["console_url"] == f"http://127.0.0.1:{ports['--billing-port']}/console"
            dev_env = (project / ".data" / "dev.env").read_text()
            for name in ("METER_URL", "BILLING_URL", "API_KEY", "JWT", "ORGANIZATION_ID", "STRIPE_PUBLISHABLE_KEY"):
                assert f"export {name}=" in dev_env
            assert f"export API_KEY={info['api_key']}" in dev_env
            services = {e["service"] for e in stack.events()}
            assert {"dev", "meter", "settler", "billing"} <= services
            if round_ == 0:
                applied = {e["migration"] for e in stack.events("migration_applied")}
                assert {"0001_ledger.sql", "0006_usage_hourly.sql"} <= applied
            # Each service is a process of its own, child of the supervisor.
            ready = {e["service"]: e["pid"] for e in stack.events("service_ready")}
            assert set(ready) == {"meter", "settler", "billing"} and len(set(ready.values())) == 3
            assert set(ready.values()) <= set(_children(stack.proc.pid))

            headers_key = info["api_key"]
            used = _call(f"{info['meter_url']}/api/credits/use", headers_key, {"action": "generate_content"})
            balances.append(used["balance"])
            for _ in range(100):  # the settler process settles it into the ledger
                settled = _call(f"{info['meter_url']}/api/credits/usage", headers_key)["data"]
                if len(settled) == len(balances):
                    break
                time.sleep(0.2)
            assert len(settled) == len(balances)
            assert (
                _call(f"{info['meter_url']}/api/credits/balance", info["jwt"])["organization_id"]
                == (info["organization_id"])
            )
            # The demo organization's portal link opens a session (once).
            portal = urllib.parse.urlsplit(info["portal_url"])
            assert portal.port == ports["--billing-port"] and portal.path.startswith("/portal/enter/pl1.")
            conn = http.client.HTTPConnection(portal.hostname or "", portal.port, timeout=10)
            try:
                conn.request("GET", portal.path)
                entered = conn.getresponse()
                entered.read()
                assert entered.status == 303 and entered.getheader("Location") == "/portal/overview"
                assert "HttpOnly" in (entered.getheader("Set-Cookie") or "")
                # The ops console is served with it (its own role connected): signed out, the sign-in page.
                conn.request("GET", "/console/organizations")
                console = conn.getresponse()
                console.read()
                assert console.status == 303 and console.getheader("Location") == "/console/sign-in"
                conn.request("GET", "/console/sign-in")
                sign_in = conn.getresponse()
                assert sign_in.status == 200 and b"Sign in to the ops console" in sign_in.read()
            finally:
                conn.close()

            # Idle: nothing is printed (no cron lines, no per-second chatter).
            time.sleep(2.0)
            quiet_from = len(stack.lines)
            time.sleep(5.0)
            assert stack.lines[quiet_from:] == []

            if round_ == 0:
                os.kill(ready["meter"], signal.SIGKILL)
                [exited] = stack.wait_for("service_exited")
                assert exited["service"] == "meter" and exited["exit"] == "signal SIGKILL"
                [restarted] = stack.wait_for("service_restarted")
                assert restarted["service"] == "meter" and restarted["restarts"] == 1
                for _ in range(100):
                    try:
                        _call(f"{info['meter_url']}/api/credits/balance", headers_key)
                        break
                    except OSError:
                        time.sleep(0.2)
                assert _call(f"{info['meter_url']}/api/credits/balance", headers_key)["balance"] == used["balance"]
        finally:
            code = stack.stop()
        assert code == 0
        pids = [e["pid"] for e in stack.events("service_ready")] + [e["pid"] for e in stack.events("service_restarted")]
        for pid in pids:  # Ctrl-C stopped every service
            try:
                os.kill(pid, 0)
                raise AssertionError(f"service pid {pid} outlived credits dev")
            except ProcessLookupError:
                pass
        assert stack.events("stack_stopped")
    assert balances == [99, 98]
    first, second = announced
    for key in ("meter_url", "billing_url", "settler_url", "redis_url", "database_url", "stripe_api_base"):
        assert first[key] == second[key], key
    assert first["stripe_publishable_key"] == second["stripe_publishable_key"]
    assert first["api_key"] == second["api_key"] and first["organization_id"] == second["organization_id"]


def test_dev_says_which_port_is_busy_and_what_to_change(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _bare_env(tmp_path)
        proc = subprocess.run(
            [*CLI, "dev", "--meter-port", str(port), "--billing-port", str(_free_port()), "--settler-port",
             str(_free_port())],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"port {port}" in proc.stderr and "--meter-port" in proc.stderr and "METER_PORT" in proc.stderr
    assert "No credits dev stack is running" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 4


def test_the_sidecar_listens_on_a_unix_socket(migrated: Config, tmp_path: Path) -> None:
    """METER_SOCKET: the SDK's `unix:/path` reaches the sidecar; a stale socket file is
    replaced, a live one refused."""
    from credits_sdk import CreditsClient

    org = json.loads(run(migrated, "org", "create", "--name", "Socket").stdout)
    path = tmp_path / "meter.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a file left by a process that died: nobody listens
    stale.close()
    env = {
        **os.environ,
        "REDIS_URL": migrated.redis_url or "",
        "DATABASE_URL": migrated.database_url or "",
        "METER_PORT": str(_free_port()),
        "METER_SOCKET": str(path),
        "LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([*CLI, "serve", "meter"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                with CreditsClient(f"unix:{path}", api_key=org["api_key"]) as client:
                    used = client.consume("tool_call")
                break
            except Exception:
                time.sleep(0.1)
        assert used.balance == decimal.Decimal("99.9")  # tool_call: 0.1 credit
        assert (path.stat().st_mode & 0o777) == 0o660
        second = subprocess.run([*CLI, "serve", "meter"], env={**env, "METER_PORT": str(_free_port())},
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert second.returncode != 0 and "in use" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert not path.exists()  # removed on the way out


def test_partitions_show_lists_every_partition(migrated: Config) -> None:
    shown = json.loads(run(migrated, "partitions", "show", "--json").stdout)
    assert shown["partitions"] == migrated.usage_partitions
    assert [r["partition"] for r in shown["rows"]] == list(range(migrated.usage_partitions))
    assert all({"slot", "server", "unsettled", "oldest_s", "layout"} <= set(r) for r in shown["rows"])
    refused = run(migrated, "partitions", "resize", "--to", "0", check=False)
    assert refused.returncode == 2 and "between 1 and 16384" in refused.stderr
