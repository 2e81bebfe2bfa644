"""Automatic top-up, as operations staff see and set it (the same door as
PUT /api/billing/auto-topup, so the same checks):

credits autotopup show --org ORG
credits autotopup set --org ORG --threshold 50 --package small --max-per-month 4 --monthly-cap-cents 5000 [--disable]

Saving also resumes top-ups that a failure paused.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from accounts import admin
from api.errors import ApiError
from billing import schemas
from billing.catalog import Catalog
from billing.handlers import auto_topup_view, save_auto_topup
from billing.store import BillingStore
from core.config import Config
from core.money import to_credits
from ledger.operators import AuditEntry
from ops.commands.common import (
    Subparsers,
    acting,
    audit,
    credits_amount,
    identifier,
    json_flag,
    operator_flag,
    run_with_services,
    table,
    write_json,
    write_text,
)
from ops.runtime import Services

_to_builtins = msgspec.to_builtins


def register(sub: Subparsers) -> None:
    at = sub.add_parser("autotopup", help="automatic top-up of an organization").add_subparsers(
        dest="autotopup_command", required=True
    )
    sh = at.add_parser("show", help="the settings and the last attempts")
    sh.add_argument("--org", required=True, type=identifier)
    json_flag(sh)
    sh.set_defaults(fn=cmd_show)
    st = at.add_parser("set", help="set (and resume) automatic top-up")
    st.add_argument("--org", required=True, type=identifier)
    st.add_argument(
        "--threshold", required=True, type=credits_amount, help="credits: a top-up starts when available falls below"
    )
    st.add_argument("--package", required=True, help="the credit package to buy (small, medium, ...)")
    st.add_argument("--max-per-month", type=int, required=True)
    st.add_argument("--monthly-cap-cents", type=int, required=True)
    st.add_argument("--disable", action="store_true", help="keep the settings, start no top-up")
    json_flag(st)
    operator_flag(st)
    st.set_defaults(fn=cmd_set)


def _show(view: dict[str, Any]) -> None:
    settings = {k: v for k, v in view.items() if k != "attempts"}
    write_text("\n".join(f"{k:18} {v}" for k, v in settings.items()))
    columns = ("id", "status", "reason", "package_id", "credits", "amount_cents", "created_at")
    write_text(table(view["attempts"], columns, empty="(no attempts)"))


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        view = _to_builtins(await auto_topup_view(s.ledger, args.org))
        if args.json:
            write_json(view)
        else:
            _show(view)
        return 0

    return run_with_services(config, run)


def cmd_set(config: Config, args: argparse.Namespace) -> int:
    raw = {
        "enabled": not args.disable,
        "threshold": to_credits(args.threshold),
        "package_id": args.package,
        "max_per_month": args.max_per_month,
        "monthly_cap_cents": args.monthly_cap_cents,
    }
    try:
        body = msgspec.convert(raw, schemas.AutoTopupRequest)
    except msgspec.ValidationError as exc:
        raise admin.AdminError(f"not valid settings: {exc}") from None

    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        actor = await acting(s, args)
        try:
            await save_auto_topup(s.ledger, Catalog(s.ledger.pool), BillingStore(s.ledger), args.org, body)
        except ApiError as exc:
            raise admin.AdminError(f"{exc.message} ({exc.param})" if exc.param else exc.message) from None
        detail = {k: v for k, v in raw.items() if k != "threshold"}
        await audit(
            s, actor, AuditEntry("autotopup.set", "applied", args.org, amount=int(raw["threshold"]), detail=detail)
        )
        view = _to_builtins(await auto_topup_view(s.ledger, args.org))
        if args.json:
            write_json(view)
        else:
            _show(view)
        return 0

    return run_with_services(config, run)
