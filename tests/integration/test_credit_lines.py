"""Credit lines (issue 13): a trusted organization's `available` may go down to minus its
credit limit; what is charged past the grants is debt, a ledger state of its own
(organizations.debt, debt_entries); the next grant repays it first. Against the real
Redis and Postgres: the hot path, settlement, cold loads and reconciliation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config
from hotpath.client import BatchItem, GroupRequest, HotPath, fingerprint, new_id, now_ms
from ledger.settlement import Settlement
from ledger.store import Ledger
from lua import Status
from settler import reconcile
from settler import stream as stream_module
from settler.stream import PartitionSettler
from tests.conftest import Org

CREDIT = 1000
BONUS = 100 * CREDIT  # every organization starts with the signup bonus


@pytest.fixture(scope="session")
async def settlement(migrated: Config) -> AsyncIterator[Settlement]:
    s = await Settlement.connect(migrated.settler_dsn())
    yield s
    await s.close()


async def drain(redis: aioredis.Redis, settlement: Settlement, hot: HotPath, org: str) -> None:
    ps = PartitionSettler(redis, settlement, hot, hot.partition(org), consumer="c1", batch_entries=50)
    assert await ps.acquire()
    try:
        for _ in range(1000):
            if await ps.settle_once(block_ms=1) == 0:
                return
        raise AssertionError("did not drain")
    finally:
        await ps.release()


async def cached(hot: HotPath, org: str) -> dict[str, int]:
    r = await hot.balance(org)
    assert r.status is Status.OK
    p = r.payload
    return {k: int(p[k]) for k in ("balance", "reserved", "available", "credit_limit", "debt")}


async def ledger_state(ledger: Ledger, org: str) -> dict[str, int]:
    async with ledger.tenant(org) as conn:
        row = await conn.fetchrow("SELECT balance, debt, credit_limit FROM organizations")
        entries = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries")
        remaining = await conn.fetchval("SELECT coalesce(sum(remaining), 0) FROM credit_grants")
        held = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM reservations WHERE status = 'open'")
        debt_sum = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM debt_entries")
    return {
        "balance": int(row["balance"]),
        "debt": int(row["debt"]),
        "limit": int(row["credit_limit"]),
        "entries": int(entries),
        "remaining": int(remaining),
        "held": int(held),
        "debt_entries": int(debt_sum),
    }


async def assert_settled_and_agreeing(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: str
) -> dict[str, int]:
    await drain(redis, settlement, hot, org)
    state = await ledger_state(ledger, org)
    cache = await cached(hot, org)
    assert state["balance"] == state["entries"] == cache["balance"]
    assert state["debt"] == state["debt_entries"] == cache["debt"]
    assert state["remaining"] + state["held"] - state["debt"] == state["balance"]
    report = await reconcile.run(redis, hot, settlement, [org])
    assert report.checked == 1 and report.drifts == []
    return state


def use(units: int = 1) -> BatchItem:
    return BatchItem("generate_content", units, "", "", None, fingerprint("use", "generate_content", units))


async def test_without_a_credit_line_nothing_goes_below_zero(hot: HotPath, ledger: Ledger, org: Org) -> None:
    line = await ledger.credit_line(org.id)
    assert (line.credit_limit, line.debt) == (0, 0)
    assert (await hot.consume(org.id, org.admin_key_id, action="generate_content", units=100)).status is Status.OK
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    assert r.status is Status.INSUFFICIENT_CREDITS and r.payload == {"available": 0, "needed": CREDIT}
    assert await cached(hot, org.id) == {"balance": 0, "reserved": 0, "available": 0, "credit_limit": 0, "debt": 0}


async def test_charges_go_past_zero_up_to_the_limit_and_a_grant_repays_the_debt_first(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    cred = org.admin_key_id
    line = await admin.set_credit_limit(ledger, hot, org.id, limit=10 * CREDIT, reason="trusted")
    assert line.credit_limit == 10 * CREDIT and line.changes[0]["reason"] == "trusted"
    r = await hot.consume(org.id, cred, action="generate_content", units=104)  # 100 from the bonus, 4 owed
    assert r.status is Status.OK and r.payload["available"] == -4 * CREDIT
    batch = await hot.consume_batch(org.id, cred, [use(), use(2)], atomic=True)
    assert batch.status is Status.OK and batch.payload["available"] == -7 * CREDIT
    # A hold may use the line too; what it does not use goes back to it.
    h = await hot.reserve(org.id, cred, amount=2 * CREDIT, ttl_ms=60_000)
    assert h.status is Status.OK and h.payload["available"] == -9 * CREDIT
    assert (await cached(hot, org.id))["debt"] == 9 * CREDIT
    rel = await hot.release(org.id, cred, reservation_id=h.payload["id"], used=CREDIT)
    assert rel.status is Status.OK and rel.payload["available"] == -8 * CREDIT
    # An adjustment is backed by credits that exist: never on the line.
    with pytest.raises(admin.AdminError, match="available"):
        await admin.adjust(ledger, hot, org.id, amount=-CREDIT, reason="t")
    assert (await hot.consume(org.id, cred, action="generate_content", units=2)).status is Status.OK
    r = await hot.consume(org.id, cred, action="generate_content", units=1)
    assert r.status is Status.INSUFFICIENT_CREDITS and r.payload == {"available": -10 * CREDIT, "needed": CREDIT}
    best = await hot.consume_batch(org.id, cred, [use()], atomic=False)
    assert best.status is Status.OK and [r["err"] for r in best.payload["results"]] == [Status.INSUFFICIENT_CREDITS]
    assert await cached(hot, org.id) == {
        "balance": -10 * CREDIT,
        "reserved": 0,
        "available": -10 * CREDIT,
        "credit_limit": 10 * CREDIT,
        "debt": 10 * CREDIT,
    }
    state = await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    assert (state["balance"], state["debt"], state["remaining"]) == (-10 * CREDIT, 10 * CREDIT, 0)

    # The next grant repays the debt first; the rest is spendable.
    g = await admin.grant(ledger, hot, org.id, amount=15 * CREDIT, reason="top up")
    after = await cached(hot, org.id)
    assert (after["balance"], after["available"], after["debt"]) == (5 * CREDIT, 5 * CREDIT, 0)
    grants = (await hot.balance(org.id)).payload["grants"]
    assert [(x["id"], int(x["remaining"])) for x in grants] == [(g.grant_id, 5 * CREDIT)]
    state = await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    assert (state["balance"], state["debt"], state["remaining"]) == (5 * CREDIT, 0, 5 * CREDIT)
    line = await ledger.credit_line(org.id)
    assert [(e["type"], e["amount"], e["debt_after"]) for e in reversed(line.entries)] == [
        ("overdraw", 9 * CREDIT, 9 * CREDIT),  # the batch's usage past the grants, in one entry
        ("overdraw", 2 * CREDIT, 11 * CREDIT),  # the hold
        ("hold_return", -CREDIT, 10 * CREDIT),  # what the release did not use
        ("repayment", -10 * CREDIT, 0),
    ]
    assert line.entries[0]["grant_id"] == g.grant_id
    # A grant smaller than the debt goes to it whole.
    assert (await hot.consume(org.id, cred, action="generate_content", units=12)).status is Status.OK
    await admin.grant(ledger, hot, org.id, amount=3 * CREDIT, reason="small")
    after = await cached(hot, org.id)
    assert (after["available"], after["debt"]) == (-4 * CREDIT, 4 * CREDIT)
    assert (await hot.balance(org.id)).payload["grants"] == []
    await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)


async def test_a_hold_on_the_line_survives_a_cold_load_and_gives_back_what_it_did_not_use(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    cred = org.admin_key_id
    await admin.set_credit_limit(ledger, hot, org.id, limit=20 * CREDIT)
    assert (await hot.consume(org.id, cred, action="generate_content", units=95)).status is Status.OK
    h = await hot.reserve(org.id, cred, amount=12 * CREDIT, ttl_ms=600_000)  # 5 from the bonus, 7 on the line
    assert h.status is Status.OK and h.payload["available"] == -7 * CREDIT
    assert (await hot.reserve(org.id, cred, amount=14 * CREDIT, ttl_ms=60_000)).status is Status.INSUFFICIENT_CREDITS
    before = await cached(hot, org.id)
    assert (before["reserved"], before["debt"]) == (12 * CREDIT, 7 * CREDIT)
    await hot.evict(org.id)  # unsettled: the load replays the hold
    assert await cached(hot, org.id) == before
    await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    await hot.evict(org.id)  # settled: the ledger says what of the hold is on the line
    assert await cached(hot, org.id) == before
    rel = await hot.release(org.id, cred, reservation_id=h.payload["id"], used=6 * CREDIT)  # 5 + 1 of the line
    assert rel.status is Status.OK and rel.payload["available"] == -CREDIT
    assert (await cached(hot, org.id))["debt"] == CREDIT
    # A hold that expires gives all it took from the line back.
    now = now_ms()
    assert (await hot.reserve(org.id, cred, amount=3 * CREDIT, ttl_ms=1_000, now=now)).status is Status.OK
    assert (await cached(hot, org.id))["debt"] == 4 * CREDIT
    await hot.balance(org.id, now=now + 2_000)
    c = await cached(hot, org.id)
    assert (c["available"], c["reserved"], c["debt"]) == (-CREDIT, 0, CREDIT)
    state = await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    assert (state["balance"], state["debt"]) == (-CREDIT, CREDIT)
    async with ledger.tenant(org.id) as conn:
        kinds = sorted(r[0] for r in await conn.fetch("SELECT type FROM debt_entries"))
    assert kinds == ["hold_return", "hold_return", "overdraw", "overdraw"]


async def test_a_grant_repays_what_is_owed_but_not_an_open_holds_part_on_the_line(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    cred = org.admin_key_id
    await admin.set_credit_limit(ledger, hot, org.id, limit=20 * CREDIT)
    assert (await hot.consume(org.id, cred, action="generate_content", units=102)).status is Status.OK  # owes 2
    h = await hot.reserve(org.id, cred, amount=10 * CREDIT, ttl_ms=600_000)  # all on the line
    assert h.status is Status.OK and h.payload["available"] == -12 * CREDIT
    await admin.grant(ledger, hot, org.id, amount=4 * CREDIT, reason="t")  # repays the 2, not the hold's 10
    c = await cached(hot, org.id)
    assert (c["available"], c["debt"]) == (-8 * CREDIT, 10 * CREDIT)
    rel = await hot.release(org.id, cred, reservation_id=h.payload["id"], used=5 * CREDIT)
    assert rel.status is Status.OK and rel.payload["available"] == -3 * CREDIT
    assert (await cached(hot, org.id))["debt"] == 5 * CREDIT  # what the hold used is owed now
    await admin.grant(ledger, hot, org.id, amount=10 * CREDIT, reason="t")
    c = await cached(hot, org.id)
    assert (c["available"], c["debt"]) == (7 * CREDIT, 0)
    state = await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    assert (state["balance"], state["debt"], state["remaining"]) == (7 * CREDIT, 0, 7 * CREDIT)


async def test_a_lower_limit_refuses_new_charges_and_keeps_the_debt(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    await admin.set_credit_limit(ledger, hot, org.id, limit=5 * CREDIT)
    assert (await hot.consume(org.id, org.admin_key_id, action="generate_content", units=103)).status is Status.OK
    await admin.set_credit_limit(ledger, hot, org.id, limit=0, reason="no longer trusted")
    r = await hot.consume(org.id, org.admin_key_id, action="tool_call", units=1)
    assert r.status is Status.INSUFFICIENT_CREDITS
    c = await cached(hot, org.id)
    assert (c["available"], c["debt"], c["credit_limit"]) == (-3 * CREDIT, 3 * CREDIT, 0)
    await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)


async def test_a_cold_load_reproduces_the_debt_exactly(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    cred = org.admin_key_id
    await admin.set_credit_limit(ledger, hot, org.id, limit=50 * CREDIT)
    await hot.consume(org.id, cred, action="generate_content", units=110)
    await drain(redis, settlement, hot, org.id)  # some settled...
    await hot.consume_batch(org.id, cred, [use(3), use(2)], atomic=True)
    await admin.grant(ledger, hot, org.id, amount=20 * CREDIT, reason="partly repays")  # unsettled push
    await hot.consume(org.id, cred, action="generate_content", units=9)
    before = await cached(hot, org.id)
    assert (before["available"], before["debt"]) == (-4 * CREDIT, 4 * CREDIT)
    grants_before = (await hot.balance(org.id)).payload["grants"]
    await hot.evict(org.id)  # ...some not, and the cache is gone
    assert await cached(hot, org.id) == before
    assert (await hot.balance(org.id)).payload["grants"] == grants_before
    await hot.evict(org.id)  # settled, and gone again: the ledger alone says the same
    await drain(redis, settlement, hot, org.id)
    assert await cached(hot, org.id) == before
    await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)


async def test_reconciliation_sees_debt_drift(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    await admin.set_credit_limit(ledger, hot, org.id, limit=5 * CREDIT)
    await hot.consume(org.id, org.admin_key_id, action="generate_content", units=102)
    report = await reconcile.run(redis, hot, settlement, [org.id])  # in flight, not drift
    assert report.drifts == []
    await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    await redis.hincrby(hot.org_keys(org.id)[0], "debt", CREDIT)  # behind the ledger's back
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert [(d.difference, d.debt_difference) for d in report.drifts] == [(0, CREDIT)]


async def test_many_clients_never_take_one_organization_below_minus_its_limit(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    await admin.set_credit_limit(ledger, hot, org.id, limit=20 * CREDIT)
    charged = 0

    async def client(n: int) -> None:
        nonlocal charged
        while True:
            if n % 2:
                r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
                ok = r.status is Status.OK
                charged += CREDIT if ok else 0
            else:
                r = await hot.consume_batch(org.id, org.admin_key_id, [use(), use()], atomic=True)
                ok = r.status is Status.OK
                charged += 2 * CREDIT if ok else 0
            if not ok:
                assert r.status in (Status.INSUFFICIENT_CREDITS, Status.ITEM_FAILED)
                return

    await asyncio.gather(*(client(n) for n in range(32)))
    c = await cached(hot, org.id)
    assert c["available"] >= -20 * CREDIT
    assert charged == BONUS - c["available"]
    assert c["available"] in (-20 * CREDIT, -19 * CREDIT)  # a pair may not fit the last credit
    # the last credit, if one is left, goes to a single charge
    while (await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)).status is Status.OK:
        pass
    assert (await cached(hot, org.id))["available"] == -20 * CREDIT
    state = await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    assert state["debt"] == 20 * CREDIT


async def test_a_held_dead_letter_that_overdrew_is_no_debt_drift_and_reloads(
    hot: HotPath,
    ledger: Ledger,
    settlement: Settlement,
    redis: aioredis.Redis,
    org: Org,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_module, "clean_event", lambda ev: ev)  # as if no cleaning could help
    await admin.set_credit_limit(ledger, hot, org.id, limit=10 * CREDIT)
    poison = '{"note": "a\\u0000b"}'  # jsonb refuses it
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=103, metadata=poison)
    assert r.status is Status.OK and r.payload["available"] == -3 * CREDIT
    await drain(redis, settlement, hot, org.id)
    [dead] = await settlement.dead_letters(organization_id=org.id, state="held")
    report = await reconcile.run(redis, hot, settlement, [org.id])
    assert report.drifts == [] and report.quarantined == {org.id: -103 * CREDIT}
    before = await cached(hot, org.id)
    await hot.evict(org.id)  # a cold load replays what quarantine holds, its debt too
    assert await cached(hot, org.id) == before and before["debt"] == 3 * CREDIT
    assert dead.organization_id == org.id


async def test_a_group_commit_charges_on_the_line_as_one_by_one_would(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """Coalesced consumes (consume_group.lua) use the same check and split as consume:
    in arrival order, past zero down to minus the limit, the rest refused."""
    await admin.set_credit_limit(ledger, hot, org.id, limit=3 * CREDIT)
    requests = [
        GroupRequest(org.admin_key_id, "generate_content", units, "", "", None, "", False, new_id())
        for units in (99, 2, 2, 1, 1)  # 99 from the bonus; 1 from it and 1 owed; 2 owed; then the line is used up
    ]
    results = await hot.consume_group(org.id, requests)
    ok, refused = Status.OK, Status.INSUFFICIENT_CREDITS
    assert [r.status for r in results] == [ok, ok, ok, refused, refused], results
    assert results[3].payload == results[4].payload == {"available": -3 * CREDIT, "needed": CREDIT}
    assert (await cached(hot, org.id))["debt"] == 3 * CREDIT
    state = await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
    assert state["debt"] == 3 * CREDIT


async def test_voiding_a_grant_beside_debt_never_goes_below_zero(
    hot: HotPath, ledger: Ledger, settlement: Settlement, redis: aioredis.Redis, org: Org
) -> None:
    """A hold's unused credits come back to the grants while usage debt is owed (debt
    and spendable grants side by side, see the README): a void is backed by credits
    that exist, so it takes only what is available, never the grant's whole remainder."""
    cred = org.admin_key_id
    await admin.set_credit_limit(ledger, hot, org.id, limit=50 * CREDIT)
    h = await hot.reserve(org.id, cred, amount=100 * CREDIT, ttl_ms=60_000)  # the whole bonus held
    assert h.status is Status.OK
    assert (await hot.consume(org.id, cred, action="generate_content", units=50)).status is Status.OK  # owed
    assert (await hot.release(org.id, cred, reservation_id=h.payload["id"], used=0)).status is Status.OK
    before = await cached(hot, org.id)
    assert (before["available"], before["debt"]) == (50 * CREDIT, 50 * CREDIT)
    bonus = (await hot.balance(org.id)).payload["grants"][0]["id"]
    voided = await admin.void_grant(ledger, hot, org.id, bonus, reason="mistake")
    assert voided["amount"] == -50 * CREDIT  # what was available, not the 100 the grant had left
    after = await cached(hot, org.id)
    assert (after["available"], after["debt"]) == (0, 50 * CREDIT)
    await assert_settled_and_agreeing(hot, ledger, settlement, redis, org.id)
