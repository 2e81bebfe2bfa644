"""`credits portal-link --org ORG`: a single-use link into the customer portal."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from aiohttp import web

from accounts import admin
from billing.config import BillingConfig
from core.config import Config
from ledger.operators import Actor, AuditEntry, check_actor, record
from ops.commands.common import Subparsers, cli_actor, identifier, operator_flag, write_json
from ops.dev import JWT_SECRET_FILE
from ops.stack import servers


def register(sub: Subparsers) -> None:
    pl = sub.add_parser("portal-link", help="print a single-use link into the customer portal")
    pl.add_argument("--org", required=True, type=identifier)
    pl.add_argument("--role", choices=["admin", "viewer"], default="admin")
    pl.add_argument("--return-url", help="shown in the portal as the way back")
    operator_flag(pl)
    pl.set_defaults(fn=cmd_portal_link)


def mounts() -> tuple[Callable[[web.Application], None], ...]:
    """The web rooms the billing service serves: the customer portal under /portal,
    the ops console under /console."""
    from portal import console
    from portal.app import mount

    return (mount, console.mount)


async def portal_link(
    config: Config,
    billing: BillingConfig,
    organization_id: str,
    role: str,
    return_url: str | None,
    *,
    actor: Actor | None = None,
) -> str:
    """A portal link signed as the billing service signs them (PORTAL_SECRET, else the
    JWT secret: configured, or the one `credits dev` keeps in the data directory).
    With an `actor`, the link is in the audit trail (`portal_link.create`)."""
    from billing.portal_sessions import ENTRY_PATH, PortalSessions, signing_key
    from ledger.store import Ledger

    jwt_secret = config.jwt_secret
    if jwt_secret is None and (config.data_dir / JWT_SECRET_FILE).exists():
        jwt_secret = (config.data_dir / JWT_SECRET_FILE).read_text().strip()
    if billing.portal_secret is None and jwt_secret is None:
        raise admin.AdminError("set PORTAL_SECRET (or JWT_SECRET) as the billing service has it")
    if return_url is not None and (not return_url.startswith(("https://", "http://")) or len(return_url) > 2048):
        raise admin.AdminError("--return-url must be an http(s) URL of at most 2048 characters")
    ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=2)
    try:
        if not await ledger.organization_exists(organization_id):
            raise admin.AdminError(f"organization {organization_id} not found")
        if actor is not None:
            await check_actor(ledger.pool, actor)
        sessions = PortalSessions(
            ledger,
            signing_key(billing.portal_secret, jwt_secret),
            link_ttl_s=billing.portal_link_ttl_s,
            session_ttl_s=billing.portal_session_ttl_s,
        )
        link = await sessions.create_link(
            organization_id, role=role, return_url=return_url, created_by=actor.label if actor else "ops:cli"
        )
        if actor is not None:
            entry = AuditEntry(
                "portal_link.create", "applied", organization_id, target=f"link:{link.id}", detail={"role": role}
            )
            await record(ledger.pool, actor, entry)
    finally:
        await ledger.close()
    base = billing.billing_public_url or f"http://{config.host}:{billing.billing_port}".replace("0.0.0.0", "127.0.0.1")  # noqa: S104
    return base + ENTRY_PATH + link.token


def cmd_portal_link(config: Config, args: argparse.Namespace) -> int:
    from billing import config as billing_config

    billing = billing_config.load()
    with servers(config) as cfg:
        actor = cli_actor(cfg, args)
        url = asyncio.run(portal_link(cfg, billing, args.org, args.role, args.return_url, actor=actor))
    write_json({"organization_id": args.org, "role": args.role, "url": url, "valid_for_s": billing.portal_link_ttl_s})
    return 0
