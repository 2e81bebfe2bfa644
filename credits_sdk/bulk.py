"""Bulk consumption: charge an iterable of any size, in bounded concurrent batches.

    report = client.consume_all(items, job_id="invoices-2026-11", checkpoint="job.ckpt")

- **Bounded.** The input is read lazily, ``batch_size`` items at a time (at most the
  sidecar's 5000), with at most ``max_in_flight`` batches sent and not yet answered, so
  memory holds ``batch_size * max_in_flight`` items whatever the input's size.
- **Exactly once, across crashes.** Each item without its own ``idempotency_key`` gets
  ``"{job_id}:{index}"``. Run the job again with the same ``job_id`` and the same input
  after a crash, and every item the sidecar already charged replays instead of charging
  again (item keys share the namespace of ``consume`` keys, and last the sidecar's
  IDEMPOTENCY_TTL_S, at least 24 h). Keep the input, and each item's metadata, the
  same between runs: a changed item under an old key is refused as
  ``idempotency_conflict`` (and reported, never charged twice).
- **Checkpoint (optional).** With ``checkpoint=path`` the job records, after each batch,
  the index below which every item has an answer, with the counts so far (written to a
  temporary file, fsynced, renamed over the old one). A rerun skips that prefix without
  sending it and resends only the rest; the keys make the resent part safe.
- **Per-item failures** (insufficient credits, unknown action, a department's budget
  spent, an item the sidecar rejects as invalid) are counted by code, the first
  ``FAILURES_KEPT_MAX`` kept in the report, and each passed to ``on_failure`` (called
  from the worker threads by the sync client: keep it quick and thread-safe); they do
  not stop the job. A failure of the whole request (bad credential, the sidecar down
  after retries) stops it: ``BulkAborted`` carries the report of what was done.
- **Progress** on stderr when it is a terminal (``progress=None``), see ``progress.py``.

The job's bookkeeping (``BulkJob``) does no I/O besides the checkpoint; ``run_async``
(asyncio tasks) and ``run_sync`` (a thread pool) only send its batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import decimal
import itertools
import json
import os
import pathlib
import re
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from credits_sdk import _core, context, errors, models
from credits_sdk.progress import Progress

if TYPE_CHECKING:
    from credits_sdk.aio import AsyncCreditsClient
    from credits_sdk.sync import CreditsClient

DEFAULT_BATCH_SIZE = 1000  # a 1000-item Lua script holds Redis ~10 ms; 5000 would stall other agents longer
DEFAULT_MAX_IN_FLIGHT = 4
MAX_IN_FLIGHT_MAX = 64
FAILURES_KEPT_MAX = 1000
JOB_ID_LENGTH_MAX = 200  # leaves room for ":{index}" within the 255-character key limit
CHECKPOINT_VERSION = 1
# Whole-batch refusals worth waiting out (beyond the client's own retries of each request).
BATCH_RETRIES_MAX = 5
BATCH_RETRY_WAIT_S_MAX = 30.0

_ITEM_PARAM = re.compile(r"^\$\.items\[(\d+)\]")


@dataclass(frozen=True)
class ItemFailure:
    index: int  # position in the input
    idempotency_key: str
    code: str  # the API's error code: insufficient_credits, unknown_action, ...
    message: str


@dataclass
class BulkReport:
    """What the job did. With a checkpoint, counts include earlier runs of the job."""

    job_id: str
    ok: int = 0
    failed: int = 0
    credits: decimal.Decimal = decimal.Decimal(0)
    resumed_from: int = 0  # items below this index were done by an earlier run
    failures: list[ItemFailure] = field(default_factory=list)  # this run's, at most FAILURES_KEPT_MAX
    failures_by_code: dict[str, int] = field(default_factory=dict)  # this run's
    elapsed_s: float = 0.0

    @property
    def processed(self) -> int:
        return self.ok + self.failed


class BulkAborted(errors.CreditsError):
    """The job stopped on a failure of a whole request; ``report`` says what was done
    (rerun with the same job_id to finish: charged items replay)."""

    def __init__(self, message: str, report: BulkReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Chunk:
    seq: int
    start: int  # index of items[0] in the input
    items: list[models.Item]


@dataclass
class _Tally:
    ok: int = 0
    failed: int = 0
    credits: decimal.Decimal = decimal.Decimal(0)


class _Checkpoint(msgspec.Struct, kw_only=True):
    version: int
    job_id: str
    next_index: int
    ok: int
    failed: int
    credits: decimal.Decimal
    complete: bool = False


def length_of(items: Iterable[models.Item]) -> int | None:
    return len(items) if isinstance(items, Sized) else None


class BulkJob:
    """The bookkeeping of one run: keys, chunks, counts, the checkpoint, progress.
    Thread-safe (the sync driver records from worker threads)."""

    def __init__(
        self,
        job_id: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        checkpoint: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        total: int | None = None,
        on_failure: Callable[[ItemFailure], None] | None = None,
        progress_bar: Progress | None = None,
    ) -> None:
        if not 1 <= len(job_id) <= JOB_ID_LENGTH_MAX:
            raise ValueError(f"job_id must be 1 to {JOB_ID_LENGTH_MAX} characters")
        if not 1 <= batch_size <= _core.MAX_BATCH_ITEMS:
            raise ValueError(f"batch_size must be 1 to {_core.MAX_BATCH_ITEMS}")
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT_MAX:
            raise ValueError(f"max_in_flight must be 1 to {MAX_IN_FLIGHT_MAX}")
        self.job_id = job_id
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.on_failure = on_failure
        self.checkpoint_path = pathlib.Path(checkpoint) if checkpoint is not None else None
        self._lock = threading.Lock()
        self._started_s = time.monotonic()
        saved = self._load_checkpoint()
        self._watermark = saved.next_index if saved else 0
        self._below = _Tally(saved.ok, saved.failed, saved.credits) if saved else _Tally()
        self.report = BulkReport(job_id, ok=self._below.ok, failed=self._below.failed, credits=self._below.credits)
        self.report.resumed_from = self._watermark
        self._next_seq = 0  # the lowest chunk not yet answered
        self._answered: dict[int, tuple[int, _Tally]] = {}  # seq -> (end index, tally), above the watermark
        remaining = None if total is None else max(0, total - self._watermark)
        self.progress = progress_bar or Progress(remaining, enabled=progress, label=f"credits {job_id}")

    # -- input ------------------------------------------------------------------------
    def chunks(self, items: Iterable[models.Item]) -> Iterator[Chunk]:
        """The input after the checkpoint, in keyed chunks. One pass, lazily: the loop is
        bounded by the input itself."""
        source = iter(items)
        skipped = sum(1 for _ in itertools.islice(source, self._watermark))
        if skipped < self._watermark:
            raise ValueError(f"the checkpoint says {self._watermark} items were done, but the input has only {skipped}")
        start = self._watermark
        for seq in itertools.count():
            batch = list(itertools.islice(source, self.batch_size))
            if not batch:
                return
            yield Chunk(seq, start, [self._keyed(item, start + i) for i, item in enumerate(batch)])
            start += len(batch)

    def _keyed(self, item: models.Item, index: int) -> models.Item:
        if not isinstance(item, models.Item):
            raise TypeError(f"item {index} is a {type(item).__name__}, not a credits_sdk.Item")
        if item.idempotency_key is not None:
            return item
        return msgspec.structs.replace(item, idempotency_key=f"{self.job_id}:{index}")

    # -- one chunk: what to send, what the answers mean -----------------------------------
    def settle(
        self, chunk: Chunk
    ) -> Generator[list[models.Item] | _core.Sleep, models.BatchResult | errors.CreditsError | None, None]:
        """Yields the items to send (or a Sleep); is sent the BatchResult or the error.

        An error that names one item (``$.items[3].units``: the sidecar validates the
        whole request before charging any of it) fails that item and resends the rest;
        a rate limit or an outage is waited out a bounded number of times; any other
        error is the job's, and is raised.
        """
        pending = list(range(len(chunk.items)))  # positions in chunk.items still to send
        tally = _Tally()
        waits = 0
        # Each round either finishes, drops one item, or spends one of the bounded waits.
        for _ in range(len(chunk.items) + BATCH_RETRIES_MAX + 1):
            outcome = yield [chunk.items[p] for p in pending]
            if isinstance(outcome, models.BatchResult):
                for result in outcome.results:
                    position = pending[result.index]
                    if result.ok:
                        tally.ok += 1
                        tally.credits += result.credits or 0
                    else:
                        code = result.error.code if result.error else "unknown"
                        message = result.error.message if result.error else ""
                        self._fail(chunk, position, code, message, tally)
                self._answered_chunk(chunk, tally)
                return
            if outcome is None:
                raise RuntimeError("settle() must be sent the outcome of the batch it yielded")
            named = _item_named(outcome)
            if named is not None and named < len(pending) and isinstance(outcome, errors.ApiError):
                self._fail(chunk, pending[named], outcome.code, outcome.message, tally)
                del pending[named]
                if not pending:
                    self._answered_chunk(chunk, tally)
                    return
                continue
            wait_s = _wait_for(outcome, waits)
            if wait_s is None:
                raise outcome
            waits += 1
            sent = yield _core.Sleep(wait_s)
            if sent is not None:
                raise RuntimeError("settle() expects None after a Sleep")
        raise RuntimeError("a chunk did not settle within its bound")  # pragma: no cover

    def _fail(self, chunk: Chunk, position: int, code: str, message: str, tally: _Tally) -> None:
        item = chunk.items[position]
        failure = ItemFailure(chunk.start + position, item.idempotency_key or "", code, message)
        tally.failed += 1
        with self._lock:
            by_code = self.report.failures_by_code
            by_code[code] = by_code.get(code, 0) + 1
            if len(self.report.failures) < FAILURES_KEPT_MAX:
                self.report.failures.append(failure)
        if self.on_failure is not None:
            self.on_failure(failure)

    def _answered_chunk(self, chunk: Chunk, tally: _Tally) -> None:
        with self._lock:
            self.report.ok += tally.ok
            self.report.failed += tally.failed
            self.report.credits += tally.credits
            self._answered[chunk.seq] = (chunk.start + len(chunk.items), tally)
            moved = False
            # Advance over answered chunks in input order; at most max_in_flight wait here.
            while self._next_seq in self._answered:
                end, done = self._answered.pop(self._next_seq)
                self._watermark = end
                self._below.ok += done.ok
                self._below.failed += done.failed
                self._below.credits += done.credits
                self._next_seq += 1
                moved = True
            if moved:
                self._save_checkpoint(complete=False)
            self.progress.advance(len(chunk.items), failed=tally.failed)

    # -- the end -----------------------------------------------------------------------
    def finish(self) -> BulkReport:
        with self._lock:
            self._save_checkpoint(complete=True)
            self.progress.close()
            self.report.elapsed_s = time.monotonic() - self._started_s
            return self.report

    def abort(self, cause: BaseException) -> BulkAborted:
        with self._lock:
            self.progress.close()
            self.report.elapsed_s = time.monotonic() - self._started_s
            return BulkAborted(
                f"bulk job {self.job_id!r} stopped after {self.report.processed} items: {cause}; "
                "run it again with the same job_id to finish (charged items replay)",
                self.report,
            )

    # -- checkpoint --------------------------------------------------------------------
    def _load_checkpoint(self) -> _Checkpoint | None:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        try:
            saved = msgspec.json.decode(path.read_bytes(), type=_Checkpoint)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ValueError(f"checkpoint {path} is unreadable ({exc}); remove it to start over") from None
        if saved.version != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path} has version {saved.version}, expected {CHECKPOINT_VERSION}")
        if saved.job_id != self.job_id:
            raise ValueError(f"checkpoint {path} belongs to job {saved.job_id!r}, not {self.job_id!r}")
        return saved

    def _save_checkpoint(self, *, complete: bool) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        state = _Checkpoint(
            version=CHECKPOINT_VERSION,
            job_id=self.job_id,
            next_index=self._watermark,
            ok=self._below.ok,
            failed=self._below.failed,
            credits=self._below.credits,
            complete=complete,
        )
        data = msgspec.json.encode(state)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            pathlib.Path(temporary).unlink(missing_ok=True)
            raise


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, object]:
    """A checkpoint file as a dict (for operators and tests)."""
    loaded: dict[str, object] = json.loads(pathlib.Path(path).read_text())
    return loaded


def _item_named(error: errors.CreditsError) -> int | None:
    """The position of the item a whole-request 4xx blames (``$.items[3]...``), if any."""
    if not isinstance(error, errors.ApiError) or error.status not in (400, 403, 404, 409) or not error.param:
        return None
    if isinstance(error, errors.IdempotencyConflict) and error.param == _core.IDEMPOTENCY_HEADER:
        return None
    match = _ITEM_PARAM.match(error.param)
    return int(match.group(1)) if match else None


def _wait_for(error: errors.CreditsError, waits: int) -> float | None:
    """How long to wait before resending a batch the sidecar refused as a whole for a
    passing reason (the client already retried the request itself), or None."""
    if waits >= BATCH_RETRIES_MAX:
        return None
    if not isinstance(error, errors.RateLimited | errors.Unavailable | errors.ConnectionFailed):
        return None
    retry_after_s: float = 0.0
    if isinstance(error, errors.ApiError) and error.retry_after_s is not None:
        retry_after_s = error.retry_after_s
    backoff_s = min(BATCH_RETRY_WAIT_S_MAX, 0.5 * 2.0**waits)
    return min(BATCH_RETRY_WAIT_S_MAX, max(backoff_s, retry_after_s))


# -- drivers -----------------------------------------------------------------------------
async def _settle_async(client: AsyncCreditsClient, job: BulkJob, chunk: Chunk) -> None:
    steps = job.settle(chunk)
    step = next(steps)
    for _ in range(2 * (len(chunk.items) + BATCH_RETRIES_MAX + 1)):
        outcome: models.BatchResult | errors.CreditsError | None
        if isinstance(step, _core.Sleep):
            await asyncio.sleep(step.seconds)
            outcome = None
        else:
            try:
                outcome = await client.consume_batch(step)
            except errors.CreditsError as exc:
                outcome = exc
        try:
            step = steps.send(outcome)
        except StopIteration:
            return
    raise RuntimeError("a chunk did not settle within its bound")  # pragma: no cover


def _settle_sync(client: CreditsClient, job: BulkJob, chunk: Chunk) -> None:
    steps = job.settle(chunk)
    step = next(steps)
    for _ in range(2 * (len(chunk.items) + BATCH_RETRIES_MAX + 1)):
        outcome: models.BatchResult | errors.CreditsError | None
        if isinstance(step, _core.Sleep):
            time.sleep(step.seconds)
            outcome = None
        else:
            try:
                outcome = client.consume_batch(step)
            except errors.CreditsError as exc:
                outcome = exc
        try:
            step = steps.send(outcome)
        except StopIteration:
            return
    raise RuntimeError("a chunk did not settle within its bound")  # pragma: no cover


def _first_error(
    done: Iterable[asyncio.Task[None]] | Iterable[concurrent.futures.Future[None]],
) -> BaseException | None:
    for finished in done:
        if finished.cancelled():
            continue
        error = finished.exception()
        if error is not None:
            return error
    return None


async def run_async(client: AsyncCreditsClient, job: BulkJob, items: Iterable[models.Item]) -> BulkReport:
    """Send the job's chunks as asyncio tasks, at most ``max_in_flight`` at a time. The
    tasks inherit the caller's ``credits_context``."""
    in_flight: set[asyncio.Task[None]] = set()
    failure: BaseException | None = None
    try:
        for chunk in job.chunks(items):
            if len(in_flight) >= job.max_in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                failure = _first_error(done)
                if failure is not None:
                    break
            in_flight.add(asyncio.create_task(_settle_async(client, job, chunk)))
    except Exception as exc:
        failure = exc  # reading the input failed: finish what is in flight, then stop
    except BaseException:
        # Cancelled (or interrupted): stop sending. What was charged stays charged and
        # replays when the job runs again.
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        job.progress.close()
        raise
    if in_flight:
        done, _ = await asyncio.wait(in_flight)
        failure = failure or _first_error(done)
    if failure is not None:
        if not isinstance(failure, errors.CreditsError):
            job.progress.close()
            raise failure
        raise job.abort(failure) from failure
    return job.finish()


def run_sync(client: CreditsClient, job: BulkJob, items: Iterable[models.Item]) -> BulkReport:
    """Send the job's chunks from a pool of ``max_in_flight`` threads, each running in a
    copy of the caller's ``credits_context``."""
    settle = context.bind(_settle_sync)
    failure: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(job.max_in_flight, thread_name_prefix="credits-bulk") as pool:
        in_flight: set[concurrent.futures.Future[None]] = set()
        try:
            for chunk in job.chunks(items):
                if len(in_flight) >= job.max_in_flight:
                    done, in_flight = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                    failure = _first_error(done)
                    if failure is not None:
                        break
                in_flight.add(pool.submit(settle, client, job, chunk))
        except Exception as exc:
            failure = exc
        except BaseException:
            for future in in_flight:
                future.cancel()
            job.progress.close()
            raise
        done, _ = concurrent.futures.wait(in_flight)
        failure = failure or _first_error(done)
    if failure is not None:
        if not isinstance(failure, errors.CreditsError):
            job.progress.close()
            raise failure
        raise job.abort(failure) from failure
    return job.finish()
