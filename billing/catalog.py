"""The catalog: subscription plans and credit packages (Postgres, seeded by migration
0003) and their Stripe twins. `sync_catalog` creates in Stripe whatever is missing and
records the ids; running it again changes nothing.

Stripe ids are deterministic where Stripe lets us choose them: products are
`credits_plan_<id>` and `credits_package_<id>`; a plan's recurring price is found by a
lookup key that names its amount (`credits_<id>_<currency>_<cents>_<interval>`), since
prices are immutable. Packages are sold with PaymentIntents for the amount in our table,
so they need a product but no price.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from billing.gateway import StripeGateway

log = logging.getLogger(__name__)

PLAN_PRODUCT_PREFIX = "credits_plan_"
PACKAGE_PRODUCT_PREFIX = "credits_package_"


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    description: str
    price_cents: int
    currency: str
    interval: str
    credits: int  # millicredits per period
    features: tuple[str, ...]
    stripe_product_id: str | None
    stripe_price_id: str | None

    @property
    def lookup_key(self) -> str:
        return f"credits_{self.id}_{self.currency}_{self.price_cents}_{self.interval}"


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    name: str
    credits: int  # millicredits
    price_cents: int
    currency: str
    stripe_product_id: str | None


@dataclass(frozen=True, slots=True)
class SyncedItem:
    kind: str  # plan | package
    id: str
    stripe_product_id: str
    stripe_price_id: str | None
    changed: bool


def _plan(row: asyncpg.Record) -> Plan:
    features = row["features"]
    if isinstance(features, str):
        features = json.loads(features)
    return Plan(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        price_cents=int(row["price_cents"]),
        currency=row["currency"],
        interval=row["billing_interval"],
        credits=int(row["credits_per_period"]),
        features=tuple(str(f) for f in features),
        stripe_product_id=row["stripe_product_id"],
        stripe_price_id=row["stripe_price_id"],
    )


def _package(row: asyncpg.Record) -> Package:
    return Package(
        id=row["id"],
        name=row["name"],
        credits=int(row["credits"]),
        price_cents=int(row["price_cents"]),
        currency=row["currency"],
        stripe_product_id=row["stripe_product_id"],
    )


class Catalog:
    """Reads the catalog tables (not tenant data: no organization context needed)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows

    async def plans(self, *, active_only: bool = True) -> list[Plan]:
        rows = await self._fetch(
            "SELECT * FROM billing_plans WHERE active OR NOT $1 ORDER BY position, id", active_only
        )
        return [_plan(r) for r in rows]

    async def plan(self, plan_id: str) -> Plan | None:
        rows = await self._fetch("SELECT * FROM billing_plans WHERE id = $1", plan_id)
        return _plan(rows[0]) if rows else None

    async def plan_for(self, *, product_id: str | None, price_id: str | None) -> Plan | None:
        """The plan a Stripe product (stable across price changes) or price belongs to."""
        rows = await self._fetch(
            "SELECT * FROM billing_plans WHERE stripe_product_id = $1 OR stripe_price_id = $2"
            " ORDER BY (stripe_product_id = $1) DESC NULLS LAST LIMIT 1",
            product_id,
            price_id,
        )
        if rows:
            return _plan(rows[0])
        if product_id is not None and product_id.startswith(PLAN_PRODUCT_PREFIX):
            return await self.plan(product_id.removeprefix(PLAN_PRODUCT_PREFIX))
        return None

    async def packages(self, *, active_only: bool = True) -> list[Package]:
        rows = await self._fetch(
            "SELECT * FROM billing_credit_packages WHERE active OR NOT $1 ORDER BY position, id", active_only
        )
        return [_package(r) for r in rows]

    async def package(self, package_id: str) -> Package | None:
        rows = await self._fetch("SELECT * FROM billing_credit_packages WHERE id = $1", package_id)
        return _package(rows[0]) if rows else None


async def sync_catalog(catalog: Catalog, gateway: StripeGateway) -> list[SyncedItem]:
    """Create what Stripe lacks (products, recurring prices) and record the ids."""
    synced: list[SyncedItem] = []
    for plan in await catalog.plans(active_only=False):
        metadata = {"credits_plan": plan.id}
        product = await gateway.ensure_product(
            product_id=PLAN_PRODUCT_PREFIX + plan.id, name=plan.name, description=plan.description, metadata=metadata
        )
        price = await gateway.ensure_recurring_price(
            product_id=product,
            lookup_key=plan.lookup_key,
            amount=plan.price_cents,
            currency=plan.currency,
            interval=plan.interval,
            known_price_id=plan.stripe_price_id,
            metadata=metadata,
        )
        changed = (product, price) != (plan.stripe_product_id, plan.stripe_price_id)
        if changed:
            async with catalog.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE billing_plans SET stripe_product_id = $2, stripe_price_id = $3, synced_at = now()"
                    " WHERE id = $1",
                    plan.id,
                    product,
                    price,
                )
        synced.append(SyncedItem("plan", plan.id, product, price, changed))
    for package in await catalog.packages(active_only=False):
        product = await gateway.ensure_product(
            product_id=PACKAGE_PRODUCT_PREFIX + package.id,
            name=f"{package.name} credit package",
            description=f"{package.credits // 1000} credits",
            metadata={"credits_package": package.id},
        )
        changed = product != package.stripe_product_id
        if changed:
            async with catalog.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE billing_credit_packages SET stripe_product_id = $2, synced_at = now() WHERE id = $1",
                    package.id,
                    product,
                )
        synced.append(SyncedItem("package", package.id, product, None, changed))
    log.info("catalog_synced", extra={"changed": sum(1 for s in synced if s.changed), "items": len(synced)})
    return synced
