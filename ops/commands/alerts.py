"""Low-balance alerts: `credits alert set|list|delete|test`."""

from __future__ import annotations

import argparse
import decimal
import urllib.parse

from accounts import admin
from core.config import Config
from ledger.operators import AuditEntry
from ledger.settlement import OperatorReads, Settlement
from ledger.store import NotFound
from ops.commands.common import (
    Subparsers,
    acting,
    audit,
    credits_amount,
    identifier,
    iso,
    json_flag,
    operator_flag,
    run_with_services,
    show_credits,
    table,
    write_json,
    write_text,
)
from ops.runtime import Services


def register(sub: Subparsers) -> None:
    al = sub.add_parser("alert", help="low-balance alerts").add_subparsers(dest="alert_command", required=True)
    als = al.add_parser(
        "set", help="alert when available credits fall below a threshold, or N days are left (signed webhook)"
    )
    als.add_argument("--org", required=True, type=identifier)
    als.add_argument("--threshold", type=credits_amount, help="credits (default 0: days only)")
    als.add_argument(
        "--days-left", type=days, help="also alert when fewer days than this are left at the recent rate of spend"
    )
    als.add_argument("--url", required=True, help="where the signed webhook is POSTed")
    operator_flag(als)
    json_flag(als)
    als.set_defaults(fn=cmd_alert_set)
    all_ = al.add_parser("list", help="the alerts of every organization (or one), with their deliveries")
    all_.add_argument("--org", type=identifier, help="one organization")
    json_flag(all_)
    all_.set_defaults(fn=cmd_alert_list)
    ald = al.add_parser("delete", help="stop alerting an organization (waiting deliveries are dropped)")
    ald.add_argument("--org", required=True, type=identifier)
    operator_flag(ald)
    json_flag(ald)
    ald.set_defaults(fn=cmd_alert_delete)
    alt = al.add_parser("test", help="send a signed alert.test event to the organization's alert URL")
    alt.add_argument("--org", required=True, type=identifier)
    json_flag(alt)
    alt.set_defaults(fn=cmd_alert_test)


def days(text: str) -> decimal.Decimal:
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not value.is_finite() or not decimal.Decimal("0.01") <= value <= 365 or value != round(value, 2):
        raise argparse.ArgumentTypeError(f"days must be between 0.01 and 365, to 0.01: {text!r}")
    return value


def _origin(url: str) -> str:
    """Where an alert goes, for the audit trail: scheme and host only (the path and
    query of a webhook URL are often its secret)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def cmd_alert_set(config: Config, args: argparse.Namespace) -> int:
    if args.threshold is None and args.days_left is None:
        raise admin.AdminError("give --threshold, --days-left or both")
    threshold = args.threshold or 0

    async def run(s: Services) -> int:
        if not await s.ledger.organization_exists(args.org):
            raise LookupError(f"organization {args.org}")
        actor = await acting(s, args)
        try:
            secret = await s.ledger.set_alert(
                args.org, threshold=threshold, webhook_url=args.url, days_left=args.days_left
            )
        except ValueError as exc:
            raise admin.AdminError(str(exc)) from None
        detail = {"url": _origin(args.url), "days_left": None if args.days_left is None else str(args.days_left)}
        entry = AuditEntry("alert.set", "applied", args.org, amount=args.threshold, detail=detail)
        await audit(s, actor, entry)
        write_json(
            {
                "organization_id": args.org,
                "threshold": show_credits(threshold),
                "days_left": None if args.days_left is None else str(args.days_left),
                "url": args.url,
                "secret": secret,
            }
        )
        return 0

    return run_with_services(config, run)


def cmd_alert_list(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        settlement = await Settlement.connect(s.config.settler_dsn(), min_size=1, max_size=1)
        try:
            alerts = await OperatorReads(settlement).alerts(args.org)
        finally:
            await settlement.close()
        rows = [
            {
                "organization_id": a.organization_id,
                "organization": a.organization_name,
                "threshold": show_credits(a.threshold),
                "days_left": None if a.days_left is None else str(a.days_left),
                "url": a.webhook_url,
                "state": a.state,
                "deliveries_pending": a.deliveries_pending,
                "last_error": a.last_error or None,
                "updated_at": iso(a.updated_at),
            }
            for a in alerts
        ]
        if args.json:
            write_json({"data": rows})
        else:
            columns = ["organization_id", "organization", "threshold", "days_left", "state", "url"]
            write_text(table(rows, [*columns, "deliveries_pending", "last_error"]))
        return 0

    return run_with_services(config, run)


def cmd_alert_delete(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        actor = await acting(s, args)
        deleted = await s.ledger.delete_alert(args.org)
        if not deleted:
            raise LookupError(f"organization {args.org} has no alert set")
        await audit(s, actor, AuditEntry("alert.delete", "applied", args.org))
        if args.json:
            write_json({"organization_id": args.org, "deleted": True})
        else:
            write_text(f"alert of {args.org} deleted")
        return 0

    return run_with_services(config, run)


def cmd_alert_test(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        try:
            event_id = await admin.send_test_alert(s.ledger, args.org)
        except NotFound:
            raise LookupError(f"organization {args.org} has no alert set (credits alert set)") from None
        if args.json:
            write_json({"organization_id": args.org, "event_id": event_id, "type": "alert.test", "queued": True})
        else:
            write_text(f"queued alert.test {event_id}: the settler delivers it, signed, within about a second")
        return 0

    return run_with_services(config, run)
