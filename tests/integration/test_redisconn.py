"""The auto-pipelined connection and the function library against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from core.config import Config
from hotpath.client import HotPath
from hotpath.cluster import slot_of
from hotpath.connection import PipelinedRedis
from hotpath.servers import RedisConnections
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org


async def test_many_concurrent_commands_in_order(
    config: Config, redis: aioredis.Redis, redis_connections: RedisConnections
) -> None:
    assert config.redis_url is not None
    key = f"{config.redis_key_prefix}:pipe-test:{uuid.uuid4().hex}"
    if redis_connections.cluster is None:
        pipe = PipelinedRedis.from_url(config.redis_url)
    else:  # straight to the primary of the key's slot
        node = redis_connections.cluster.node(slot_of(key))
        pipe = PipelinedRedis(node.host, node.port)
    try:
        replies = await asyncio.gather(*(pipe.execute("INCR", key) for _ in range(2000)))
        assert replies == list(range(1, 2001))
        assert int(await redis.get(key)) == 2000  # the same database as the pool's
    finally:
        await redis.delete(key)
        await pipe.close()


def each_server(connections: RedisConnections) -> list[aioredis.Redis]:
    """The one server, or every primary of a cluster (each has its own libraries)."""
    if connections.cluster is None:
        return [connections.redis]
    return [node.redis for node in connections.cluster.primaries]


async def test_a_lost_function_library_is_loaded_again(
    config: Config, pipelined: RedisConnections, ledger: Ledger, org: Org
) -> None:
    hot = HotPath.using(pipelined, ledger, config)
    await hot.start()
    assert await hot.scripts_loaded()
    first = await hot.consume(org.id, org.admin_key_id, action="generate_content", units=1)
    assert first.status is Status.OK
    for server in each_server(pipelined):  # as after a FUNCTION FLUSH
        await server.function_delete(hot._library.name)
    assert not await hot.scripts_loaded()
    results = await asyncio.gather(
        *(hot.consume(org.id, org.admin_key_id, action="generate_content", units=1) for _ in range(10))
    )
    assert [r.status for r in results] == [Status.OK] * 10
    assert (await hot.balance(org.id)).payload["balance"] == 89_000  # each charged once
    assert await hot.scripts_loaded()


async def test_starting_drops_the_libraries_of_earlier_versions(
    config: Config, pipelined: RedisConnections, redis_connections: RedisConnections, ledger: Ledger, org: Org
) -> None:
    """A deploy adds a library per version; a new process deletes the ones no process
    started with for a day (recent ones stay: a rolling deploy, or other versions sharing
    the server), and a process still running a deleted version loads its own again.
    On a cluster, on every primary."""
    redis = pipelined.redis
    servers = each_server(pipelined)
    old = "credits_000000000000"
    recent = f"credits_{uuid.uuid4().hex[:12]}"
    unrelated = "billing_helpers_test"
    for server in servers:
        await server.function_load(
            f"#!lua name={recent}\nredis.register_function('{recent}_f', function() return 1 end)", replace=True
        )
        await server.function_load(
            f"#!lua name={old}\nredis.register_function('credits_old_000000000000', function() return 1 end)",
            replace=True,
        )
        await server.function_load(
            f"#!lua name={unrelated}\nredis.register_function('billing_helpers_test_f', function() return 1 end)",
            replace=True,
        )
    await redis.set(f"credits-function-library:{recent}", 1, ex=60)  # a process started with it a moment ago
    await redis.delete(f"credits-function-library:{old}")
    hot = HotPath.using(pipelined, ledger, config)
    running = HotPath.using(redis_connections, ledger, config)  # as if an older process
    try:
        await running.start()
        await hot.start()
        for server in servers:
            names = {lib[b"library_name"].decode() for lib in map(_pairs, await server.function_list())}
            assert old not in names and unrelated in names and hot._library.name in names
            assert recent in names  # in use: kept
            await server.function_delete(hot._library.name)  # the library the other one uses goes
        r = await running.consume(org.id, org.admin_key_id, action="generate_content", units=1)
        assert r.status is Status.OK and await running.scripts_loaded()
    finally:
        for server in servers:
            await server.function_delete(unrelated)
            await server.function_delete(recent)


def _pairs(entry: list[object]) -> dict[object, object]:
    return dict(zip(entry[::2], entry[1::2], strict=True))
