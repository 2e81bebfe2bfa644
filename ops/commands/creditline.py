"""Credit lines (overdraft) of trusted organizations, set by operations staff only:

credits credit-line show --org ORG [--json]
credits credit-line set --org ORG --limit 500 [--reason "trusted since 2024"] [--json]

A limit (credits, 0 = none, the default) lets usage take `available` down to minus it;
what is charged past the grants is debt, which the next grants repay first.
"""

from __future__ import annotations

import argparse
from typing import Any

from accounts import admin
from core.config import Config
from ops.commands.common import (
    Subparsers,
    credits_amount,
    identifier,
    iso,
    json_flag,
    run_with_services,
    show_credits,
    table,
    write_json,
    write_text,
)
from ops.runtime import Services


def register(sub: Subparsers) -> None:
    cl = sub.add_parser("credit-line", help="an organization's credit line (overdraft)").add_subparsers(
        dest="credit_line_command", required=True
    )
    sh = cl.add_parser("show", help="the limit, what is owed, the latest debt entries")
    sh.add_argument("--org", required=True, type=identifier)
    json_flag(sh)
    sh.set_defaults(fn=cmd_show)
    st = cl.add_parser("set", help="set the credit limit (0 removes the line)")
    st.add_argument("--org", required=True, type=identifier)
    st.add_argument("--limit", required=True, type=credits_amount, help="credits: how far below zero available may go")
    st.add_argument("--reason", default="", help="why (kept with the change)")
    json_flag(st)
    st.set_defaults(fn=cmd_set)


async def _view(s: Services, org: str) -> dict[str, Any]:
    line = await s.ledger.credit_line(org)
    bal = await admin.balance(s.ledger, s.hot, org)
    cached = await s.hot.balance(org)
    return {
        "organization_id": org,
        "credit_limit": show_credits(line.credit_limit),
        "debt": show_credits(int(cached.payload.get("debt") or 0)),
        "ledger_debt": show_credits(line.debt),
        "available": show_credits(bal.cache_available),
        "entries": [
            {
                "type": e["type"],
                "amount": show_credits(int(e["amount"])),
                "debt_after": show_credits(int(e["debt_after"])),
                "grant_id": e["grant_id"],
                "reference": e["reference"],
                "created_at": iso(e["created_at"]),
            }
            for e in line.entries
        ],
        "changes": [
            {
                "credit_limit": show_credits(int(c["credit_limit"])),
                "reason": c["reason"],
                "created_at": iso(c["created_at"]),
            }
            for c in line.changes
        ],
    }


def _show(view: dict[str, Any]) -> None:
    head = {k: v for k, v in view.items() if k not in ("entries", "changes")}
    write_text("\n".join(f"{k:16} {v}" for k, v in head.items()))
    write_text(
        table(view["entries"], ("type", "amount", "debt_after", "reference", "created_at"), empty="(no debt yet)")
    )


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        view = await _view(s, args.org)
        write_json(view) if args.json else _show(view)
        return 0

    return run_with_services(config, run)


def cmd_set(config: Config, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise admin.AdminError("--limit: a credit limit is zero or more")

    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        await admin.set_credit_limit(s.ledger, s.hot, args.org, limit=args.limit, reason=args.reason)
        view = await _view(s, args.org)
        write_json(view) if args.json else _show(view)
        return 0

    return run_with_services(config, run)
