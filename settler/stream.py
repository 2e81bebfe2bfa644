"""Settling one partition's usage stream into the ledger, exactly once.

One settler owns a partition at a time (a lease in Redis, renewed by a heartbeat
while it works, and an epoch that fences a former owner's transactions in Postgres);
several settler processes share the partitions. The sequence for each batch:

  1. read entries through the consumer group (first what this consumer has pending,
     then new ones), bounded by `batch_entries`;
  2. settle them in ONE Postgres transaction (ledger.settlement) that skips any event
     already settled, so a batch delivered twice counts once;
  3. only after the commit: XACK, then trim the stream below the oldest entry still
     unsettled (one script, one round trip).

While a batch's transaction runs, the loop already reads and decodes the next one
(only when nothing else is pending, so the order holds): Redis and Python work overlap
with Postgres work. Should the transaction fail, the entries read ahead stay pending
and are read again, after the failed ones.

A crash before 3 leaves the entries pending; whoever owns the partition next claims
them (XAUTOCLAIM) and settles them first, in stream order. So does an owner that finds
entries pending under another consumer at a renewal (a former owner's read-ahead,
delivered after the handover). Postgres down: step 2
fails, nothing is acknowledged, the loop backs off and retries the same entries while
the hot path keeps appending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from hotpath.client import HotPath
from ledger.settlement import (
    DeadLetter,
    PoisonEntry,
    Settlement,
    Staged,
    StaleOwner,
    balance_change,
    clean_event,
    is_poison,
    is_transient,
)
from settler.metrics import QUARANTINED

log = logging.getLogger(__name__)

GROUP = "settlers"
LEASE_TTL_MS = 10_000  # renewed every third of it; a successor waits this long after an owner stops
BLOCK_MS = 200
BACKOFF_S_MAX = 5.0
CLAIM_COUNT = 1000
SETTLE_ATTEMPTS_MAX = 5  # a batch failing this often, for no reason known to be passing, is isolated

_decode = msgspec.msgpack.Decoder().decode

Entry = tuple[str, dict[bytes, bytes]]

# The lease and its epoch, in one step (both keys in the partition's slot): renew it
# when we hold it (the same epoch), take it when it is free (a new epoch), else 0.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""
# Acknowledge a settled batch (ARGV[3..]) and trim the stream below the oldest entry
# still unsettled: the oldest pending one of any consumer, or ARGV[2] (the entry after
# the batch), whichever is older. Entry ids compare as (ms, seq) pairs.
_ACK_TRIM = """
local acked = 0
for i = 3, #ARGV, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local threshold = ARGV[2]
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] > 0 and older(pending[2], threshold) then threshold = pending[2] end
redis.call('XTRIM', KEYS[1], 'MINID', threshold)
return acked
"""
# Raise the epoch counter to ARGV[1] while we hold the lease (never lowers it).
_RAISE_EPOCH = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]); now = tonumber(ARGV[1]) end
return now
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
    quarantined: int = 0
    last_error: str = ""


def _organization(fields: dict[bytes, bytes]) -> str | None:
    """The entry's organization id, if it names a valid one."""
    try:
        return str(uuid.UUID(fields[b"o"].decode()))
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


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
        on_quarantined: Callable[[DeadLetter], Awaitable[object]] | None = None,
    ) -> None:
        self.on_settled = on_settled
        self.on_quarantined = on_quarantined
        self._strikes = ("", 0)  # (first entry of the failing batch, failures in a row)
        self.redis = redis
        self.settlement = settlement
        self.hot = hot
        self.partition = partition
        self.consumer = consumer
        self.batch_entries = batch_entries
        self.stream = hot.stream_key(partition)
        self.lease_key = hot.partition_key(partition, "settler-lease")
        self.stats = PartitionStats()
        self.epoch_key = hot.partition_key(partition, "settler-epoch")
        self.epoch = 0  # this owner's epoch (the fence its transactions move), 0: none
        self._lease = redis.register_script(_LEASE)
        self._release = redis.register_script(_RELEASE)
        self._raise_epoch = redis.register_script(_RAISE_EPOCH)
        self._ack_trim = redis.register_script(_ACK_TRIM)
        self._backoff_s = 0.0
        self.claimed_orphans = False  # set by acquire when it claimed another consumer's entries

    # -- ownership -------------------------------------------------------------
    async def acquire(self) -> bool:
        """Take the lease if free (with a new epoch, claiming every pending entry), or
        renew it if ours; False when another settler holds it."""
        epoch = int(await self._lease(keys=[self.lease_key, self.epoch_key], args=[self.consumer, LEASE_TTL_MS]))
        if epoch == 0:
            self.epoch = 0
            return False
        if epoch != self.epoch:  # newly ours (or ours again after it ran out)
            epoch = await self._past_the_fence(epoch)
            if epoch == 0:  # the lease ran out meanwhile
                self.epoch = 0
                return False
            self.epoch = epoch
            await self._ensure_group()
            await self._claim_all()
        elif await self._orphans():
            # Entries delivered to another consumer after we took over (a former
            # owner's read-ahead, done before it noticed): nobody else will settle them.
            await self._claim_all()
            self.claimed_orphans = True
        return True

    async def _past_the_fence(self, epoch: int) -> int:
        """The epoch, raised past the fence in Postgres if it is not already: after Redis
        lost its counters (flushed, restored, replaced) a new owner's epoch would start
        again at 1 and every transaction of it be refused. Only the lease holder gets
        here, so the raise is as exclusive as the lease. Postgres away: the epoch as it
        is (a refused transaction hands the partition back; the next owner raises it)."""
        try:
            fence = await self.settlement.fence(self.partition)
        except Exception as exc:  # Postgres down: settlement waits for it anyway
            log.warning("fence_unknown", extra={"partition": self.partition, "error": str(exc)})
            return epoch
        if epoch > fence:
            return epoch
        return int(await self._raise_epoch(keys=[self.epoch_key, self.lease_key], args=[fence + 1, self.consumer]))

    async def _orphans(self) -> bool:
        """Whether a consumer other than this one has entries pending."""
        try:
            summary = await self.redis.xpending(self.stream, GROUP)
        except aioredis.ResponseError:  # no stream or group yet
            return False
        return any(_s(c["name"]) != self.consumer for c in summary.get("consumers") or [])

    async def release(self) -> None:
        """Give the partition up (a graceful handover: call it after the last batch)."""
        await self._release(keys=[self.lease_key], args=[self.consumer])
        self.epoch = 0

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
    async def _read(self, block_ms: int) -> tuple[list[Entry], bool]:
        """The next batch: our own pending entries first (left by a crash or a failed
        commit), in order; else new ones. Also says whether they are new ones."""
        for start in ("0", ">"):
            entries = await self._xread(start, None if start == "0" else block_ms)
            if entries:
                return entries, start == ">"
        return [], False

    async def _xread(self, start: str, block_ms: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            GROUP, self.consumer, {self.stream: start}, count=self.batch_entries, block=block_ms
        )
        return [(eid.decode(), fields) for _, rows in (reply or []) for eid, fields in rows if fields]

    @staticmethod
    def _stage(entries: list[Entry]) -> Staged:
        """The batch decoded for settlement; PoisonEntry when an entry cannot be."""
        staged = Staged()
        for eid, fields in entries:
            try:
                staged.add(fields[b"o"].decode(), _decode(fields[b"d"]))
            except Exception as exc:  # whatever an entry holds, it must not stop the partition
                raise PoisonEntry(f"entry {eid}: {type(exc).__name__}: {exc}") from exc
        return staged

    def _stage_or_none(self, entries: list[Entry]) -> Staged | None:
        try:
            return self._stage(entries)
        except PoisonEntry:
            return None  # settled entry by entry (_isolate)

    async def settle_once(self, *, block_ms: int = BLOCK_MS) -> int:
        """Read, settle, acknowledge one batch. Returns the number of entries settled
        (quarantined ones included)."""
        entries, _ = await self._read(block_ms)
        if not entries:
            return 0
        await self._settle_checked(entries, self._stage_or_none(entries))
        return len(entries)

    async def _settle_checked(self, entries: list[Entry], staged: Staged | None) -> None:
        """Settle a batch; one that cannot be settled as it is (an entry Postgres refuses,
        or a failure that repeats SETTLE_ATTEMPTS_MAX times) is settled around its bad
        entries, which go to quarantine: nothing can stall the partition. Failures that
        are not the entries' fault (Postgres unreachable, a lock, a restart) are raised:
        the loop retries the same entries after a backoff, however long it takes."""
        if staged is None:
            await self._isolate(entries)
            return
        try:
            await self._settle(entries, staged)
            self._strikes = ("", 0)
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, StaleOwner):
                raise
            if not is_poison(exc):
                first = entries[0][0]
                count = self._strikes[1] + 1 if self._strikes[0] == first else 1
                self._strikes = (first, count)
                if count < SETTLE_ATTEMPTS_MAX:
                    raise
            log.error(
                "settlement_isolating",
                extra={"partition": self.partition, "entries": len(entries), "first": entries[0][0], "error": str(exc)},
            )
            await self._isolate(entries)
            self._strikes = ("", 0)

    async def _settle(self, entries: list[Entry], staged: Staged) -> None:
        await self.settlement.settle(
            staged,
            batch_id=uuid.uuid4().hex,
            partition=self.partition,
            first_entry=entries[0][0],
            last_entry=entries[-1][0],
            epoch=self.epoch or None,
        )
        await self._acknowledge(entries, len(staged))

    async def _acknowledge(self, entries: list[Entry], events: int) -> None:
        """Committed: now (and only now) acknowledge and trim."""
        await self._ack_trim(keys=[self.stream], args=[GROUP, next_id(entries[-1][0]), *(eid for eid, _ in entries)])
        self.stats.settled_entries += len(entries)
        self.stats.settled_events += events
        self.stats.batches += 1
        if self.on_settled is not None:
            orgs = {fields[b"o"].decode(errors="replace") for _, fields in entries}
            try:
                await self.on_settled(orgs)
            except Exception:  # an alert check must never hold settlement back
                log.exception("on_settled_failed", extra={"partition": self.partition})

    # -- quarantine ----------------------------------------------------------------
    async def _isolate(self, entries: list[Entry]) -> None:
        """Settle the batch in order, halving every part that fails until the entries
        that cannot be settled stand alone; those go to quarantine. At most about
        2 x len(entries) transactions; a transient failure on the way is raised (what
        was committed stays committed; the rest is read again)."""
        events = 0

        async def settle_part(part: list[Entry]) -> None:
            nonlocal events
            try:
                staged = self._stage(part)
                await self.settlement.settle(
                    staged,
                    batch_id=uuid.uuid4().hex,
                    partition=self.partition,
                    first_entry=part[0][0],
                    last_entry=part[-1][0],
                    epoch=self.epoch or None,
                )
                events += len(staged)
            except Exception as exc:
                if is_transient(exc) or isinstance(exc, StaleOwner):
                    raise
                if len(part) == 1:
                    await self._quarantine(part[0], exc)
                    return
                middle = len(part) // 2
                await settle_part(part[:middle])
                await settle_part(part[middle:])

        await settle_part(entries)
        await self._acknowledge(entries, events)

    async def _quarantine(self, entry: Entry, error: BaseException) -> None:
        """One entry settlement refused: settled cleaned (its charges in the ledger,
        the offending text replaced), else held out of the ledger; recorded either way,
        with the raw entry and the error, and announced."""
        eid, fields = entry
        raw = fields.get(b"d", b"")
        org = _organization(fields)
        try:
            event: dict[str, Any] | None = _decode(raw)
            if not isinstance(event, dict):
                event = None
        except Exception:  # undecodable: kept as it is
            event = None
        reason = f"{type(error).__name__}: {error}"
        if event is not None and org is not None:
            cleaned = Staged()
            try:
                cleaned.add(org, clean_event(event))
                dead = DeadLetter(self.partition, eid, org, raw, reason, "cleaned")
                await self.settlement.settle(
                    cleaned,
                    batch_id=uuid.uuid4().hex,
                    partition=self.partition,
                    first_entry=eid,
                    last_entry=eid,
                    dead_letter=dead,
                    epoch=self.epoch or None,
                )
                await self._quarantined(dead)
                return
            except Exception as second:
                if is_transient(second) or isinstance(second, StaleOwner):
                    raise
                reason = f"{reason}; cleaned: {type(second).__name__}: {second}"
        amount = balance_change(event) if event is not None else 0
        dead = DeadLetter(self.partition, eid, org, raw, reason, "held", amount)
        await self.settlement.hold_dead_letter(dead, epoch=self.epoch or None)
        await self._quarantined(dead)

    async def _quarantined(self, dead: DeadLetter) -> None:
        QUARANTINED.labels(dead.state).inc()
        self.stats.quarantined += 1
        log.error(
            "settlement_quarantined",
            extra={
                "partition": dead.partition,
                "entry": dead.entry_id,
                "organization_id": dead.organization_id,
                "state": dead.state,
                "amount": dead.amount,
                "error": dead.error,
            },
        )
        if self.on_quarantined is not None:
            try:
                await self.on_quarantined(dead)
            except Exception:  # an ops alert must never hold settlement back
                log.exception("on_quarantined_failed", extra={"partition": self.partition})

    # -- the loop ----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Settle while holding the lease, backing off on failure, until `stop`. The
        lease is renewed every third of its time by a heartbeat of its own, so that a
        long transaction does not lose it; losing it ends the loop (and the fence in
        Postgres stops a transaction that was still running)."""
        if not await self.acquire():
            log.warning("lease_lost", extra={"partition": self.partition})
            return
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(lost), name=f"lease-{self.partition}")
        ahead: asyncio.Task[tuple[list[Entry], Staged | None]] | None = None  # the next batch, meanwhile
        try:
            while not stop.is_set():
                if lost.is_set():
                    log.warning("lease_lost", extra={"partition": self.partition})
                    return  # another settler owns this partition now
                if self.claimed_orphans:  # read them, in stream order, before new ones
                    self.claimed_orphans = False
                    await _drop(ahead)
                    ahead = None
                try:
                    if ahead is not None:
                        (entries, staged), new = await ahead, True
                        ahead = None
                    else:
                        entries, new = await self._read(BLOCK_MS)
                        staged = self._stage_or_none(entries)
                    if not entries:
                        continue
                    if new:  # nothing else is pending: the next entries follow these
                        ahead = asyncio.create_task(self._read_ahead())
                    await self._settle_checked(entries, staged)
                    self._backoff_s = 0.0
                except asyncio.CancelledError:
                    raise
                except StaleOwner:
                    log.warning("lease_lost_fenced", extra={"partition": self.partition, "epoch": self.epoch})
                    self.epoch = 0
                    return  # another settler owns this partition now; it settles these entries
                except Exception as exc:  # Postgres or Redis down: retry the same entries later
                    await _drop(ahead)  # what it read stays pending, after these
                    ahead = None
                    self.stats.failures += 1
                    self.stats.last_error = str(exc)
                    self._backoff_s = min(BACKOFF_S_MAX, max(0.1, self._backoff_s * 2))
                    log.warning(
                        "settle_failed",
                        extra={"partition": self.partition, "retry_in_s": self._backoff_s, "error": str(exc)},
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self._backoff_s)
        finally:
            await _drop(ahead)
            await _drop(heartbeat)

    async def _heartbeat(self, lost: asyncio.Event) -> None:
        """Renew the lease every third of its time until it is lost. A renewal that
        fails (Redis away) is tried again sooner; the lease may then run out, and
        whoever takes it next raises the fence."""
        interval_s = LEASE_TTL_MS / 3000
        await asyncio.sleep(interval_s)  # (run took it just now)
        while True:
            try:
                if not await self.acquire():
                    lost.set()
                    return
                wait_s = interval_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease_renew_failed", extra={"partition": self.partition, "error": str(exc)})
                wait_s = min(1.0, interval_s)
            await asyncio.sleep(wait_s)

    async def _read_ahead(self) -> tuple[list[Entry], Staged | None]:
        """Read and decode the next batch while Postgres settles the current one."""
        entries = await self._xread(">", BLOCK_MS)
        return entries, self._stage_or_none(entries)


async def _drop(task: asyncio.Task[Any] | None) -> None:
    """Cancel a read ahead; its entries (if Redis delivered them) stay pending."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


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
