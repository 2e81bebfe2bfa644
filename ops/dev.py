"""`credits dev`: the whole stack on this machine, each service in its own process.

The supervisor (this process) starts what the services share once — the embedded
PostgreSQL and Valkey (unless REDIS_URL and DATABASE_URL are set), the local Stripe
stand-in (unless STRIPE_* keys are set), the migrations and the demo organization —
then runs `credits serve meter`, `credits serve billing` and `credits serve settler` as
child processes with those URLs in their environment (ops/supervisor.py: restarted when
they die, stopped together on Ctrl-C). It writes `<data dir>/dev.env` for the shell and
records the stack for the other commands (ops/stack.py).

Ports: a flag, else its variable, else what this data directory used last time, else
the default (8080, 8081, 8082; a free port for the embedded servers and Stripe).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import pathlib
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from accounts import admin
from api.auth import issue_jwt
from billing import config as billing_config
from billing.config import BillingConfig
from core.config import Config
from ops import stack
from ops.runtime import connect
from ops.supervisor import ServiceSpec, Supervisor

log = logging.getLogger("credits")

DEMO_FILE = "demo.json"
JWT_SECRET_FILE = "jwt_secret"  # noqa: S105 - a file name
DEV_ENV_FILE = "dev.env"
METER_SOCKET_FILE = "meter.sock"
DEV_JWT_TTL_S = 24 * 3600
SOCKET_PATH_BYTES_MAX = 100
EMBEDDED_HOST = "127.0.0.1"


class DevError(RuntimeError):
    """`credits dev` cannot start; the message says why and what to change."""


@dataclass(frozen=True)
class PortSpec:
    name: str  # as recorded in stack.json
    what: str  # as people call it
    variable: str
    flag: str
    default: int  # 0: a free port, picked once and kept


PORTS = (
    PortSpec("meter", "the metering sidecar", "METER_PORT", "--meter-port", 8080),
    PortSpec("billing", "the billing service", "BILLING_PORT", "--billing-port", 8081),
    PortSpec("settler", "the settler's ops endpoint", "SETTLER_PORT", "--settler-port", 8082),
    PortSpec("postgres", "the embedded PostgreSQL", "DEV_POSTGRES_PORT", "--postgres-port", 0),
    PortSpec("redis", "the embedded Valkey", "DEV_REDIS_PORT", "--redis-port", 0),
    PortSpec("stripe", "the local Stripe stand-in", "DEV_STRIPE_PORT", "--stripe-port", 0),
)


def resolve_ports(
    flags: Mapping[str, int | None], env: Mapping[str, str], remembered: Mapping[str, int]
) -> dict[str, int]:
    """Each port: its flag, else its variable, else last time's, else its default."""
    ports: dict[str, int] = {}
    for spec in PORTS:
        value = flags.get(spec.name)
        if value is None and env.get(spec.variable):
            try:
                value = int(env[spec.variable])
            except ValueError:
                raise DevError(f"{spec.variable}: expected a port number, got {env[spec.variable]!r}") from None
        if value is None:
            value = remembered.get(spec.name) or spec.default
        lowest = 0 if spec.default == 0 else 1  # 0 = "a free one" only where one is picked for us
        if not lowest <= value <= 65535:
            raise DevError(f"{spec.flag} / {spec.variable}: expected a port {lowest}-65535, got {value}")
        ports[spec.name] = value
    return ports


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_busy(host: str, port: int) -> bool:
    """True when something listens on (host, port). SO_REUSEADDR as the servers bind,
    so a port in TIME_WAIT after a restart counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def busy_port_message(spec: PortSpec, host: str, port: int, running: stack.StackRecord | None) -> str:
    lines = [f"credits dev: port {port} on {host} ({spec.what}) is in use."]
    if running is not None:
        env_file = running.data_dir / DEV_ENV_FILE
        lines.append(
            f"A credits dev stack is already running on {running.data_dir} (pid {running.pid}): "
            f"use it (. {env_file}), or stop it with Ctrl-C in its terminal first."
        )
    else:
        lines.append("No credits dev stack is running: another program holds the port.")
    lines.append(
        f"To use another port: credits dev {spec.flag} PORT, or {spec.variable}=PORT "
        "(the data directory remembers it for the next start)."
    )
    return "\n".join(lines)


def check_ports(ports: Mapping[str, int], config: Config, *, embedded: bool, local_stripe: bool) -> None:
    running = stack.running(config)
    for spec in PORTS:
        if spec.name in ("postgres", "redis") and not embedded:
            continue
        if spec.name == "stripe" and not local_stripe:
            continue
        port = ports[spec.name]
        if port == 0:
            continue
        host = config.host if spec.name in ("meter", "billing", "settler") else EMBEDDED_HOST
        if port_busy(host, port):
            raise DevError(busy_port_message(spec, host, port, running))


def jwt_secret(config: Config) -> str:
    """JWT_SECRET, or one generated once for this data directory."""
    if config.jwt_secret is not None:
        return config.jwt_secret
    path = config.data_dir / JWT_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


async def demo_organization(config: Config) -> dict[str, str]:
    """The demo organization of this data directory (created on the first start)."""
    path = config.data_dir / DEMO_FILE
    async with connect(config, run_migrations=True) as s:
        if path.exists():
            demo: dict[str, str] = json.loads(path.read_text())
            if await s.ledger.organization_exists(demo["organization_id"]):
                return demo
        org, key = await admin.create_organization(s.ledger, "Demo organization")
    demo = {"organization_id": org, "api_key": key.secret}
    path.write_text(json.dumps(demo))
    path.chmod(0o600)
    return demo


# -- what the stack announces ---------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    key: str  # the JSON key of `credits dev --json`
    label: str  # the text line's label
    value: str
    note: str = ""


@dataclass(frozen=True)
class DevStack:
    config: Config
    billing: BillingConfig
    ports: dict[str, int]
    demo: dict[str, str]
    jwt: str
    meter_socket: pathlib.Path | None
    portal_url: str = ""

    def url(self, service: str) -> str:
        return f"http://{_connect_host(self.config.host)}:{self.ports[service]}"


def announcement(s: DevStack) -> list[Entry]:
    """What `credits dev` prints once every service is ready, one entry per line, in
    order (and the keys of `credits dev --json`). This is the one place to add a line;
    a value that needs the running stack (a sign-in link, say) is made in run(), where
    the demo organization is, and carried here on DevStack."""
    meter, billing = s.url("meter"), s.url("billing")
    entries = [
        Entry("meter_url", "meter", meter, f"API reference {meter}/docs"),
        Entry("billing_url", "billing", billing, f"API reference {billing}/docs"),
        Entry("settler_url", "settler", s.url("settler"), "/metrics, /api/admin/reconcile"),
    ]
    if s.meter_socket is not None:
        entries.append(
            Entry("meter_socket", "meter socket", str(s.meter_socket), "the SDK: unix:" + str(s.meter_socket))
        )
    entries += [
        Entry("stripe_api_base", "stripe", s.billing.stripe_api_base, s.billing.stripe_flavor.value),
        Entry("stripe_publishable_key", "stripe key", s.billing.stripe_publishable_key or ""),
        Entry("redis_url", "redis", s.config.redis_url or ""),
        Entry("database_url", "postgres", s.config.database_url or ""),
        Entry("organization_id", "demo org", s.demo["organization_id"]),
        Entry("api_key", "api key", s.demo["api_key"], "admin"),
        Entry("jwt", "jwt", s.jwt, "admin, 24 h; more: credits token --org ORG --role admin|viewer|agent --ttl 1h"),
        Entry(
            "portal_url",
            "portal",
            s.portal_url,
            "the demo organization's portal, single use; more: credits portal-link",
        ),
        Entry(
            "console_url", "console", f"{billing}/console", "operators: credits operator create --email you@example.com"
        ),
        Entry("data_dir", "data", str(s.config.data_dir)),
    ]
    return entries


def env_file_hint(data_dir: pathlib.Path) -> str:
    """`. .data/dev.env` when the data directory is below the current one, else absolute."""
    path = data_dir / DEV_ENV_FILE
    with contextlib.suppress(ValueError):
        return ". " + str(path.relative_to(pathlib.Path.cwd()))
    return ". " + shlex.quote(str(path))


def print_announcement(s: DevStack, *, as_json: bool) -> None:
    entries = announcement(s)
    hint = env_file_hint(s.config.data_dir)
    if as_json:
        sys.stdout.write(json.dumps({**{e.key: e.value for e in entries}, "next": hint}) + "\n")
    else:
        width = max(len(e.label) for e in entries)
        out = ["credits dev: the stack is up (Ctrl-C stops it)"]
        for e in entries:
            out.append(f"  {e.label:<{width}}  {e.value}" + (f"   ({e.note})" if e.note else ""))
        out.append(f"Next: {hint}   (METER_URL, BILLING_URL, API_KEY, JWT, ORGANIZATION_ID, STRIPE_PUBLISHABLE_KEY)")
        sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


def write_env_file(s: DevStack) -> pathlib.Path:
    values = {
        "METER_URL": s.url("meter"),
        "BILLING_URL": s.url("billing"),
        "ORGANIZATION_ID": s.demo["organization_id"],
        "API_KEY": s.demo["api_key"],
        "JWT": s.jwt,
        "STRIPE_PUBLISHABLE_KEY": s.billing.stripe_publishable_key or "",
    }
    lines = [
        f"# Written by `credits dev` at {stack.now_iso()} for the stack in {s.config.data_dir}.",
        "# Load it into your shell:  " + env_file_hint(s.config.data_dir),
        "# JWT: an admin token of the demo organization for 24 h (credits token makes others).",
        *(f"export {k}={shlex.quote(v)}" for k, v in values.items()),
    ]
    path = s.config.data_dir / DEV_ENV_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o600)  # an API key and a token
    tmp.replace(path)
    return path


# -- the children -----------------------------------------------------------------------
def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - a wildcard bind is reached locally


def service_env(s: DevStack, base: Mapping[str, str]) -> dict[str, str]:
    """The environment every service process gets: the shared servers' URLs and keys."""
    env = {k: v for k, v in base.items() if not k.startswith("STRIPE_")}
    env.update(
        {
            "REDIS_URL": s.config.redis_url or "",
            "DATABASE_URL": s.config.database_url or "",
            "CREDITS_DATA_DIR": str(s.config.data_dir),
            "JWT_SECRET": s.config.jwt_secret or "",
            "HOST": s.config.host,
            "METER_PORT": str(s.ports["meter"]),
            "BILLING_PORT": str(s.ports["billing"]),
            "SETTLER_PORT": str(s.ports["settler"]),
            "STRIPE_SECRET_KEY": s.billing.stripe_secret_key or "",
            "STRIPE_WEBHOOK_SECRET": s.billing.stripe_webhook_secret or "",
            "STRIPE_FLAVOR": s.billing.stripe_flavor.value,
        }
    )
    if s.billing.stripe_publishable_key:
        env["STRIPE_PUBLISHABLE_KEY"] = s.billing.stripe_publishable_key
    if s.billing.stripe_api_base != billing_config.STRIPE_API_BASE_DEFAULT:
        env["STRIPE_API_BASE"] = s.billing.stripe_api_base
    if s.meter_socket is not None:
        env["METER_SOCKET"] = str(s.meter_socket)
    return env


def serve_argv(service: str) -> list[str]:
    """How `credits dev` starts a service: `credits serve NAME`, as a deployment does."""
    return [sys.executable, "-m", "ops.cli", "serve", service]


def service_specs(s: DevStack, base: Mapping[str, str]) -> list[ServiceSpec]:
    """The three services as a deployment runs them, each ready when it answers. The
    settler first (it drains last), the front doors after it."""
    env = service_env(s, base)
    return [
        ServiceSpec("settler", serve_argv("settler"), env, s.url("settler") + "/healthz"),
        ServiceSpec("meter", serve_argv("meter"), env, s.url("meter") + "/readyz"),
        ServiceSpec("billing", serve_argv("billing"), env, s.url("billing") + "/healthz"),
    ]


def _meter_socket(config: Config) -> pathlib.Path | None:
    if config.meter_socket is not None:
        return config.meter_socket
    path = config.data_dir / METER_SOCKET_FILE
    if len(str(path).encode()) > SOCKET_PATH_BYTES_MAX:
        log.warning("meter_socket_skipped", extra={"reason": "the data directory's path is too long for a socket"})
        return None
    return path


# -- the command ------------------------------------------------------------------------
@contextlib.contextmanager
def _embedded(config: Config, ports: dict[str, int]) -> Iterator[Config]:
    if not config.embedded:
        yield config
        return
    from ops.embedded import EmbeddedServers

    servers = EmbeddedServers(config.data_dir, redis_port=ports["redis"], postgres_port=ports["postgres"])
    try:
        urls = servers.start()
    except RuntimeError as exc:
        raise DevError(f"credits dev: the embedded servers did not start: {exc}") from None
    try:
        ports["redis"] = int(urls.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        ports["postgres"] = int(urls.database_url.rsplit(":", 1)[1].split("/", 1)[0])
        yield config.with_urls(config.redis_url or urls.redis_url, config.database_url or urls.database_url)
    finally:
        servers.stop()


def run(config: Config, flags: Mapping[str, int | None], *, as_json: bool, env: Mapping[str, str]) -> int:
    """`credits dev`: start everything, announce it, supervise until Ctrl-C."""
    from billing.runtime import stripe_backend

    config = replace(config, data_dir=config.data_dir.expanduser().resolve())
    previous = stack.recorded(config.data_dir)
    if previous is not None and previous.running:
        raise DevError(
            f"credits dev: a stack is already running on {config.data_dir} (pid {previous.pid}); "
            f"use it ({env_file_hint(config.data_dir)}) or stop it with Ctrl-C in its terminal first."
        )
    billing_settings = billing_config.load(env)
    ports = resolve_ports(flags, env, previous.ports if previous is not None else {})
    local_stripe = not billing_settings.stripe_configured
    check_ports(ports, config, embedded=config.embedded, local_stripe=local_stripe)
    for name in ("stripe",):
        if ports[name] == 0 and local_stripe:
            ports[name] = _free_port(EMBEDDED_HOST)
    config = replace(config, jwt_secret=jwt_secret(config))
    billing_settings = replace(billing_settings, billing_port=ports["billing"])
    with (
        _embedded(config, ports) as cfg,
        stripe_backend(
            billing_settings, cfg.data_dir, publish=True, port=ports["stripe"] if local_stripe else 0
        ) as billing,
    ):
        cfg = replace(cfg, meter_port=ports["meter"], settler_port=ports["settler"])
        demo = asyncio.run(demo_organization(cfg))
        assert cfg.jwt_secret is not None
        token = issue_jwt(
            cfg.jwt_secret, organization_id=demo["organization_id"], subject="demo", role="admin", ttl_s=DEV_JWT_TTL_S
        )
        from ops.commands.portal import portal_link

        portal = asyncio.run(portal_link(cfg, billing, demo["organization_id"], "admin", None))
        dev = DevStack(cfg, billing, ports, demo, token, _meter_socket(cfg), portal)
        supervisor = Supervisor(service_specs(dev, env))
        rec = stack.StackRecord(
            data_dir=cfg.data_dir,
            pid=os.getpid(),
            ports=dict(ports),
            urls={
                "meter": dev.url("meter"),
                "billing": dev.url("billing"),
                "settler": dev.url("settler"),
                "redis": cfg.redis_url or "",
                "database": cfg.database_url or "",
                "stripe": billing.stripe_api_base,
            },
            started_at=stack.now_iso(),
        )
        stack.record(rec)
        _on_signals(supervisor.request_stop)
        try:
            supervisor.start()
            write_env_file(dev)
            log.info("stack_ready", extra={"data_dir": str(cfg.data_dir), "services": supervisor.pids()})
            print_announcement(dev, as_json=as_json)
            supervisor.run()
        finally:
            supervisor.stop()
            stack.stopped(rec)
            log.info("stack_stopped", extra={"data_dir": str(cfg.data_dir)})
    return 0


def _on_signals(handler: Callable[[], None]) -> None:
    def on_signal(signum: int, frame: Any) -> None:
        handler()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
