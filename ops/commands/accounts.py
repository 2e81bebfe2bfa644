"""Organizations, API keys, frontend tokens and credits:

credits org create|list|show  credits key create|revoke|list
credits token --org ORG --role admin|viewer|agent --ttl 1h
credits grant|grant void|adjust|balance

The money commands (grant, grant void, adjust, key revoke) go through accounts.audited,
as the ops console does: each writes an audit row naming the operator (--operator, or
CREDITS_OPERATOR) or the system user who ran it.
"""

from __future__ import annotations

import argparse
import secrets
from typing import Any

from accounts import admin, audited
from api.auth import issue_jwt
from core.config import Config
from ledger.operators import AuditEntry
from ledger.settlement import OperatorReads, Settlement
from ops.commands.common import (
    Subparsers,
    acting,
    audit,
    cli_actor,
    credits_amount,
    identifier,
    iso,
    json_flag,
    operator_flag,
    run_with_services,
    show_credits,
    table,
    timestamp,
    ttl_seconds,
    write_json,
    write_text,
)
from ops.dev import JWT_SECRET_FILE
from ops.runtime import Services

TOKEN_ROLES = ("admin", "viewer", "agent")
ORG_PAGE_MAX = 1000


def register(sub: Subparsers) -> None:
    org = sub.add_parser("org", help="organizations").add_subparsers(dest="org_command", required=True)
    oc = org.add_parser("create", help="create an organization; prints its id and an admin API key")
    oc.add_argument("--name", required=True)
    json_flag(oc)
    oc.set_defaults(fn=cmd_org_create)
    ol = org.add_parser("list", help="every organization, with its ledger balance")
    ol.add_argument("--limit", type=int, default=100, help=f"at most this many (1-{ORG_PAGE_MAX}, default 100)")
    ol.add_argument("--after", type=identifier, help="the last id of the previous page")
    json_flag(ol)
    ol.set_defaults(fn=cmd_org_list)
    os_ = org.add_parser("show", help="one organization: balances (cache and ledger), grants, keys, plan, spend")
    os_.add_argument("--org", required=True, type=identifier)
    json_flag(os_)
    os_.set_defaults(fn=cmd_org_show)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    kc = key.add_parser("create", help="create an API key")
    kc.add_argument("--org", required=True, type=identifier)
    kc.add_argument("--role", choices=["agent", "admin"], default="agent")
    kc.add_argument("--name", default="")
    kc.add_argument("--department", type=identifier, help="scope the key to a department id")
    kc.add_argument("--cap", type=credits_amount, help="lifetime spending cap in credits")
    kc.add_argument("--rate", type=float, help="requests per second (0 = unlimited)")
    kc.add_argument("--burst", type=float, help="token bucket size")
    operator_flag(kc)
    json_flag(kc)
    kc.set_defaults(fn=cmd_key_create)
    kr = key.add_parser("revoke", help="revoke an API key")
    kr.add_argument("--org", required=True, type=identifier)
    kr.add_argument("--key", required=True, type=identifier, help="the key id")
    kr.add_argument("--reason", default="", help="why (kept in the audit trail)")
    operator_flag(kr)
    json_flag(kr)
    kr.set_defaults(fn=cmd_key_revoke)
    kl = key.add_parser("list", help="an organization's API keys (never their secrets)")
    kl.add_argument("--org", required=True, type=identifier)
    kl.add_argument("--active", action="store_true", help="leave out revoked keys")
    json_flag(kl)
    kl.set_defaults(fn=cmd_key_list)

    t = sub.add_parser("token", help="a signed JWT for a frontend (Authorization: Bearer ...)")
    t.add_argument("--org", required=True, type=identifier)
    t.add_argument("--role", choices=TOKEN_ROLES, default="admin")
    t.add_argument("--ttl", type=ttl_seconds, default=3600, help="lifetime: 90s, 15m, 1h (default), 7d; at most 30d")
    t.add_argument("--subject", help="the user the token stands for (claim sub; default: a new id)")
    t.add_argument("--department", type=identifier, help="claim department_id: the token charges that department")
    operator_flag(t)
    json_flag(t)
    t.set_defaults(fn=cmd_token)

    g = sub.add_parser("grant", help="grant credits (ledger first, then the cache); `grant void` takes one back")
    # Required, but checked by cmd_grant: `credits grant void ...` names none of them.
    g.add_argument("--org", type=identifier, help="required")
    g.add_argument("--amount", type=credits_amount, help="credits, e.g. 12.5 (required)")
    g.add_argument("--reason", help="required; kept in the ledger and the audit trail")
    g.add_argument("--reference", help="idempotency reference: the same one grants once")
    g.add_argument("--expires-at", type=timestamp)
    g.add_argument("--priority", type=int, help=f"burn-down order, 0-{admin.PRIORITY_MAX}, lower first (default 20)")
    operator_flag(g)
    json_flag(g)
    g.set_defaults(fn=cmd_grant)
    gsub = g.add_subparsers(dest="grant_command")
    gv = gsub.add_parser("void", help="take away what an unspent grant has left (a grant given by mistake)")
    gv.add_argument("--org", required=True, type=identifier)
    gv.add_argument("--grant", required=True, type=identifier, help="the grant id (credits org show)")
    gv.add_argument("--reason", required=True)
    gv.add_argument("--reference", help="idempotency reference (default: void:<grant id>)")
    operator_flag(gv)
    json_flag(gv)
    gv.set_defaults(fn=cmd_grant_void)

    a = sub.add_parser("adjust", help="adjust credits up (grant) or down (debit, never below zero)")
    a.add_argument("--org", required=True, type=identifier)
    a.add_argument("--amount", type=credits_amount, required=True, help="signed credits, e.g. -5")
    a.add_argument("--reason", required=True)
    a.add_argument("--reference", help="idempotency reference: the same one adjusts once")
    operator_flag(a)
    json_flag(a)
    a.set_defaults(fn=cmd_adjust)

    b = sub.add_parser("balance", help="show an organization's balance")
    b.add_argument("--org", required=True, type=identifier)
    json_flag(b)
    b.set_defaults(fn=cmd_balance)


# -- organizations ---------------------------------------------------------------------
def cmd_org_create(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        org, key = await admin.create_organization(s.ledger, args.name)
        write_json({"organization_id": org, "api_key": key.secret})
        return 0

    return run_with_services(config, run)


def cmd_org_list(config: Config, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= ORG_PAGE_MAX:
        raise admin.AdminError(f"--limit must be between 1 and {ORG_PAGE_MAX}")

    async def run(s: Services) -> int:
        settlement = await Settlement.connect(s.config.settler_dsn(), min_size=1, max_size=1)
        try:
            page = await OperatorReads(settlement).organizations(after=args.after, limit=args.limit + 1)
        finally:
            await settlement.close()
        more = len(page) > args.limit
        rows = [
            {
                "id": o.id,
                "name": o.name,
                "balance": show_credits(o.balance),
                "active_keys": o.active_keys,
                "created_at": iso(o.created_at),
            }
            for o in page[: args.limit]
        ]
        if args.json:
            write_json({"data": rows, "has_more": more})
        else:
            write_text(table(rows, ["id", "name", "balance", "active_keys", "created_at"]))
            if more:
                write_text(f"(more: --after {rows[-1]['id']})")
        return 0

    return run_with_services(config, run)


def cmd_org_show(config: Config, args: argparse.Namespace) -> int:
    from ledger.console_reads import ConsoleReads

    async def run(s: Services) -> int:
        reads = await ConsoleReads.connect(s.config.console_dsn(), max_size=1)
        try:
            org = await reads.organization(args.org)
        finally:
            await reads.close()
        if org is None:
            raise LookupError(f"organization {args.org}")
        b = await admin.balance(s.ledger, s.hot, args.org)
        live = [sub for sub in org["subscriptions"] if sub["ended_at"] is None]
        view = {
            "id": org["id"],
            "name": org["name"],
            "created_at": iso(org["created_at"]),
            "balance": {
                "cache": show_credits(b.cache_balance),
                "reserved": show_credits(b.cache_reserved),
                "available": show_credits(b.cache_available),
                "ledger": show_credits(b.ledger_balance),
            },
            "plan": live[0]["plan_id"] if live else None,
            "spend_30d": show_credits(sum(int(d["credits"]) for d in org["usage_by_day"])),
            "grants": [
                {
                    "id": str(g["id"]),
                    "source": g["source"],
                    "amount": show_credits(int(g["amount"])),
                    "remaining": show_credits(int(g["remaining"])),
                    "priority": g["priority"],
                    "expires_at": iso(g["expires_at"]),
                    "reason": g["reason"],
                }
                for g in org["grants"]
            ],
            "keys": [
                {
                    "id": str(k["id"]),
                    "prefix": k["prefix"],
                    "name": k["name"],
                    "role": k["role"],
                    "revoked_at": iso(k["revoked_at"]),
                }
                for k in org["keys"]
            ],
            "departments": [{"id": str(d["id"]), "name": d["name"]} for d in org["departments"]],
        }
        if args.json:
            write_json(view)
        else:
            write_text(
                f"{view['name']}  {view['id']}  plan {view['plan'] or '-'}  spent {view['spend_30d']} in 30 days"
            )
            write_text("  ".join(f"{k} {v}" for k, v in view["balance"].items()))
            write_text(
                "grants:\n" + table(view["grants"], ["id", "source", "amount", "remaining", "priority", "expires_at"])
            )
            write_text("keys:\n" + table(view["keys"], ["id", "prefix", "name", "role", "revoked_at"]))
        return 0

    return run_with_services(config, run)


# -- keys -------------------------------------------------------------------------------
def cmd_key_create(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        actor = await acting(s, args)
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
        detail = {"role": args.role, "name": args.name, "department_id": args.department, "cap": args.cap}
        await audit(s, actor, AuditEntry("key.create", "applied", args.org, target=f"key:{key.id}", detail=detail))
        write_json({"organization_id": args.org, "key_id": key.id, "api_key": key.secret, "role": args.role})
        return 0

    return run_with_services(config, run)


def cmd_key_revoke(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        actor = cli_actor(s.config, args)
        revoked = await audited.revoke_key(s.ledger, s.hot, actor, args.org, args.key, reason=args.reason)
        write_json({"key_id": args.key, "revoked": True, "was_active": revoked})
        return 0

    return run_with_services(config, run)


def cmd_key_list(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        keys = await s.ledger.api_keys(args.org, include_revoked=not args.active)
        rows: list[dict[str, Any]] = [
            {
                "id": k.id,
                "prefix": k.prefix,
                "name": k.name,
                "role": k.role,
                "department_id": k.department_id,
                "cap": show_credits(k.cap),
                "rate_limit_per_s": k.rate_limit_per_s,
                "rate_limit_burst": k.rate_limit_burst,
                "created_at": iso(k.created_at),
                "revoked_at": iso(k.revoked_at),
                "last_used_at": iso(k.last_used_at),
            }
            for k in keys
        ]
        if args.json:
            write_json({"organization_id": args.org, "data": rows})
        else:
            columns = ["id", "prefix", "name", "role", "department_id", "cap", "rate_limit_per_s", "last_used_at"]
            write_text(table(rows, [*columns, "revoked_at"]))
        return 0

    return run_with_services(config, run)


# -- frontend tokens ----------------------------------------------------------------------
def _jwt_secret(config: Config) -> str:
    """JWT_SECRET, or the secret the dev stack generated in its data directory."""
    if config.jwt_secret is not None:
        return config.jwt_secret
    path = config.data_dir / JWT_SECRET_FILE
    try:
        return path.read_text().strip()
    except OSError:
        raise admin.AdminError(
            "JWT_SECRET is not set and the stack has no generated secret: set JWT_SECRET "
            "(the services must use the same one), or start the dev stack with `credits dev`"
        ) from None


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        if args.department is not None:
            await s.ledger.department(args.org, args.department)  # NotFound: a LookupError
        secret = _jwt_secret(s.config)
        actor = await acting(s, args)
        subject = args.subject or f"cli-{secrets.token_hex(6)}"
        token = issue_jwt(
            secret,
            organization_id=args.org,
            subject=subject,
            role=args.role,
            ttl_s=args.ttl,
            department_id=args.department,
        )
        detail = {"role": args.role, "ttl_s": args.ttl, "department_id": args.department}
        await audit(s, actor, AuditEntry("token.issue", "applied", args.org, target=f"jwt:{subject}", detail=detail))
        if args.json:
            write_json(
                {"token": token, "organization_id": args.org, "role": args.role, "subject": subject, "ttl_s": args.ttl}
            )
        else:
            write_text(token)
        return 0

    return run_with_services(config, run)


# -- credits -------------------------------------------------------------------------------
def cmd_grant(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        missing = [f"--{n}" for n in ("org", "amount", "reason") if getattr(args, n) is None]
        if missing:
            raise admin.AdminError(f"credits grant needs {', '.join(missing)}")
        if args.amount <= 0:
            raise admin.AdminError("--amount must be positive (use `credits adjust` to take credits away)")
        g = await audited.grant(
            s.ledger,
            s.hot,
            cli_actor(s.config, args),
            args.org,
            amount=args.amount,
            reason=args.reason,
            reference=args.reference,
            expires_at=args.expires_at,
            priority=args.priority,
        )
        write_json({"grant_id": g.grant_id, "created": g.created, "ledger_balance": show_credits(g.balance_after)})
        return 0

    return run_with_services(config, run)


def cmd_adjust(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        out = await audited.adjust(
            s.ledger,
            s.hot,
            cli_actor(s.config, args),
            args.org,
            amount=args.amount,
            reason=args.reason,
            reference=args.reference,
        )
        out["amount"] = show_credits(int(out["amount"]))
        write_json(out)
        return 0

    return run_with_services(config, run)


def cmd_grant_void(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        out = await audited.void_grant(
            s.ledger,
            s.hot,
            cli_actor(s.config, args),
            args.org,
            args.grant,
            reason=args.reason,
            reference=args.reference,
        )
        view = {**out, "amount": show_credits(int(out["amount"]))}
        if args.json:
            write_json(view)
        else:
            write_text(f"voided grant {args.grant}: {view['amount']} credits taken back")
        return 0

    return run_with_services(config, run)


def cmd_balance(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        b = await admin.balance(s.ledger, s.hot, args.org)
        view = {
            "organization_id": b.organization_id,
            "balance": show_credits(b.cache_balance),
            "reserved": show_credits(b.cache_reserved),
            "available": show_credits(b.cache_available),
            "ledger_balance": show_credits(b.ledger_balance),
            "ledger_entries_sum": show_credits(b.ledger_entries_sum),
        }
        if args.json:
            write_json(view)
        else:
            write_text("\n".join(f"{k:20} {v}" for k, v in view.items()))
        return 0

    return run_with_services(config, run)
