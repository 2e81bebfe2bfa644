"""Entitlements in Postgres (migration 0030): the typed features of plans (and of the
free defaults), per-organization overrides, and the usage of limit features.

Postgres is authoritative; the hot path answers checks from a cached copy that carries
the version `effective_entitlements` reads (accounts/entitlements.py pushes it).
A limit's usage changes here, under a row lock, so concurrent changes cannot pass
the limit; each change is recorded once per idempotency key, in the same transaction.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Literal

import asyncpg

from ledger.store import Ledger, NotFound

FeatureType = Literal["boolean", "limit", "config"]
FREE_SCOPE = "free"  # the features of an organization without a plan
FEATURE_TYPES: tuple[FeatureType, ...] = ("boolean", "limit", "config")
FEATURE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # as migration 0030 checks it


class LimitReached(Exception):
    """A usage change would pass the feature's limit (nothing changed)."""

    def __init__(self, feature: str, limit: int, usage: int, delta: int) -> None:
        super().__init__(f"{feature}: usage {usage} + {delta} would pass the limit of {limit}")
        self.feature, self.limit, self.usage, self.delta = feature, limit, usage, delta


class NotALimit(Exception):
    """Usage is counted only for limit features (the feature is another type or absent)."""

    def __init__(self, feature: str, type_: str | None) -> None:
        what = "not one of this organization's features" if type_ is None else f"a {type_} feature"
        super().__init__(f"{feature} is {what}; usage is counted for limit features only")
        self.feature, self.type = feature, type_


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature as defined (catalog or override): `limit` None = unlimited."""

    feature: str
    type: FeatureType
    enabled: bool | None = None
    limit: int | None = None
    value: str | None = None

    def __post_init__(self) -> None:
        if not FEATURE_NAME.fullmatch(self.feature):
            raise ValueError("a feature name is lower case letters, digits and _, starting with a letter (<= 64)")
        if self.type not in FEATURE_TYPES:
            raise ValueError(f"type must be one of {', '.join(FEATURE_TYPES)}")
        if (self.type == "boolean") != (self.enabled is not None):
            raise ValueError("a boolean feature has `enabled` (and only a boolean feature)")
        if self.type != "limit" and self.limit is not None:
            raise ValueError("only a limit feature has a limit")
        if self.limit is not None and self.limit < 0:
            raise ValueError("a limit is at least 0 (no limit: unlimited)")
        if (self.type == "config") != (self.value is not None):
            raise ValueError("a config feature has a value (and only a config feature)")


@dataclass(frozen=True, slots=True)
class Entitlement:
    """One feature an organization has: its definition, usage and where it came from."""

    feature: Feature
    usage: int
    overridden: bool


@dataclass(frozen=True, slots=True)
class Entitlements:
    """An organization's features as one snapshot: `version` rises with every change."""

    organization_id: str
    version: int
    plan_id: str  # '' = free defaults
    features: tuple[Entitlement, ...]

    def get(self, feature: str) -> Entitlement | None:
        return next((e for e in self.features if e.feature.feature == feature), None)


@dataclass(frozen=True, slots=True)
class UsageChange:
    feature: str
    delta: int
    usage: int
    limit: int | None
    replayed: bool


def _feature(row: asyncpg.Record) -> Feature:
    limit = row["limit_value"]
    return Feature(
        feature=row["feature"],
        type=row["type"],
        enabled=row["enabled"],
        limit=None if limit is None else int(limit),
        value=row["value"],
    )


class EntitlementStore:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # -- the catalog (not tenant data) ---------------------------------------------------
    async def catalog(self) -> dict[str, list[Feature]]:
        """Every scope's features ('free' and each plan id), in their order."""
        async with self.ledger.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM entitlement_features ORDER BY scope, position, feature")
        out: dict[str, list[Feature]] = {}
        for r in rows:
            out.setdefault(r["scope"], []).append(_feature(r))
        return out

    async def set_catalog_feature(self, scope: str, feature: Feature) -> None:
        """Add or change one feature of a plan (or of the free defaults)."""
        async with self.ledger.pool.acquire() as conn, conn.transaction():
            if scope != FREE_SCOPE and not await conn.fetchval("SELECT 1 FROM billing_plans WHERE id = $1", scope):
                raise NotFound(f"no plan {scope!r} (or use {FREE_SCOPE!r} for the free defaults)")
            await conn.execute(
                "INSERT INTO entitlement_features (scope, feature, type, enabled, limit_value, value, position)"
                " VALUES ($1, $2, $3, $4, $5, $6,"
                "  (SELECT coalesce(max(position), 0) + 1 FROM entitlement_features WHERE scope = $1))"
                " ON CONFLICT (scope, feature) DO UPDATE SET type = excluded.type, enabled = excluded.enabled,"
                " limit_value = excluded.limit_value, value = excluded.value, updated_at = now()",
                scope,
                feature.feature,
                feature.type,
                feature.enabled,
                feature.limit,
                feature.value,
            )

    async def remove_catalog_feature(self, scope: str, feature: str) -> bool:
        async with self.ledger.pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM entitlement_features WHERE scope = $1 AND feature = $2", scope, feature
            )
        return str(status).endswith(" 1")

    async def organizations_of(self, scope: str, *, after: str | None, limit: int) -> list[str]:
        """Organizations whose features come from `scope` (a plan, or 'free': those with
        no live subscription), a page at a time by id: the ones a catalog edit changes."""
        async with self.ledger.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id FROM entitlement_scope_organizations($1, $2, $3)",
                scope,
                None if after is None else uuid.UUID(after),
                limit,
            )
        return [str(r["id"]) for r in rows]

    # -- per organization ------------------------------------------------------------------
    async def effective(self, org: str) -> Entitlements:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch("SELECT * FROM effective_entitlements($1)", uuid.UUID(org))
        head = rows[0]
        features = tuple(
            Entitlement(_feature(r), int(r["usage"]), bool(r["overridden"])) for r in rows if r["feature"] is not None
        )
        return Entitlements(org, int(head["version"]), head["plan_id"], features)

    async def set_override(self, org: str, feature: Feature, *, reason: str) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "INSERT INTO organization_entitlements (organization_id, feature, type, enabled, limit_value, value,"
                " reason) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (organization_id, feature) DO UPDATE SET type = excluded.type,"
                " enabled = excluded.enabled, limit_value = excluded.limit_value, value = excluded.value,"
                " reason = excluded.reason, updated_at = now()",
                uuid.UUID(org),
                feature.feature,
                feature.type,
                feature.enabled,
                feature.limit,
                feature.value,
                reason,
            )

    async def remove_override(self, org: str, feature: str) -> bool:
        async with self.ledger.tenant(org) as conn:
            status = await conn.execute("DELETE FROM organization_entitlements WHERE feature = $1", feature)
        return str(status).endswith(" 1")

    async def change_usage(
        self, org: str, feature: str, delta: int, *, key: str | None, fingerprint: str
    ) -> UsageChange:
        """Add `delta` (may be negative; usage never goes below 0) to a limit feature's
        usage, refusing to pass the limit; once per `key` (a retry returns the first
        change, marked replayed; the same key for another change: ValueError). A usage
        above the limit (a downgrade) may still go down."""
        org_id = uuid.UUID(org)
        async with self.ledger.tenant(org) as conn:
            # The row lock first: changes of one feature take turns, and a retry of a key
            # waits for the first to commit, then finds it.
            await conn.execute(
                "INSERT INTO entitlement_usage (organization_id, feature) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                org_id,
                feature,
            )
            usage = int(
                await conn.fetchval("SELECT usage FROM entitlement_usage WHERE feature = $1 FOR UPDATE", feature)
            )
            if key is not None:
                prior = await conn.fetchrow(
                    "SELECT feature, delta, usage_after, limit_value, fingerprint FROM entitlement_usage_changes"
                    " WHERE idempotency_key = $1",
                    key,
                )
                if prior is not None:
                    if prior["fingerprint"] != fingerprint:
                        raise ValueError("idempotency key reused with different parameters")
                    prior_limit = prior["limit_value"]
                    return UsageChange(
                        prior["feature"],
                        int(prior["delta"]),
                        int(prior["usage_after"]),
                        None if prior_limit is None else int(prior_limit),
                        True,
                    )
            current = {
                r["feature"]: r for r in await conn.fetch("SELECT * FROM effective_entitlements($1)", org_id) if r
            }.get(feature)
            if current is None or current["type"] != "limit":
                raise NotALimit(feature, None if current is None else current["type"])
            limit = None if current["limit_value"] is None else int(current["limit_value"])
            after = max(0, usage + delta)
            if delta > 0 and limit is not None and after > limit:
                raise LimitReached(feature, limit, usage, delta)
            await conn.execute(
                "UPDATE entitlement_usage SET usage = $2, updated_at = now() WHERE feature = $1", feature, after
            )
            await conn.execute(
                "INSERT INTO entitlement_usage_changes (organization_id, feature, delta, usage_after, limit_value,"
                " idempotency_key, fingerprint) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                org_id,
                feature,
                delta,
                after,
                limit,
                key,
                fingerprint if key is not None else None,
            )
        return UsageChange(feature, delta, after, limit, False)
