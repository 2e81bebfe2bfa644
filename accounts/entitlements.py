"""Entitlements: Postgres first (ledger/entitlements.py), then the cache.

Every change (a plan feature edited by ops, an override, a usage change, a plan change
in billing) is written to Postgres, whose version of the organization's features then
rises; `push` mirrors the whole set into Redis with that version, and a push of an older
version changes nothing (lua/entitlements.lua), so pushes may race. Checks read only
the cache (lua/check.lua); on a miss the set is read from Postgres once and pushed. The
cached copy lives ENTITLEMENTS_TTL_MS, so a push that could not reach Redis is healed
within that time even if nothing else changes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from core.errors import Unavailable
from hotpath.client import HotPath, Result
from ledger.entitlements import Entitlements, EntitlementStore, Feature, UsageChange
from lua import Status

log = logging.getLogger(__name__)

ENTITLEMENTS_TTL_MS = 10 * 60_000
LOAD_TRIES_MAX = 3  # a miss loads once; a load racing an eviction may miss again
REFRESH_PAGE = 500  # organizations pushed at a time after a catalog edit
UNLIMITED = -1  # how the cache writes "no limit"


def cached_features(ents: Entitlements) -> list[dict[str, Any]]:
    """The features as lua/entitlements.lua stores them: {f, t, e, l, u, v}."""
    rows = []
    for e in ents.features:
        f = e.feature
        rows.append(
            {
                "f": f.feature,
                "t": f.type,
                "e": 1 if f.enabled else 0,
                "l": UNLIMITED if f.limit is None else f.limit,
                "u": e.usage,
                "v": f.value or "",
            }
        )
    return rows


async def push(store: EntitlementStore, hot: HotPath, org: str) -> Entitlements:
    """Read the organization's features from Postgres and mirror them (newest wins)."""
    ents = await store.effective(org)
    await hot.put_entitlements(
        org, version=ents.version, plan_id=ents.plan_id, features=cached_features(ents), ttl_ms=ENTITLEMENTS_TTL_MS
    )
    return ents


async def push_soon(store: EntitlementStore, hot: HotPath, org: str) -> None:
    """push(), for callers whose own change is already committed: a cache that cannot be
    reached is logged, not raised (it reads Postgres again within ENTITLEMENTS_TTL_MS)."""
    try:
        await push(store, hot, org)
    except Unavailable as exc:
        log.warning("entitlements_push_deferred", extra={"organization_id": org, "error": str(exc)})


async def _loaded(store: EntitlementStore, hot: HotPath, org: str, call: Callable[[], Awaitable[Result]]) -> Result:
    result = await call()
    for _ in range(LOAD_TRIES_MAX):
        if result.status is not Status.ENTITLEMENTS_NOT_LOADED:
            return result
        await push(store, hot, org)
        result = await call()
    raise Unavailable(
        "entitlements could not be cached", answer="the features could not be loaded; nothing was charged"
    )


async def check(store: EntitlementStore, hot: HotPath, org: str, cred: str, *, feature: str) -> Result:
    """A feature's gate, from the cache (loaded from Postgres on a miss)."""
    return await _loaded(store, hot, org, lambda: hot.check(org, cred, feature=feature))


async def check_consume(
    store: EntitlementStore, hot: HotPath, org: str, cred: str, *, feature: str, **consume: Any
) -> Result:
    """The gate and, if it lets it, the charge, in one script call."""
    return await _loaded(store, hot, org, lambda: hot.check_consume(org, cred, feature=feature, **consume))


async def change_usage(
    store: EntitlementStore, hot: HotPath, org: str, feature: str, delta: int, *, key: str | None, fingerprint: str
) -> UsageChange:
    """Count usage of a limit feature in Postgres (refusing past the limit), then cache it."""
    change = await store.change_usage(org, feature, delta, key=key, fingerprint=fingerprint)
    await push_soon(store, hot, org)
    return change


async def set_override(store: EntitlementStore, hot: HotPath, org: str, feature: Feature, *, reason: str) -> None:
    await store.set_override(org, feature, reason=reason)
    await push_soon(store, hot, org)


async def remove_override(store: EntitlementStore, hot: HotPath, org: str, feature: str) -> bool:
    removed = await store.remove_override(org, feature)
    await push_soon(store, hot, org)
    return removed


async def refresh_scope(store: EntitlementStore, hot: HotPath, scope: str) -> int:
    """After a catalog edit: push every organization whose features come from `scope`
    (a page at a time). Returns how many were pushed."""
    after: str | None = None
    pushed = 0
    while True:
        page = await store.organizations_of(scope, after=after, limit=REFRESH_PAGE)
        for org in page:
            await push_soon(store, hot, org)
        pushed += len(page)
        if len(page) < REFRESH_PAGE:
            return pushed
        after = page[-1]


async def set_catalog_feature(store: EntitlementStore, hot: HotPath, scope: str, feature: Feature) -> int:
    await store.set_catalog_feature(scope, feature)
    return await refresh_scope(store, hot, scope)


async def remove_catalog_feature(store: EntitlementStore, hot: HotPath, scope: str, feature: str) -> int:
    if not await store.remove_catalog_feature(scope, feature):
        return 0
    return await refresh_scope(store, hot, scope)
