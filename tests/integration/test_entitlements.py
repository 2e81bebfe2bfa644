"""Entitlements against real Postgres and Redis: the catalog's typed features, overrides,
usage counted under a row lock, the cached copy's version (no stale push wins), and a
feature gate with a charge in one script."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from accounts import entitlements
from hotpath.client import HotPath
from ledger.entitlements import EntitlementStore, Feature, LimitReached, NotALimit
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org

CREDIT = 1000


@pytest.fixture
def store(ledger: Ledger) -> EntitlementStore:
    return EntitlementStore(ledger)


async def subscribe(ledger: Ledger, org: Org, plan: str, status: str = "active") -> str:
    """A subscription row as billing mirrors it from Stripe (the plan change path)."""
    sub_id = f"sub_{uuid.uuid4().hex[:12]}"
    async with ledger.tenant(org.id) as conn:
        await conn.execute(
            "INSERT INTO billing_subscriptions (organization_id, id, stripe_customer_id, plan_id, status, created_at)"
            " VALUES ($1, $2, 'cus_test', $3, $4, now())",
            uuid.UUID(org.id),
            sub_id,
            plan,
            status,
        )
    return sub_id


async def set_status(ledger: Ledger, org: Org, sub_id: str, status: str) -> None:
    async with ledger.tenant(org.id) as conn:
        await conn.execute("UPDATE billing_subscriptions SET status = $2 WHERE id = $1", sub_id, status)


def by_name(ents: entitlements.Entitlements) -> dict[str, tuple[Feature, int]]:
    return {e.feature.feature: (e.feature, e.usage) for e in ents.features}


async def test_the_catalog_holds_the_specifications_plans(store: EntitlementStore) -> None:
    catalog = await store.catalog()
    assert catalog["starter"] == [
        Feature("api_access", "boolean", enabled=False),
        Feature("projects", "limit", limit=1),
        Feature("custom_integrations", "boolean", enabled=False),
    ]
    assert catalog["professional"][:2] == [
        Feature("api_access", "boolean", enabled=True),
        Feature("projects", "limit", limit=5),
    ]
    assert catalog["enterprise"] == [
        Feature("api_access", "boolean", enabled=True),
        Feature("projects", "limit", limit=None),  # unlimited
        Feature("custom_integrations", "boolean", enabled=True),
    ]
    assert {f.feature for f in catalog["free"]} == {"api_access", "projects", "custom_integrations"}


async def test_an_organization_has_its_plans_features_and_its_overrides(
    store: EntitlementStore, ledger: Ledger, org: Org
) -> None:
    free = await store.effective(org.id)
    assert free.plan_id == ""
    assert by_name(free)["api_access"][0].enabled is False
    sub = await subscribe(ledger, org, "professional")
    pro = await store.effective(org.id)
    assert pro.plan_id == "professional" and pro.version > free.version
    assert by_name(pro)["api_access"][0].enabled is True and by_name(pro)["projects"][0].limit == 5
    await store.set_override(org.id, Feature("projects", "limit", limit=8), reason="deal")
    await store.set_override(org.id, Feature("support_tier", "config", value="gold"), reason="deal")
    over = await store.effective(org.id)
    assert by_name(over)["projects"][0].limit == 8 and by_name(over)["support_tier"][0].value == "gold"
    assert over.get("projects") is not None and over.get("projects").overridden  # type: ignore[union-attr]
    # A cancelled subscription: back to the free defaults (the override stays).
    await set_status(ledger, org, sub, "canceled")
    after = await store.effective(org.id)
    assert after.plan_id == "" and by_name(after)["api_access"][0].enabled is False
    assert by_name(after)["projects"][0].limit == 8
    assert after.version > over.version


async def test_usage_is_counted_once_per_key_and_never_past_the_limit(
    store: EntitlementStore, hot: HotPath, ledger: Ledger, org: Org
) -> None:
    await subscribe(ledger, org, "professional")  # projects: 5

    async def add(key: str | None) -> object:
        try:
            return await entitlements.change_usage(store, hot, org.id, "projects", 1, key=key, fingerprint="fp1")
        except LimitReached as exc:
            return exc

    # Twenty concurrent requests, two of each key: five succeed, each key once.
    results = await asyncio.gather(*(add(f"k{i % 10}") for i in range(20)))
    done = [r for r in results if not isinstance(r, LimitReached)]
    refused = [r for r in results if isinstance(r, LimitReached)]
    assert len({(r.delta, r.usage) for r in done if not r.replayed}) == 5  # type: ignore[attr-defined]
    assert refused and all(r.limit == 5 for r in refused)
    ents = await store.effective(org.id)
    assert by_name(ents)["projects"][1] == 5
    async with ledger.tenant(org.id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM entitlement_usage_changes") == 5
    # A key that counted, another change: refused as a reuse of the key (which keys
    # counted is the race's: a refused key left no record).
    counted = next(f"k{i % 10}" for i, r in enumerate(results) if not isinstance(r, LimitReached))
    with pytest.raises(ValueError, match="idempotency"):
        await store.change_usage(org.id, "projects", 1, key=counted, fingerprint="other")
    # Down again, never below zero; a boolean feature has no usage.
    down = await store.change_usage(org.id, "projects", -9, key=None, fingerprint="")
    assert down.usage == 0
    with pytest.raises(NotALimit):
        await store.change_usage(org.id, "api_access", 1, key=None, fingerprint="")
    with pytest.raises(NotALimit):
        await store.change_usage(org.id, "nothing_like_it", 1, key=None, fingerprint="")


async def test_the_cache_answers_checks_and_no_stale_push_wins(
    store: EntitlementStore, hot: HotPath, redis: aioredis.Redis, ledger: Ledger, org: Org
) -> None:
    r = await hot.check(org.id, org.admin_key_id, feature="api_access")
    assert r.status is Status.ENTITLEMENTS_NOT_LOADED
    r = await entitlements.check(store, hot, org.id, org.admin_key_id, feature="api_access")
    assert r.status is Status.OK and r.payload["ent"]["ok"] == 0 and r.payload["ent"]["why"] == "disabled"
    old = await store.effective(org.id)
    await subscribe(ledger, org, "professional")
    await entitlements.push(store, hot, org.id)
    r = await hot.check(org.id, org.admin_key_id, feature="api_access")
    assert r.payload["ent"]["ok"] == 1
    # A push computed before the plan change arrives late: nothing changes.
    late = await hot.put_entitlements(
        org.id, version=old.version, plan_id="", features=entitlements.cached_features(old), ttl_ms=60_000
    )
    assert late.status is Status.STALE
    assert (await hot.check(org.id, org.admin_key_id, feature="api_access")).payload["ent"]["ok"] == 1
    r = await hot.check(org.id, org.admin_key_id, feature="teleportation")
    assert r.payload["ent"] == {"t": "", "ok": 0, "why": "not_included"}
    # A limit reached reads as such, with its numbers.
    for _ in range(5):
        await entitlements.change_usage(store, hot, org.id, "projects", 1, key=None, fingerprint="")
    gate = (await hot.check(org.id, org.admin_key_id, feature="projects")).payload["ent"]
    assert (gate["ok"], gate["why"], gate["l"], gate["u"]) == (0, "limit_reached", 5, 5)
    assert await redis.pttl(hot.entitlements_key(org.id)) > 0  # healed by expiry if a push is lost


async def test_a_gate_and_a_charge_are_one_step(
    store: EntitlementStore, hot: HotPath, ledger: Ledger, org: Org
) -> None:
    denied = await entitlements.check_consume(
        store, hot, org.id, org.admin_key_id, feature="api_access", action="generate_content", units=1
    )
    assert denied.status is Status.FEATURE_DENIED and denied.payload["why"] == "disabled"
    assert (await hot.balance(org.id)).payload["available"] == 100 * CREDIT  # nothing charged
    await subscribe(ledger, org, "professional")
    await entitlements.push(store, hot, org.id)
    charged = await entitlements.check_consume(
        store,
        hot,
        org.id,
        org.admin_key_id,
        feature="api_access",
        action="generate_content",
        units=2,
        idempotency_key="once",
        fp="fp",
    )
    assert charged.status is Status.OK and charged.payload["credits"] == 2 * CREDIT
    assert charged.payload["ent"]["ok"] == 1
    # Downgraded, then the same call retried: it replays its first answer, charging nothing.
    await store.set_override(org.id, Feature("api_access", "boolean", enabled=False), reason="test")
    await entitlements.push(store, hot, org.id)
    again = await entitlements.check_consume(
        store,
        hot,
        org.id,
        org.admin_key_id,
        feature="api_access",
        action="generate_content",
        units=2,
        idempotency_key="once",
        fp="fp",
    )
    assert again.status is Status.REPLAY and again.payload["id"] == charged.payload["id"]
    assert (await hot.balance(org.id)).payload["available"] == 98 * CREDIT
    # The gate refuses a new call; an evicted organization loads and still refuses it.
    await hot.evict(org.id)
    refused = await entitlements.check_consume(
        store, hot, org.id, org.admin_key_id, feature="api_access", action="generate_content", units=1
    )
    assert refused.status is Status.FEATURE_DENIED
    # Credits refuse after the gate lets it: nothing charged either.
    await store.remove_override(org.id, "api_access")
    await entitlements.push(store, hot, org.id)
    poor = await entitlements.check_consume(
        store, hot, org.id, org.admin_key_id, feature="api_access", action="generate_content", units=1000
    )
    assert poor.status is Status.INSUFFICIENT_CREDITS
    assert (await hot.balance(org.id)).payload["available"] == 98 * CREDIT
