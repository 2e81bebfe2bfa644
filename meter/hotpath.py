"""The hot path's door: every Redis script call goes through `HotPath`.

Other components (the CLI, settlement, billing) use this class and never build keys or
call scripts themselves. Amounts here are integer millicredits; decimals live at the
HTTP edge.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

import lua
from core.config import Config, Durability
from core.periods import period_bounds, period_starts_ms
from lua import Status
from meter.replay import entry_after, replay
from meter.snapshot import (
    CredSnapshot,
    DeptSnapshot,
    GrantSnapshot,
    HoldSnapshot,
    Snapshot,
    SnapshotSource,
)

log = logging.getLogger(__name__)

__all__ = [
    "CredSnapshot",
    "DeptSnapshot",
    "GrantSnapshot",
    "HoldSnapshot",
    "Snapshot",
    "SnapshotSource",
    "period_bounds",
    "period_starts_ms",
]
UNSETTLED_SCAN_MAX = 200_000

FIXED_KEYS = (
    "acct",
    "grem",
    "gq",
    "costs",
    "depts",
    "creds",
    "holds",
    "hx",
    "hclosed",
    "gapplied",
)
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class Unavailable(Exception):
    """Redis or the ledger could not be reached; nothing was charged."""


@dataclass(frozen=True, slots=True)
class Result:
    """A script's answer: its status and payload (integers are millicredits)."""

    status: Status
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchItem:
    action: str
    units: int
    department_id: str
    metadata: str  # JSON text, "" = none
    idempotency_key: str | None
    fingerprint: str


def fingerprint(*parts: object) -> str:
    """Stable digest of a request's parameters, to tell a retry from a reuse."""
    return hashlib.sha256(_encode(parts)).hexdigest()[:32]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class HotPath:
    """Atomic credit operations on one organization, one Lua script each."""

    def __init__(
        self,
        redis: aioredis.Redis,
        source: SnapshotSource,
        *,
        partitions: int,
        default_rate_per_s: float,
        default_burst: float,
        idempotency_ttl_s: int,
        durability: Durability = Durability.ASYNC,
        key_prefix: str = "cr",
    ) -> None:
        self.redis = redis
        self.key_prefix = key_prefix
        self.source = source
        self.partitions = partitions
        self.default_rate_per_s = default_rate_per_s
        self.default_burst = default_burst
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.durability = durability
        self._loading: dict[str, asyncio.Future[Result]] = {}
        self._scripts: dict[str, AsyncScript] = {name: redis.register_script(lua.source(name)) for name in lua.SCRIPTS}

    @classmethod
    def from_config(cls, redis: aioredis.Redis, source: SnapshotSource, config: Config) -> HotPath:
        return cls(
            redis,
            source,
            partitions=config.usage_partitions,
            default_rate_per_s=config.rate_limit_per_s,
            default_burst=config.rate_limit_burst,
            idempotency_ttl_s=config.idempotency_ttl_s,
            durability=config.durability,
            key_prefix=config.redis_key_prefix,
        )

    # -- keys ---------------------------------------------------------------------
    def partition(self, organization_id: str) -> int:
        return zlib.crc32(organization_id.encode()) % self.partitions

    def tag(self, organization_id: str) -> str:
        return f"{{cr{self.partition(organization_id)}}}"

    def stream_key(self, partition: int) -> str:
        return f"{self.key_prefix}:{{cr{partition}}}:usage"

    def org_keys(self, organization_id: str) -> list[str]:
        tag = self.tag(organization_id)
        keys = [f"{self.key_prefix}:{tag}:o:{organization_id}:{k}" for k in FIXED_KEYS]
        keys.append(self.stream_key(self.partition(organization_id)))
        return keys

    def idempotency_key(self, organization_id: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return f"{self.key_prefix}:{self.tag(organization_id)}:o:{organization_id}:idem:{digest}"

    def partition_key(self, partition: int, name: str) -> str:
        """Another key of a partition's slot (e.g. the settler's lease)."""
        return f"{self.key_prefix}:{{cr{partition}}}:{name}"

    # -- plumbing -----------------------------------------------------------------
    async def start(self) -> None:
        """Load every script once (EVALSHA then never sends the source again)."""
        try:
            for script in self._scripts.values():
                await self.redis.script_load(script.script)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Result:
        try:
            raw = await self._scripts[name](keys=keys, args=args)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc
        status = Status(int(raw[0]))
        payload = _decode(raw[1])
        if not isinstance(payload, dict):  # an empty Lua table packs as an array
            payload = {}
        return Result(status, payload)

    async def _durable(self, result: Result) -> Result:
        if self.durability is Durability.ASYNC or result.status is not Status.OK:
            return result
        replicas = 1 if self.durability is Durability.REPLICA else 0
        try:
            acked = await self.redis.execute_command("WAITAOF", 1, replicas, 1000)  # type: ignore[no-untyped-call]
        except (aioredis.RedisError, OSError) as exc:
            # The charge is applied in memory already; it cannot be un-done here.
            log.error("durability_wait_failed", extra={"error": str(exc)})
            return result
        if int(acked[0]) < 1 or int(acked[1]) < replicas:
            log.error("durability_wait_short", extra={"acked": acked})
        return result

    async def _call_loaded(self, name: str, org: str, keys: Sequence[str], args: Sequence[Any]) -> Result:
        result = await self._call(name, keys, args)
        if result.status is Status.NOT_LOADED:
            await self._load_once(org)
            result = await self._call(name, keys, args)
        return await self._durable(result)

    def _common(self, org: str, cred: str, now: int) -> list[Any]:
        day, week, month = period_starts_ms(now)
        return [org, now, uuid.uuid4().hex, cred, self.default_rate_per_s, self.default_burst, day, week, month]

    def _idem(self, org: str, key: str | None, fp: str) -> tuple[list[str], list[Any]]:
        if key is None:
            return [], ["", self.idempotency_ttl_ms]
        return [self.idempotency_key(org, key)], [fp, self.idempotency_ttl_ms]

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
        entries (read first, see meter/replay.py); a no-op when already loaded."""
        keys = self.org_keys(organization_id)
        try:
            rows = await self.redis.xrange(keys[-1], min="-", max="+", count=UNSETTLED_SCAN_MAX + 1)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc
        if len(rows) > UNSETTLED_SCAN_MAX:
            raise Unavailable("settlement is too far behind to load this organization; retry later")
        org_bytes = organization_id.encode()
        mine = [(eid.decode(), f[b"d"]) for eid, f in rows if f and f.get(b"o") == org_bytes]
        snap = await self.source.snapshot(organization_id, self.partition(organization_id))
        snap = replay(snap, (_decode(d) for eid, d in mine if entry_after(eid, snap.after)))
        return await self._call("load", keys, [organization_id, now_ms(), uuid.uuid4().hex, _encode(snap)])

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
        now: int | None = None,
    ) -> Result:
        now = now_ms() if now is None else now
        idem_keys, idem_args = self._idem(org, idempotency_key, fp)
        args = self._common(org, cred, now) + idem_args
        args += [action, units, department_id, metadata, uuid.uuid4().hex]
        return await self._call_loaded("consume", org, self.org_keys(org) + idem_keys, args)

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
        now = now_ms() if now is None else now
        keys = self.org_keys(org)
        # KEYS[12] is always present; without a request key it is never read.
        keys.append(self.idempotency_key(org, idempotency_key or ""))
        packed = []
        for item in items:
            ki = 0
            if item.idempotency_key is not None:
                keys.append(self.idempotency_key(org, item.idempotency_key))
                ki = len(keys)
            packed.append(
                {
                    "a": item.action,
                    "u": item.units,
                    "d": item.department_id,
                    "m": item.metadata,
                    "id": uuid.uuid4().hex,
                    "ki": ki,
                    "fp": item.fingerprint,
                }
            )
        args = self._common(org, cred, now)
        args += [fp if idempotency_key else "", self.idempotency_ttl_ms, "1" if atomic else "0", _encode(packed)]
        return await self._call_loaded("consume_batch", org, keys, args)

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
        now: int | None = None,
    ) -> Result:
        now = now_ms() if now is None else now
        idem_keys, idem_args = self._idem(org, idempotency_key, fp)
        args = self._common(org, cred, now) + idem_args
        args += [amount, ttl_ms, department_id, action, metadata, uuid.uuid4().hex]
        return await self._call_loaded("reserve", org, self.org_keys(org) + idem_keys, args)

    async def release(
        self,
        org: str,
        cred: str,
        *,
        reservation_id: str,
        used: int,
        idempotency_key: str | None = None,
        fp: str = "",
        now: int | None = None,
    ) -> Result:
        now = now_ms() if now is None else now
        idem_keys, idem_args = self._idem(org, idempotency_key, fp)
        args = self._common(org, cred, now) + idem_args + [reservation_id, used]
        return await self._call_loaded("release", org, self.org_keys(org) + idem_keys, args)

    async def balance(self, org: str, cred: str = "", *, department_id: str = "", now: int | None = None) -> Result:
        now = now_ms() if now is None else now
        args = self._common(org, cred, now) + [department_id]
        return await self._call_loaded("balance", org, self.org_keys(org), args)

    async def take_request_token(self, org: str, cred: str, *, now: int | None = None) -> Result:
        now = now_ms() if now is None else now
        return await self._call_loaded("ratelimit", org, self.org_keys(org), self._common(org, cred, now)[:6])

    async def grant(
        self, org: str, *, grant_id: str, amount: int, priority: int, expires_ms: int, now: int | None = None
    ) -> Result:
        """Push a grant the ledger holds; NOT_LOADED means the next load carries it."""
        if amount <= 0:
            raise ValueError("a grant is positive; use debit() to take credits away")
        now = now_ms() if now is None else now
        args = [org, now, uuid.uuid4().hex, grant_id, amount, priority, expires_ms]
        return await self._durable(await self._call("grant", self.org_keys(org), args))

    async def debit(
        self,
        org: str,
        *,
        amount: int,
        kind: str,
        reason: str,
        idempotency_key: str,
        partial: bool = False,
        now: int | None = None,
    ) -> Result:
        """Take credits away (adjustment down, refund clawback), exactly once per key."""
        if amount <= 0:
            raise ValueError("debit amount must be positive")
        now = now_ms() if now is None else now
        fp = fingerprint("debit", amount, kind, reason, partial)
        keys = self.org_keys(org) + [self.idempotency_key(org, idempotency_key)]
        args = [org, now, uuid.uuid4().hex, fp, amount, "1" if partial else "0", kind, reason]
        args += [self.idempotency_ttl_ms, uuid.uuid4().hex]
        return await self._call_loaded("debit", org, keys, args)

    async def configure(self, org: str, what: str, *values: str | int | float) -> Result:
        """Mirror a configuration change Postgres holds (cost, department, credential)."""
        args = [org, now_ms(), uuid.uuid4().hex, what, *values]
        return await self._call("configure", self.org_keys(org), args)

    async def reconcile_read(self, org: str, *, after: str, scan_max: int, outbox: Sequence[tuple[str, int]]) -> Result:
        """Cache balance, unsettled change and unpushed grants, read atomically."""
        flat: list[str | int] = [x for pair in outbox for x in pair]
        args = [org, now_ms(), uuid.uuid4().hex, after, scan_max, _encode(flat)]
        return await self._call("reconcile", self.org_keys(org), args)

    def script_shas(self) -> list[str]:
        return [s.sha for s in self._scripts.values()]

    async def evict(self, organization_id: str) -> None:
        """Drop an organization's cached state (ops: force a reload from the ledger)."""
        keys = self.org_keys(organization_id)[: len(FIXED_KEYS)]
        try:
            await self.redis.delete(*keys)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc}") from exc
