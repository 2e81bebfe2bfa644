"""The typed door to the scripts: every Redis script call goes through `HotPath`.

Other components (the CLI, settlement, billing) use this class and never build keys or
call scripts themselves. Amounts here are integer millicredits; decimals live at the
HTTP edge.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import functools
import hashlib
import itertools
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions
from redis.exceptions import ResponseError

import lua
from core.config import Config, Durability
from core.errors import OutcomeUnknown, Unavailable
from core.periods import period_bounds, period_starts_ms
from hotpath.cluster import Cluster, Node, plain_call, slot_of
from hotpath.connection import NotSent, PipelinedRedis, ReplyLost, pack_command
from hotpath.replay import entry_after, replay
from hotpath.servers import RedisConnections
from hotpath.snapshot import (
    CredSnapshot,
    DeptSnapshot,
    GrantSnapshot,
    HoldSnapshot,
    Snapshot,
    SnapshotSource,
)
from lua import Status

log = logging.getLogger(__name__)

__all__ = [
    "CredSnapshot",
    "DeptSnapshot",
    "GrantSnapshot",
    "HoldSnapshot",
    "Snapshot",
    "SnapshotSource",
    "Unavailable",
    "period_bounds",
    "period_starts_ms",
]
UNSETTLED_SCAN_MAX = 200_000
ORG_KEYS_CACHE_MAX = 4096  # organizations whose key names are kept ready
DAY_MS = 86_400_000
RECORD_NAMES_MARK = "idempotency-names-since"  # see HotPath._read_record_names_mark
DURABILITY_WAIT_MS = 1000  # longest WAITAOF per call; a short wait is logged, never undone
# Answered OK, these wait for the fsync (DURABILITY local/replica) before answering. A
# grant push waits too: its outbox row is deleted once it is confirmed. Reads (balance,
# request tokens) do not: what they may write (an expiry whose time has come) is done
# again, identically and with the same event ids, after a crash.
DURABLE_OPERATIONS = frozenset(
    {"consume", "consume_batch", "consume_group", "reserve", "release", "debit", "grant", "check_consume"}
)

FIXED_KEYS = (
    "acct",
    "grem",
    "gq",
    "gx",
    "costs",
    "depts",
    "creds",
    "holds",
    "hx",
    "hclosed",
    "gapplied",
)
N_ORG_KEYS = len(FIXED_KEYS) + 1  # and the usage stream: KEYS[1..12] of every script (see lua/lib.lua)
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class DurabilityError(RuntimeError):
    """Redis cannot give the durability the configuration asks for."""


class LayoutError(Unavailable):
    """This process's USAGE_PARTITIONS is not the one the cache is laid out in (or the
    cache is being resized): nothing is loaded, nothing charged."""

    @classmethod
    def of(cls, mine: int, theirs: int) -> LayoutError:
        if theirs == 0:
            return cls("the cache is being resized (credits partitions resize): try again once it is done")
        return cls(
            f"this process runs with USAGE_PARTITIONS={mine}, but the cache is laid out in {theirs} partitions:"
            f" every process must use the same count (restart this one with USAGE_PARTITIONS={theirs},"
            " or change it for all with `credits partitions resize`)"
        )


class EvictionPolicyError(RuntimeError):
    """Redis would evict keys under memory pressure: credits would vanish."""


async def check_eviction_policy(redis: aioredis.Redis, *, where: str = "Redis") -> None:
    """Refuse a Redis that may evict keys (an evicted balance or usage entry is lost money)."""
    policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
    if policy != "noeviction":
        raise EvictionPolicyError(
            f"{where} runs with maxmemory-policy={policy}; the credits cache needs noeviction "
            "(an evicted balance or usage entry is lost money). Set it and restart."
        )


class Result(msgspec.Struct, frozen=True):
    """A script's answer: its status and payload (integers are millicredits).
    (A Struct: built on every call, and ~5x cheaper to build than a frozen dataclass.)"""

    status: Status
    payload: dict[str, Any]


_LIBRARY_NAME = re.compile(r"credits_[0-9a-f]{12}")  # lua.library()'s names
LIBRARY_IN_USE_S = 86_400  # a library version no process started with for this long is pruned


def _library_mark(name: str) -> str:
    """The key that says a library version is in use (one per server: functions are)."""
    return f"credits-function-library:{name}"


_STATUSES = {int(s): s for s in Status}  # a dict lookup, not an Enum call, per reply


def _result(raw: Any) -> Result:
    """A script's reply {status, msgpack payload} as a Result."""
    status = _STATUSES.get(raw[0]) or Status(raw[0])  # the Enum call raises on an unknown code
    payload = _decode(raw[1])
    if not isinstance(payload, dict):  # an empty Lua table packs as an array
        payload = {}
    return Result(status, payload)


class BatchItem(NamedTuple):
    """One item of a batch consume (a tuple: a batch builds thousands of them)."""

    action: str
    units: int
    department_id: str
    metadata: str  # JSON text, "" = none
    idempotency_key: str | None
    fingerprint: str  # of the item's parameters; read only when it has a key


class GroupRequest(NamedTuple):
    """One consume of a group commit (see consume_group): what HotPath.consume takes."""

    cred: str
    action: str
    units: int
    department_id: str
    metadata: str  # JSON text, "" = none
    idempotency_key: str | None
    fingerprint: str  # of the request's parameters; read only when it has a key
    assigned: bool  # the key is one the sidecar assigned (kept IDEMPOTENCY_AUTO_TTL_S)
    event_id: str  # its usage event's id (and the answer's id)


def group_results(raw: Any) -> list[Result]:
    """consume_group's reply {OK, status, payload, status, payload, ...} as one Result
    per request, in order."""
    results = []
    for i in range(1, len(raw), 2):
        code = raw[i]
        payload = _decode(raw[i + 1])
        if isinstance(payload, list) and len(payload) >= 3:  # a charge's answer, as its record keeps it
            payload = {"id": payload[0], "credits": payload[1], "balance": payload[2], "available": payload[-1]}
        results.append(Result(_STATUSES.get(code) or Status(code), payload if isinstance(payload, dict) else {}))
    return results


def batch_results(payload: dict[str, Any], items: Sequence[BatchItem]) -> list[dict[str, Any]]:
    """The per-item results of consume_batch's compact answer, in order:
    {i, ok, id, credits, replay?} or {i, ok=False, err, need?, have?}."""
    if "results" in payload:  # answered (and stored for replays) by an earlier version
        return list(payload["results"])
    base = payload["b"]
    costs = payload["c"] or {}  # an empty Lua table packs as an array
    failed = {int(f["i"]): f for f in payload["f"]}
    replayed = {int(r[0]): r for r in payload["r"]}
    results: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if i in failed:
            results.append({**failed[i], "ok": False})
        elif i in replayed:
            _, event_id, credits = replayed[i]
            results.append({"i": i, "ok": True, "id": event_id, "credits": credits, "replay": True})
        else:
            results.append({"i": i, "ok": True, "id": f"{base}-{i}", "credits": costs[item.action] * item.units})
    return results


def partition_of(organization_id: str, partitions: int) -> int:
    """The usage partition (and so the hash tag) of an organization."""
    return zlib.crc32(organization_id.encode()) % partitions


def fingerprint(*parts: object) -> str:
    """Stable digest of a request's parameters, to tell a retry from a reuse."""
    return hashlib.sha256(_encode(parts)).hexdigest()[:32]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# Call ids (and the event ids derived from them) must never repeat: the ledger drops an
# event whose id it already holds. 80 random bits per process (drawn again in a forked
# child) and a counter give that without a uuid4 (a getrandom call) per request.
_id_prefix = ""
_id_counter = itertools.count()


def _reseed_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = secrets.token_hex(10)
    _id_counter = itertools.count()


_reseed_ids()
os.register_at_fork(after_in_child=_reseed_ids)


def new_id() -> str:
    """A unique 32-hex-digit id (the shape of uuid4().hex)."""
    return f"{_id_prefix}{next(_id_counter):012x}"


class _PeriodStarts:
    """period_starts_ms, computed once per UTC day (a day is 86,400,000 ms in UTC)."""

    def __init__(self) -> None:
        self.day_start_ms = 0
        self.starts = period_starts_ms(0)

    def __call__(self, now: int) -> tuple[int, int, int]:
        if not 0 <= now - self.day_start_ms < DAY_MS:
            self.starts = period_starts_ms(now)
            self.day_start_ms = self.starts[0]
        return self.starts


class Mode(enum.Enum):
    """How scripts reach Redis: a function library (Redis >= 7) or EVALSHA."""

    FUNCTIONS = "functions"
    EVALSHA = "evalsha"


def _words(words: tuple[Any, ...]) -> bytes:
    """RESP of some words of a command, without the array header (to be joined)."""
    packed = pack_command(words)
    return packed[packed.index(b"\r\n") + 2 :]


def _decodable(raw_events: Sequence[bytes]) -> list[dict[str, Any]]:
    """The events a load replays; one that cannot be decoded is left out (settlement
    quarantines it; it said nothing a load could apply)."""
    events = []
    for raw in raw_events:
        try:
            event = _decode(raw)
        except msgspec.DecodeError:
            log.warning("load_skipped_undecodable_event", extra={"bytes": len(raw)})
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _missing_code(exc: ResponseError) -> bool:
    """Redis lost (or never had) our code: loading it and calling again is safe,
    because the call did not run."""
    text = str(exc)
    return text.startswith("NOSCRIPT") or "Function not found" in text


# Operations that charge or move credits: when one of them was sent and no answer came,
# the caller must be told it may have taken effect (OutcomeUnknown).
CHARGING_OPERATIONS = frozenset(
    {"consume", "consume_batch", "consume_group", "reserve", "release", "debit", "check_consume"}
)


class NotDurable(OutcomeUnknown):
    """Applied in memory, but Redis did not confirm it on disk in time (DURABILITY)."""

    answer = (
        "this request was charged, but Redis has not confirmed it on disk yet, so a crash now could"
        " lose it. Retry it with the same Idempotency-Key: the retry returns the first result"
        " (charging nothing again) once it is on disk"
    )


def _unreachable(exc: BaseException, operation: str) -> Unavailable:
    """What a failed call means for its caller. NotSent (the pipe never wrote it) and
    redis-py's errors while connecting or writing: it did not run. Anything else (a
    reply lost or late): it may have run, which matters for the operations that charge."""
    text = str(exc)
    not_run = isinstance(exc, NotSent) or (
        not isinstance(exc, ReplyLost)
        and isinstance(exc, (aioredis.ConnectionError, aioredis.TimeoutError))
        and ("connecting" in text or "writing" in text)
    )
    if not_run:
        return Unavailable(f"redis: {exc}", answer="Redis could not be reached; nothing was charged")
    if operation in CHARGING_OPERATIONS:
        return OutcomeUnknown(f"redis: {exc}")
    return Unavailable(f"redis: {exc}", answer="Redis did not answer in time; nothing was charged")


# Errors with which Redis refuses a command before running it, and what they mean.
_REFUSALS = {
    "OOM": "Redis is full (maxmemory reached, noeviction); nothing was charged",
    "BUSY": "Redis is busy running another script; nothing was charged",
    "LOADING": "Redis is loading its data after a restart; nothing was charged",
    "READONLY": "the Redis server is a read-only replica; nothing was charged",
    "MASTERDOWN": "the Redis replica lost its primary; nothing was charged",
    "CLUSTERDOWN": "the Redis cluster is down; nothing was charged",
    "TRYAGAIN": "the Redis cluster is moving this organization's data; nothing was charged",
    "NOREPLICAS": "too few Redis replicas are reachable; nothing was charged",
}


# redis-py turns some of those into classes of their own and drops the prefix.
_REFUSAL_CLASSES = (
    (redis_exceptions.OutOfMemoryError, "OOM"),
    (redis_exceptions.BusyLoadingError, "LOADING"),
    (redis_exceptions.ReadOnlyError, "READONLY"),
)


def _refused_before_running(exc: ResponseError) -> str | None:
    for kind, prefix in _REFUSAL_CLASSES:
        if isinstance(exc, kind):
            return _REFUSALS[prefix]
    return _REFUSALS.get(str(exc).split(" ", 1)[0])


def _no_functions(exc: ResponseError) -> bool:
    text = str(exc).lower()
    return "unknown command" in text and ("fcall" in text or "function" in text)


class HotPath:
    """Atomic credit operations on one organization, one Lua script each.

    Scripts run as functions of one Redis function library (FCALL), or through EVALSHA
    on servers without functions. With `pipe` (the sidecar), every script call goes
    over one auto-pipelined connection (hotpath/connection.py); without it (the settler,
    the CLI), over the redis-py client. Everything else uses the redis-py client.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        source: SnapshotSource,
        *,
        partitions: int,
        default_rate_per_s: float,
        default_burst: float,
        idempotency_ttl_s: int,
        assigned_idempotency_ttl_s: int = 300,
        durability: Durability = Durability.ASYNC,
        key_prefix: str = "cr",
        pipe: PipelinedRedis | None = None,
        cluster: Cluster | None = None,
        mode: Mode = Mode.FUNCTIONS,
    ) -> None:
        self.redis = redis
        # DURABILITY local/replica: each call is followed by WAITAOF on its own
        # connection (_send_durably), which the shared pipe cannot do.
        self.pipe = pipe if durability is Durability.ASYNC and cluster is None else None
        # On a cluster: script calls go to the primary of their slot (hotpath/cluster.py),
        # over its pipe when the cluster has them.
        self.cluster = cluster
        self._pipelined = self.pipe is not None or (
            cluster is not None and cluster.pipelined and durability is Durability.ASYNC
        )
        self.key_prefix = key_prefix
        self.source = source
        self.partitions = partitions
        self.default_rate_per_s = default_rate_per_s
        self.default_burst = default_burst
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.assigned_idempotency_ttl_ms = assigned_idempotency_ttl_s * 1000
        self.durability = durability
        self._loading: dict[str, asyncio.Future[Result]] = {}
        self._library = lua.library()
        self._sources = {name: lua.source(name) for name in lua.SCRIPTS}
        self._shas = {name: hashlib.sha1(code.encode()).hexdigest() for name, code in self._sources.items()}  # noqa: S324 (Redis names scripts by sha1)
        self._installing: asyncio.Future[None] | None = None
        # Until start() has read when these record names were first used, look up the
        # names before as well (safe: an extra read).
        self._legacy_until_ms: float = float("inf")
        self._period_starts = _PeriodStarts()
        self._org_keys = functools.lru_cache(maxsize=ORG_KEYS_CACHE_MAX)(self._build_org_keys)
        self._command_head = functools.lru_cache(maxsize=4 * ORG_KEYS_CACHE_MAX)(self._pack_command_head)
        self._org_word = functools.lru_cache(maxsize=ORG_KEYS_CACHE_MAX)(lambda org: _words((org,)))
        self._slots = [slot_of(f"{{cr{p}}}") for p in range(partitions)]
        self._credential_words = functools.lru_cache(maxsize=ORG_KEYS_CACHE_MAX)(self._pack_credential_words)
        self._ttl_words = {ttl: _words((ttl,)) for ttl in (self.idempotency_ttl_ms, self.assigned_idempotency_ttl_ms)}
        self._set_mode(mode)

    @classmethod
    def from_config(
        cls,
        redis: aioredis.Redis,
        source: SnapshotSource,
        config: Config,
        *,
        pipe: PipelinedRedis | None = None,
        cluster: Cluster | None = None,
    ) -> HotPath:
        return cls(
            redis,
            source,
            partitions=config.usage_partitions,
            default_rate_per_s=config.rate_limit_per_s,
            default_burst=config.rate_limit_burst,
            idempotency_ttl_s=config.idempotency_ttl_s,
            assigned_idempotency_ttl_s=config.idempotency_auto_ttl_s,
            durability=config.durability,
            key_prefix=config.redis_key_prefix,
            pipe=pipe,
            cluster=cluster,
        )

    @classmethod
    def using(cls, connections: RedisConnections, source: SnapshotSource, config: Config) -> HotPath:
        """The hot path over what open_redis opened (one server or a cluster)."""
        return cls.from_config(connections.redis, source, config, pipe=connections.pipe, cluster=connections.cluster)

    # -- keys ---------------------------------------------------------------------
    def partition(self, organization_id: str) -> int:
        return partition_of(organization_id, self.partitions)

    def tag(self, organization_id: str) -> str:
        return f"{{cr{self.partition(organization_id)}}}"

    def stream_key(self, partition: int) -> str:
        return f"{self.key_prefix}:{{cr{partition}}}:usage"

    def _build_org_keys(self, organization_id: str) -> tuple[str, ...]:
        tag = self.tag(organization_id)
        keys = [f"{self.key_prefix}:{tag}:o:{organization_id}:{k}" for k in FIXED_KEYS]
        keys.append(self.stream_key(self.partition(organization_id)))
        return tuple(keys)

    def _pack_command_head(self, name: str, organization_id: str, extra_keys: int, args: int) -> bytes:
        """RESP of a call up to its organization's keys: the array header (the number
        of words), the verb, the function (or sha), the number of keys, the 11 keys."""
        numkeys = N_ORG_KEYS + extra_keys
        words = (self._verb, self._names[name], numkeys, *self._org_keys(organization_id))
        packed = pack_command(words)
        return b"*%d\r\n" % (len(words) + extra_keys + args) + packed[packed.index(b"\r\n") + 2 :]

    def org_keys(self, organization_id: str) -> list[str]:
        return list(self._org_keys(organization_id))

    def org_key(self, organization_id: str, name: str) -> str:
        """One of an organization's keys by its name in FIXED_KEYS (acct, creds, ...)."""
        return self._org_keys(organization_id)[FIXED_KEYS.index(name)]

    def idempotency_key(self, organization_id: str, key: str) -> str:
        """An idempotency record's key: the partition's tag, the organization's crc32 (all
        a resize needs to find the record's new partition), a 128-bit digest of the
        organization and the key. 42 bytes where the name before took 93."""
        org = organization_id.encode()
        crc = zlib.crc32(org)
        digest = base64.urlsafe_b64encode(hashlib.sha256(org + b"\0" + key.encode()).digest()[:16])
        return f"{self.key_prefix}:{{cr{crc % self.partitions}}}:i:{crc:08x}:{digest[:22].decode()}"

    def legacy_idempotency_key(self, organization_id: str, key: str) -> str:
        """The name an idempotency record had before (looked up while such records may live)."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return f"{self.key_prefix}:{self.tag(organization_id)}:o:{organization_id}:idem:{digest}"

    def idempotency_pattern(self, organization_id: str) -> str:
        """SCAN pattern of an organization's idempotency records (and of any other whose
        crc32 is the same: for tests and tools, never to delete in production)."""
        crc = zlib.crc32(organization_id.encode())
        return f"{self.key_prefix}:{{cr{crc % self.partitions}}}:i:{crc:08x}:*"

    def _twin(self, organization_id: str, key: str, assigned: bool = False) -> str | None:
        """The record's name before, while records under it may live: a client's key only
        (a key the sidecar assigns is new), until IDEMPOTENCY_TTL_S after the first start
        with these names (see start)."""
        if assigned or now_ms() >= self._legacy_until_ms:
            return None
        return self.legacy_idempotency_key(organization_id, key)

    def partition_key(self, partition: int, name: str) -> str:
        """Another key of a partition's slot (e.g. the settler's lease)."""
        return f"{self.key_prefix}:{{cr{partition}}}:{name}"

    # -- plumbing -----------------------------------------------------------------
    def _set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode is Mode.FUNCTIONS:
            self._names = dict(self._library.functions)
            verb = "FCALL"
        else:
            self._names = dict(self._shas)
            verb = "EVALSHA"
        self._verb = verb
        if hasattr(self, "_command_head"):
            self._command_head.cache_clear()  # encoded with the other verb

    def _execute(self, *args: Any) -> Awaitable[Any]:
        """A command for the one server (not a cluster: see _on_each)."""
        if self.pipe is not None:
            return self.pipe.execute(*args)
        return self.redis.execute_command(*args)  # type: ignore[no-untyped-call]

    def _primaries(self) -> list[tuple[str, aioredis.Redis | None]]:
        """(name, client) of every primary; one entry (None: _execute) off a cluster."""
        if self.cluster is None:
            return [("Redis", None)]
        return [(f"Redis {n.address}", n.redis) for n in self.cluster.primaries]

    def _servers(self) -> list[tuple[str, aioredis.Redis]]:
        """(name, client) of every server whose settings matter: on a cluster, the
        replicas too (one of them is a primary after a failover)."""
        if self.cluster is None:
            return [("Redis", self.redis)]
        return [(f"Redis {n.address}", n.redis) for n in self.cluster.servers]

    async def _on(self, client: aioredis.Redis | None, *args: Any) -> Any:
        if client is None:
            return await self._execute(*args)
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def check_servers(self) -> None:
        """Refuse servers that would lose money: a policy that evicts keys, anywhere;
        with DURABILITY local or replica, a server without an append-only file (every
        charge would wait for an fsync that never comes). On a cluster: every server."""
        try:
            for where, client in self._servers():
                await check_eviction_policy(client, where=where)
                if self.durability is not Durability.ASYNC:
                    appendonly = (await client.config_get("appendonly")).get("appendonly")
                    if appendonly != "yes":
                        raise DurabilityError(
                            f"DURABILITY={self.durability.value} needs Redis with appendonly yes ({where} runs with"
                            f" appendonly {appendonly}): every charge waits for its own fsync (WAITAOF)"
                        )
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc

    async def layout(self) -> dict[int, str]:
        """The layout mark of each of this process's partition tags that has one: how
        many partitions the cache there is laid out in ("0": being resized)."""
        return await self.layout_marks(self.partitions)

    async def layout_marks(self, upto: int) -> dict[int, str]:
        """layout() for the tags 0 .. upto - 1."""
        marks: dict[int, str] = {}
        for p in range(upto):
            raw = await self.redis.get(self.partition_key(p, "layout"))
            if raw is not None:
                marks[p] = raw.decode() if isinstance(raw, bytes) else str(raw)
        return marks

    async def set_layout_marks(self, partitions: range, value: str | None) -> None:
        """Mark these partitions' tags as laid out in `value` partitions ("0": being
        resized, every load refused; None: no mark)."""
        for p in partitions:
            if value is None:
                await self.redis.delete(self.partition_key(p, "layout"))
            else:
                await self.redis.set(self.partition_key(p, "layout"), value)

    def _scan_clients(self) -> list[aioredis.Redis]:
        if self.cluster is None:
            return [self.redis]
        return [node.redis for node in self.cluster.primaries]

    async def relayout(self, partitions: int) -> tuple[int, int]:
        """Offline (credits partitions resize): every organization's cached state leaves
        the cache (it loads again from the ledger, under its new partition), and its
        idempotency records move to the tag of its partition among `partitions`, with
        their time to live (records under the names before as well). One SCAN of the
        keyspace (of each primary) per kind. Returns (keys dropped, idempotency records moved)."""
        dropped = moved = 0
        for client in self._scan_clients():
            async for raw in client.scan_iter(match=f"{self.key_prefix}:{{cr*}}:o:*", count=1000):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                _, sep, rest = key.partition("}:o:")
                org, _, kind = rest.partition(":")
                if not sep or not org:
                    continue
                if not kind.startswith("idem:"):
                    await client.delete(key)
                    dropped += 1
                    continue
                target = f"{self.key_prefix}:{{cr{partition_of(org, partitions)}}}:o:{org}:{kind}"
                moved += await self._move(client, key, target)
            async for raw in client.scan_iter(match=f"{self.key_prefix}:{{cr*}}:i:*", count=1000):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                _, sep, rest = key.partition("}:i:")
                crc, _, digest = rest.partition(":")
                if not sep or len(crc) != 8 or not digest:
                    continue
                target = f"{self.key_prefix}:{{cr{int(crc, 16) % partitions}}}:i:{crc}:{digest}"
                moved += await self._move(client, key, target)
        return dropped, moved

    async def _move(self, client: aioredis.Redis, key: str, target: str) -> int:
        """One key to another name (on a cluster, maybe another node), with its time to live."""
        if target == key:
            return 0
        dump = await client.dump(key)
        ttl_ms = await client.pttl(key)
        if dump is None or ttl_ms == -2:  # expired meanwhile
            return 0
        await self.redis.restore(target, max(0, ttl_ms), dump, replace=True)  # 0: no expiry
        await client.delete(key)
        return 1

    async def check_layout(self) -> None:
        """Refuse to start with another partition count than the cache's: an
        organization would be cached under two partitions (two balances to spend)."""
        for mark in (await self.layout()).values():
            if mark != str(self.partitions):
                raise LayoutError.of(self.partitions, int(mark) if mark.isdigit() else 0)

    async def ping(self) -> None:
        """Every primary answers (readiness); Unavailable naming the first that does not."""
        for where, client in self._primaries():
            try:
                await self._on(client, "PING")
            except (aioredis.RedisError, OSError) as exc:
                raise Unavailable(f"{where}: {exc}") from exc

    async def start(self) -> None:
        """Install the scripts once on every primary (calls then never send the code
        again), and drop the function libraries earlier versions left behind. With
        DURABILITY local or replica, Redis must keep an append-only file (see
        check_servers, which start runs first when durability asks for it)."""
        try:
            if self.durability is not Durability.ASYNC:
                await self.check_servers()
            await self.check_layout()
            await self._read_record_names_mark()
            await self._install()
            if self.mode is Mode.FUNCTIONS:
                await self._prune_libraries()
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc

    async def _read_record_names_mark(self) -> None:
        """When idempotency records were first written under their present names (the
        first start that set the mark): records under the names before live at most
        IDEMPOTENCY_TTL_S after the last process of the version before wrote one, so they
        are looked up as well until then (a rolling deploy gets a day more)."""
        mark = f"{self.key_prefix}:{RECORD_NAMES_MARK}"
        await self.redis.set(mark, now_ms(), nx=True)
        raw = await self.redis.get(mark)
        since = int(raw) if raw is not None else now_ms()
        self._legacy_until_ms = since + self.idempotency_ttl_ms + DAY_MS

    async def _prune_libraries(self) -> None:
        """Each version of the scripts is its own library (credits_<hash>), so a deploy
        adds one. Every start marks its version as in use for LIBRARY_IN_USE_S; a
        library no process has started with for that long is deleted. (A process still
        running it would load it again on its next call, see _call_again, so deleting is
        safe; waiting spares a rolling deploy, and the other versions sharing a server,
        from taking each other's libraries away every time one of them starts.)"""
        mark = _library_mark(self._library.name)
        if self.cluster is None:
            await self._execute("SET", mark, now_ms(), "EX", LIBRARY_IN_USE_S)
        else:
            await self.redis.set(mark, now_ms(), ex=LIBRARY_IN_USE_S)
        for where, client in self._primaries():  # each primary has its own libraries
            try:
                listed = await self._on(client, "FUNCTION", "LIST", "LIBRARYNAME", "credits_*")
            except ResponseError as exc:
                log.warning("function_list_failed", extra={"error": str(exc), "server": where})
                continue
            for entry in listed:
                fields = dict(zip(entry[::2], entry[1::2], strict=True))
                raw = fields.get(b"library_name", fields.get("library_name", b""))
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                if not _LIBRARY_NAME.fullmatch(name) or name == self._library.name:
                    continue
                in_use = (
                    await self._execute("EXISTS", _library_mark(name))
                    if self.cluster is None
                    else await self.redis.exists(_library_mark(name))
                )
                if in_use:
                    continue  # started with recently: still in use
                with contextlib.suppress(ResponseError):  # another process deleted it first
                    await self._on(client, "FUNCTION", "DELETE", name)
                log.info("function_library_pruned", extra={"library": name, "server": where})

    async def _install(self) -> None:
        """Load the function library (or the scripts); concurrent callers share one load."""
        if self._installing is None:
            self._installing = asyncio.ensure_future(self._install_now())
            self._installing.add_done_callback(self._installed)
        await asyncio.shield(self._installing)

    def _installed(self, future: asyncio.Future[None]) -> None:
        self._installing = None
        if not future.cancelled():
            future.exception()  # seen here; every waiter gets it through the shield

    async def _install_now(self) -> None:
        """On every primary (a cluster's replicas get the library by replication)."""
        if self.cluster is not None:
            await self.cluster.refresh()  # a primary added since: it needs the code too
        primaries = self._primaries()
        if self.mode is Mode.FUNCTIONS:
            try:
                for _, client in primaries:
                    try:
                        await self._on(client, "FUNCTION", "LOAD", self._library.code)
                    except ResponseError as exc:
                        if "already exists" not in str(exc):
                            raise
                return
            except ResponseError as exc:
                if not _no_functions(exc):
                    raise
            log.warning("redis_without_functions: falling back to EVALSHA")
            self._set_mode(Mode.EVALSHA)
        for _, client in primaries:
            for code in self._sources.values():
                await self._on(client, "SCRIPT", "LOAD", code)

    async def scripts_loaded(self) -> bool:
        """Whether Redis (every primary of a cluster) holds this version's scripts (readiness)."""
        try:
            for _, client in self._primaries():
                if self.mode is Mode.FUNCTIONS:
                    if not await self._on(client, "FUNCTION", "LIST", "LIBRARYNAME", self._library.name):
                        return False
                elif not all(int(x) for x in await self._on(client, "SCRIPT", "EXISTS", *self._shas.values())):
                    return False
            return True
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc

    def _send(self, name: str, org: str, extra_keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        if self.cluster is not None:
            return self._send_to_slot(name, org, extra_keys, args)
        if self.pipe is not None:
            # Only the per-call words are encoded here; the rest is cached bytes.
            tail = pack_command((*extra_keys, *args))
            head = self._command_head(name, org, len(extra_keys), len(args))
            return self.pipe.execute_packed(head + tail[tail.index(b"\r\n") + 2 :])
        keys = (*self._org_keys(org), *extra_keys)
        if self.durability is not Durability.ASYNC:
            return self._send_durably(name, keys, args)
        return self.redis.execute_command(self._verb, self._names[name], len(keys), *keys, *args)  # type: ignore[no-untyped-call]

    async def _call(self, name: str, org: str, extra_keys: Sequence[str], args: Sequence[Any]) -> Result:
        try:
            raw = await self._send(name, org, extra_keys, args)
        except (ResponseError, aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raw = await self._call_again(exc, name, org, extra_keys, args)
        return _result(raw)

    async def _call_again(
        self, exc: BaseException, name: str, org: str, extra_keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """The rare outcomes of a call: Redis lost (or never had) our code, or cannot be
        reached: Unavailable when the call cannot have run, OutcomeUnknown when it may
        have (see _unreachable)."""
        try:
            if not isinstance(exc, ResponseError):
                raise exc
            refusal = _refused_before_running(exc)
            if refusal is not None:
                raise Unavailable(f"redis: {exc}", answer=refusal) from exc
            if not (_missing_code(exc) or _no_functions(exc)):
                raise exc
            # Redis restarted without its data, or was flushed: the call did not run,
            # so installing the code and calling once more is safe.
            await self._install()
            return await self._send(name, org, extra_keys, args)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as error:
            raise _unreachable(error, name) from error

    def _send_to_slot(self, name: str, org: str, extra_keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        """A script call on a cluster: to the primary of the organization's slot."""
        assert self.cluster is not None
        slot = self._slots[self.partition(org)]
        if self._pipelined:
            tail = pack_command((*extra_keys, *args))
            command = self._command_head(name, org, len(extra_keys), len(args)) + tail[tail.index(b"\r\n") + 2 :]
            return self._route_packed(slot, command)
        keys = (*self._org_keys(org), *extra_keys)
        if self.durability is not Durability.ASYNC:
            return self.cluster.route(slot, lambda node, asking: self._send_durably(name, keys, args, node, asking))
        words = (self._verb, self._names[name], len(keys), *keys, *args)
        return self.cluster.route(slot, lambda node, asking: plain_call(node.redis, asking, *words))

    def _route_packed(self, slot: int, command: bytes) -> Awaitable[Any]:
        assert self.cluster is not None

        def send(node: Node, asking: bool) -> Awaitable[Any]:
            assert node.pipe is not None
            return node.pipe.execute_packed(command, asking=asking)

        return self.cluster.route(slot, send)

    async def _send_durably(
        self, name: str, keys: Sequence[str], args: Sequence[Any], node: Node | None = None, asking: bool = False
    ) -> Any:
        """The call, then (when it changed balances) WAITAOF on the same connection:
        WAITAOF waits for the writes of its own connection only. Not over the pipe:
        WAITAOF blocks its connection until the fsync, and every command queued behind
        it would wait too. An OK that Redis does not confirm on disk in time is not an OK
        (NotDurable: it is applied in memory and could still be lost); a REPLAY first
        writes once on this connection, so that its wait covers the original's writes
        (the AOF is one file: an fsync of a later write is an fsync of every earlier one)."""
        redis = self.redis if node is None else node.redis  # on a cluster, the node of the slot
        async with redis.client() as connection:
            call = connection.execute_command  # (untyped in redis-py)
            if asking:
                await call("ASKING")  # type: ignore[no-untyped-call]
            raw = await call(self._verb, self._names[name], len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            # consume_group: OK for the group, then each request's status.
            decided = raw[1::2] if name == "consume_group" and raw[0] == Status.OK else raw[:1]
            wrote = Status.OK in decided
            if name not in DURABLE_OPERATIONS or not (wrote or Status.REPLAY in decided):
                return raw
            replicas = 1 if self.durability is Durability.REPLICA else 0
            try:
                if not wrote:  # replays only
                    await call("SET", self._durability_probe_key(keys[0]), "1", "PX", DAY_MS)  # type: ignore[no-untyped-call]
                acked = await call("WAITAOF", 1, replicas, DURABILITY_WAIT_MS)  # type: ignore[no-untyped-call]
            except (aioredis.RedisError, OSError) as exc:
                log.error("durability_wait_failed", extra={"operation": name, "error": str(exc)})
                raise NotDurable(f"WAITAOF failed: {exc}") from exc
        if int(acked[0]) < 1 or int(acked[1]) < replicas:
            log.error("durability_wait_short", extra={"operation": name, "local": acked[0], "replicas": acked[1]})
            raise NotDurable(f"WAITAOF confirmed {acked[0]} local / {acked[1]} replica fsyncs of 1 / {replicas}")
        return raw

    def _durability_probe_key(self, org_key: str) -> str:
        """A key in the organization's slot (the same node, on a cluster) to write to."""
        tag = org_key[org_key.index("{") : org_key.index("}") + 1]
        return f"{self.key_prefix}:{tag}:durability-probe"

    async def _call_loaded(
        self, name: str, org: str, extra_keys: Sequence[str], args: Sequence[Any], command: bytes | None = None
    ) -> Result:
        """_call, loading the organization from the ledger first when it is not cached.
        command: the call already encoded, for the pipe (the first try only)."""
        try:
            if command is not None and self.pipe is not None:
                raw = await self.pipe.execute_packed(command)
            elif command is not None and self.cluster is not None:
                raw = await self._route_packed(self._slots[self.partition(org)], command)
            else:
                raw = await self._send(name, org, extra_keys, args)
        except (ResponseError, aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raw = await self._call_again(exc, name, org, extra_keys, args)
        result = _result(raw)
        if result.status is Status.NOT_LOADED:
            await self._load_once(org)
            result = await self._call(name, org, extra_keys, args)
        return result

    def _common(self, org: str, cred: str, now: int, call_id: str) -> tuple[Any, ...]:
        day, week, month = self._period_starts(now)
        return (org, now, call_id, cred, self.default_rate_per_s, self.default_burst, day, week, month)

    def _idem(
        self, org: str, key: str | None, fp: str, assigned: bool = False
    ) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """KEYS and ARGV of a call's idempotency record. `assigned`: a key the sidecar
        gave a request that had none (kept IDEMPOTENCY_AUTO_TTL_S: long enough for the
        retry of an answer that never came, not the 48 h of a client's own keys)."""
        ttl_ms = self.assigned_idempotency_ttl_ms if assigned else self.idempotency_ttl_ms
        if key is None:
            return (), ("", ttl_ms)
        twin = self._twin(org, key, assigned)
        if twin is not None:
            return (self.idempotency_key(org, key), twin), (fp, ttl_ms)
        return (self.idempotency_key(org, key),), (fp, ttl_ms)

    # -- operations ---------------------------------------------------------------
    async def _load_once(self, organization_id: str) -> None:
        """Concurrent misses of one organization share one load."""
        pending = self._loading.get(organization_id)
        if pending is None:
            pending = asyncio.ensure_future(self.load(organization_id))
            self._loading[organization_id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(organization_id, None))
        await asyncio.shield(pending)

    async def load(self, organization_id: str) -> Result:
        """Fill an empty cache from the ledger plus the organization's unsettled stream
        entries (read first, see hotpath/replay.py); a no-op when already loaded."""
        keys = self._org_keys(organization_id)
        try:
            rows = await self.redis.xrange(keys[-1], min="-", max="+", count=UNSETTLED_SCAN_MAX + 1)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc
        if len(rows) > UNSETTLED_SCAN_MAX:
            raise Unavailable("settlement is too far behind to load this organization; retry later")
        org_bytes = organization_id.encode()
        mine = [(eid.decode(), f[b"d"]) for eid, f in rows if f and f.get(b"o") == org_bytes]
        snap = await self.source.snapshot(organization_id, self.partition(organization_id))
        events = [*snap.held, *(d for eid, d in mine if entry_after(eid, snap.after))]
        snap.held = []  # the load script does not need them
        snap = replay(snap, _decodable(events))
        layout = (self.partition_key(self.partition(organization_id), "layout"),)
        args = (organization_id, now_ms(), new_id(), _encode(snap), self.partitions)
        result = await self._call("load", organization_id, layout, args)
        if result.status is Status.LAYOUT_CHANGED:
            raise LayoutError.of(self.partitions, int(result.payload.get("partitions") or 0))
        return result

    async def consume(
        self,
        org: str,
        cred: str,
        *,
        action: str,
        units: int,
        department_id: str = "",
        metadata: str = "",
        idempotency_key: str | None = None,
        fp: str = "",
        assigned: bool = False,
        now: int | None = None,
    ) -> Result:
        now = now_ms() if now is None else now
        call_id = new_id()  # also the usage event's id: one per call
        idem_keys, idem_args = self._idem(org, idempotency_key, fp, assigned)
        args = (*self._common(org, cred, now, call_id), *idem_args, action, units, department_id, metadata, call_id)
        command = None
        if self._pipelined:  # the busiest call: encoded by hand, mostly from cached bytes
            command = self._consume_command(org, idem_keys, args)
        return await self._call_loaded("consume", org, idem_keys, args, command)

    def _consume_command(self, org: str, extra_keys: tuple[str, ...], args: tuple[Any, ...]) -> bytes:
        """RESP of a consume call, as _send would encode it (tests/unit/test_fast_paths.py
        compares them), from the cached head and the credential's cached words."""
        now, call_id, cred, _, _, day, week, month, fp, ttl_ms, action, units, dept, metadata = args[1:15]
        head = self._command_head("consume", org, len(extra_keys), len(args))
        if extra_keys:
            head += _words(extra_keys)
        n, c, f = b"%d" % now, call_id.encode(), fp.encode()
        a, u, d, m = action.encode(), b"%d" % units, dept.encode(), metadata.encode()
        return b"%b%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n%b" % (
            head,
            self._org_word(org),
            len(n),
            n,
            len(c),
            c,
            self._credential_words(cred, day, week, month),
            len(f),
            f,
            self._ttl_words[ttl_ms],
        ) + b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            len(a),
            a,
            len(u),
            u,
            len(d),
            d,
            len(m),
            m,
            len(c),
            c,
        )

    def _pack_credential_words(self, cred: str, day: int, week: int, month: int) -> bytes:
        return _words((cred, self.default_rate_per_s, self.default_burst, day, week, month))

    async def consume_batch(
        self,
        org: str,
        cred: str,
        items: Sequence[BatchItem],
        *,
        atomic: bool,
        idempotency_key: str | None = None,
        fp: str = "",
        now: int | None = None,
    ) -> Result:
        """consume_batch_compact, with the per-item results spelled out (payload
        {results: [see batch_results], balance, available})."""
        result = await self.consume_batch_compact(
            org, cred, items, atomic=atomic, idempotency_key=idempotency_key, fp=fp, now=now
        )
        if result.status is not Status.OK and result.status is not Status.REPLAY:
            return result
        p = result.payload
        return Result(
            result.status,
            {"results": batch_results(p, items), "balance": p["balance"], "available": p["available"]},
        )

    async def consume_batch_compact(
        self,
        org: str,
        cred: str,
        items: Sequence[BatchItem],
        *,
        atomic: bool,
        idempotency_key: str | None = None,
        fp: str = "",
        assigned: bool = False,
        now: int | None = None,
    ) -> Result:
        """Many consumes in one script call. OK's payload names only the exceptions
        (see lua/consume_batch.lua): every item not failed or replayed succeeded, with the
        id <b>-<index> and the credits c[action] * units."""
        now = now_ms() if now is None else now
        # KEYS[12] is always present; without a request key it is never read.
        keys = [self.idempotency_key(org, idempotency_key or "")]
        # Items go as runs: consecutive items alike (and without a key) are sent once,
        # with a count; the script still decides, charges and records each of them.
        runs: list[list[Any]] = []
        previous: BatchItem | None = None
        twins: list[str] = []  # the names before, after every record (see lua/lib.lua idem_twin)
        item_twins: list[tuple[list[Any], str]] = []
        for item in items:
            if item.idempotency_key is not None:
                keys.append(self.idempotency_key(org, item.idempotency_key))
                ki = N_ORG_KEYS + len(keys)
                run = [1, item.action, item.units, item.department_id, item.metadata, ki, item.fingerprint]
                runs.append(run)
                twin = self._twin(org, item.idempotency_key)
                if twin is not None:
                    item_twins.append((run, twin))
                previous = None
            elif previous is not None and item[:4] == previous[:4]:
                runs[-1][0] += 1
            else:
                runs.append([1, item.action, item.units, item.department_id, item.metadata, 0, ""])
                previous = item
        for run, twin in item_twins:
            twins.append(twin)
            run.append(N_ORG_KEYS + len(keys) + len(twins))
        request_twin = 0
        if idempotency_key is not None and (twin := self._twin(org, idempotency_key, assigned)) is not None:
            twins.append(twin)
            request_twin = N_ORG_KEYS + len(keys) + len(twins)
        args = self._common(org, cred, now, new_id())
        ttl_ms = self.assigned_idempotency_ttl_ms if assigned else self.idempotency_ttl_ms
        args += (fp if idempotency_key else "", ttl_ms, "1" if atomic else "0", _encode(runs), request_twin)
        return await self._call_loaded("consume_batch", org, [*keys, *twins], args)

    async def consume_group(
        self, org: str, requests: Sequence[GroupRequest], *, now: int | None = None
    ) -> list[Result]:
        """Many consumes of one organization in one call (group commit), each decided as
        consume would decide it, in this order (lua/consume_group.lua); one Result per
        request. Two requests with one idempotency key share its record: the later one
        replays the earlier (or conflicts with it), as it would one call later."""
        now = now_ms() if now is None else now
        keys: list[str] = []
        index: dict[str, int] = {}
        rows: list[list[Any]] = []
        twins: list[tuple[list[Any], str]] = []
        for r in requests:
            ki = 0
            twin = None
            if r.idempotency_key is not None:
                name = self.idempotency_key(org, r.idempotency_key)
                found = index.get(name)
                if found is None:
                    keys.append(name)
                    found = index[name] = N_ORG_KEYS + len(keys)
                    twin = self._twin(org, r.idempotency_key, r.assigned)
                ki = found
            rows.append(
                [
                    r.cred,
                    r.action,
                    r.units,
                    r.department_id,
                    r.metadata,
                    r.event_id,
                    ki,
                    r.fingerprint if ki else "",
                    1 if r.assigned else 0,
                ]
            )
            if twin is not None:
                twins.append((rows[-1], twin))
        for n, (row, _) in enumerate(twins, 1):
            row.append(N_ORG_KEYS + len(keys) + n)
        keys += [name for _, name in twins]
        day, week, month = self._period_starts(now)
        args = (
            org,
            now,
            new_id(),
            "",
            self.default_rate_per_s,
            self.default_burst,
            day,
            week,
            month,
            "",
            self.idempotency_ttl_ms,
            self.assigned_idempotency_ttl_ms,
            _encode(rows),
        )
        try:
            raw = await self._send("consume_group", org, keys, args)
        except (ResponseError, aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raw = await self._call_again(exc, "consume_group", org, keys, args)
        if raw[0] == Status.NOT_LOADED:
            await self._load_once(org)
            try:
                raw = await self._send("consume_group", org, keys, args)
            except (ResponseError, aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                raw = await self._call_again(exc, "consume_group", org, keys, args)
            if raw[0] == Status.NOT_LOADED:
                return [Result(Status.NOT_LOADED, {}) for _ in requests]
        return group_results(raw)

    async def reserve(
        self,
        org: str,
        cred: str,
        *,
        amount: int,
        ttl_ms: int,
        department_id: str = "",
        action: str = "",
        metadata: str = "",
        idempotency_key: str | None = None,
        fp: str = "",
        assigned: bool = False,
        now: int | None = None,
    ) -> Result:
        now = now_ms() if now is None else now
        call_id = new_id()  # also the reservation's id
        idem_keys, idem_args = self._idem(org, idempotency_key, fp, assigned)
        args = (*self._common(org, cred, now, call_id), *idem_args, amount, ttl_ms, department_id, action, metadata)
        return await self._call_loaded("reserve", org, idem_keys, (*args, call_id))

    async def release(
        self,
        org: str,
        cred: str,
        *,
        reservation_id: str,
        used: int,
        any_hold: bool = False,
        idempotency_key: str | None = None,
        fp: str = "",
        assigned: bool = False,
        now: int | None = None,
    ) -> Result:
        """Close a hold of `cred` (any hold of the organization with any_hold: an admin)."""
        now = now_ms() if now is None else now
        idem_keys, idem_args = self._idem(org, idempotency_key, fp, assigned)
        args = (
            *self._common(org, cred, now, new_id()),
            *idem_args,
            reservation_id,
            used,
            "1" if any_hold else "0",
        )
        return await self._call_loaded("release", org, idem_keys, args)

    async def balance(self, org: str, cred: str = "", *, department_id: str = "", now: int | None = None) -> Result:
        now = now_ms() if now is None else now
        args = (*self._common(org, cred, now, new_id()), department_id)
        return await self._call_loaded("balance", org, (), args)

    async def take_request_token(self, org: str, cred: str, *, now: int | None = None) -> Result:
        now = now_ms() if now is None else now
        return await self._call_loaded("ratelimit", org, (), self._common(org, cred, now, new_id())[:6])

    async def grant(
        self,
        org: str,
        *,
        grant_id: str,
        amount: int,
        priority: int,
        expires_ms: int,
        created_ms: int,
        now: int | None = None,
    ) -> Result:
        """Push a grant the ledger holds (written at created_ms); NOT_LOADED means the
        next load carries it, STALE that it is too old to tell from a repeat: reload."""
        if amount <= 0:
            raise ValueError("a grant is positive; use debit() to take credits away")
        now = now_ms() if now is None else now
        args = (org, now, new_id(), grant_id, amount, priority, expires_ms, created_ms)
        return await self._call("grant", org, (), args)

    async def debit(
        self,
        org: str,
        *,
        amount: int,
        kind: str,
        reason: str,
        idempotency_key: str,
        partial: bool = False,
        event_id: str | None = None,
        grant_id: str = "",
        now: int | None = None,
    ) -> Result:
        """Take credits away (adjustment down, refund clawback), exactly once per key;
        from one grant only with grant_id (a void). event_id: the debit event's id (a
        caller that records it first passes its own, so the ledger entry is found by it)."""
        if amount <= 0:
            raise ValueError("debit amount must be positive")
        now = now_ms() if now is None else now
        # (grant_id only when given: keys stored before it existed stay valid)
        fp = fingerprint("debit", amount, kind, reason, partial, *([grant_id] if grant_id else []))
        call_id = new_id()
        event = event_id or call_id
        day, week, month = self._period_starts(now)
        args = (
            org,
            now,
            call_id,
            fp,
            amount,
            "1" if partial else "0",
            kind,
            reason,
            self.idempotency_ttl_ms,
            event,
            grant_id,
            day,
            week,
            month,
        )
        record = self.idempotency_key(org, idempotency_key)
        twin = self._twin(org, idempotency_key)
        return await self._call_loaded("debit", org, (record,) if twin is None else (record, twin), args)

    async def configure(self, org: str, what: str, *values: str | int | float) -> Result:
        """Mirror a configuration change Postgres holds (cost, department, credential)."""
        return await self._call("configure", org, (), (org, now_ms(), new_id(), what, *values))

    async def reconcile_read(self, org: str, *, after: str, scan_max: int, outbox: Sequence[tuple[str, int]]) -> Result:
        """Cache balance, unsettled change and unpushed grants, read atomically."""
        flat: list[str | int] = [x for pair in outbox for x in pair]
        return await self._call("reconcile", org, (), (org, now_ms(), new_id(), after, scan_max, _encode(flat)))

    def script_shas(self) -> list[str]:
        """The EVALSHA names of the scripts (kept for callers of the EVALSHA era)."""
        return list(self._shas.values())

    async def evict(self, organization_id: str) -> None:
        """Drop an organization's cached state (ops: force a reload from the ledger)."""
        keys = self._org_keys(organization_id)[: len(FIXED_KEYS)]
        try:
            await self.redis.delete(*keys)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc

    # -- entitlements (issue 13; lua/check.lua, check_gate.lua, entitlements.lua) --------
    def entitlements_key(self, organization_id: str) -> str:
        """The organization's cached features (a hash under its hash tag, see lib.lua)."""
        return f"{self.key_prefix}:{self.tag(organization_id)}:o:{organization_id}:ents"

    async def put_entitlements(
        self, org: str, *, version: int, plan_id: str, features: Sequence[dict[str, Any]], ttl_ms: int
    ) -> Result:
        """Replace the cached features with these (OK), unless the cache holds this
        version or a newer one (STALE). features: [{f, t, e, l, u, v}], see lib.lua."""
        args = (org, now_ms(), new_id(), version, plan_id, _encode(list(features)), ttl_ms)
        return await self._call("entitlements", org, (self.entitlements_key(org),), args)

    async def check(self, org: str, cred: str, *, feature: str, now: int | None = None) -> Result:
        """A feature's gate from the cache: OK {ent}, or ENTITLEMENTS_NOT_LOADED."""
        now = now_ms() if now is None else now
        args = (org, now, new_id(), cred, self.default_rate_per_s, self.default_burst, feature)
        return await self._call("check", org, (self.entitlements_key(org),), args)

    async def check_consume(
        self,
        org: str,
        cred: str,
        *,
        feature: str,
        action: str,
        units: int,
        department_id: str = "",
        metadata: str = "",
        idempotency_key: str | None = None,
        fp: str = "",
        assigned: bool = False,
        now: int | None = None,
    ) -> Result:
        """consume(), only if the feature's gate lets it, in one atomic step: FEATURE_DENIED
        {gate} charges nothing; OK / REPLAY carry the gate as payload["ent"]."""
        now = now_ms() if now is None else now
        call_id = new_id()
        idem_keys, idem_args = self._idem(org, idempotency_key, fp, assigned)
        keys = (*idem_keys, self.entitlements_key(org))
        args = (
            *self._common(org, cred, now, call_id),
            *idem_args,
            action,
            units,
            department_id,
            metadata,
            call_id,
            feature,
            N_ORG_KEYS + len(keys),  # the entitlements hash: the last key
        )
        return await self._call_loaded("check_consume", org, keys, args)
