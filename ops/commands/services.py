"""`credits serve meter|settler|billing`, `credits migrate`, `credits catalog sync`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from core.config import Config, ConfigError
from ledger.migrate import migrate
from ops import stack
from ops.commands.common import Subparsers, json_flag, write_json
from ops.runtime import servers
from ops.supervisor import STOP_TIMEOUT_S, ServiceSpec, Supervisor, SupervisorError, exit_with_parent

log = logging.getLogger("credits")
SERVICES = ("meter", "settler", "billing")


def portal_mounts() -> tuple[Callable[[web.Application], None], ...]:
    from ops.commands.portal import mounts

    return mounts()


def register(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="run one service (credits dev runs all three)")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="meter: run N sidecar processes sharing HOST:METER_PORT (SO_REUSEPORT) and METER_SOCKET",
    )
    # A worker of `--workers N` (internal): the port is shared, the Unix socket inherited.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--socket-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(fn=cmd_serve)

    m = sub.add_parser("migrate", help="apply SQL migrations (safe to repeat)")
    m.add_argument(
        "--embedded",
        action="store_true",
        help="with no DATABASE_URL: create the embedded database in CREDITS_DATA_DIR (.data) if there is none",
    )
    json_flag(m)
    m.set_defaults(fn=cmd_migrate)

    catalog = sub.add_parser("catalog", help="the billing catalog")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    sync = catalog_commands.add_parser("sync", help="create in Stripe what the catalog lacks (idempotent)")
    json_flag(sync)
    sync.set_defaults(fn=cmd_catalog_sync)


def _event_loop_runner() -> Callable[[Awaitable[None]], None]:
    try:
        import uvloop

        return lambda coro: uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return lambda coro: asyncio.run(coro)  # type: ignore[arg-type]


async def migrate_when_reachable(config: Config, *, attempts: int = 60) -> None:
    """Services wait for Postgres at start (bounded), instead of dying with it down."""
    for attempt in range(attempts):
        try:
            await migrate(
                config.database_url or "",
                app_password=config.app_db_password,
                settler_password=config.settler_db_password,
                console_password=config.console_db_password,
            )
            return
        except (
            OSError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.InsufficientPrivilegeError,
        ) as exc:
            if attempt == attempts - 1:
                raise
            delay_s = min(5.0, 0.2 * 2**attempt)
            log.warning(
                "postgres_unreachable", extra={"error": str(exc), "attempt": attempt + 1, "retry_in_s": delay_s}
            )
            await asyncio.sleep(delay_s)


def _unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path`; a stale file (nobody listening) is replaced."""
    import os
    import pathlib

    where = pathlib.Path(path)
    if where.exists() or where.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(where))
        except OSError:
            where.unlink()  # left by a process that died
        else:
            raise OSError(f"METER_SOCKET: {where} is in use by another process")
        finally:
            probe.close()
    where.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(where))
    os.chmod(where, 0o660)  # owner and group: the agents that share the sidecar's group
    return sock


async def serve_meter(config: Config, *, worker: bool = False, socket_fd: int | None = None) -> None:
    """`credits serve meter`: the sidecar on HOST:METER_PORT, and on METER_SOCKET if set.
    worker: one of `--workers N` (its supervisor migrated; the port is bound with
    SO_REUSEPORT, the kernel spreading connections over the workers; the Unix socket is
    the supervisor's, `socket_fd`, shared by all)."""
    from meter.app import create_app

    if not worker:
        await migrate_when_reachable(config)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.meter_port, reuse_port=worker or None).start()
    where = {"url": f"http://{config.host}:{config.meter_port}"}
    log.info("meter_listening", extra={**where, "pid": os.getpid()} if worker else where)
    owns_socket = config.meter_socket is not None and socket_fd is None
    if socket_fd is not None:
        await web.SockSite(runner, socket.socket(fileno=socket_fd)).start()
    elif config.meter_socket is not None:
        await web.SockSite(runner, _unix_socket(str(config.meter_socket))).start()
        log.info("meter_listening", extra={"socket": str(config.meter_socket)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if owns_socket and config.meter_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                config.meter_socket.unlink()


def _port_holder(host: str, port: int) -> socket.socket:
    """HOST:port bound with SO_REUSEPORT and never listening (so it takes no
    connections): the workers bind the same port beside it, METER_PORT=0 picks one port
    for all of them, and no other program takes it while a worker restarts."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind(address)
    except OSError:
        holder.close()
        raise
    return holder


def serve_meter_workers(config: Config, workers: int) -> int:
    """`credits serve meter --workers N`: N sidecar processes on one port, supervised
    (ops/supervisor.py: one that dies is started again), all stopped on SIGTERM/SIGINT."""
    asyncio.run(migrate_when_reachable(config))  # once, here; the workers skip it
    holder = _port_holder(config.host, config.meter_port)
    port = int(holder.getsockname()[1])
    unix = _unix_socket(str(config.meter_socket)) if config.meter_socket is not None else None
    if unix is not None:
        unix.listen(1024)
    env = {
        **os.environ,
        "REDIS_URL": config.redis_url or "",
        "DATABASE_URL": config.database_url or "",
        "METER_PORT": str(port),
    }
    argv = [sys.executable, "-m", "ops.cli", "serve", "meter", "--worker"]
    fds: tuple[int, ...] = ()
    if unix is not None:
        argv += ["--socket-fd", str(unix.fileno())]
        fds = (unix.fileno(),)
    ready = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '') else config.host}:{port}/healthz"  # noqa: S104
    supervisor = Supervisor([ServiceSpec(f"meter-{i}", argv, env, ready, fds) for i in range(workers)])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: supervisor.request_stop())
    try:
        try:
            supervisor.start()
        except SupervisorError as exc:
            log.error("meter_workers_failed", extra={"error": str(exc)})
            return 1
        log.info(
            "meter_listening",
            extra={"url": f"http://{config.host}:{port}", "workers": workers, "pids": list(supervisor.pids().values())},
        )
        supervisor.run()
    finally:
        supervisor.stop(STOP_TIMEOUT_S)
        holder.close()
        if unix is not None:
            unix.close()
            if config.meter_socket is not None:
                with contextlib.suppress(FileNotFoundError):
                    config.meter_socket.unlink()
    log.info("meter_stopped", extra={"workers": workers})
    return 0


async def _settle(config: Config) -> None:
    from settler import worker

    await migrate_when_reachable(config)
    await worker.run(config)


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from billing import config as billing_config
    from billing.runtime import serve_billing, stripe_backend

    exit_with_parent()  # under `credits dev`: stop with the supervisor
    if args.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    if args.workers > 1 and args.service != "meter":
        raise ConfigError("--workers: only the meter runs as several processes (run more settlers instead)")
    with servers(config) as cfg:
        if args.service == "meter" and args.workers > 1:
            return serve_meter_workers(cfg, args.workers)
        if args.service == "meter":
            _event_loop_runner()(serve_meter(cfg, worker=args.worker, socket_fd=args.socket_fd))
        elif args.service == "billing":
            with stripe_backend(billing_config.load(), cfg.data_dir) as billing:

                async def run() -> None:
                    await migrate_when_reachable(cfg)
                    await serve_billing(cfg, billing, mounts=portal_mounts())

                _event_loop_runner()(run())
        else:
            _event_loop_runner()(_settle(cfg))
    return 0


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    with servers(config, create=args.embedded) as cfg:
        assert cfg.database_url is not None
        applied = asyncio.run(
            migrate(
                cfg.database_url,
                app_password=cfg.app_db_password,
                settler_password=cfg.settler_db_password,
                console_password=cfg.console_db_password,
            )
        )
        if config.embedded:
            stack.remember_data_dir(cfg.data_dir)
    write_json({"applied": applied})
    return 0


def cmd_catalog_sync(config: Config, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from billing import config as billing_config
    from billing.runtime import stripe_backend, sync_catalog_once

    with servers(config) as cfg, stripe_backend(billing_config.load(), cfg.data_dir) as billing:

        async def run() -> list[dict[str, object]]:
            await migrate_when_reachable(cfg)
            return [asdict(item) for item in await sync_catalog_once(cfg, billing)]

        synced = asyncio.run(run())
    write_json({"synced": synced})
    return 0
