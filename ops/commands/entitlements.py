"""Entitlements (the features plans carry), for operations staff:

credits entitlements catalog                         every plan's features, and the free defaults
credits entitlements plan-set --plan P --feature F (--enabled|--disabled|--limit N|--unlimited|--value V)
credits entitlements plan-remove --plan P --feature F
credits entitlements show --org ORG                  an organization's features and usage
credits entitlements set --org ORG --feature F (...) --reason R   an override for one organization
credits entitlements unset --org ORG --feature F

--plan free edits the defaults of organizations without a plan. Every change is written
to Postgres, then pushed to the cache of the organizations it concerns (the next check
sees it).
"""

from __future__ import annotations

import argparse
from typing import Any

from accounts import admin, entitlements
from core.config import Config
from ledger.entitlements import FREE_SCOPE, Entitlements, EntitlementStore, Feature
from ledger.operators import AuditEntry
from ops.commands.common import (
    Subparsers,
    acting,
    audit,
    identifier,
    json_flag,
    operator_flag,
    run_with_services,
    table,
    write_json,
    write_text,
)
from ops.runtime import Services


def _definition_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature", required=True, help="feature name (api_access, projects, ...)")
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--enabled", action="store_true", help="a boolean feature, on")
    kind.add_argument("--disabled", action="store_true", help="a boolean feature, off")
    kind.add_argument("--limit", type=int, help="a limit feature: at most this many (>= 0)")
    kind.add_argument("--unlimited", action="store_true", help="a limit feature without a limit")
    kind.add_argument("--value", help="a config feature's value")


def register(sub: Subparsers) -> None:
    ent = sub.add_parser("entitlements", help="plan features and per-organization overrides").add_subparsers(
        dest="entitlements_command", required=True
    )
    c = ent.add_parser("catalog", help="every plan's features, and the free defaults")
    json_flag(c)
    c.set_defaults(fn=cmd_catalog)
    ps = ent.add_parser("plan-set", help="add or change a feature of a plan (or of the free defaults)")
    ps.add_argument("--plan", required=True, help=f"a plan id, or {FREE_SCOPE!r}")
    _definition_flags(ps)
    json_flag(ps)
    operator_flag(ps)
    ps.set_defaults(fn=cmd_plan_set)
    pr = ent.add_parser("plan-remove", help="remove a feature from a plan")
    pr.add_argument("--plan", required=True)
    pr.add_argument("--feature", required=True)
    json_flag(pr)
    operator_flag(pr)
    pr.set_defaults(fn=cmd_plan_remove)
    sh = ent.add_parser("show", help="an organization's features (plan + overrides) and usage")
    sh.add_argument("--org", required=True, type=identifier)
    json_flag(sh)
    sh.set_defaults(fn=cmd_show)
    st = ent.add_parser("set", help="override a feature for one organization")
    st.add_argument("--org", required=True, type=identifier)
    _definition_flags(st)
    st.add_argument("--reason", required=True, help="why (kept with the override)")
    json_flag(st)
    operator_flag(st)
    st.set_defaults(fn=cmd_set)
    un = ent.add_parser("unset", help="remove an organization's override (back to its plan's)")
    un.add_argument("--org", required=True, type=identifier)
    un.add_argument("--feature", required=True)
    json_flag(un)
    operator_flag(un)
    un.set_defaults(fn=cmd_unset)


def definition(args: argparse.Namespace) -> Feature:
    """The feature the flags describe (an AdminError, a usage error, when it cannot be)."""
    try:
        if args.enabled or args.disabled:
            return Feature(args.feature, "boolean", enabled=bool(args.enabled))
        if args.unlimited:
            return Feature(args.feature, "limit", limit=None)
        if args.limit is not None:
            return Feature(args.feature, "limit", limit=args.limit)
        return Feature(args.feature, "config", value=args.value)
    except ValueError as exc:
        raise admin.AdminError(f"--feature {args.feature}: {exc}") from None


def feature_row(f: Feature) -> dict[str, Any]:
    return {"feature": f.feature, "type": f.type, "enabled": f.enabled, "limit": f.limit, "value": f.value}


def org_view(ents: Entitlements) -> dict[str, Any]:
    rows = []
    for e in ents.features:
        row = feature_row(e.feature)
        row["unlimited"] = e.feature.type == "limit" and e.feature.limit is None
        row["usage"] = e.usage if e.feature.type == "limit" else None
        row["source"] = "override" if e.overridden else ("plan" if ents.plan_id else "free")
        rows.append(row)
    return {"organization_id": ents.organization_id, "plan_id": ents.plan_id or None, "data": rows}


COLUMNS = ("feature", "type", "enabled", "limit", "value")


def cmd_catalog(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        catalog = await EntitlementStore(s.ledger).catalog()
        view = {scope: [feature_row(f) for f in features] for scope, features in catalog.items()}
        if args.json:
            write_json(view)
        else:
            write_text("\n\n".join(f"{scope}\n{table(rows, COLUMNS)}" for scope, rows in view.items()))
        return 0

    return run_with_services(config, run)


def cmd_plan_set(config: Config, args: argparse.Namespace) -> int:
    feature = definition(args)

    async def run(s: Services) -> int:
        actor = await acting(s, args)
        pushed = await entitlements.set_catalog_feature(EntitlementStore(s.ledger), s.hot, args.plan, feature)
        await audit(
            s, actor, AuditEntry("entitlement.plan_set", "applied", target=args.plan, detail=feature_row(feature))
        )
        write_json({"plan": args.plan, **feature_row(feature), "organizations_updated": pushed})
        return 0

    return run_with_services(config, run)


def cmd_plan_remove(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        store = EntitlementStore(s.ledger)
        known = {f.feature for f in (await store.catalog()).get(args.plan, [])}
        if args.feature not in known:
            raise LookupError(f"plan {args.plan} has no feature {args.feature}")
        actor = await acting(s, args)
        pushed = await entitlements.remove_catalog_feature(store, s.hot, args.plan, args.feature)
        entry = AuditEntry("entitlement.plan_remove", "applied", target=args.plan, detail={"feature": args.feature})
        await audit(s, actor, entry)
        write_json({"plan": args.plan, "feature": args.feature, "removed": True, "organizations_updated": pushed})
        return 0

    return run_with_services(config, run)


async def _existing(s: Services, org: str) -> None:
    if not await s.ledger.organization_exists(org):
        raise LookupError(f"organization {org}")


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        await _existing(s, args.org)
        view = org_view(await EntitlementStore(s.ledger).effective(args.org))
        if args.json:
            write_json(view)
        else:
            write_text(f"plan: {view['plan_id'] or '(none: free defaults)'}")
            write_text(table(view["data"], (*COLUMNS, "usage", "source")))
        return 0

    return run_with_services(config, run)


def cmd_set(config: Config, args: argparse.Namespace) -> int:
    feature = definition(args)

    async def run(s: Services) -> int:
        await _existing(s, args.org)
        store = EntitlementStore(s.ledger)
        actor = await acting(s, args)
        await entitlements.set_override(store, s.hot, args.org, feature, reason=args.reason)
        entry = AuditEntry(
            "entitlement.override_set",
            "applied",
            args.org,
            target=feature.feature,
            reason=args.reason,
            detail=feature_row(feature),
        )
        await audit(s, actor, entry)
        write_json(org_view(await store.effective(args.org)))
        return 0

    return run_with_services(config, run)


def cmd_unset(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        await _existing(s, args.org)
        store = EntitlementStore(s.ledger)
        actor = await acting(s, args)
        removed = await entitlements.remove_override(store, s.hot, args.org, args.feature)
        if removed:
            await audit(s, actor, AuditEntry("entitlement.override_unset", "applied", args.org, target=args.feature))
        write_json({"organization_id": args.org, "feature": args.feature, "removed": removed})
        return 0

    return run_with_services(config, run)
