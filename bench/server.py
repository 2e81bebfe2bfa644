"""The servers under test, each run in its own process the same way:

    python -m bench.server bare|naive|sidecar [options]

uvloop, one aiohttp AppRunner without access log, bound to a free port on 127.0.0.1.
The process prints `READY <host> <port>` on stdout once it listens and stops cleanly on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

NAIVE_ACCOUNT_ID = 1
_encode = msgspec.json.Encoder().encode


class UseBody(msgspec.Struct, forbid_unknown_fields=True):
    action: str
    units: int = 1


_decode_use = msgspec.json.Decoder(UseBody).decode


# -- 1. bare: the ceiling --------------------------------------------------------------
async def bare(request: web.Request) -> web.Response:
    """Decode a small JSON body, answer a small JSON body: no I/O behind it."""
    try:
        body = _decode_use(await request.read())
    except (msgspec.ValidationError, msgspec.DecodeError):
        return web.Response(status=400, body=b'{"error":"bad request"}', content_type="application/json")
    return web.Response(
        body=_encode({"ok": True, "action": body.action, "units": body.units}), content_type="application/json"
    )


def bare_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/bare", bare)
    return app


# -- 2. naive: one stored procedure per request on one hot row ---------------------------
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)


async def naive(request: web.Request) -> web.Response:
    try:
        body = _decode_use(await request.read())
    except (msgspec.ValidationError, msgspec.DecodeError):
        return web.Response(status=400, body=b'{"error":"bad request"}', content_type="application/json")
    try:
        row = await request.app[POOL].fetchrow(
            "SELECT credits, balance FROM bench_use($1, $2, $3)", NAIVE_ACCOUNT_ID, body.action, body.units
        )
    except asyncpg.RaiseError as exc:
        return web.Response(status=402, body=_encode({"error": str(exc)}), content_type="application/json")
    assert row is not None
    return web.Response(
        body=_encode({"credits": row["credits"], "balance": row["balance"]}), content_type="application/json"
    )


def naive_app(dsn: str, pool_size: int) -> web.Application:
    app = web.Application()

    async def pool(app: web.Application) -> AsyncIterator[None]:
        p = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size, command_timeout=30)
        app[POOL] = p
        try:
            yield
        finally:
            await p.close()

    app.cleanup_ctx.append(pool)
    app.router.add_post("/use", naive)
    return app


# -- 3./4. the sidecar, with the project's own config -------------------------------------
def sidecar_app(redis_url: str, database_url: str) -> web.Application:
    from core import config as config_module
    from meter.app import create_app

    env = dict(os.environ)
    env["RATE_LIMIT_PER_S"] = "0"
    for name in ("REDIS_URL", "DATABASE_URL", "APP_DATABASE_URL"):
        env.pop(name, None)
    config = dataclasses.replace(config_module.load(env), redis_url=redis_url, database_url=database_url)
    return create_app(config)


# -- the one way every server runs --------------------------------------------------------
async def serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    addr: Any = runner.addresses[0]
    sys.stdout.write(f"READY {addr[0]} {addr[1]}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.server")
    p.add_argument("kind", choices=["bare", "naive", "sidecar"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--naive-dsn")
    p.add_argument("--naive-pool-size", type=int, default=20)
    p.add_argument("--redis-url")
    p.add_argument("--database-url")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.kind == "bare":
        app = bare_app()
    elif args.kind == "naive":
        if not args.naive_dsn:
            p.error("naive needs --naive-dsn")
        app = naive_app(args.naive_dsn, args.naive_pool_size)
    else:
        if not (args.redis_url and args.database_url):
            p.error("sidecar needs --redis-url and --database-url")
        app = sidecar_app(args.redis_url, args.database_url)
    import uvloop

    uvloop.run(serve(app, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
