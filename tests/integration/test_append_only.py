"""The ledger only grows (issue 8, item 9): no application role may change or delete
ledger entries, usage events, grants (but settlement moving `remaining`), reservations
(but settlement closing an open one) or allocations, and triggers refuse it even to the
owner. Adjustments down are idempotent by reference in Postgres, for ever."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config
from hotpath.client import HotPath
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org
from tests.integration.test_settlement import assert_conserved, cache_balance, drain, ledger_state, settler

CREDIT = 1000

pytest_plugins = ("tests.integration.test_settlement",)


@pytest.fixture
async def settled_org(hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org) -> Org:
    """An organization with an entry of every ledger table: usage, a closed hold, a grant."""
    await admin.grant(ledger, hot, org.id, amount=10 * CREDIT, reason="t")
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    hold = await hot.reserve(org.id, org.admin_key_id, amount=2 * CREDIT, ttl_ms=60_000)
    await hot.release(org.id, org.admin_key_id, reservation_id=hold.payload["id"], used=CREDIT)
    await drain(settler(redis, settlement, hot, org.id))
    return org


CHANGES = [
    "UPDATE ledger_entries SET amount = amount + 1",
    "DELETE FROM ledger_entries",
    "UPDATE usage_events SET credits = 0",
    "DELETE FROM usage_events",
    "UPDATE credit_grants SET amount = amount + 1000",
    "DELETE FROM credit_grants",
    "UPDATE reservations SET used = 0",
    "DELETE FROM reservations",
    "UPDATE reservation_allocations SET amount = 1",
    "DELETE FROM reservation_allocations",
]


async def connect_as(config: Config, role: str) -> asyncpg.Connection:
    dsn = {"credits_app": config.app_dsn(), "credits_settler": config.settler_dsn(), "owner": config.database_url}[role]
    return await asyncpg.connect(dsn)


@pytest.mark.parametrize("role", ["credits_app", "credits_settler", "owner"])
async def test_no_role_changes_or_deletes_the_ledger(migrated: Config, settled_org: Org, role: str) -> None:
    conn = await connect_as(migrated, role)
    try:
        for statement in CHANGES:
            with pytest.raises(asyncpg.PostgresError) as refused:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('app.organization_id', $1, true)", settled_org.id)
                    if role == "owner":  # the owner obeys row-level security too (FORCE): lift it to try
                        await conn.execute("SET LOCAL row_security = off")
                    result = await conn.execute(f"{statement} WHERE organization_id = $1::uuid", settled_org.id)
                    assert result.split()[-1] != "0", (role, statement, "the test must hit rows")
            assert (
                isinstance(refused.value, asyncpg.exceptions.InsufficientPrivilegeError | asyncpg.exceptions.RaiseError)
                or "append-only" in str(refused.value)
                or "permission denied" in str(refused.value)
            ), refused.value
        for table in ("ledger_entries", "usage_events", "credit_grants", "reservations"):
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(f"TRUNCATE {table} CASCADE")
    finally:
        await conn.close()


async def test_settlement_may_move_remaining_and_close_an_open_hold_only(migrated: Config, settled_org: Org) -> None:
    conn = await connect_as(migrated, "credits_settler")
    try:
        async with conn.transaction():
            moved = await conn.execute(
                "UPDATE credit_grants SET remaining = remaining WHERE organization_id = $1::uuid", settled_org.id
            )
            assert moved.split()[-1] != "0"
        with pytest.raises(asyncpg.PostgresError, match="closed"):
            await conn.execute(
                "UPDATE reservations SET status = 'expired' WHERE organization_id = $1::uuid", settled_org.id
            )
    finally:
        await conn.close()


async def test_an_adjustment_reference_debits_once_for_ever(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    first = await admin.adjust(ledger, hot, org.id, amount=-5 * CREDIT, reason="duplicate grant", reference="FIX-7")
    assert first["amount"] == -5 * CREDIT
    # Two days later the hot path's idempotency key is gone; the ledger still knows.
    async for key in redis.scan_iter(match=hot.idempotency_pattern(org.id)):
        await redis.delete(key)
    again = await admin.adjust(ledger, hot, org.id, amount=-5 * CREDIT, reason="duplicate grant", reference="FIX-7")
    assert again == first
    assert await cache_balance(hot, org.id) == 95 * CREDIT
    with pytest.raises(admin.AdminError, match="different adjustment"):
        await admin.adjust(ledger, hot, org.id, amount=-6 * CREDIT, reason="duplicate grant", reference="FIX-7")
    # More than is available: refused, nothing changed, and on record.
    with pytest.raises(admin.AdminError, match="nothing was changed"):
        await admin.adjust(ledger, hot, org.id, amount=-500 * CREDIT, reason="too much", reference="FIX-8")
    async with ledger.tenant(org.id) as conn:
        outcomes = dict(await conn.fetch("SELECT reference, outcome FROM credit_adjustments"))
    assert outcomes == {"FIX-7": "applied", "FIX-8": "refused"}
    await drain(settler(redis, settlement, hot, org.id))
    state = await ledger_state(ledger, org.id)
    assert state["other"] == -5 * CREDIT
    assert_conserved(state, await cache_balance(hot, org.id))


async def test_an_adjustment_whose_answer_was_lost_is_found_in_the_ledger(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    row = await ledger.claim_adjustment(
        org.id, reference="LOST-1", kind="debit", amount=3 * CREDIT, reason="lost", actor="tests"
    )
    # The debit ran, then the process died before recording it.
    r = await hot.debit(
        org.id, amount=3 * CREDIT, kind="adjustment", reason="lost", idempotency_key=f"adjust:{row.id}",
        event_id=row.event_id,
    )  # fmt: skip
    assert r.status is Status.OK
    await drain(settler(redis, settlement, hot, org.id))
    async for key in redis.scan_iter(match=hot.idempotency_pattern(org.id)):
        await redis.delete(key)  # and its idempotency key expired
    done = await admin.adjust(ledger, hot, org.id, amount=-3 * CREDIT, reason="lost", reference="LOST-1")
    assert done["amount"] == -3 * CREDIT
    assert await cache_balance(hot, org.id) == 97 * CREDIT  # once


async def test_a_void_takes_what_a_grant_has_left_once(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    g = await admin.grant(ledger, hot, org.id, amount=10 * CREDIT, reason="by mistake")
    voided = await admin.void_grant(ledger, hot, org.id, g.grant_id, reason="given by mistake")
    assert voided["amount"] == -10 * CREDIT
    assert await cache_balance(hot, org.id) == 100 * CREDIT  # the bonus is untouched
    again = await admin.void_grant(ledger, hot, org.id, g.grant_id, reason="given by mistake")
    assert again == voided
    with pytest.raises(admin.AdminError, match="no grant"):
        await admin.void_grant(ledger, hot, org.id, str(uuid.uuid4()), reason="x")
    await drain(settler(redis, settlement, hot, org.id))
    assert (await ledger.grant_row(org.id, g.grant_id))["remaining"] == 0
    assert_conserved(await ledger_state(ledger, org.id), await cache_balance(hot, org.id))
