"""`credits serve meter|settler|billing`, `credits migrate`, `credits catalog sync`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from core.config import Config
from ledger.migrate import migrate
from ops import stack
from ops.commands.common import Subparsers, json_flag, write_json
from ops.runtime import servers
from ops.supervisor import exit_with_parent

log = logging.getLogger("credits")
SERVICES = ("meter", "settler", "billing")


def portal_mounts() -> tuple[Callable[[web.Application], None], ...]:
    from ops.commands.portal import mounts

    return mounts()


def register(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="run one service (credits dev runs all three)")
    serve.add_argument("service", choices=SERVICES)
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


async def serve_meter(config: Config) -> None:
    """`credits serve meter`: the sidecar on HOST:METER_PORT, and on METER_SOCKET if set."""
    from meter.app import create_app

    await migrate_when_reachable(config)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.meter_port).start()
    log.info("meter_listening", extra={"url": f"http://{config.host}:{config.meter_port}"})
    if config.meter_socket is not None:
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
        if config.meter_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                config.meter_socket.unlink()


async def _settle(config: Config) -> None:
    from settler import worker

    await migrate_when_reachable(config)
    await worker.run(config)


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from billing import config as billing_config
    from billing.runtime import serve_billing, stripe_backend

    exit_with_parent()  # under `credits dev`: stop with the supervisor
    with servers(config) as cfg:
        if args.service == "meter":
            _event_loop_runner()(serve_meter(cfg))
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
