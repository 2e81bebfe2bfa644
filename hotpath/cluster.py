"""The hot path on a Redis Cluster: which primary serves a slot, and a connection to each.

Every script call of an organization names only keys of its partition's hash tag
(`{crN}`), so a call goes to exactly one primary: the one the slot map names for the
slot of `{crN}`. Per primary there is a redis-py client (a pool, with no retries of its
own: a script that may have run is never sent again) and, in the sidecar, an
auto-pipelined connection (hotpath/connection.py). Everything else (streams, leases,
the settler's single-key commands) uses redis-py's RedisCluster, whose retries are
harmless for those commands.

Redirects, as the cluster specification says:
- `MOVED <slot> <host:port>`: the slot lives elsewhere now. The command did not run:
  the map is corrected for that slot (and read again in the background), and the
  command is sent to the new owner.
- `ASK <slot> <host:port>`: the slot is being migrated and this key is at the target
  already. The command did not run: it is sent to the target once, right after
  `ASKING` on the same connection; the map is left as it is.
- `TRYAGAIN`: a multi-key call during a migration whose keys are split between the two
  nodes. Nothing ran: a few short waits, then the caller gets the error (a 503 with
  nothing charged).
- `CLUSTERDOWN`: the caller gets it (a 503 with nothing charged).
A connection that fails (a primary killed) fails its calls as on one Redis (not sent:
503 with nothing charged; sent: outcome unknown), and the map is read again, so that
calls go to the replica promoted in its place as soon as the cluster says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ResponseError

from hotpath.connection import PipelinedRedis

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIRECTS_MAX = 5  # MOVED / ASK followed per call
TRYAGAIN_WAITS_S = (0.01, 0.02, 0.05, 0.1)  # then TRYAGAIN reaches the caller
REFRESH_INTERVAL_MIN_S = 0.2  # a failing node asks for the map at most this often


class ClusterConfigError(ValueError):
    """REDIS_URL cannot name a cluster this way (a database index, say)."""


def slot_of(tag: str) -> int:
    """The hash slot of a key with this hash tag (`{cr7}` and `x:{cr7}:y` agree)."""
    return int(key_slot(tag.encode()))


def redirect(exc: ResponseError) -> tuple[str, int, str, int] | None:
    """(MOVED|ASK, slot, host, port) of a redirect error; None for any other error."""
    words = str(exc).split()
    if len(words) != 3 or words[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = words[2].rpartition(":")
    try:
        return words[0], int(words[1]), host, int(port)
    except ValueError:
        return None


def _busy_with_migration(exc: ResponseError) -> bool:
    return str(exc).startswith("TRYAGAIN")


async def is_cluster(url: str) -> bool:
    """Whether the server at `url` runs in cluster mode (asked, not configured)."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        info = await client.info("cluster")
    finally:
        await client.aclose()
    return bool(int(info.get("cluster_enabled", 0) or 0))


def check_cluster_url(url: str) -> None:
    """A cluster has database 0 only: a REDIS_URL naming another is a mistake to say."""
    db = parse_url(url).get("db")
    if db not in (None, 0, "0", ""):
        raise ClusterConfigError(
            f"REDIS_URL names database {db}, but it points at a Redis Cluster, which has database 0 only:"
            f" drop the /{db} (use REDIS_KEY_PREFIX to keep several deployments apart)"
        )


@dataclass(eq=False)
class Node:
    """One server of the cluster, with the hot path's connections to it."""

    host: str
    port: int
    redis: aioredis.Redis  # pooled, no retries (script calls, WAITAOF, per-node admin)
    pipe: PipelinedRedis | None  # the sidecar's auto-pipelined connection

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        if self.pipe is not None:
            await self.pipe.close()
        await self.redis.aclose()


class Cluster:
    """The slot map of one cluster and a Node per server seen in it."""

    def __init__(
        self,
        url: str,
        *,
        pipelined: bool = False,
        timeout_s: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        check_cluster_url(url)
        options = parse_url(url)
        self.url = url
        self.pipelined = pipelined
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._username = options.get("username")
        self._password = options.get("password")
        self._tls = url.startswith("rediss://")
        seed = (str(options.get("host", "127.0.0.1")), int(options.get("port", 6379)))
        self._seeds: list[tuple[str, int]] = [seed]
        self._nodes: dict[tuple[str, int], Node] = {}
        self._slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._primaries: list[Node] = []
        self._replicas: list[Node] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    # -- the map ------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read the slot map from the first server that answers (the seeds, then every
        server seen so far); ConnectionError when none does."""
        errors: list[str] = []
        for host, port in dict.fromkeys([*self._seeds, *self._nodes]):
            node = self._node(host, port)
            try:
                rows = await node.redis.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except (aioredis.RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            self._apply(rows, host)
            self._refreshed_at = time.monotonic()
            return
        raise aioredis.ConnectionError("no server of the cluster answered CLUSTER SLOTS: " + "; ".join(errors))

    def _apply(self, rows: list[Any], asked: str) -> None:
        slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        primaries: dict[str, Node] = {}
        replicas: dict[str, Node] = {}
        for row in rows:
            start, end, primary, *others = row
            node = self._from_row(primary, asked)
            primaries[node.address] = node
            for i in range(int(start), int(end) + 1):
                slots[i] = node
            for other in others:
                replica = self._from_row(other, asked)
                replicas[replica.address] = replica
        self._slots = slots
        self._primaries = list(primaries.values())
        self._replicas = [r for a, r in replicas.items() if a not in primaries]

    def _from_row(self, entry: list[Any], asked: str) -> Node:
        raw = entry[0]
        host = raw.decode() if isinstance(raw, bytes) else str(raw)
        if host in ("", "?"):  # the server does not know its own address: the one we asked
            host = asked
        return self._node(host, int(entry[1]))

    def _node(self, host: str, port: int) -> Node:
        node = self._nodes.get((host, port))
        if node is None:
            ssl_context = ssl.create_default_context() if self._tls else None
            redis = aioredis.Redis(
                host=host,
                port=port,
                username=self._username,
                password=self._password,
                ssl=self._tls,
                max_connections=self.max_connections,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),  # never again: a script sent may have run
            )
            pipe = None
            if self.pipelined:
                pipe = PipelinedRedis(
                    host,
                    port,
                    username=self._username,
                    password=self._password,
                    ssl_context=ssl_context,
                    timeout_s=self.timeout_s,
                )
            node = Node(host, port, redis, pipe)
            self._nodes[(host, port)] = node
        return node

    def node(self, slot: int) -> Node:
        """The primary the map names for `slot` (ConnectionError when none does)."""
        node = self._slots[slot]
        if node is None:
            self.refresh_soon()
            raise aioredis.ConnectionError(f"no primary serves slot {slot} (the cluster is not covering it)")
        return node

    @property
    def primaries(self) -> list[Node]:
        return list(self._primaries)

    @property
    def servers(self) -> list[Node]:
        """Primaries and replicas: a replica is promoted on failover, with its settings."""
        return [*self._primaries, *self._replicas]

    def refresh_soon(self) -> None:
        """Read the map again in the background (at most every REFRESH_INTERVAL_MIN_S)."""
        if self._refreshing is not None or time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_MIN_S:
            return
        self._refreshing = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the next failure asks again
            log.warning("cluster_refresh_failed", extra={"error": str(exc)})
            self._refreshed_at = time.monotonic()
        finally:
            self._refreshing = None

    # -- calls --------------------------------------------------------------------
    async def route(self, slot: int, send: Callable[[Node, bool], Awaitable[T]]) -> T:
        """send(node, asking) on the primary of `slot`, following MOVED and ASK (the
        command did not run when either comes back) and waiting out a short TRYAGAIN.
        `asking`: send ASKING first, on the same connection."""
        node = self.node(slot)
        asking = False
        waits = iter(TRYAGAIN_WAITS_S)
        redirects = 0
        while True:
            try:
                return await send(node, asking)
            except ResponseError as exc:
                moved = redirect(exc)
                if moved is None:
                    if _busy_with_migration(exc):
                        wait_s = next(waits, None)
                        if wait_s is not None:
                            await asyncio.sleep(wait_s)
                            continue
                    raise
                redirects += 1
                if redirects > REDIRECTS_MAX:
                    raise
                kind, moved_slot, host, port = moved
                target = self._node(host or node.host, port)
                if kind == "MOVED":
                    self._slots[moved_slot] = target
                    self.refresh_soon()
                    asking = False
                else:
                    asking = True
                node = target
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                self.refresh_soon()  # a primary gone: its replica may be serving by now
                raise

    async def on_each(self, nodes: list[Node], *args: Any) -> list[Any]:
        """One command on each of `nodes` (not pipelined), in order."""
        return [await n.redis.execute_command(*args) for n in nodes]  # type: ignore[no-untyped-call]

    def client(self, **kwargs: Any) -> RedisCluster:
        """redis-py's cluster client for everything that is not a script call."""
        client: RedisCluster = RedisCluster.from_url(self.url, **kwargs)
        return client

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        for node in list(self._nodes.values()):
            with contextlib.suppress(Exception):
                await node.close()
        self._nodes.clear()


async def plain_call(redis: aioredis.Redis, asking: bool, *words: Any) -> Any:
    """One command over a redis-py client; after ASKING on the same connection when
    `asking` (an ASK redirect)."""
    if not asking:
        return await redis.execute_command(*words)  # type: ignore[no-untyped-call]
    async with redis.client() as connection:
        await connection.execute_command("ASKING")  # type: ignore[no-untyped-call]
        return await connection.execute_command(*words)  # type: ignore[no-untyped-call]
