"""Operators of the ops console and the audit trail:

credits operator create --email E [--name N]   an operator; prints a one-time sign-in link
credits operator link --email E                 a new sign-in link (a forgotten password)
credits operator list | revoke --email E        who may sign in; disable one (sessions end)
credits audit [--org ORG] [--action credits.] [--actor E] [--limit N] [--json]
credits anomalies list|scan|ack|dismiss|reopen  the usage audit's findings (settler/anomalies.py)

Making an operator, who can act on every organization, takes the database owner's URL
(DATABASE_URL, or the stack's); the audit trail is read through the console's
read-only role.
"""

from __future__ import annotations

import argparse
from typing import Any

import asyncpg

from core.config import Config
from ledger.operators import LINK_TTL_S, Actor, AuditFilter, OperatorAdmin, audit_rows
from ops.commands.common import (
    Subparsers,
    cli_actor,
    identifier,
    iso,
    json_flag,
    operator_flag,
    run_with_services,
    show_credits,
    table,
    ttl_seconds,
    write_json,
    write_text,
)
from ops.runtime import Services

ENTRY_PATH = "/console/enter/"
AUDIT_LIMIT_MAX = 10_000


def register(sub: Subparsers) -> None:
    op = sub.add_parser("operator", help="operators of the ops console").add_subparsers(
        dest="operator_command", required=True
    )
    oc = op.add_parser("create", help="create an operator; prints a one-time sign-in link")
    oc.add_argument("--email", required=True)
    oc.add_argument("--name", default="")
    oc.add_argument("--ttl", type=ttl_seconds, default=LINK_TTL_S, help="the link's lifetime (default 1d, at most 7d)")
    json_flag(oc)
    oc.set_defaults(fn=cmd_operator_create)
    ol = op.add_parser("link", help="a new one-time sign-in link for an operator")
    ol.add_argument("--email", required=True)
    ol.add_argument("--ttl", type=ttl_seconds, default=LINK_TTL_S)
    json_flag(ol)
    ol.set_defaults(fn=cmd_operator_link)
    ls = op.add_parser("list", help="operators, with their live sessions")
    json_flag(ls)
    ls.set_defaults(fn=cmd_operator_list)
    rv = op.add_parser("revoke", help="disable an operator: every session ends, links stop working")
    rv.add_argument("--email", required=True)
    json_flag(rv)
    rv.set_defaults(fn=cmd_operator_revoke)

    au = sub.add_parser("audit", help="the operators' action log (console and CLI), newest first")
    au.add_argument("--org", type=identifier, help="one organization")
    au.add_argument("--action", help="an action or its prefix: credits.grant, credits., key.revoke")
    au.add_argument("--actor", help="part of the actor: an operator's email, a system user")
    au.add_argument("--limit", type=int, default=50, help=f"at most this many rows (1-{AUDIT_LIMIT_MAX}, default 50)")
    json_flag(au)
    au.set_defaults(fn=cmd_audit)
    register_anomalies(sub)


def console_url(config: Config, token: str) -> str:
    """The sign-in link, on the billing service (which serves /console)."""
    from billing import config as billing_config

    billing = billing_config.load()
    base = billing.billing_public_url or f"http://{config.host}:{billing.billing_port}".replace("0.0.0.0", "127.0.0.1")  # noqa: S104
    return base.rstrip("/") + ENTRY_PATH + token


async def _owner(s: Services) -> asyncpg.Connection:
    assert s.config.database_url is not None
    return await asyncpg.connect(s.config.database_url)


def _created_by(config: Config) -> str:
    return Actor.cli(config.operator_email).label


def _link_out(config: Config, args: argparse.Namespace, link: Any) -> int:
    url = console_url(config, link.token)
    out = {"operator_id": link.operator_id, "email": link.email, "url": url, "expires_at": iso(link.expires_at)}
    if args.json:
        write_json(out)
    else:
        write_text(f"sign-in link for {link.email} (works once, until {iso(link.expires_at)}):\n{url}")
    return 0


def cmd_operator_create(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        conn = await _owner(s)
        try:
            link = await OperatorAdmin(conn).create(
                args.email, name=args.name, created_by=_created_by(s.config), link_ttl_s=args.ttl
            )
        finally:
            await conn.close()
        return _link_out(s.config, args, link)

    return run_with_services(config, run)


def cmd_operator_link(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        conn = await _owner(s)
        try:
            link = await OperatorAdmin(conn).link(args.email, created_by=_created_by(s.config), link_ttl_s=args.ttl)
        finally:
            await conn.close()
        return _link_out(s.config, args, link)

    return run_with_services(config, run)


def cmd_operator_list(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        conn = await _owner(s)
        try:
            operators = await OperatorAdmin(conn).list()
        finally:
            await conn.close()
        rows = [
            {
                "id": o.id,
                "email": o.email,
                "name": o.name,
                "password_set": o.password_set,
                "active_sessions": o.active_sessions,
                "created_at": iso(o.created_at),
                "created_by": o.created_by,
                "disabled_at": iso(o.disabled_at),
            }
            for o in operators
        ]
        if args.json:
            write_json({"data": rows})
        else:
            write_text(table(rows, ["email", "name", "password_set", "active_sessions", "created_at", "disabled_at"]))
        return 0

    return run_with_services(config, run)


def cmd_operator_revoke(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        conn = await _owner(s)
        try:
            revoked = await OperatorAdmin(conn).disable(args.email)
        finally:
            await conn.close()
        if args.json:
            write_json({"email": args.email.strip().lower(), "disabled": True, "sessions_revoked": revoked})
        else:
            write_text(f"operator {args.email} disabled; {revoked} session(s) ended")
        return 0

    return run_with_services(config, run)


def audit_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": iso(row.at),
        "actor": row.actor,
        "via": row.via,
        "action": row.action,
        "organization_id": row.organization_id,
        "target": row.target or None,
        "amount": show_credits(row.amount),
        "reason": row.reason or None,
        "reference": row.reference or None,
        "outcome": row.outcome,
        "source": row.source or None,
        "detail": row.detail,
    }


def cmd_audit(config: Config, args: argparse.Namespace) -> int:
    from ledger.console_reads import ConsoleReads

    if not 1 <= args.limit <= AUDIT_LIMIT_MAX:
        from accounts.admin import AdminError

        raise AdminError(f"--limit must be between 1 and {AUDIT_LIMIT_MAX}")

    async def run(s: Services) -> int:
        reads = await ConsoleReads.connect(s.config.console_dsn(), max_size=1)
        try:
            found = await audit_rows(
                reads.pool,
                AuditFilter(organization_id=args.org, actor=args.actor, action=args.action),
                limit=args.limit,
            )
        finally:
            await reads.close()
        rows = [audit_view(r) for r in found]
        if args.json:
            write_json({"data": rows})
        else:
            columns = ["id", "at", "actor", "via", "action", "organization_id", "amount", "outcome", "reason"]
            write_text(table(rows, columns))
        return 0

    return run_with_services(config, run)


# -- the usage audit -------------------------------------------------------------------------
def register_anomalies(sub: Subparsers) -> None:
    an = sub.add_parser("anomalies", help="the usage audit: hours of spend far above their baseline").add_subparsers(
        dest="anomalies_command", required=True
    )
    al = an.add_parser("list", help="findings, newest first")
    al.add_argument("--org", type=identifier)
    al.add_argument("--state", choices=["open", "acknowledged", "dismissed"])
    json_flag(al)
    al.set_defaults(fn=cmd_anomalies_list)
    sc = an.add_parser("scan", help="look for spikes now (the settler does every ANOMALY_INTERVAL_S)")
    json_flag(sc)
    sc.set_defaults(fn=cmd_anomalies_scan)
    for name, state in (("ack", "acknowledged"), ("dismiss", "dismissed"), ("reopen", "open")):
        d = an.add_parser(name, help=f"mark a finding {state} (audited)")
        d.add_argument("--org", required=True, type=identifier)
        d.add_argument("--id", required=True, type=identifier, help="the finding's id")
        d.add_argument("--note", default="")
        operator_flag(d)
        json_flag(d)
        d.set_defaults(fn=cmd_anomalies_decide, state=state)


def anomaly_view(a: Any) -> dict[str, Any]:
    return {
        "id": a.id,
        "organization_id": a.organization_id,
        "organization": a.organization,
        "scope": a.scope,
        "api_key_id": a.credential_id,
        "api_key_name": a.key_name,
        "hour": iso(a.hour),
        "spend": show_credits(a.spend),
        "baseline_per_hour": show_credits(a.baseline),
        "baseline_hours": a.baseline_hours,
        "threshold_factor": a.threshold_factor,
        "state": a.state,
        "decided_by": a.decided_by,
        "note": a.note or None,
    }


def cmd_anomalies_list(config: Config, args: argparse.Namespace) -> int:
    from ledger.console_reads import ConsoleReads
    from settler.anomalies import anomalies

    async def run(s: Services) -> int:
        reads = await ConsoleReads.connect(s.config.console_dsn(), max_size=1)
        try:
            found = await anomalies(reads.pool, state=args.state, organization_id=args.org)
        finally:
            await reads.close()
        rows = [anomaly_view(a) for a in found]
        if args.json:
            write_json({"data": rows})
        else:
            columns = ["id", "organization", "scope", "api_key_id", "hour", "spend", "baseline_per_hour", "state"]
            write_text(table(rows, columns))
        return 0

    return run_with_services(config, run)


def cmd_anomalies_scan(config: Config, args: argparse.Namespace) -> int:
    from ledger.settlement import Settlement
    from settler.anomalies import AnomalyDetector, Method

    async def run(s: Services) -> int:
        settlement = await Settlement.connect(s.config.settler_dsn(), min_size=1, max_size=1)
        try:
            new = await AnomalyDetector(settlement.pool, Method.of(s.config)).scan()
        finally:
            await settlement.close()
        if args.json:
            write_json({"new_findings": new})
        else:
            write_text(f"{new} new finding(s) (credits anomalies list --state open)")
        return 0

    return run_with_services(config, run)


def cmd_anomalies_decide(config: Config, args: argparse.Namespace) -> int:
    from accounts import audited

    async def run(s: Services) -> int:
        changed = await audited.decide_anomaly(
            s.ledger, cli_actor(s.config, args), args.org, args.id, state=args.state, note=args.note
        )
        if args.json:
            write_json({"id": args.id, "state": args.state, "changed": changed})
        else:
            write_text(f"finding {args.id}: {args.state}" + ("" if changed else " (already, or not found)"))
        return 0

    return run_with_services(config, run)
