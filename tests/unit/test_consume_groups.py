"""hotpath/group.py without a server: when requests go alone, when together, in what
order, and what each gets when the call fails."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from core.errors import OutcomeUnknown, Unavailable
from hotpath.client import GroupRequest, Result
from hotpath.group import ConsumeGroups
from lua import Status


class FakeHot:
    """Records the calls; each waits until released, to hold a call in flight."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[int]]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def consume(self, org: str, cred: str, *, units: int, **_: Any) -> Result:
        self.calls.append(("alone", org, [units]))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return Result(Status.OK, {"units": units})

    async def consume_group(self, org: str, requests: Sequence[GroupRequest]) -> list[Result]:
        self.calls.append(("group", org, [r.units for r in requests]))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [Result(Status.OK, {"units": r.units, "id": r.event_id}) for r in requests]


def groups_over(fake: FakeHot, max_group: int = 256) -> ConsumeGroups:
    return ConsumeGroups(fake, max_group=max_group)  # type: ignore[arg-type]


async def test_alone_at_once_then_together_in_arrival_order() -> None:
    fake = FakeHot()
    groups = groups_over(fake, max_group=3)
    tasks = []
    for units in range(1, 6):
        tasks.append(asyncio.ensure_future(groups.consume("o", "k", action="a", units=units)))
        await asyncio.sleep(0)
    other = asyncio.ensure_future(groups.consume("p", "k", action="a", units=9))  # another organization: at once
    await asyncio.sleep(0)
    assert fake.calls == [("alone", "o", [1]), ("alone", "p", [9])]
    fake.gate.set()
    results = await asyncio.gather(*tasks, other)
    assert [r.payload["units"] for r in results] == [1, 2, 3, 4, 5, 9]
    # 1 alone; 2..4 waited for it (at most 3 a call); 5 went after them, alone.
    assert fake.calls == [("alone", "o", [1]), ("alone", "p", [9]), ("group", "o", [2, 3, 4]), ("alone", "o", [5])]
    assert groups.stats.groups == 1 and groups.stats.grouped == 3
    assert groups._waiting == {}  # nothing left in flight


async def test_nothing_in_flight_means_no_wait() -> None:
    fake = FakeHot()
    fake.gate.set()
    groups = groups_over(fake)
    for units in (1, 2, 3):
        assert (await groups.consume("o", "k", action="a", units=units)).payload["units"] == units
    assert [c[0] for c in fake.calls] == ["alone"] * 3


async def test_each_waiter_gets_its_own_exception() -> None:
    fake = FakeHot()
    groups = groups_over(fake)
    tasks = []
    for units in range(4):
        tasks.append(asyncio.ensure_future(groups.consume("o", "k", action="a", units=units)))
        await asyncio.sleep(0)
    fake.fail = OutcomeUnknown("redis: no answer")
    fake.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, OutcomeUnknown) for e in outcomes)
    assert len({id(e) for e in outcomes}) == 4  # a handler sets its own key on its own copy
    for key, exc in zip("abcd", outcomes, strict=True):
        assert isinstance(exc, OutcomeUnknown)
        exc.idempotency_key = key
    assert [e.idempotency_key for e in outcomes if isinstance(e, OutcomeUnknown)] == list("abcd")


async def test_past_the_bound_a_request_is_refused_not_queued() -> None:
    fake = FakeHot()
    groups = ConsumeGroups(fake, waiting_max=2)  # type: ignore[arg-type]
    tasks = [asyncio.ensure_future(groups.consume("o", "k", action="a", units=u)) for u in range(3)]
    await asyncio.sleep(0)  # one in flight, two waiting
    with pytest.raises(Unavailable, match="consumes of one organization waiting"):
        await groups.consume("o", "k", action="a", units=9)
    fake.gate.set()
    assert [r.payload["units"] for r in await asyncio.gather(*tasks)] == [0, 1, 2]
    assert all(9 not in units for _, _, units in fake.calls)  # never sent


def test_max_group_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_group"):
        groups_over(FakeHot(), max_group=0)
