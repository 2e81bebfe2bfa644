"""localstripe (PyPI), started by the project itself for development and tests.

`LocalStripe` runs it as a child process (`python -m billing.localstripe`, which wraps
localstripe's own server), waits a bounded time until it answers, registers webhook
endpoints with it and stops it cleanly. The wrapper exists for three reasons, each a
difference from running the `localstripe` script:

- it listens on 127.0.0.1 on a port the kernel picks and reports it in a file, so
  there is no race for a "free" port and no dependency on IPv6 being enabled;
- localstripe keeps its whole store in /tmp/localstripe.pickle, shared by every
  instance on the machine and rewritten on every change; the wrapper points it at a
  file of ours (`credits dev`: under the data directory, so a restart keeps Stripe's
  objects together with Postgres' references to them) or at none (tests: in memory);
- it exits by itself when its parent dies, so a killed test run leaves no server behind.

What localstripe does not do like Stripe is listed in the README ("localstripe gaps").
localstripe is GPL-3.0 and a development dependency only (the `dev` extra): production
images talk to Stripe and never contain it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import pathlib
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from core import logs

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 20.0
STARTUP_POLL_S = 0.05
STOP_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0
PARENT_CHECK_INTERVAL_S = 1.0
WEBHOOK_ENDPOINT_ID = "credits"
PORT_BUSY_STATUS = 3  # the child's exit status when its port is taken


class LocalStripeError(RuntimeError):
    """localstripe did not start or refused a configuration call."""


@dataclass(frozen=True)
class LocalStripeKeys:
    """What a client needs: the API base and keys (localstripe accepts any sk_/pk_)."""

    api_base: str
    secret_key: str
    publishable_key: str
    webhook_secret: str


def new_keys() -> LocalStripeKeys:
    """Fresh keys (localstripe accepts any sk_/pk_; webhooks are signed with the secret)."""
    return LocalStripeKeys(
        api_base="",
        secret_key="sk_test_localstripe_" + secrets.token_hex(8),
        publishable_key="pk_test_localstripe_" + secrets.token_hex(8),
        webhook_secret="whsec_" + secrets.token_hex(24),
    )


class LocalStripe:
    """One localstripe server. Use as a context manager, or start() / stop()."""

    def __init__(
        self,
        *,
        data_file: pathlib.Path | None = None,
        log_file: pathlib.Path | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        port: int = 0,
        keys: LocalStripeKeys | None = None,
    ) -> None:
        """`port` 0: one the kernel picks. `keys`: the keys to answer to (their api_base
        is ignored), so that clients configured before a restart keep working; None:
        new ones."""
        if not 0 <= port <= 65535:
            raise LocalStripeError(f"port must be 0 (any) or 1-65535, got {port}")
        self.data_file = data_file
        self.log_file = log_file
        self.port = port
        self.wanted_keys = keys
        self.startup_timeout_s = startup_timeout_s
        self.keys: LocalStripeKeys | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> LocalStripeKeys:
        if self._proc is not None:
            raise LocalStripeError("already started")
        if importlib.util.find_spec("localstripe") is None:
            raise LocalStripeError(
                "localstripe is not installed (a development dependency: pip install -e '.[dev]'); "
                "or set STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET to use Stripe"
            )
        self._workdir = tempfile.TemporaryDirectory(prefix="localstripe-")
        workdir = pathlib.Path(self._workdir.name)
        port_file = workdir / "port"
        log_path = self.log_file or workdir / "localstripe.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "billing.localstripe", "--port-file", str(port_file), "--parent", str(os.getpid())]
        cmd += ["--port", str(self.port)]
        if self.data_file is not None:
            self.data_file.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--data-file", str(self.data_file)]
        with open(log_path, "ab") as log_out:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT)
        keys = self.wanted_keys or new_keys()
        try:
            port = self._wait_for_port(port_file, log_path)
            api_base = f"http://127.0.0.1:{port}"
            self._wait_until_answering(api_base, keys.secret_key, log_path)
        except BaseException:
            self.stop()
            raise
        self.keys = LocalStripeKeys(api_base, keys.secret_key, keys.publishable_key, keys.webhook_secret)
        log.info("localstripe_listening", extra={"url": api_base, "log": str(log_path)})
        return self.keys

    def _deadline_passed(self, deadline: float, log_path: pathlib.Path, what: str) -> None:
        if self._proc is None:
            raise LocalStripeError("stopped while starting")
        code = self._proc.poll()
        if code == PORT_BUSY_STATUS:
            raise LocalStripeError(f"localstripe cannot listen on 127.0.0.1:{self.port}: the port is in use")
        if code is not None:
            raise LocalStripeError(f"localstripe exited with status {code} {what}; see {log_path}")
        if time.monotonic() > deadline:
            raise LocalStripeError(f"localstripe did not start within {self.startup_timeout_s} s; see {log_path}")

    def _wait_for_port(self, port_file: pathlib.Path, log_path: pathlib.Path) -> int:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(port_file.read_text().strip())
            self._deadline_passed(deadline, log_path, "before listening")
            time.sleep(STARTUP_POLL_S)

    def _wait_until_answering(self, api_base: str, secret_key: str, log_path: pathlib.Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        probe = urllib.request.Request(  # noqa: S310 - a local http URL we built
            f"{api_base}/v1/customers?limit=1", headers={"Authorization": f"Bearer {secret_key}"}
        )
        while True:
            try:
                with urllib.request.urlopen(probe, timeout=PROBE_TIMEOUT_S) as reply:  # noqa: S310
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self._deadline_passed(deadline, log_path, "before answering")
            time.sleep(STARTUP_POLL_S)

    def register_webhook(self, url: str, *, endpoint_id: str = WEBHOOK_ENDPOINT_ID) -> None:
        """Ask localstripe to deliver every event, signed, to `url`."""
        if self.keys is None:
            raise LocalStripeError("not started")
        register_webhook(self.keys.api_base, url, self.keys.webhook_secret, endpoint_id=endpoint_id)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        elif proc is not None:
            proc.wait(timeout=STOP_TIMEOUT_S)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def register_webhook(api_base: str, url: str, secret: str, *, endpoint_id: str = WEBHOOK_ENDPOINT_ID) -> None:
    """localstripe's own configuration call: POST /_config/webhooks/{id} (url, secret)."""
    body = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    request = urllib.request.Request(  # noqa: S310 - the localstripe base URL we configured
        f"{api_base}/_config/webhooks/{urllib.parse.quote(endpoint_id, safe='')}", data=body, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as reply:  # noqa: S310
            if reply.status != 200:
                raise LocalStripeError(f"webhook registration answered {reply.status}")
    except urllib.error.URLError as exc:
        raise LocalStripeError(f"webhook registration failed: {exc}") from exc


# -- the child process ------------------------------------------------------------------
def _point_store_at(data_file: pathlib.Path | None) -> None:
    """Replace localstripe's /tmp/localstripe.pickle persistence with ours."""
    resources: Any = importlib.import_module("localstripe.resources")

    def dump_to_disk(store: dict[str, Any]) -> None:
        if data_file is None:
            return
        tmp = data_file.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            pickle.dump(store, out, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(data_file)

    def try_load_from_disk(store: dict[str, Any]) -> None:
        if data_file is None or not data_file.exists():
            return
        with open(data_file, "rb") as source:
            old = pickle.load(source)  # noqa: S301 - our own file, written by dump_to_disk above
        store.clear()
        store.update(old)

    resources.Store.dump_to_disk = dump_to_disk
    resources.Store.try_load_from_disk = try_load_from_disk
    resources.store.try_load_from_disk()


def _serve(port_file: pathlib.Path, data_file: pathlib.Path | None, parent_pid: int, port: int = 0) -> None:
    import asyncio

    from aiohttp import web

    _point_store_at(data_file)
    server: Any = importlib.import_module("localstripe.server")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        log.error("localstripe_port_busy", extra={"port": port, "error": str(exc)})
        raise SystemExit(PORT_BUSY_STATUS) from None
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
    tmp.replace(port_file)

    async def exit_with_parent(app: web.Application) -> Any:
        async def watch() -> None:
            # Polled: no event tells a child that its parent died (the pid changes to 1).
            while True:
                await asyncio.sleep(PARENT_CHECK_INTERVAL_S)
                if os.getppid() != parent_pid:
                    break
            log.warning("localstripe_parent_gone", extra={"parent_pid": parent_pid})
            os.kill(os.getpid(), signal.SIGTERM)

        task = asyncio.get_running_loop().create_task(watch())
        yield
        task.cancel()

    app: web.Application = server.app
    app.cleanup_ctx.append(exit_with_parent)
    web.run_app(app, sock=sock, print=None, access_log=logging.getLogger("aiohttp.access"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m billing.localstripe", description="localstripe for this project")
    parser.add_argument("--port-file", type=pathlib.Path, required=True)
    parser.add_argument("--data-file", type=pathlib.Path)
    parser.add_argument("--parent", type=int, default=os.getppid())
    parser.add_argument("--port", type=int, default=0, help="0: one the kernel picks")
    args = parser.parse_args(argv)
    logs.setup(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_FORMAT", "text"), service="localstripe")
    _serve(args.port_file, args.data_file, args.parent, args.port)


if __name__ == "__main__":
    main()
