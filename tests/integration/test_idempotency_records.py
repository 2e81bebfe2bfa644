"""Idempotency records are compact (lua/lib.lua): what a record holds, what it costs,
and that records written by the version before (fingerprint, newline, msgpack map)
still replay, alone, in a batch and in a group."""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis

from hotpath.client import BatchItem, GroupRequest, HotPath, fingerprint, new_id
from lua import Status
from tests.conftest import Org

CREDIT = 1000


async def test_a_charge_record_is_its_fingerprint_and_its_values(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 1, "", None)
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="c1", fp=fp)
    raw = await redis.get(hot.idempotency_key(org.id, "c1"))
    assert raw[:18] == b"\0\x10" + fp[:16].encode()
    assert msgspec.msgpack.decode(raw[18:]) == [r.payload["id"], CREDIT, 99 * CREDIT]  # available == balance
    assert len(raw) <= 64  # it was 116 bytes: "<32 hex>\n" and a map with the names
    again = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="c1", fp=fp)
    assert again.status is Status.REPLAY and again.payload == r.payload
    # With a hold open, available is kept as well.
    await hot.reserve(org.id, org.admin_key_id, amount=5 * CREDIT, ttl_ms=60_000)
    r2 = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="c2", fp=fp)
    raw2 = await redis.get(hot.idempotency_key(org.id, "c2"))
    assert msgspec.msgpack.decode(raw2[18:]) == [r2.payload["id"], CREDIT, 98 * CREDIT, 93 * CREDIT]
    replay2 = await hot.consume(
        org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="c2", fp=fp
    )
    assert replay2.payload == r2.payload == {"id": r2.payload["id"], "credits": CREDIT, "balance": 98 * CREDIT,
                                             "available": 93 * CREDIT}  # fmt: skip


async def test_records_of_the_version_before_still_replay(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    """What a retry finds right after an upgrade: the earlier format, under the same name."""
    await hot.balance(org.id)
    fp = fingerprint("use", "generate_content", 2, "", None)
    first = {"id": "e" * 32, "credits": 2 * CREDIT, "balance": 98 * CREDIT, "available": 98 * CREDIT}
    for name in ("old-1", "old-2", "old-3"):
        old = fp.encode() + b"\n" + msgspec.msgpack.encode(first)
        await redis.set(hot.idempotency_key(org.id, name), old, px=60_000)
    alone = await hot.consume(
        org.id, org.admin_key_id, action="generate_content", units=2, idempotency_key="old-1", fp=fp
    )
    assert alone.status is Status.REPLAY and alone.payload == first
    conflict = await hot.consume(
        org.id, org.admin_key_id, action="generate_content", units=3, idempotency_key="old-1", fp=fingerprint("x")
    )
    assert conflict.status is Status.IDEMPOTENCY_CONFLICT
    group = await hot.consume_group(
        org.id, [GroupRequest(org.admin_key_id, "generate_content", 2, "", "", "old-2", fp, False, new_id())]
    )
    assert group[0].status is Status.REPLAY and group[0].payload == first
    batch = await hot.consume_batch(
        org.id, org.admin_key_id, [BatchItem("generate_content", 2, "", "", "old-3", fp)], atomic=True
    )
    assert batch.payload["results"][0] == {"i": 0, "ok": True, "id": "e" * 32, "credits": 2 * CREDIT, "replay": True}
    assert (await hot.balance(org.id)).payload["balance"] == 100 * CREDIT  # nothing charged


async def test_a_batch_item_record_replays_alone(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 1, "", None)
    b = await hot.consume_batch(
        org.id, org.admin_key_id, [BatchItem("generate_content", 1, "", "", "item-1", fp)], atomic=False
    )
    item = b.payload["results"][0]
    raw = await redis.get(hot.idempotency_key(org.id, "item-1"))
    assert msgspec.msgpack.decode(raw[18:]) == [item["id"], CREDIT]  # a batch item's: no balance
    alone = await hot.consume(
        org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="item-1", fp=fp
    )
    assert alone.status is Status.REPLAY and alone.payload == {"id": item["id"], "credits": CREDIT}
