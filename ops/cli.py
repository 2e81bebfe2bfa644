"""`credits`: the one command-line tool for developers and operations staff.

credits dev                      the whole stack on embedded servers, with a demo org
credits serve meter|settler|billing  one service (embedded servers unless URLs are set)
credits catalog sync             create in Stripe what the billing catalog lacks
credits migrate                  apply SQL migrations (safe to repeat)
credits org create --name N      prints {"organization_id": ..., "api_key": ...}
credits key create|revoke ...    API keys (role agent|admin, department, cap, rate)
credits grant|adjust ...         credits with a reason
credits balance --org ID         cache and ledger balance
credits portal-link --org ID     a single-use link into the customer portal
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import decimal
import json
import logging
import secrets
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from accounts import admin
from billing.config import BillingConfig
from core import config as config_module
from core.config import Config, ConfigError
from core.money import PrecisionError, to_credits, to_milli
from ledger.migrate import migrate
from ops.runtime import Services, connect, publish_urls, servers, unpublish_urls


def _portal() -> tuple[Callable[[web.Application], None], ...]:
    """The customer portal, served by the billing service under /portal."""
    from portal.app import mount

    return (mount,)


log = logging.getLogger("credits")
DEMO_FILE = "demo.json"
JWT_SECRET_FILE = "jwt_secret"  # noqa: S105 - a file name


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _credits(text: str) -> int:
    try:
        return to_milli(decimal.Decimal(text))
    except (decimal.InvalidOperation, PrecisionError) as exc:
        raise argparse.ArgumentTypeError(f"not an exact credit amount: {text} ({exc})") from None


def _timestamp(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("the timestamp needs a time zone (e.g. Z)")
    return value


async def _with_services(config: Config, fn: Callable[[Services], Awaitable[int]]) -> int:
    async with connect(config) as services:
        return await fn(services)


def _run_with_services(config: Config, fn: Callable[[Services], Awaitable[int]]) -> int:
    with servers(config) as cfg:
        return asyncio.run(_with_services(cfg, fn))


# -- services ------------------------------------------------------------------------
async def _serve(
    config: Config,
    *,
    announce: Callable[[Config], Awaitable[None]] | None = None,
    with_settler: bool = False,
    billing: BillingConfig | None = None,
) -> None:
    from meter.app import create_app
    from settler import worker

    await _migrate_when_reachable(config)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.meter_port)
    await site.start()
    log.info("meter listening on http://%s:%d", config.host, config.meter_port)
    billing_service = None
    if billing is not None:  # credits dev: the billing service too, on BILLING_PORT
        from billing.runtime import start_billing

        billing_service = await start_billing(config, billing, mounts=_portal())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settler_task = asyncio.create_task(worker.run(config, stop=stop, handle_signals=False)) if with_settler else None
    try:
        if announce is not None:
            await announce(config)
        await stop.wait()
    finally:
        stop.set()
        if settler_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await settler_task
        if billing_service is not None:
            await billing_service.stop()
        await runner.cleanup()


def _event_loop_runner() -> Callable[[Awaitable[None]], None]:
    try:
        import uvloop

        return lambda coro: uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return lambda coro: asyncio.run(coro)  # type: ignore[arg-type]


async def _migrate_when_reachable(config: Config, *, attempts: int = 60) -> None:
    """Services wait for Postgres at start (bounded), instead of dying with it down."""
    for attempt in range(attempts):
        try:
            await migrate(
                config.database_url or "",
                app_password=config.app_db_password,
                settler_password=config.settler_db_password,
            )
            return
        except (
            OSError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.InsufficientPrivilegeError,
        ) as exc:
            if attempt == attempts - 1:
                raise
            log.warning("postgres not reachable (%s); retrying", exc)
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))


async def _settle(config: Config) -> None:
    from settler import worker

    await migrate(
        config.database_url or "", app_password=config.app_db_password, settler_password=config.settler_db_password
    )
    await worker.run(config)


async def _serve_billing(config: Config, billing: BillingConfig) -> None:
    from billing.runtime import serve_billing

    await _migrate_when_reachable(config)
    await serve_billing(config, billing, mounts=_portal())


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from billing import config as billing_config
    from billing.runtime import stripe_backend

    with servers(config) as cfg:
        if args.service == "meter":
            _event_loop_runner()(_serve(cfg))
        elif args.service == "billing":
            with stripe_backend(billing_config.load(), cfg.data_dir) as billing:
                _event_loop_runner()(_serve_billing(cfg, billing))
        else:
            _event_loop_runner()(_settle(cfg))
    return 0


def cmd_catalog_sync(config: Config, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from billing import config as billing_config
    from billing.runtime import stripe_backend, sync_catalog_once

    async def run(cfg: Config, billing: BillingConfig) -> list[dict[str, Any]]:
        await _migrate_when_reachable(cfg)
        return [asdict(item) for item in await sync_catalog_once(cfg, billing)]

    with servers(config) as cfg, stripe_backend(billing_config.load(), cfg.data_dir) as billing:
        synced = asyncio.run(run(cfg, billing))
    _print({"synced": synced})
    return 0


def _dev_jwt_secret(config: Config) -> str:
    path = config.data_dir / JWT_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


def cmd_dev(config: Config, args: argparse.Namespace) -> int:
    from dataclasses import replace

    from api.auth import issue_jwt
    from billing import config as billing_config
    from billing.runtime import stripe_backend

    if config.jwt_secret is None:
        config = replace(config, jwt_secret=_dev_jwt_secret(config))
    billing_settings = billing_config.load()
    with servers(config) as cfg, stripe_backend(billing_settings, cfg.data_dir, publish=True) as billing:

        async def announce(cfg: Config) -> None:
            demo_path = cfg.data_dir / DEMO_FILE
            if demo_path.exists():
                demo = json.loads(demo_path.read_text())
            else:
                async with connect(cfg, run_migrations=False) as s:
                    org, key = await admin.create_organization(s.ledger, "Demo organization")
                demo = {"organization_id": org, "api_key": key.secret}
                demo_path.write_text(json.dumps(demo))
                demo_path.chmod(0o600)
            publish_urls(cfg)
            assert cfg.jwt_secret is not None
            token = issue_jwt(
                cfg.jwt_secret, organization_id=demo["organization_id"], subject="demo", role="admin", ttl_s=86400
            )
            _print(
                {
                    "meter_url": f"http://{cfg.host}:{cfg.meter_port}",
                    "billing_url": f"http://{cfg.host}:{billing.billing_port}",
                    "stripe_api_base": billing.stripe_api_base,
                    "stripe_publishable_key": billing.stripe_publishable_key,
                    "redis_url": cfg.redis_url,
                    "database_url": cfg.database_url,
                    "organization_id": demo["organization_id"],
                    "api_key": demo["api_key"],
                    "jwt": token,
                    "portal_url": await _portal_link(cfg, billing, demo["organization_id"], "admin", None),
                }
            )

        try:
            _event_loop_runner()(_serve(cfg, announce=announce, with_settler=True, billing=billing))
        finally:
            unpublish_urls(cfg)
    return 0


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    with servers(config) as cfg:
        assert cfg.database_url is not None
        applied = asyncio.run(
            migrate(cfg.database_url, app_password=cfg.app_db_password, settler_password=cfg.settler_db_password)
        )
    _print({"applied": applied})
    return 0


# -- organizations, keys, credits -------------------------------------------------------
def cmd_org_create(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        org, key = await admin.create_organization(s.ledger, args.name)
        _print({"organization_id": org, "api_key": key.secret})
        return 0

    return _run_with_services(config, run)


def cmd_key_create(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        key = await admin.create_key(
            s.ledger,
            s.hot,
            args.org,
            role=args.role,
            name=args.name,
            department_id=args.department,
            cap=args.cap,
            rate_limit_per_s=args.rate,
            rate_limit_burst=args.burst,
        )
        _print({"organization_id": args.org, "key_id": key.id, "api_key": key.secret, "role": args.role})
        return 0

    return _run_with_services(config, run)


def cmd_key_revoke(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        revoked = await admin.revoke_key(s.ledger, s.hot, args.org, args.key)
        _print({"key_id": args.key, "revoked": True, "was_active": revoked})
        return 0

    return _run_with_services(config, run)


def cmd_grant(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        if args.amount <= 0:
            raise admin.AdminError("--amount must be positive (use `credits adjust` to take credits away)")
        g = await admin.grant(
            s.ledger,
            s.hot,
            args.org,
            amount=args.amount,
            reason=args.reason,
            reference=args.reference,
            expires_at=args.expires_at,
        )
        _print({"grant_id": g.grant_id, "created": g.created, "ledger_balance": str(to_credits(g.balance_after))})
        return 0

    return _run_with_services(config, run)


def cmd_adjust(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        out = await admin.adjust(
            s.ledger, s.hot, args.org, amount=args.amount, reason=args.reason, reference=args.reference
        )
        out["amount"] = str(to_credits(int(out["amount"])))
        _print(out)
        return 0

    return _run_with_services(config, run)


def cmd_balance(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        b = await admin.balance(s.ledger, s.hot, args.org)
        view = {
            "organization_id": b.organization_id,
            "balance": str(to_credits(b.cache_balance)),
            "reserved": str(to_credits(b.cache_reserved)),
            "available": str(to_credits(b.cache_available)),
            "ledger_balance": str(to_credits(b.ledger_balance)),
            "ledger_entries_sum": str(to_credits(b.ledger_entries_sum)),
        }
        if args.json:
            _print(view)
        else:
            for k, v in view.items():
                sys.stdout.write(f"{k:20} {v}\n")
        return 0

    return _run_with_services(config, run)


def cmd_alert_set(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        try:
            secret = await s.ledger.set_alert(args.org, threshold=args.threshold, webhook_url=args.url)
        except ValueError as exc:
            raise admin.AdminError(str(exc)) from None
        _print(
            {
                "organization_id": args.org,
                "threshold": str(to_credits(args.threshold)),
                "url": args.url,
                "secret": secret,
            }
        )
        return 0

    return _run_with_services(config, run)


async def _portal_link(
    config: Config, billing: BillingConfig, organization_id: str, role: str, return_url: str | None
) -> str:
    """A portal link signed as the billing service signs them (PORTAL_SECRET, else the
    JWT secret: configured, or the one `credits dev` keeps in the data directory)."""
    from billing.portal_sessions import ENTRY_PATH, PortalSessions, signing_key
    from ledger.store import Ledger

    jwt_secret = config.jwt_secret
    if jwt_secret is None and (config.data_dir / JWT_SECRET_FILE).exists():
        jwt_secret = (config.data_dir / JWT_SECRET_FILE).read_text().strip()
    if billing.portal_secret is None and jwt_secret is None:
        raise admin.AdminError("set PORTAL_SECRET (or JWT_SECRET) as the billing service has it")
    try:
        organization_id = str(uuid.UUID(organization_id))
    except ValueError:
        raise admin.AdminError(f"--org: not an organization id: {organization_id!r}") from None
    if return_url is not None and (not return_url.startswith(("https://", "http://")) or len(return_url) > 2048):
        raise admin.AdminError("--return-url must be an http(s) URL of at most 2048 characters")
    ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=2)
    try:
        if not await ledger.organization_exists(organization_id):
            raise admin.AdminError(f"organization {organization_id} not found")
        sessions = PortalSessions(
            ledger,
            signing_key(billing.portal_secret, jwt_secret),
            link_ttl_s=billing.portal_link_ttl_s,
            session_ttl_s=billing.portal_session_ttl_s,
        )
        link = await sessions.create_link(organization_id, role=role, return_url=return_url, created_by="ops:cli")
    finally:
        await ledger.close()
    base = billing.billing_public_url or f"http://{config.host}:{billing.billing_port}".replace("0.0.0.0", "127.0.0.1")  # noqa: S104
    return base + ENTRY_PATH + link.token


def cmd_portal_link(config: Config, args: argparse.Namespace) -> int:
    from billing import config as billing_config

    billing = billing_config.load()
    with servers(config) as cfg:
        url = asyncio.run(_portal_link(cfg, billing, args.org, args.role, args.return_url))
    _print({"organization_id": args.org, "role": args.role, "url": url, "valid_for_s": billing.portal_link_ttl_s})
    return 0


def cmd_reconcile(config: Config, args: argparse.Namespace) -> int:
    from ledger.settlement import Settlement
    from settler import reconcile

    async def run(s: Services) -> int:
        settlement = await Settlement.connect(s.config.settler_dsn(), max_size=2)
        try:
            orgs = [args.org] if args.org else None
            report = await reconcile.run(s.redis, s.hot, settlement, orgs)
            repaired: list[str] = []
            if args.repair:
                for d in report.drifts:
                    await reconcile.repair(s.hot, settlement, d.organization_id)
                    repaired.append(d.organization_id)
        finally:
            await settlement.close()
        drifts = [
            {
                "organization_id": d.organization_id,
                "redis": str(to_credits(d.cache)),
                "ledger": str(to_credits(d.ledger)),
                "in_flight": str(to_credits(d.in_flight)),
                "unpushed_grants": str(to_credits(d.unpushed)),
                "quarantined": str(to_credits(d.quarantined)),
                "difference": str(to_credits(d.difference)),
            }
            for d in report.drifts
        ]
        out = {
            "checked": report.checked,
            "drifts": drifts,
            "lagging": report.lagging,
            "quarantined": {org: str(to_credits(amount)) for org, amount in report.quarantined.items()},
            "dead_letters": report.dead_letters,
            "lagging_partitions": {str(p): round(age, 1) for p, age in report.lagging_partitions.items()},
            "repaired": repaired,
        }
        if args.json:
            _print(out)
        else:
            sys.stdout.write(f"checked {report.checked} organizations, {len(drifts)} drifting\n")
            for row in drifts:
                sys.stdout.write("  ".join(f"{k} {v}" for k, v in row.items()) + "\n")
            for org in report.lagging:
                sys.stdout.write(f"lagging {org}: too much unsettled to compare now\n")
            for org, amount in report.quarantined.items():
                sys.stdout.write(f"quarantined {org}: {to_credits(amount)} credits held out of the ledger\n")
            for partition, age in report.lagging_partitions.items():
                sys.stdout.write(f"partition {partition}: oldest unsettled entry {age:.0f} s old\n")
            if report.dead_letters:
                counts = ", ".join(f"{n} {state}" for state, n in sorted(report.dead_letters.items()))
                sys.stdout.write(f"dead letters: {counts} (credits deadletter list)\n")
            for org in repaired:
                sys.stdout.write(f"repaired {org} from the ledger\n")
        unresolved = report.lagging or report.quarantined or report.lagging_partitions
        return 1 if (drifts and not args.repair) or unresolved else 0

    return _run_with_services(config, run)


# -- quarantine (entries settlement could not take) ------------------------------------
def _with_settlement(config: Config, fn: Callable[[Any], Awaitable[int]]) -> int:
    from ledger.settlement import Settlement

    async def run(s: Services) -> int:
        settlement = await Settlement.connect(s.config.settler_dsn(), max_size=2)
        try:
            return await fn(settlement)
        finally:
            await settlement.close()

    return _run_with_services(config, run)


def cmd_deadletter_list(config: Config, args: argparse.Namespace) -> int:
    from settler import quarantine

    async def run(settlement: Any) -> int:
        rows = await settlement.dead_letters(state=args.state, organization_id=args.org, limit=args.limit)
        if args.json:
            _print({"data": [quarantine.describe(r) for r in rows]})
            return 0
        for r in rows:
            sys.stdout.write(
                f"{r.id:>6}  {r.state:9}  partition {r.partition:<3} {r.entry_id:22} org {r.organization_id}"
                f"  {to_credits(r.amount)} credits  {r.error[:80]}\n"
            )
        if not rows:
            sys.stdout.write("no dead letters\n")
        return 0

    return _with_settlement(config, run)


def cmd_deadletter_show(config: Config, args: argparse.Namespace) -> int:
    from settler import quarantine

    async def run(settlement: Any) -> int:
        row = await settlement.dead_letter(args.id)
        if row is None:
            raise admin.AdminError(f"no dead letter {args.id}")
        _print(quarantine.describe(row))
        return 0

    return _with_settlement(config, run)


def cmd_deadletter_resolve(config: Config, args: argparse.Namespace) -> int:
    from settler import quarantine

    async def run(settlement: Any) -> int:
        act = quarantine.replay if args.deadletter_command == "replay" else quarantine.discard
        try:
            row = await act(settlement, args.id, reason=args.reason)
        except quarantine.QuarantineError as exc:
            raise admin.AdminError(str(exc)) from None
        _print(quarantine.describe(row))
        return 0

    return _with_settlement(config, run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credits", description="Agent credits: services and operations.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("dev", help="run the whole stack on embedded servers").set_defaults(fn=cmd_dev)
    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=["meter", "settler", "billing"])
    serve.set_defaults(fn=cmd_serve)
    sub.add_parser("migrate", help="apply SQL migrations").set_defaults(fn=cmd_migrate)
    catalog = sub.add_parser("catalog", help="the billing catalog")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    sync = catalog_commands.add_parser("sync", help="create in Stripe what the catalog lacks (idempotent)")
    sync.set_defaults(fn=cmd_catalog_sync)

    org = sub.add_parser("org", help="organizations").add_subparsers(dest="org_command", required=True)
    oc = org.add_parser("create", help="create an organization; prints its id and an admin API key")
    oc.add_argument("--name", required=True)
    oc.set_defaults(fn=cmd_org_create)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    kc = key.add_parser("create", help="create an API key")
    kc.add_argument("--org", required=True)
    kc.add_argument("--role", choices=["agent", "admin"], default="agent")
    kc.add_argument("--name", default="")
    kc.add_argument("--department", help="scope the key to a department id")
    kc.add_argument("--cap", type=_credits, help="lifetime spending cap in credits")
    kc.add_argument("--rate", type=float, help="requests per second (0 = unlimited)")
    kc.add_argument("--burst", type=float, help="token bucket size")
    kc.set_defaults(fn=cmd_key_create)
    kr = key.add_parser("revoke", help="revoke an API key")
    kr.add_argument("--org", required=True)
    kr.add_argument("--key", required=True, help="the key id")
    kr.set_defaults(fn=cmd_key_revoke)

    g = sub.add_parser("grant", help="grant credits (ledger first, then the cache)")
    g.add_argument("--org", required=True)
    g.add_argument("--amount", type=_credits, required=True, help="credits, e.g. 12.5")
    g.add_argument("--reason", required=True)
    g.add_argument("--reference", help="idempotency reference: the same one grants once")
    g.add_argument("--expires-at", type=_timestamp)
    g.set_defaults(fn=cmd_grant)

    a = sub.add_parser("adjust", help="adjust credits up (grant) or down (debit, never below zero)")
    a.add_argument("--org", required=True)
    a.add_argument("--amount", type=_credits, required=True, help="signed credits, e.g. -5")
    a.add_argument("--reason", required=True)
    a.add_argument("--reference", help="idempotency reference: the same one adjusts once")
    a.set_defaults(fn=cmd_adjust)

    al = sub.add_parser("alert", help="low-balance alerts").add_subparsers(dest="alert_command", required=True)
    als = al.add_parser("set", help="alert when available credits fall below a threshold (signed webhook)")
    als.add_argument("--org", required=True)
    als.add_argument("--threshold", type=_credits, required=True, help="credits")
    als.add_argument("--url", required=True, help="where the signed webhook is POSTed")
    als.set_defaults(fn=cmd_alert_set)

    rc = sub.add_parser("reconcile", help="compare Redis with the ledger; repair from the ledger on request")
    rc.add_argument("--org", help="one organization (default: all)")
    rc.add_argument("--repair", action="store_true", help="rebuild drifting organizations from the ledger")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(fn=cmd_reconcile)

    dl = sub.add_parser("deadletter", help="stream entries settlement could not take (quarantine)")
    dls = dl.add_subparsers(dest="deadletter_command", required=True)
    dll = dls.add_parser("list", help="list quarantined entries, newest first")
    dll.add_argument("--state", choices=["held", "cleaned", "replayed", "discarded"])
    dll.add_argument("--org", help="one organization")
    dll.add_argument("--limit", type=int, default=100)
    dll.add_argument("--json", action="store_true")
    dll.set_defaults(fn=cmd_deadletter_list)
    dlshow = dls.add_parser("show", help="one quarantined entry, its event decoded")
    dlshow.add_argument("id", type=int)
    dlshow.set_defaults(fn=cmd_deadletter_show)
    for verb, text in (
        ("replay", "settle a held entry as it is, once its cause is fixed"),
        ("discard", "close a held entry that should never count (then reconcile --repair the organization)"),
    ):
        dlr = dls.add_parser(verb, help=text)
        dlr.add_argument("id", type=int)
        dlr.add_argument("--reason", required=True)
        dlr.set_defaults(fn=cmd_deadletter_resolve)

    pl = sub.add_parser("portal-link", help="print a single-use link into the customer portal")
    pl.add_argument("--org", required=True)
    pl.add_argument("--role", choices=["admin", "viewer"], default="admin")
    pl.add_argument("--return-url", help="shown in the portal as the way back")
    pl.set_defaults(fn=cmd_portal_link)

    b = sub.add_parser("balance", help="show an organization's balance")
    b.add_argument("--org", required=True)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_balance)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    try:
        result: int = args.fn(config, args)
    except (admin.AdminError, ConfigError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except LookupError as exc:
        sys.stderr.write(f"not found: {exc}\n")
        return 1
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
