"""`credits reconcile`: Redis against the ledger; repair from the ledger on request."""

from __future__ import annotations

import argparse

from accounts import audited
from core.config import Config
from ops.commands.common import (
    Subparsers,
    cli_actor,
    identifier,
    json_flag,
    operator_flag,
    run_with_services,
    show_credits,
    write_json,
    write_text,
)
from ops.runtime import Services


def register(sub: Subparsers) -> None:
    rc = sub.add_parser("reconcile", help="compare Redis with the ledger; repair from the ledger on request")
    rc.add_argument("--org", type=identifier, help="one organization (default: all)")
    rc.add_argument("--repair", action="store_true", help="rebuild drifting organizations from the ledger")
    rc.add_argument("--reason", default="credits reconcile --repair", help="why (the audit trail keeps each repair)")
    operator_flag(rc)
    json_flag(rc)
    rc.set_defaults(fn=cmd_reconcile)


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
                actor = cli_actor(s.config, args)
                for d in report.drifts:
                    await audited.repair_cache(
                        s.ledger, s.hot, actor, d.organization_id, reason=args.reason, repair=reconcile.repair
                    )
                    repaired.append(d.organization_id)
        finally:
            await settlement.close()
        drifts = [
            {
                "organization_id": d.organization_id,
                "redis": show_credits(d.cache),
                "ledger": show_credits(d.ledger),
                "in_flight": show_credits(d.in_flight),
                "unpushed_grants": show_credits(d.unpushed),
                "quarantined": show_credits(d.quarantined),
                "difference": show_credits(d.difference),
                "debt_difference": show_credits(d.debt_difference),
            }
            for d in report.drifts
        ]
        out = {
            "checked": report.checked,
            "drifts": drifts,
            "lagging": report.lagging,
            "quarantined": {org: show_credits(amount) for org, amount in report.quarantined.items()},
            "dead_letters": report.dead_letters,
            "lagging_partitions": {str(p): round(age, 1) for p, age in report.lagging_partitions.items()},
            "repaired": repaired,
        }
        if args.json:
            write_json(out)
        else:
            write_text(f"checked {report.checked} organizations, {len(drifts)} drifting")
            for row in drifts:
                write_text("  ".join(f"{k} {v}" for k, v in row.items()))
            for org in report.lagging:
                write_text(f"lagging {org}: too much unsettled to compare now, or unsettled too long")
            for org, amount in report.quarantined.items():
                write_text(f"quarantined {org}: {show_credits(amount)} credits held out of the ledger")
            for partition, age in report.lagging_partitions.items():
                write_text(f"partition {partition}: oldest unsettled entry {age:.0f} s old")
            if report.dead_letters:
                counts = ", ".join(f"{n} {state}" for state, n in sorted(report.dead_letters.items()))
                write_text(f"dead letters: {counts} (credits deadletter list)")
            for org in repaired:
                write_text(f"repaired {org} from the ledger")
        unresolved = report.lagging or report.quarantined or report.lagging_partitions
        return 1 if (drifts and not args.repair) or unresolved else 0

    return run_with_services(config, run)
