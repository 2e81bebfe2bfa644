"""Bulk jobs without a server: keys, chunks, bounds, item failures, waits, the
checkpoint, and both drivers against a fake sidecar that keeps idempotency like the real
one."""

from __future__ import annotations

import asyncio
import decimal
import io
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any, cast

import pytest

from credits_sdk import _core, bulk, errors, models
from credits_sdk.bulk import BulkJob, Chunk
from credits_sdk.context import credits_context, current
from credits_sdk.models import Item
from credits_sdk.progress import Progress

D = decimal.Decimal
PRICE = D("0.001")


class FakeSidecar:
    """Charges items like /use/batch: keys replay, `bad` is an unknown action, units=0
    refuses the whole request naming the item, `fail_next` requests fail first."""

    def __init__(self, *, fail_next: list[errors.CreditsError] | None = None, delay_s: float = 0.0) -> None:
        self.charged: dict[str, D] = {}
        self.fail_next = list(fail_next or [])
        self.delay_s = delay_s
        self.in_flight = 0
        self.in_flight_max = 0
        self.requests = 0
        self.metadata_seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def answer(self, items: Sequence[Item]) -> models.BatchResult:
        with self.lock:
            self.requests += 1
            if self.fail_next:
                raise self.fail_next.pop(0)
            for i, it in enumerate(items):
                if it.units == 0:
                    raise errors.InvalidRequest(
                        "Expected `int` >= 1", status=400, code="invalid_request", param=f"$.items[{i}].units"
                    )
            results = []
            scope = current()
            for i, it in enumerate(items):
                self.metadata_seen.append(dict(scope.metadata))
                if it.action == "bad":
                    results.append(
                        models.BatchItemResult(
                            index=i, ok=False, error=models.ItemError(code="unknown_action", message="no cost")
                        )
                    )
                    continue
                key = it.idempotency_key or ""
                credits = self.charged.setdefault(key, PRICE * it.units)
                results.append(models.BatchItemResult(index=i, ok=True, id=key, credits=credits))
            total = sum(self.charged.values(), D(0))
            return models.BatchResult(results=results, balance=-total, available=-total)

    async def consume_batch(self, items: Sequence[Item], **_: Any) -> models.BatchResult:
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return self.answer(items)
        finally:
            self.in_flight -= 1

    def consume_batch_sync(self, items: Sequence[Item], **_: Any) -> models.BatchResult:
        with self.lock:
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            time.sleep(self.delay_s)
            return self.answer(items)
        finally:
            with self.lock:
                self.in_flight -= 1


class SyncFake:
    def __init__(self, sidecar: FakeSidecar) -> None:
        self.consume_batch = sidecar.consume_batch_sync


def items(count: int, *, bad: Collection[int] = (), zero: Collection[int] = ()) -> Iterator[Item]:
    for i in range(count):
        yield Item(action="bad" if i in bad else "tokens", units=0 if i in zero else 1)


async def run(sidecar: FakeSidecar, source: Any, **options: Any) -> bulk.BulkReport:
    job = BulkJob(options.pop("job_id", "job"), progress=False, **options)
    return await bulk.run_async(cast(Any, sidecar), job, source)


# -- keys and chunks ---------------------------------------------------------------------------
def test_items_get_stable_keys_in_bounded_chunks() -> None:
    job = BulkJob("j", batch_size=4, progress=False)
    source = [Item(action="a") for _ in range(9)] + [Item(action="a", idempotency_key="own")]
    chunks = list(job.chunks(source))
    assert [len(c.items) for c in chunks] == [4, 4, 2]
    assert [c.start for c in chunks] == [0, 4, 8]
    assert [it.idempotency_key for c in chunks for it in c.items] == [f"j:{i}" for i in range(9)] + ["own"]
    with pytest.raises(TypeError, match=r"not a credits_sdk\.Item"):
        list(job.chunks(cast(Any, [{"action": "a"}])))


def test_options_are_bounded() -> None:
    bad: list[dict[str, Any]] = [{"batch_size": 0}, {"batch_size": 5001}, {"max_in_flight": 0}, {"max_in_flight": 65}]
    for options in bad:
        with pytest.raises(ValueError):
            BulkJob("j", **options)
    with pytest.raises(ValueError, match="job_id"):
        BulkJob("x" * 201)


# -- settling one chunk -------------------------------------------------------------------------------
def test_an_item_the_sidecar_rejects_is_dropped_and_the_rest_resent() -> None:
    job = BulkJob("j", progress=False)
    chunk = Chunk(0, 0, [job._keyed(Item(action="a", units=u), i) for i, u in enumerate([1, 0, 1, 0])])
    steps = job.settle(chunk)
    assert [it.units for it in cast(list[Item], next(steps))] == [1, 0, 1, 0]
    refusal = errors.InvalidRequest("bad", status=400, code="invalid_request", param="$.items[1].units")
    assert [it.units for it in cast(list[Item], steps.send(refusal))] == [1, 1, 0]
    again = errors.InvalidRequest("bad", status=400, code="invalid_request", param="$.items[2].units")
    sent = cast(list[Item], steps.send(again))
    assert [it.idempotency_key for it in sent] == ["j:0", "j:2"]
    ok = models.BatchResult(
        results=[models.BatchItemResult(index=i, ok=True, credits=D(1)) for i in range(2)], balance=D(0), available=D(0)
    )
    with pytest.raises(StopIteration):
        steps.send(ok)
    assert (job.report.ok, job.report.failed) == (2, 2)
    assert [f.index for f in job.report.failures] == [1, 3]


def test_outages_are_waited_out_a_bounded_number_of_times() -> None:
    job = BulkJob("j", progress=False)
    chunk = Chunk(0, 0, [job._keyed(Item(action="a"), 0)])
    steps = job.settle(chunk)
    next(steps)
    down = errors.Unavailable("down", status=503, code="unavailable", retry_after_s=3)
    waits = []
    with pytest.raises(errors.Unavailable):
        for _ in range(bulk.BATCH_RETRIES_MAX + 1):
            step = steps.send(down)
            assert isinstance(step, _core.Sleep)
            waits.append(step.seconds)
            assert isinstance(steps.send(None), list)  # the same items again
    assert len(waits) == bulk.BATCH_RETRIES_MAX
    assert all(3 <= w <= bulk.BATCH_RETRY_WAIT_S_MAX for w in waits)


def test_a_request_level_refusal_stops_the_chunk() -> None:
    job = BulkJob("j", progress=False)
    steps = job.settle(Chunk(0, 0, [job._keyed(Item(action="a"), 0)]))
    next(steps)
    with pytest.raises(errors.Unauthenticated):
        steps.send(errors.Unauthenticated("revoked", status=401, code="unauthenticated"))
    conflict = errors.IdempotencyConflict("x", status=409, code="idempotency_conflict", param="Idempotency-Key")
    steps = job.settle(Chunk(1, 1, [job._keyed(Item(action="a"), 1)]))
    next(steps)
    with pytest.raises(errors.IdempotencyConflict):
        steps.send(conflict)


async def test_failures_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "FAILURES_KEPT_MAX", 5)
    report = await run(FakeSidecar(), items(50, bad=set(range(50))), batch_size=10)
    assert report.failed == 50 and len(report.failures) == 5 and report.failures_by_code == {"unknown_action": 50}


# -- the checkpoint -------------------------------------------------------------------------------------
def answered(job: BulkJob, chunk: Chunk) -> None:
    steps = job.settle(chunk)
    next(steps)
    result = models.BatchResult(
        results=[models.BatchItemResult(index=i, ok=True, credits=PRICE) for i in range(len(chunk.items))],
        balance=D(0),
        available=D(0),
    )
    with pytest.raises(StopIteration):
        steps.send(result)


def test_checkpoint_advances_only_over_answered_prefixes(tmp_path: Any) -> None:
    path = tmp_path / "ckpt"
    job = BulkJob("j", batch_size=10, checkpoint=path, progress=False)
    c0, c1, c2 = list(job.chunks(items(30)))
    answered(job, c1)  # out of order: nothing below it is done yet
    assert not path.exists()
    answered(job, c0)
    assert bulk.read_checkpoint(path)["next_index"] == 20
    assert job.report.ok == 20
    answered(job, c2)
    job.finish()
    saved = bulk.read_checkpoint(path)
    assert (saved["next_index"], saved["ok"], saved["complete"]) == (30, 30, True)
    assert D(str(saved["credits"])) == D("0.030")

    again = BulkJob("j", batch_size=10, checkpoint=path, progress=False)
    assert list(again.chunks(items(30))) == [] and again.report.resumed_from == 30 and again.report.ok == 30
    with pytest.raises(ValueError, match="belongs to job"):
        BulkJob("other", checkpoint=path)
    with pytest.raises(ValueError, match="only 12"):
        list(BulkJob("j", checkpoint=path, progress=False).chunks(items(12)))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        BulkJob("j", checkpoint=path)


async def test_resume_from_a_checkpoint_sends_only_the_rest(tmp_path: Any) -> None:
    sidecar = FakeSidecar()
    path = tmp_path / "ckpt"

    def crashing() -> Iterator[Item]:
        for i, item in enumerate(items(100)):
            if i == 55:
                raise KeyboardInterrupt  # the process dies while reading its input
            yield item

    with pytest.raises(KeyboardInterrupt):
        await run(sidecar, crashing(), batch_size=10, max_in_flight=2, checkpoint=path)
    done = int(cast(int, bulk.read_checkpoint(path)["next_index"]))
    assert 0 < done <= 50
    report = await run(sidecar, items(100), batch_size=10, checkpoint=path)
    assert (report.ok, report.resumed_from) == (100, done)
    assert len(sidecar.charged) == 100 and sum(sidecar.charged.values()) == D("0.1")


# -- drivers ---------------------------------------------------------------------------------------------
async def test_async_driver_is_bounded_and_lazy() -> None:
    sidecar = FakeSidecar(delay_s=0.002)
    pulled = 0

    def counting() -> Iterator[Item]:
        nonlocal pulled
        for item in items(2000):
            pulled += 1
            answered_items = sum(1 for _ in sidecar.charged)
            assert pulled - answered_items <= (3 + 1) * 50  # never more than in flight + one chunk
            yield item

    report = await run(sidecar, counting(), batch_size=50, max_in_flight=3)
    assert report.ok == 2000 and sidecar.in_flight_max == 3
    assert report.credits == D(2)


async def test_async_driver_reports_failures_and_retries_outages() -> None:
    sidecar = FakeSidecar(fail_next=[errors.Unavailable("down", status=503, code="unavailable")])
    seen: list[bulk.ItemFailure] = []
    report = await run(
        sidecar, items(100, bad={3, 50}, zero={7}), batch_size=25, on_failure=seen.append, job_id="with-failures"
    )
    assert (report.ok, report.failed) == (97, 3)
    assert sorted(f.index for f in seen) == [3, 7, 50]
    assert report.failures_by_code == {"unknown_action": 2, "invalid_request": 1}


async def test_async_driver_aborts_on_a_request_failure_with_the_report() -> None:
    sidecar = FakeSidecar(fail_next=[errors.Forbidden("no", status=403, code="forbidden")])
    with pytest.raises(bulk.BulkAborted) as aborted:
        await run(sidecar, items(100), batch_size=10, max_in_flight=1)
    assert isinstance(aborted.value.__cause__, errors.Forbidden)
    assert aborted.value.report.processed == 0


async def test_async_driver_tasks_inherit_the_context() -> None:
    sidecar = FakeSidecar()
    with credits_context(metadata={"job": "ctx"}):
        await run(sidecar, items(30), batch_size=10)
    assert sidecar.metadata_seen == [{"job": "ctx"}] * 30


def test_sync_driver_threads_are_bounded_and_carry_the_context() -> None:
    sidecar = FakeSidecar(delay_s=0.002)
    with credits_context(metadata={"job": "threads"}):
        job = BulkJob("sync", batch_size=20, max_in_flight=3, progress=False)
        report = bulk.run_sync(cast(Any, SyncFake(sidecar)), job, items(500, bad={10}))
    assert (report.ok, report.failed) == (499, 1)
    assert sidecar.in_flight_max <= 3
    assert all(seen == {"job": "threads"} for seen in sidecar.metadata_seen)

    failing = FakeSidecar(fail_next=[errors.Unauthenticated("no", status=401, code="unauthenticated")])
    with pytest.raises(bulk.BulkAborted):
        bulk.run_sync(cast(Any, SyncFake(failing)), BulkJob("sync2", progress=False), items(10))


def test_progress_is_drawn_through_the_job() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    job = BulkJob("drawn", batch_size=10, progress_bar=Progress(30, stream=screen, label="job"))
    report = bulk.run_sync(cast(Any, SyncFake(FakeSidecar())), job, items(30))
    assert report.ok == 30
    assert "30/30" in screen.getvalue() and screen.getvalue().endswith("\n")
