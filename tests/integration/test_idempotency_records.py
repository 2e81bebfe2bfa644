"""Idempotency records are compact (lua/lib.lua, HotPath.idempotency_key): what a
record is named and holds, and that records the version before wrote (under its names,
as "fingerprint, newline, msgpack map") still replay, alone, in a batch, in a group, after
a resize, until they cannot live any more."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import redis.asyncio as aioredis

from accounts import admin, entitlements
from core.config import Config
from hotpath.client import BatchItem, GroupRequest, HotPath, fingerprint, new_id, partition_of
from hotpath.servers import RedisConnections
from ledger.entitlements import EntitlementStore
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org

CREDIT = 1000


async def test_a_charge_record_is_its_fingerprint_and_its_values(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 1, "", None)
    r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="c1", fp=fp)
    name = hot.idempotency_key(org.id, "c1")
    assert len(name) == len(hot.key_prefix) + 39 + len(str(hot.partition(org.id)))  # the name before: + 90
    assert name.startswith(f"{hot.key_prefix}:{hot.tag(org.id)}:i:")
    raw = await redis.get(name)
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


async def test_records_of_the_version_before_still_replay(
    hot: HotPath, redis: aioredis.Redis, ledger: Ledger, org: Org
) -> None:
    """What a retry finds right after an upgrade: the earlier format, under the same name."""
    await hot.balance(org.id)
    fp = fingerprint("use", "generate_content", 2, "", None)
    first = {"id": "e" * 32, "credits": 2 * CREDIT, "balance": 98 * CREDIT, "available": 98 * CREDIT}
    for name in ("old-1", "old-2", "old-3", "old-4"):
        old = fp.encode() + b"\n" + msgspec.msgpack.encode(first)
        await redis.set(hot.legacy_idempotency_key(org.id, name), old, px=60_000)
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
    # A feature the organization no longer has does not refuse a retry of what was charged.
    gated = await entitlements.check_consume(
        EntitlementStore(ledger), hot, org.id, org.admin_key_id, feature="api_access", action="generate_content",
        units=2, idempotency_key="old-4", fp=fp,
    )  # fmt: skip
    assert gated.status is Status.REPLAY and gated.payload["id"] == "e" * 32, gated
    assert (await hot.balance(org.id)).payload["balance"] == 100 * CREDIT  # nothing charged
    assert not await redis.exists(hot.idempotency_key(org.id, "old-1"))  # written under the new names only


async def test_the_names_before_are_read_only_while_their_records_may_live(
    hot: HotPath, redis: aioredis.Redis, org: Org
) -> None:
    await hot.balance(org.id)
    mark = await redis.get(f"{hot.key_prefix}:idempotency-names-since")
    assert mark is not None  # set by the first start
    assert hot._legacy_until_ms == int(mark) + hot.idempotency_ttl_ms + 86_400_000
    fp = fingerprint("use", "generate_content", 1, "", None)
    old = (
        fp.encode() + b"\n" + msgspec.msgpack.encode({"id": "f" * 32, "credits": CREDIT, "balance": 1, "available": 1})
    )
    await redis.set(hot.legacy_idempotency_key(org.id, "late"), old, px=60_000)
    until = hot._legacy_until_ms
    try:
        hot._legacy_until_ms = 0  # IDEMPOTENCY_TTL_S and a day later: no record can be there any more
        r = await hot.consume(
            org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="late", fp=fp
        )
        assert r.status is Status.OK  # not looked for
    finally:
        hot._legacy_until_ms = until


async def test_a_resize_moves_records_under_both_names(
    redis_connections: RedisConnections, redis: aioredis.Redis, ledger: Ledger, config: Config
) -> None:
    prefix = f"rl{new_id()[:8]}"  # a resize moves every record of its prefix: one of its own
    mine = HotPath.using(redis_connections, ledger, replace(config, redis_key_prefix=prefix))
    await mine.start()
    org_id, key = await admin.create_organization(ledger, f"relayout-{new_id()[:6]}")
    fp = fingerprint("use", "generate_content", 1, "", None)
    new = await mine.consume(org_id, key.id, action="generate_content", units=1, idempotency_key="n", fp=fp)
    first_old = {"id": "a" * 32, "credits": CREDIT, "balance": 5, "available": 5}
    old = fp.encode() + b"\n" + msgspec.msgpack.encode(first_old)
    await redis.set(mine.legacy_idempotency_key(org_id, "o"), old, px=60_000)
    # Another partition count for this organization (the moves only; the rest of a resize
    # is partitions.resize's, tested in test_partitions_resize.py).
    target = next(n for n in range(2, 64) if partition_of(org_id, n) != mine.partition(org_id))
    dropped, moved_n = await mine.relayout(target)
    assert moved_n == 2 and dropped > 0
    await mine.set_layout_marks(range(mine.partitions), None)
    moved = HotPath.using(redis_connections, ledger, replace(config, redis_key_prefix=prefix, usage_partitions=target))
    await moved.start()
    assert await redis.exists(moved.idempotency_key(org_id, "n"), moved.legacy_idempotency_key(org_id, "o")) == 2
    assert 0 < await redis.pttl(moved.idempotency_key(org_id, "n")) <= mine.idempotency_ttl_ms
    for k, first in (("n", new.payload), ("o", first_old)):
        again = await moved.consume(org_id, key.id, action="generate_content", units=1, idempotency_key=k, fp=fp)
        assert again.status is Status.REPLAY and again.payload == first


async def test_a_batch_item_record_replays_alone(hot: HotPath, redis: aioredis.Redis, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 1, "", None)
    b = await hot.consume_batch(
        org.id, org.admin_key_id, [BatchItem("generate_content", 1, "", "", "item-1", fp)], atomic=False
    )
    item = b.payload["results"][0]
    raw = await redis.get(hot.idempotency_key(org.id, "item-1"))
    assert msgspec.msgpack.decode(raw[18:]) == [item["id"], CREDIT, 99 * CREDIT]  # the balance after it
    alone = await hot.consume(
        org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="item-1", fp=fp
    )
    assert alone.status is Status.REPLAY
    assert alone.payload == {"id": item["id"], "credits": CREDIT, "balance": 99 * CREDIT, "available": 99 * CREDIT}
