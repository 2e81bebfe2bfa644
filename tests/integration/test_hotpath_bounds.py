"""What a charge reads and what a cold load restores (issue 8, items 7, 8 and 10): a
charge reads the grants it spends a few at a time, in burn-down order; expired grants
leave through their own index, however many there are; applied grant ids are kept a
bounded time (a push older than that reloads instead); a cold load restores key caps
and department limits with what closed reservations captured; a hold is released by
the credential that made it, or an admin."""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis.asyncio as aioredis

from accounts import admin
from accounts.grants import push_one
from hotpath.client import HotPath, now_ms
from ledger.settlement import Settlement
from ledger.store import APPLIED_KEEP_MS, Ledger
from lua import Status
from tests.conftest import Org
from tests.integration.test_settlement import assert_conserved, cache_balance, drain, ledger_state, settler

CREDIT = 1000
DAY_MS = 86_400_000

pytest_plugins = ("tests.integration.test_settlement",)


async def grant(ledger: Ledger, hot: HotPath, org: Org, credits: int, **kw: Any) -> str:
    g = await admin.grant(ledger, hot, org.id, amount=credits * CREDIT, reason="test", **kw)
    return g.grant_id


async def remaining(hot: HotPath, org: Org, now: int | None = None) -> dict[str, int]:
    r = await hot.balance(org.id, now=now)
    assert r.status is Status.OK
    return {g["id"]: int(g["remaining"]) for g in r.payload["grants"]}


async def test_charges_spend_many_grants_in_burn_down_order_across_pages(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    # 30 small grants (several pages of the cursor), the later expiring first in line.
    ids = [await grant(ledger, hot, org, 1, expires_at=soon + dt.timedelta(minutes=i)) for i in range(30)]
    bonus = next(g for g in await remaining(hot, org) if g not in ids)
    # The bonus (priority 0) goes first, then the grants by expiry.
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=105)
    assert r.status is Status.OK and r.payload["balance"] == 25 * CREDIT
    left = await remaining(hot, org)
    assert bonus not in left and all(g not in left for g in ids[:5]) and all(left[g] == CREDIT for g in ids[5:])
    # A hold spanning many grants returns to the right ones.
    hold = await hot.reserve(org.id, org.admin_key_id, amount=int(12.5 * CREDIT), ttl_ms=60_000)
    assert hold.status is Status.OK
    rel = await hot.release(org.id, org.admin_key_id, reservation_id=hold.payload["id"], used=int(2.5 * CREDIT))
    assert rel.status is Status.OK and rel.payload["available"] == int(22.5 * CREDIT)
    left = await remaining(hot, org)
    assert [left.get(g, 0) for g in ids[5:8]] == [0, 0, CREDIT // 2] and left[ids[8]] == CREDIT
    refused = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=23)
    assert refused.status is Status.INSUFFICIENT_CREDITS  # 22.5 left: nothing taken
    assert sum((await remaining(hot, org)).values()) == int(22.5 * CREDIT)
    await drain(settler(redis, settlement, hot, org.id))
    assert_conserved(await ledger_state(ledger, org.id), await cache_balance(hot, org.id))


async def test_hundreds_of_grants_expire_at_once_through_their_index(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    async with ledger.tenant(org.id) as conn:  # 250 grants, more than a sweep page (200)
        for i in range(250):
            await conn.fetchrow(
                "SELECT * FROM grant_credits($1::uuid, 'admin', 1000, 20, $2, $3, 'bulk')", org.id, at, f"bulk-{i}"
            )
    await hot.evict(org.id)  # loaded with all of them
    assert (await hot.balance(org.id)).payload["balance"] == 350 * CREDIT
    later = now_ms() + 2 * 3600 * 1000
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, now=later)
    assert r.status is Status.OK and r.payload["balance"] == 99 * CREDIT  # the bonus alone is left
    org_keys = hot.org_keys(org.id)
    assert await redis.zcard(org_keys[3]) == 0  # gx: nothing left to expire
    assert await redis.zcard(org_keys[2]) == 1  # gq: the bonus
    await drain(settler(redis, settlement, hot, org.id))
    state = await ledger_state(ledger, org.id)
    assert state["other"] == -250 * CREDIT  # one expiration entry each
    assert_conserved(state, await cache_balance(hot, org.id))


async def test_applied_grants_are_kept_a_bounded_time_and_an_older_push_reloads(
    hot: HotPath, ledger: Ledger, redis: aioredis.Redis, org: Org
) -> None:
    gid = await grant(ledger, hot, org, 5)
    applied_key = hot.org_keys(org.id)[10]
    assert await redis.zscore(applied_key, gid) is not None
    again = await hot.grant(org.id, grant_id=gid, amount=5 * CREDIT, priority=20, expires_ms=0, created_ms=now_ms())
    assert again.status is Status.DUPLICATE
    # Past the window the cache forgets it; a push then cannot be told from a repeat.
    later = now_ms() + APPLIED_KEEP_MS + DAY_MS
    stale = await hot.grant(
        org.id, grant_id=gid, amount=5 * CREDIT, priority=20, expires_ms=0, created_ms=now_ms(), now=later
    )
    assert stale.status is Status.STALE
    assert await redis.zscore(applied_key, gid) is None  # pruned
    before = await cache_balance(hot, org.id)
    row = await ledger.grant_row(org.id, gid)
    await push_one(
        hot, org.id, grant_id=gid, amount=5 * CREDIT, priority=20, expires_at=None,
        created_at=row["created_at"] - dt.timedelta(milliseconds=APPLIED_KEEP_MS + DAY_MS),
    )  # fmt: skip
    assert await cache_balance(hot, org.id) == before == 105 * CREDIT  # reloaded from the ledger: counted once
    # Pruning: entries older than the window leave the set on the next push.
    await redis.zadd(applied_key, {"ancient": 1})
    await grant(ledger, hot, org, 1)
    assert await redis.zscore(applied_key, "ancient") is None


async def test_a_cache_of_an_earlier_layout_is_loaded_again(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    assert (await hot.balance(org.id)).status is Status.OK
    await redis.hset(hot.org_keys(org.id)[0], "loaded", "1")  # what the previous version wrote
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    assert r.status is Status.OK and r.payload["balance"] == 99 * CREDIT


async def test_a_cold_load_restores_what_closed_holds_captured(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    dept = await admin.create_department(ledger, hot, org.id, "research")
    await admin.set_department_limit(ledger, hot, org.id, dept.id, limit=10 * CREDIT, period="month")
    key = await admin.create_key(ledger, hot, org.id, role="agent", cap=10 * CREDIT, department_id=dept.id)
    hold = await hot.reserve(org.id, key.id, amount=8 * CREDIT, ttl_ms=60_000, department_id=dept.id)
    assert hold.status is Status.OK
    rel = await hot.release(org.id, key.id, reservation_id=hold.payload["id"], used=6 * CREDIT)
    assert rel.status is Status.OK
    used = await hot.consume(org.id, key.id, action="generate_content", units=1, department_id=dept.id)
    assert used.status is Status.OK  # 7 of 10 spent
    await drain(settler(redis, settlement, hot, org.id))
    for _ in range(2):  # before and after a reload from the ledger: the same limits
        over = await hot.consume(org.id, key.id, action="generate_content", units=4, department_id=dept.id)
        assert over.status is Status.DEPARTMENT_LIMIT and over.payload["remaining"] == 3 * CREDIT
        dept_free = await hot.consume(org.id, key.id, action="generate_content", units=4)
        assert dept_free.status is Status.CAP_EXCEEDED and dept_free.payload["remaining"] == 3 * CREDIT
        await hot.evict(org.id)
    async with settlement.pool.acquire() as conn:
        spent = await conn.fetchval(
            "SELECT spent FROM credential_spend WHERE organization_id = $1::uuid AND credential_id = $2", org.id, key.id
        )
    assert spent == 7 * CREDIT


async def test_a_hold_is_released_by_its_own_credential_or_an_admin(hot: HotPath, ledger: Ledger, org: Org) -> None:
    mine = await admin.create_key(ledger, hot, org.id, role="agent")
    other = await admin.create_key(ledger, hot, org.id, role="agent")
    hold = await hot.reserve(org.id, mine.id, amount=5 * CREDIT, ttl_ms=60_000)
    stranger = await hot.release(org.id, other.id, reservation_id=hold.payload["id"], used=5 * CREDIT)
    assert stranger.status is Status.NOT_YOURS
    assert (await hot.balance(org.id)).payload["reserved"] == 5 * CREDIT  # untouched
    by_admin = await hot.release(
        org.id, org.admin_key_id, reservation_id=hold.payload["id"], used=CREDIT, any_hold=True
    )
    assert by_admin.status is Status.OK
    second = await hot.reserve(org.id, mine.id, amount=CREDIT, ttl_ms=60_000)
    own = await hot.release(org.id, mine.id, reservation_id=second.payload["id"], used=0)
    assert own.status is Status.OK
