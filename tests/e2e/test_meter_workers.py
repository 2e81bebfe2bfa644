"""`credits serve meter --workers N`: N sidecar processes on one port (SO_REUSEPORT)
and one Unix socket, serving, and stopping together on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from core.config import Config

CLI = [sys.executable, "-m", "ops.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listeners(port: int) -> set[int]:
    """Pids listening on 127.0.0.1:port."""
    pids = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    pids.add(proc.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return pids


def _use(port: int, key: str) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a new connection: any worker
    try:
        body = json.dumps({"action": "tool_call"})
        conn.request("POST", "/api/credits/use", body, {"Authorization": f"Bearer {key}"})
        reply = conn.getresponse()
        assert reply.status == 200
        answer: dict[str, object] = json.loads(reply.read())
        return answer
    finally:
        conn.close()


def test_workers_share_the_port_and_stop_together(migrated: Config, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "REDIS_URL": migrated.redis_url or "",
        "DATABASE_URL": migrated.database_url or "",
        "LOG_LEVEL": "WARNING",
    }
    made = subprocess.run([*CLI, "org", "create", "--name", "Workers"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["api_key"]
    port = _free_port()
    sock = tmp_path / "meter.sock"
    env = {**env, "METER_PORT": str(port), "METER_SOCKET": str(sock), "LOG_LEVEL": "INFO"}
    proc = subprocess.Popen([*CLI, "serve", "meter", "--workers", "3"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        workers: set[int] = set()
        for _ in range(300):
            workers = _listeners(port)
            if len(workers) == 3:
                break
            time.sleep(0.1)
        children = {p.pid for p in psutil.Process(proc.pid).children()}
        assert workers == children and len(workers) == 3  # three processes, one port
        assert proc.pid not in workers  # the supervisor only holds the port
        for _ in range(300):  # every worker answers /readyz before charging
            try:
                _use(port, key)
                break
            except (OSError, AssertionError):
                time.sleep(0.1)
        balances = [float(str(_use(port, key)["balance"])) for _ in range(30)]
        assert balances == [round(99.8 - 0.1 * i, 1) for i in range(30)]  # one balance, whichever worker answers
        unix = socket.socket(socket.AF_UNIX)
        unix.connect(str(sock))
        unix.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert unix.recv(100).startswith(b"HTTP/1.1 200")
        unix.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert code == 0, stderr
    assert "meter_stopped" in stderr and "workers=3" in stderr
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers)
    assert not _listeners(port)
    assert not sock.exists()
    with socket.socket() as again:  # the port is free again (connections in TIME_WAIT aside)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_workers_are_for_the_meter_only(migrated: Config) -> None:
    env = {**os.environ, "REDIS_URL": migrated.redis_url or "", "DATABASE_URL": migrated.database_url or ""}
    done = subprocess.run(
        [*CLI, "serve", "settler", "--workers", "2"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "only the meter" in done.stderr
