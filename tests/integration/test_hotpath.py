"""The Lua hot path against a real Redis, with the ledger behind it in Postgres."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import msgspec
import pytest
import redis.asyncio as aioredis

from accounts import admin
from accounts.grants import push_pending
from hotpath.client import BatchItem, HotPath, fingerprint, now_ms
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org

CREDIT = 1000  # millicredits
DAY_MS = 86_400_000


async def cost(ledger: Ledger, hot: HotPath, org: str, action: str, milli: int) -> None:
    await ledger.set_cost(org, action, milli, "request", "")
    await hot.configure(org, "cost", action, milli)


async def consume(hot: HotPath, org: Org, action: str = "generate_content", units: int = 1, **kw: object):  # type: ignore[no-untyped-def]
    return await hot.consume(org.id, org.admin_key_id, action=action, units=units, **kw)  # type: ignore[arg-type]


async def balance(hot: HotPath, org: Org, now: int | None = None) -> dict[str, int]:
    r = await hot.balance(org.id, now=now)
    assert r.status is Status.OK
    return r.payload


async def stream_events(redis: aioredis.Redis, hot: HotPath, org_id: str) -> list[dict[str, object]]:
    rows = await redis.xrange(hot.stream_key(hot.partition(org_id)))
    out = []
    for _, fields in rows:
        if fields[b"o"].decode() == org_id:
            out.append(msgspec.msgpack.decode(fields[b"d"]))
    return out


async def test_signup_bonus_loads_from_ledger(hot: HotPath, ledger: Ledger, org: Org) -> None:
    b = await balance(hot, org)
    assert b["balance"] == 100 * CREDIT
    assert b["available"] == 100 * CREDIT
    led, entries = await ledger.ledger_balance(org.id)
    assert led == entries == 100 * CREDIT


async def test_consume_debits_and_appends_usage_event(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    r = await consume(hot, org, "generate_content", 3)
    assert r.status is Status.OK
    assert r.payload["credits"] == 3 * CREDIT
    assert r.payload["balance"] == 97 * CREDIT
    events = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "use"]
    assert len(events) == 1
    assert events[0]["id"] == r.payload["id"] and events[0]["amt"] == 3 * CREDIT


async def test_fractional_prices_are_exact(hot: HotPath, org: Org) -> None:
    r = await consume(hot, org, "llm_output_tokens", 1234)
    assert r.payload["credits"] == 2468  # 0.002 credits per token, exact
    assert (await balance(hot, org))["balance"] == 100 * CREDIT - 2468


async def test_unknown_action_charges_nothing(hot: HotPath, org: Org) -> None:
    r = await consume(hot, org, "no_such_action")
    assert r.status is Status.UNKNOWN_ACTION
    assert (await balance(hot, org))["balance"] == 100 * CREDIT


async def test_insufficient_credits_charges_nothing(hot: HotPath, org: Org) -> None:
    r = await consume(hot, org, "generate_content", 101)
    assert r.status is Status.INSUFFICIENT_CREDITS
    assert r.payload == {"available": 100 * CREDIT, "needed": 101 * CREDIT}
    assert (await balance(hot, org))["balance"] == 100 * CREDIT


async def test_idempotent_retry_charges_once_and_returns_first_result(hot: HotPath, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 2)
    first = await consume(hot, org, "generate_content", 2, idempotency_key="k", fp=fp)
    second = await consume(hot, org, "generate_content", 2, idempotency_key="k", fp=fp)
    assert first.status is Status.OK and second.status is Status.REPLAY
    assert second.payload == first.payload
    assert (await balance(hot, org))["balance"] == 98 * CREDIT
    conflict = await consume(hot, org, "generate_content", 3, idempotency_key="k", fp=fingerprint("use", "x", 3))
    assert conflict.status is Status.IDEMPOTENCY_CONFLICT
    assert (await balance(hot, org))["balance"] == 98 * CREDIT


async def test_concurrent_retries_with_one_key_charge_once(hot: HotPath, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 1)
    results = await asyncio.gather(
        *(consume(hot, org, "generate_content", 1, idempotency_key="same", fp=fp) for _ in range(60))
    )
    assert sum(r.status is Status.OK for r in results) == 1
    assert all(r.status in (Status.OK, Status.REPLAY) for r in results)
    assert len({r.payload["id"] for r in results}) == 1
    assert (await balance(hot, org))["balance"] == 99 * CREDIT


async def test_grants_burn_down_by_priority_then_soonest_expiry(hot: HotPath, ledger: Ledger, org: Org) -> None:
    now = dt.datetime.now(dt.UTC)
    late = await admin.grant(
        ledger, hot, org.id, amount=10 * CREDIT, reason="t", expires_at=now + dt.timedelta(days=30)
    )
    soon = await admin.grant(ledger, hot, org.id, amount=10 * CREDIT, reason="t", expires_at=now + dt.timedelta(days=2))
    never = await admin.grant(ledger, hot, org.id, amount=10 * CREDIT, reason="t")
    # The signup bonus (priority 0) goes first, then admin grants by soonest expiry.
    assert (await consume(hot, org, "generate_content", 100)).status is Status.OK
    grants = {g["id"]: g["remaining"] for g in (await balance(hot, org))["grants"]}
    assert set(grants) == {late.grant_id, soon.grant_id, never.grant_id}
    assert (await consume(hot, org, "generate_content", 15)).status is Status.OK
    grants = {g["id"]: g["remaining"] for g in (await balance(hot, org))["grants"]}
    assert soon.grant_id not in grants  # spent first: soonest expiry
    assert grants[late.grant_id] == 5 * CREDIT
    assert grants[never.grant_id] == 10 * CREDIT


async def test_expired_grant_is_never_spent(hot: HotPath, ledger: Ledger, redis: aioredis.Redis, org: Org) -> None:
    now = dt.datetime.now(dt.UTC)
    g = await admin.grant(ledger, hot, org.id, amount=50 * CREDIT, reason="t", expires_at=now + dt.timedelta(hours=1))
    later = now_ms() + 2 * 3600 * 1000
    # 150 credits would be there an hour ago; after expiry only the bonus is left.
    r = await consume(hot, org, "generate_content", 120, now=later)
    assert r.status is Status.INSUFFICIENT_CREDITS
    assert r.payload["available"] == 100 * CREDIT
    b = await balance(hot, org, now=later)
    assert b["balance"] == 100 * CREDIT
    expirations = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "grant_expired"]
    assert [(e["g"], e["amt"]) for e in expirations] == [(g.grant_id, 50 * CREDIT)]


async def test_grant_push_is_idempotent(hot: HotPath, ledger: Ledger, org: Org) -> None:
    await balance(hot, org)  # cached
    g = await ledger.grant(org.id, amount=5 * CREDIT, source="admin", reference="ref-1", reason="t")
    for _ in range(3):
        r = await hot.grant(
            org.id, grant_id=g.grant_id, amount=5 * CREDIT, priority=20, expires_ms=0, created_ms=now_ms()
        )
        assert r.status in (Status.OK, Status.DUPLICATE)
    await push_pending(ledger, hot, org.id)
    again = await ledger.grant(org.id, amount=5 * CREDIT, source="admin", reference="ref-1", reason="t")
    assert again.grant_id == g.grant_id and not again.created
    await push_pending(ledger, hot, org.id)
    assert (await balance(hot, org))["balance"] == 105 * CREDIT
    led, entries = await ledger.ledger_balance(org.id)
    assert led == entries == 105 * CREDIT


async def test_grant_push_racing_a_cold_load_counts_once(hot: HotPath, ledger: Ledger, org: Org) -> None:
    for round_ in range(5):
        await hot.evict(org.id)
        await ledger.grant(org.id, amount=CREDIT, source="admin", reference=f"race-{round_}", reason="t")
        await asyncio.gather(hot.load(org.id), push_pending(ledger, hot, org.id), hot.load(org.id))
        b = await balance(hot, org)
        assert b["balance"] == (101 + round_) * CREDIT


async def test_reservation_release_charges_used_and_frees_rest(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    r = await hot.reserve(org.id, org.admin_key_id, amount=30 * CREDIT, ttl_ms=60_000)
    assert r.status is Status.OK
    b = await balance(hot, org)
    assert (b["balance"], b["reserved"], b["available"]) == (100 * CREDIT, 30 * CREDIT, 70 * CREDIT)
    rel = await hot.release(org.id, org.admin_key_id, reservation_id=r.payload["id"], used=12 * CREDIT)
    assert rel.status is Status.OK
    assert rel.payload["released"] == 18 * CREDIT
    b = await balance(hot, org)
    assert (b["balance"], b["reserved"], b["available"]) == (88 * CREDIT, 0, 88 * CREDIT)
    again = await hot.release(org.id, org.admin_key_id, reservation_id=r.payload["id"], used=0)
    assert again.status is Status.RESERVATION_CLOSED
    assert again.payload["how"] == "released"
    closed = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "hold_closed"]
    assert len(closed) == 1 and closed[0]["used"] == 12 * CREDIT


async def test_release_more_than_held_is_refused(hot: HotPath, org: Org) -> None:
    r = await hot.reserve(org.id, org.admin_key_id, amount=5 * CREDIT, ttl_ms=60_000)
    bad = await hot.release(org.id, org.admin_key_id, reservation_id=r.payload["id"], used=6 * CREDIT)
    assert bad.status is Status.USED_EXCEEDS_HOLD
    b = await balance(hot, org)
    assert b["reserved"] == 5 * CREDIT  # still open, nothing charged


async def test_release_after_expiry_is_closed_and_hold_returned(hot: HotPath, org: Org) -> None:
    r = await hot.reserve(org.id, org.admin_key_id, amount=40 * CREDIT, ttl_ms=1_000)
    later = now_ms() + 5_000
    late = await hot.release(org.id, org.admin_key_id, reservation_id=r.payload["id"], used=1, now=later)
    assert late.status is Status.RESERVATION_CLOSED
    assert late.payload["how"] == "expired"
    b = await balance(hot, org, now=later)
    assert (b["balance"], b["reserved"], b["available"]) == (100 * CREDIT, 0, 100 * CREDIT)


async def test_expired_holds_return_before_a_consume_is_decided(hot: HotPath, org: Org) -> None:
    await hot.reserve(org.id, org.admin_key_id, amount=90 * CREDIT, ttl_ms=1_000)
    assert (await consume(hot, org, "generate_content", 50)).status is Status.INSUFFICIENT_CREDITS
    later = now_ms() + 2_000
    assert (await consume(hot, org, "generate_content", 50, now=later)).status is Status.OK


async def test_release_and_expiry_race_resolves_once(hot: HotPath, org: Org) -> None:
    r = await hot.reserve(org.id, org.admin_key_id, amount=10 * CREDIT, ttl_ms=1_000)
    at = now_ms() + 1_000  # exactly at the expiry instant
    outcomes = await asyncio.gather(
        *(
            hot.release(org.id, org.admin_key_id, reservation_id=r.payload["id"], used=5 * CREDIT, now=at)
            for _ in range(20)
        ),
        *(hot.balance(org.id, now=at) for _ in range(5)),
    )
    releases = outcomes[:20]
    assert all(x.status is Status.RESERVATION_CLOSED for x in releases)
    b = await balance(hot, org)
    assert (b["balance"], b["reserved"]) == (100 * CREDIT, 0)


async def test_department_limit_and_period_rollover(hot: HotPath, ledger: Ledger, org: Org) -> None:
    dept = await ledger.create_department(org.id, "research")
    await ledger.set_department_limit(org.id, dept.id, 10 * CREDIT, "month")
    await hot.configure(org.id, "dept", dept.id, 10 * CREDIT, "month")
    nov = int(dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.UTC).timestamp() * 1000)
    dec = int(dt.datetime(2026, 12, 1, 0, 30, tzinfo=dt.UTC).timestamp() * 1000)
    assert (await consume(hot, org, "generate_content", 8, department_id=dept.id, now=nov)).status is Status.OK
    over = await consume(hot, org, "generate_content", 3, department_id=dept.id, now=nov)
    assert over.status is Status.DEPARTMENT_LIMIT
    assert over.payload == {"remaining": 2 * CREDIT, "needed": 3 * CREDIT}
    # Without the department, the organization still has credits.
    assert (await consume(hot, org, "generate_content", 3, now=nov)).status is Status.OK
    # A new month: the department's budget starts over.
    assert (await consume(hot, org, "generate_content", 9, department_id=dept.id, now=dec)).status is Status.OK
    r = await hot.balance(org.id, department_id=dept.id, now=dec)
    assert r.payload["dept"]["spent"] == 9 * CREDIT


async def test_unknown_department_is_refused(hot: HotPath, org: Org) -> None:
    r = await consume(hot, org, "generate_content", 1, department_id=str(uuid.uuid4()))
    assert r.status is Status.DEPARTMENT_NOT_FOUND


async def test_key_cap_and_revocation(hot: HotPath, ledger: Ledger, org: Org) -> None:
    await balance(hot, org)
    key = await admin.create_key(ledger, hot, org.id, role="agent", cap=5 * CREDIT)
    ok = await hot.consume(org.id, key.id, action="generate_content", units=4)
    assert ok.status is Status.OK
    capped = await hot.consume(org.id, key.id, action="generate_content", units=2)
    assert capped.status is Status.CAP_EXCEEDED
    assert capped.payload == {"remaining": CREDIT, "needed": 2 * CREDIT}
    await admin.revoke_key(ledger, hot, org.id, key.id)
    revoked = await hot.consume(org.id, key.id, action="generate_content", units=1)
    assert revoked.status is Status.UNAUTHENTICATED
    assert await ledger.authenticate(key.secret) is None


async def test_rate_limit_per_credential(hot: HotPath, ledger: Ledger, org: Org) -> None:
    await balance(hot, org)
    key = await admin.create_key(ledger, hot, org.id, role="agent", rate_limit_per_s=1, rate_limit_burst=3)
    t = now_ms()
    statuses = [(await hot.consume(org.id, key.id, action="tool_call", units=1, now=t)).status for _ in range(5)]
    assert statuses[:3] == [Status.OK] * 3
    assert statuses[3] is Status.RATE_LIMITED
    limited = await hot.consume(org.id, key.id, action="tool_call", units=1, now=t)
    assert limited.payload["retry_after_ms"] == 1000
    assert (await hot.consume(org.id, key.id, action="tool_call", units=1, now=t + 1000)).status is Status.OK


def items(*specs: tuple[str, int], key_prefix: str | None = None) -> list[BatchItem]:
    out = []
    for i, (action, units) in enumerate(specs):
        key = None if key_prefix is None else f"{key_prefix}-{i}"
        out.append(BatchItem(action, units, "", "", key, fingerprint("use", action, units, "", None)))
    return out


async def test_batch_best_effort_reports_each_item(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    r = await hot.consume_batch(
        org.id,
        org.admin_key_id,
        items(("generate_content", 60), ("nope", 1), ("generate_content", 60), ("web_search", 2)),
        atomic=False,
    )
    assert r.status is Status.OK
    res = r.payload["results"]
    assert [x["ok"] for x in res] == [True, False, False, True]
    assert res[1]["err"] == Status.UNKNOWN_ACTION and res[2]["err"] == Status.INSUFFICIENT_CREDITS
    assert r.payload["balance"] == 39 * CREDIT
    batches = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "use_batch"]
    assert len(batches) == 1 and len(batches[0]["ev"]) == 2  # one stream entry for the batch


async def test_atomic_batch_is_all_or_nothing(hot: HotPath, org: Org) -> None:
    r = await hot.consume_batch(
        org.id, org.admin_key_id, items(("generate_content", 60), ("generate_content", 60)), atomic=True
    )
    assert r.status is Status.ITEM_FAILED
    assert r.payload["i"] == 1 and r.payload["err"] == Status.INSUFFICIENT_CREDITS
    assert (await balance(hot, org))["balance"] == 100 * CREDIT


async def test_batch_item_keys_replay_and_match_single_use(hot: HotPath, org: Org) -> None:
    first = await hot.consume_batch(
        org.id, org.admin_key_id, items(("web_search", 1), ("web_search", 2), key_prefix="b"), atomic=True
    )
    assert first.status is Status.OK
    again = await hot.consume_batch(
        org.id, org.admin_key_id, items(("web_search", 1), ("web_search", 2), key_prefix="b"), atomic=True
    )
    assert [x.get("replay") for x in again.payload["results"]] == [True, True]
    assert [x["id"] for x in again.payload["results"]] == [x["id"] for x in first.payload["results"]]
    # The same item key sent alone to /use replays too.
    single = await consume(
        hot, org, "web_search", 1, idempotency_key="b-0", fp=fingerprint("use", "web_search", 1, "", None)
    )
    assert single.status is Status.REPLAY
    assert (await balance(hot, org))["balance"] == 100 * CREDIT - 1500


async def test_many_concurrent_consumers_and_reservers_never_overdraw(hot: HotPath, ledger: Ledger, org: Org) -> None:
    dept = await ledger.create_department(org.id, "ops")
    await ledger.set_department_limit(org.id, dept.id, 60 * CREDIT, "day")
    await balance(hot, org)
    await hot.configure(org.id, "dept", dept.id, 60 * CREDIT, "day")
    charged = 0

    async def worker(n: int) -> int:
        total = 0
        for i in range(20):
            if (n + i) % 3 == 0:
                r = await hot.reserve(
                    org.id, org.admin_key_id, amount=2 * CREDIT, ttl_ms=60_000, department_id=dept.id if n % 2 else ""
                )
                if r.status is Status.OK:
                    rel = await hot.release(org.id, org.admin_key_id, reservation_id=r.payload["id"], used=CREDIT)
                    assert rel.status is Status.OK
                    total += CREDIT
                else:
                    assert r.status in (Status.INSUFFICIENT_CREDITS, Status.DEPARTMENT_LIMIT)
            else:
                r = await hot.consume(
                    org.id, org.admin_key_id, action="generate_content", units=1, department_id=dept.id if n % 2 else ""
                )
                if r.status is Status.OK:
                    total += r.payload["credits"]
                else:
                    assert r.status in (Status.INSUFFICIENT_CREDITS, Status.DEPARTMENT_LIMIT)
            b = (await hot.balance(org.id)).payload
            assert b["available"] >= 0
        return total

    totals = await asyncio.gather(*(worker(n) for n in range(60)))
    charged = sum(totals)
    b = await balance(hot, org)
    assert b["reserved"] == 0
    assert b["balance"] == 100 * CREDIT - charged
    assert b["balance"] >= 0
    d = (await hot.balance(org.id, department_id=dept.id)).payload["dept"]
    assert d["spent"] <= 60 * CREDIT


async def test_debit_adjustment_never_below_zero_and_once(
    hot: HotPath, redis: aioredis.Redis, ledger: Ledger, org: Org
) -> None:
    out = await admin.adjust(ledger, hot, org.id, amount=-30 * CREDIT, reason="goodwill reversal", reference="adj-1")
    again = await admin.adjust(ledger, hot, org.id, amount=-30 * CREDIT, reason="goodwill reversal", reference="adj-1")
    assert out == again
    assert (await balance(hot, org))["balance"] == 70 * CREDIT
    with pytest.raises(admin.AdminError):
        await admin.adjust(ledger, hot, org.id, amount=-71 * CREDIT, reason="too much")
    assert (await balance(hot, org))["balance"] == 70 * CREDIT
    events = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "adjustment"]
    assert len(events) == 1 and events[0]["amt"] == 30 * CREDIT
