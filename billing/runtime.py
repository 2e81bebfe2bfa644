"""Running billing: where Stripe is (configured, a running `credits dev`'s localstripe,
or a localstripe started here), the service itself, and the catalog sync command.

The `credits` command (ops/cli.py) calls these:

    with servers(config) as cfg, stripe_backend(load_billing(), cfg.data_dir) as billing:
        run(serve_billing(cfg, billing))          # credits serve billing
        run(sync_catalog_once(cfg, billing))      # credits catalog sync

and `credits dev` starts the service next to the meter with `start_billing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from billing.app import Mount, create_app
from billing.catalog import Catalog, SyncedItem, sync_catalog
from billing.config import BillingConfig, StripeFlavor
from billing.localstripe import LocalStripe, LocalStripeKeys, new_keys, register_webhook
from billing.stripe_client import StripeClientGateway
from core.config import Config
from ledger.store import Ledger

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/api/billing/stripe/webhook"
LOCALSTRIPE_FILE = "localstripe.json"  # published by the process that owns the dev localstripe
LOCALSTRIPE_DATA = "localstripe.pickle"
LOCALSTRIPE_LOG = "localstripe.log"
LOCALSTRIPE_KEYS = "localstripe_keys.json"  # the keys it answers to, kept across restarts


def _published(data_dir: pathlib.Path) -> BillingConfig | None:
    """The Stripe settings of a localstripe a running `credits dev` owns, if any."""
    try:
        data = json.loads((data_dir / LOCALSTRIPE_FILE).read_text())
        os.kill(int(data["pid"]), 0)
        return BillingConfig().with_stripe(
            api_base=str(data["api_base"]),
            secret_key=str(data["secret_key"]),
            webhook_secret=str(data["webhook_secret"]),
            publishable_key=str(data["publishable_key"]),
            flavor=StripeFlavor.LOCALSTRIPE,
        )
    except (OSError, ValueError, KeyError):
        return None


def running_localstripe(data_dir: pathlib.Path) -> BillingConfig | None:
    """The Stripe settings of the localstripe a running `credits dev` owns, if any."""
    return _published(data_dir)


def _stable_keys(data_dir: pathlib.Path) -> LocalStripeKeys:
    """The keys this data directory's localstripe answers to, the same across restarts
    (a frontend keeps its publishable key, the webhook endpoint its secret)."""
    path = data_dir / LOCALSTRIPE_KEYS
    try:
        data = json.loads(path.read_text())
        return LocalStripeKeys("", str(data["secret_key"]), str(data["publishable_key"]), str(data["webhook_secret"]))
    except (OSError, ValueError, KeyError):
        keys = new_keys()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        payload = {k: v for k, v in keys.__dict__.items() if k != "api_base"}
        tmp.write_text(json.dumps(payload))
        tmp.chmod(0o600)
        tmp.replace(path)
        return keys


@contextlib.contextmanager
def stripe_backend(
    billing: BillingConfig, data_dir: pathlib.Path, *, publish: bool = False, port: int = 0
) -> Iterator[BillingConfig]:
    """The billing settings with Stripe resolved: as configured; else the localstripe of
    a running `credits dev` on this data directory; else a localstripe started here
    (its objects and keys kept under `data_dir`, so they survive restarts like the
    ledger's references to them), stopped on exit. `publish`: let other commands find
    it. `port`: where it listens (0: any free port)."""
    if billing.stripe_configured:
        yield billing
        return
    running = _published(data_dir)
    if running is not None:
        yield _merge(billing, running)
        return
    server = LocalStripe(
        data_file=data_dir / LOCALSTRIPE_DATA,
        log_file=data_dir / LOCALSTRIPE_LOG,
        port=port,
        keys=_stable_keys(data_dir),
    )
    keys = server.start()
    published = data_dir / LOCALSTRIPE_FILE
    try:
        if publish:
            tmp = published.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), **keys.__dict__}))
            tmp.chmod(0o600)
            tmp.replace(published)
        yield billing.with_stripe(
            api_base=keys.api_base,
            secret_key=keys.secret_key,
            webhook_secret=keys.webhook_secret,
            publishable_key=keys.publishable_key,
            flavor=StripeFlavor.LOCALSTRIPE,
        )
    finally:
        if publish:
            with contextlib.suppress(FileNotFoundError):
                published.unlink()
        server.stop()


def _merge(billing: BillingConfig, stripe: BillingConfig) -> BillingConfig:
    return billing.with_stripe(
        api_base=stripe.stripe_api_base,
        secret_key=stripe.stripe_secret_key or "",
        webhook_secret=stripe.stripe_webhook_secret or "",
        publishable_key=stripe.stripe_publishable_key,
        flavor=stripe.stripe_flavor,
    )


@dataclass
class RunningBilling:
    url: str
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_billing(config: Config, billing: BillingConfig, *, mounts: Sequence[Mount] = ()) -> RunningBilling:
    """Start the billing service on BILLING_PORT (migrations must have run), with the
    pages `mounts` add (the portal). Against localstripe, the webhook endpoint is
    registered with it."""
    runner = web.AppRunner(create_app(config, billing, mounts=mounts), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, billing.billing_port)
    await site.start()
    port = billing.billing_port or _bound_port(runner)
    url = f"http://{config.host}:{port}"
    if billing.stripe_flavor is StripeFlavor.LOCALSTRIPE and billing.stripe_webhook_secret is not None:
        webhook_url = (billing.billing_public_url or url.replace("0.0.0.0", "127.0.0.1")) + WEBHOOK_PATH  # noqa: S104
        await asyncio.to_thread(register_webhook, billing.stripe_api_base, webhook_url, billing.stripe_webhook_secret)
    log.info("billing_listening", extra={"url": url})
    return RunningBilling(url, runner)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the billing service is not listening")


async def serve_billing(
    config: Config,
    billing: BillingConfig,
    *,
    announce: Callable[[RunningBilling], Awaitable[None]] | None = None,
    mounts: Sequence[Mount] = (),
) -> None:
    """`credits serve billing`: run until SIGINT or SIGTERM."""
    running = await start_billing(config, billing, mounts=mounts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if announce is not None:
            await announce(running)
        await stop.wait()
    finally:
        await running.stop()


async def sync_catalog_once(config: Config, billing: BillingConfig) -> list[SyncedItem]:
    """`credits catalog sync`: create in Stripe what the catalog lacks (idempotent)."""
    ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=2)
    gateway = StripeClientGateway(billing)
    try:
        return await sync_catalog(Catalog(ledger.pool), gateway)
    finally:
        await gateway.close()
        await ledger.close()
