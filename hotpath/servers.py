"""Opening the hot path's connections to Redis: one server, or a cluster (asked of the
server, never configured), behind the same three handles.

    redis    redis-py for everything but script calls: a `Redis`, or on a cluster a
             `RedisCluster` (it routes each single-slot command by its key; typed as
             `Redis`, whose commands the rooms use)
    pipe     one server: the auto-pipelined connection script calls share (sidecar)
    cluster  a cluster: the slot map and a connection per primary (hotpath/cluster.py)

Every component opens Redis through `open_redis`, so that none of them needs to know
which it is talking to.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from core.errors import Unavailable
from hotpath.cluster import Cluster, check_cluster_url, is_cluster
from hotpath.connection import PipelinedRedis


@dataclass
class RedisConnections:
    redis: aioredis.Redis
    pipe: PipelinedRedis | None = None
    cluster: Cluster | None = None

    async def close(self) -> None:
        if self.pipe is not None:
            await self.pipe.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self.redis.aclose()


async def open_redis(
    url: str,
    *,
    pipelined: bool = False,
    timeout_s: float = 5.0,
    max_connections: int = 64,
    **redis_kwargs: Any,
) -> RedisConnections:
    """Connect to the Redis (or the cluster) at `url`. pipelined: script calls over
    auto-pipelined connections (the sidecar). Unavailable when Redis cannot be asked
    which it is; ClusterConfigError for a cluster URL naming a database."""
    try:
        clustered = await is_cluster(url)
    except (aioredis.RedisError, OSError) as exc:
        raise Unavailable(f"redis: {exc}") from exc
    if not clustered:
        redis = aioredis.Redis.from_url(url, max_connections=max_connections, **redis_kwargs)
        pipe = PipelinedRedis.from_url(url, timeout_s=timeout_s) if pipelined else None
        return RedisConnections(redis, pipe)
    check_cluster_url(url)
    cluster = Cluster(url, pipelined=pipelined, timeout_s=timeout_s, max_connections=max_connections)
    try:
        await cluster.refresh()
    except (aioredis.RedisError, OSError) as exc:
        await cluster.close()
        raise Unavailable(f"redis cluster: {exc}") from exc
    client = cluster.client(max_connections=max_connections, **redis_kwargs)
    # (RedisCluster is not a Redis subclass; the commands the rooms call have the same
    # signatures on both)
    return RedisConnections(cast(aioredis.Redis, client), None, cluster)


async def open_redis_waiting(url: str, stop: asyncio.Event, **kwargs: Any) -> RedisConnections | None:
    """open_redis, trying again every second while Redis cannot be reached, until
    `stop` (then None): a settler starts, and waits, while Redis is down."""
    while True:
        try:
            return await open_redis(url, **kwargs)
        except Unavailable:
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
                return None
            except TimeoutError:
                continue
