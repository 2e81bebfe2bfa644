"""What the scripts' shortcuts must keep: the account read once per call (and again
when an expired hold closed), every grant read in one go, the one-grant fast path of
the burn-down, the credential's fields read once for both its checks and its bucket."""

from __future__ import annotations

import datetime as dt

import redis.asyncio as aioredis

from accounts import admin
from hotpath.client import BatchItem, HotPath, now_ms
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org
from tests.integration.test_hotpath import CREDIT, stream_events


async def test_consume_after_a_hold_expired_reports_what_is_available(hot: HotPath, org: Org) -> None:
    hold = await hot.reserve(org.id, org.admin_key_id, amount=30 * CREDIT, ttl_ms=1_000)
    assert hold.status is Status.OK
    later = now_ms() + 5_000
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, now=later)
    assert r.status is Status.OK
    assert (r.payload["balance"], r.payload["available"]) == (99 * CREDIT, 99 * CREDIT)
    hold = await hot.reserve(org.id, org.admin_key_id, amount=10 * CREDIT, ttl_ms=1_000, now=later)
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, now=later)
    assert (r.payload["balance"], r.payload["available"]) == (98 * CREDIT, 88 * CREDIT)  # the open hold counts
    b = await hot.consume_batch(
        org.id, org.admin_key_id, [BatchItem("generate_content", 1, "", "", None, "")], atomic=False, now=later + 5_000
    )
    assert (b.payload["balance"], b.payload["available"]) == (97 * CREDIT, 97 * CREDIT)


async def test_a_charge_across_several_grants(hot: HotPath, ledger: Ledger, redis: aioredis.Redis, org: Org) -> None:
    now = dt.datetime.now(dt.UTC)
    grants = [
        await admin.grant(ledger, hot, org.id, amount=CREDIT, reason="t", expires_at=now + dt.timedelta(days=d))
        for d in (3, 1, 2)
    ]
    # 100 (bonus, priority 0), then the admin grants by soonest expiry: days 1, 2, 3.
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=102)
    assert r.status is Status.OK and r.payload["balance"] == CREDIT
    event = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "use"][-1]
    taken = [(event["g"][i], event["g"][i + 1]) for i in range(0, len(event["g"]), 3)]
    assert [amount for _, amount in taken] == [100 * CREDIT, CREDIT, CREDIT]
    assert [gid for gid, _ in taken][1:] == [grants[1].grant_id, grants[2].grant_id]
    # One grant left: the fast path takes it all, and the grant leaves the queue.
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    assert r.status is Status.OK and r.payload["balance"] == 0
    event = [e for e in await stream_events(redis, hot, org.id) if e["t"] == "use"][-1]
    assert event["g"][:2] == [grants[0].grant_id, CREDIT]
    balance = await hot.balance(org.id)
    assert balance.payload["grants"] == []
    refused = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    assert refused.status is Status.INSUFFICIENT_CREDITS


async def test_revoked_and_rate_limited_credentials_in_every_charging_script(
    hot: HotPath, ledger: Ledger, org: Org
) -> None:
    await hot.balance(org.id)
    key = await admin.create_key(ledger, hot, org.id, role="agent", rate_limit_per_s=1, rate_limit_burst=1)
    t = now_ms()
    item = [BatchItem("tool_call", 1, "", "", None, "")]
    assert (await hot.consume_batch(org.id, key.id, item, atomic=False, now=t)).status is Status.OK
    limited = await hot.consume_batch(org.id, key.id, item, atomic=False, now=t)
    assert limited.status is Status.RATE_LIMITED and limited.payload["retry_after_ms"] == 1000
    limited = await hot.reserve(org.id, key.id, amount=CREDIT, ttl_ms=1000, now=t)
    assert limited.status is Status.RATE_LIMITED
    hold = await hot.reserve(org.id, key.id, amount=CREDIT, ttl_ms=60_000, now=t + 1000)
    assert hold.status is Status.OK
    await admin.revoke_key(ledger, hot, org.id, key.id)
    for result in (
        await hot.consume(org.id, key.id, action="tool_call", units=1, now=t + 5000),
        await hot.consume_batch(org.id, key.id, item, atomic=False, now=t + 5000),
        await hot.reserve(org.id, key.id, amount=CREDIT, ttl_ms=1000, now=t + 5000),
        await hot.release(org.id, key.id, reservation_id=hold.payload["id"], used=0, now=t + 5000),
        await hot.take_request_token(org.id, key.id, now=t + 5000),
    ):
        assert result.status is Status.UNAUTHENTICATED
