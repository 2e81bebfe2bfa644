"""`credits deadletter list|show|replay|discard`: stream entries settlement could not
take (quarantine, see settler/quarantine.py)."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from accounts import admin
from core.config import Config
from core.money import to_credits
from ledger.operators import AuditEntry
from ops.commands.common import (
    Subparsers,
    acting,
    audit,
    identifier,
    json_flag,
    operator_flag,
    run_with_services,
    write_json,
    write_text,
)
from ops.runtime import Services


def register(sub: Subparsers) -> None:
    dl = sub.add_parser("deadletter", help="stream entries settlement could not take (quarantine)")
    dls = dl.add_subparsers(dest="deadletter_command", required=True)
    dll = dls.add_parser("list", help="list quarantined entries, newest first")
    dll.add_argument("--state", choices=["held", "cleaned", "replayed", "discarded"])
    dll.add_argument("--org", type=identifier, help="one organization")
    dll.add_argument("--limit", type=int, default=100)
    json_flag(dll)
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
        operator_flag(dlr)
        dlr.set_defaults(fn=cmd_deadletter_resolve)


def _with_settlement(config: Config, fn: Callable[[Any, Services], Awaitable[int]]) -> int:
    from ledger.settlement import Settlement

    async def run(s: Services) -> int:
        settlement = await Settlement.connect(s.config.settler_dsn(), max_size=2)
        try:
            return await fn(settlement, s)
        finally:
            await settlement.close()

    return run_with_services(config, run)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True


def cmd_deadletter_list(config: Config, args: argparse.Namespace) -> int:
    from settler import quarantine

    async def run(settlement: Any, s: Services) -> int:
        rows = await settlement.dead_letters(state=args.state, organization_id=args.org, limit=args.limit)
        if args.json:
            write_json({"data": [quarantine.describe(r) for r in rows]})
            return 0
        for r in rows:
            write_text(
                f"{r.id:>6}  {r.state:9}  partition {r.partition:<3} {r.entry_id:22} org {r.organization_id}"
                f"  {to_credits(r.amount)} credits  {r.error[:80]}"
            )
        if not rows:
            write_text("no dead letters")
        return 0

    return _with_settlement(config, run)


def cmd_deadletter_show(config: Config, args: argparse.Namespace) -> int:
    from settler import quarantine

    async def run(settlement: Any, s: Services) -> int:
        row = await settlement.dead_letter(args.id)
        if row is None:
            raise admin.AdminError(f"no dead letter {args.id}")
        write_json(quarantine.describe(row))
        return 0

    return _with_settlement(config, run)


def cmd_deadletter_resolve(config: Config, args: argparse.Namespace) -> int:
    from settler import quarantine

    async def run(settlement: Any, s: Services) -> int:
        actor = await acting(s, args)
        act = quarantine.replay if args.deadletter_command == "replay" else quarantine.discard
        entry = AuditEntry(f"deadletter.{args.deadletter_command}", "applied", target=f"deadletter:{args.id}")
        try:
            row = await act(settlement, args.id, reason=args.reason)
        except quarantine.QuarantineError as exc:
            await audit(s, actor, replace(entry, outcome="refused", reason=args.reason, detail={"error": str(exc)}))
            raise admin.AdminError(str(exc)) from None
        org = row.organization_id if row.organization_id and _is_uuid(row.organization_id) else None
        await audit(s, actor, replace(entry, organization_id=org, amount=row.amount, reason=args.reason))
        write_json(quarantine.describe(row))
        return 0

    return _with_settlement(config, run)
