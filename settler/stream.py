"""Settling one partition's usage stream into the ledger, exactly once.

One settler owns a partition at a time (a lease in Redis, renewed while it works);
several settler processes share the partitions. The sequence for each batch:

  1. read entries through the consumer group (first what this consumer has pending,
     then new ones), bounded by `batch_entries`;
  2. settle them in ONE Postgres transaction (ledger.settlement) that skips any event
     already settled, so a batch delivered twice counts once;
  3. only after the commit: XACK, then trim the stream below the oldest entry still
     unsettled.

A crash before 3 leaves the entries pending; whoever owns the partition next claims
them (XAUTOCLAIM) and settles them first, in stream order. Postgres down: step 2
fails, nothing is acknowledged, the loop backs off and retries the same entries while
the hot path keeps appending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from ledger.settlement import Settlement, Staged
from meter.hotpath import HotPath

log = logging.getLogger(__name__)

GROUP = "settlers"
LEASE_TTL_MS = 15_000
BLOCK_MS = 200
BACKOFF_S_MAX = 5.0
CLAIM_COUNT = 1000

_decode = msgspec.msgpack.Decoder().decode

# Renew the lease only if we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"


@dataclass
class PartitionStats:
    settled_entries: int = 0
    settled_events: int = 0
    batches: int = 0
    failures: int = 0
    last_error: str = ""


class PartitionSettler:
    """Settles one partition while it holds the lease."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settlement: Settlement,
        hot: HotPath,
        partition: int,
        *,
        consumer: str,
        batch_entries: int = 500,
        on_settled: Callable[[set[str]], Awaitable[object]] | None = None,
    ) -> None:
        self.on_settled = on_settled
        self.redis = redis
        self.settlement = settlement
        self.hot = hot
        self.partition = partition
        self.consumer = consumer
        self.batch_entries = batch_entries
        self.stream = hot.stream_key(partition)
        self.lease_key = hot.partition_key(partition, "settler-lease")
        self.stats = PartitionStats()
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._backoff_s = 0.0

    # -- ownership -------------------------------------------------------------
    async def acquire(self) -> bool:
        """Take the lease if free; on taking it, claim every pending entry."""
        got = await self.redis.set(self.lease_key, self.consumer, nx=True, px=LEASE_TTL_MS)
        if not got:
            return bool(await self._renew(keys=[self.lease_key], args=[self.consumer, LEASE_TTL_MS]))
        await self._ensure_group()
        await self._claim_all()
        return True

    async def release(self) -> None:
        await self._release(keys=[self.lease_key], args=[self.consumer])

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim_all(self) -> None:
        """The previous owner is gone (its lease expired): its pending entries are ours."""
        cursor = "0-0"
        for _ in range(10_000):  # bounded: CLAIM_COUNT entries per round
            reply = await self.redis.xautoclaim(
                self.stream, GROUP, self.consumer, min_idle_time=0, start_id=cursor, count=CLAIM_COUNT
            )
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if cursor == "0-0":
                return

    # -- one batch ---------------------------------------------------------------
    async def _read(self, block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        # Our own pending entries first (left by a crash or a failed commit), in order.
        for start in ("0", ">"):
            reply = await self.redis.xreadgroup(
                GROUP,
                self.consumer,
                {self.stream: start},
                count=self.batch_entries,
                block=None if start == "0" else block_ms,
            )
            entries = [(eid.decode(), fields) for _, rows in (reply or []) for eid, fields in rows if fields]
            if entries:
                return entries
        return []

    async def settle_once(self, *, block_ms: int = BLOCK_MS) -> int:
        """Read, settle, acknowledge one batch. Returns the number of entries settled."""
        entries = await self._read(block_ms)
        if not entries:
            return 0
        staged = Staged()
        for _, fields in entries:
            staged.add(fields[b"o"].decode(), _decode(fields[b"d"]))
        batch_id = uuid.uuid4().hex
        await self.settlement.settle(
            staged, batch_id=batch_id, partition=self.partition, first_entry=entries[0][0], last_entry=entries[-1][0]
        )
        # Committed: now (and only now) acknowledge and trim.
        ids = [eid for eid, _ in entries]
        await self.redis.xack(self.stream, GROUP, *ids)
        await self._trim()
        self.stats.settled_entries += len(entries)
        self.stats.settled_events += len(staged.events)
        self.stats.batches += 1
        if self.on_settled is not None:
            orgs = {fields[b"o"].decode() for _, fields in entries}
            try:
                await self.on_settled(orgs)
            except Exception:  # an alert check must never hold settlement back
                log.exception("on_settled_failed partition=%d", self.partition)
        return len(entries)

    async def _trim(self) -> None:
        """Drop what is settled: everything older than the oldest unsettled entry."""
        pending = await self.redis.xpending(self.stream, GROUP)
        if pending and int(pending["pending"]) > 0:
            min_id = pending["min"].decode() if isinstance(pending["min"], bytes) else str(pending["min"])
            threshold = min_id
        else:
            groups = await self.redis.xinfo_groups(self.stream)
            group = next((g for g in groups if _s(g["name"]) == GROUP), None)
            if group is None:
                return
            threshold = next_id(_s(group["last-delivered-id"]))
        await self.redis.xtrim(self.stream, minid=threshold, approximate=False)

    # -- the loop ----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Settle while holding the lease, backing off on failure, until `stop`."""
        last_renew = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now - last_renew > LEASE_TTL_MS / 3000:
                if not await self.acquire():
                    log.warning("lease_lost partition=%d", self.partition)
                    return  # another settler owns this partition now
                last_renew = now
            try:
                await self.settle_once()
                self._backoff_s = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres or Redis down: retry the same entries later
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                self._backoff_s = min(BACKOFF_S_MAX, max(0.1, self._backoff_s * 2))
                log.warning("settle_failed partition=%d retry_in_s=%.1f error=%s", self.partition, self._backoff_s, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._backoff_s)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def lag(redis: aioredis.Redis, hot: HotPath, partition: int, now_ms: int) -> tuple[int, float]:
    """(unsettled entries, age in seconds of the oldest unsettled entry) of a partition."""
    stream = hot.stream_key(partition)
    try:
        groups = await redis.xinfo_groups(stream)
    except aioredis.ResponseError:
        return 0, 0.0  # no stream yet
    group = next((g for g in groups if _s(g["name"]) == GROUP), None)
    pending = await redis.xpending(stream, GROUP) if group is not None else None
    oldest: str | None = None
    count = 0
    if pending and int(pending["pending"]) > 0:
        oldest = _s(pending["min"])
        count += int(pending["pending"])
    after = "0" if group is None else next_id(_s(group["last-delivered-id"]))
    undelivered = await redis.xrange(stream, min=after, max="+", count=1)
    if undelivered:
        if oldest is None:
            oldest = _s(undelivered[0][0])
        info = int(group.get("lag") or 0) if group is not None else await redis.xlen(stream)
        count += int(info or 0)
    if oldest is None:
        return 0, 0.0
    age_s = max(0.0, (now_ms - int(oldest.split("-")[0])) / 1000)
    return count, age_s
