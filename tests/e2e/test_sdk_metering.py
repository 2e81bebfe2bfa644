"""Reservations, @metered in each mode, agents and context propagation, against the
real sidecar. Balances are checked over plain HTTP."""

from __future__ import annotations

import asyncio
import decimal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from credits_sdk import (
    AsyncCreditsClient,
    CreditsClient,
    IdempotencyConflict,
    InsufficientCredits,
    MeteredAgent,
    ReservationClosed,
    SyncMeteredAgent,
    UnknownAction,
    bind,
    credits_context,
    metered,
)
from tests.e2e.sdk_support import Agent, Client, available, raw_balance

pytest_plugins = ("tests.e2e.conftest_sdk",)  # its fixtures: aclient, sclient, agent, ...

D = decimal.Decimal


@dataclass(frozen=True)
class Completion:
    text: str
    output_tokens: int


class Boom(Exception):
    pass


# -- the reservation context manager ------------------------------------------------------------
async def test_reservation_charges_used_and_frees_the_rest(client: Client, aclient: AsyncCreditsClient) -> None:
    key = aclient.settings.api_key or ""
    async with aclient.reservation(50, ttl_s=600, action="generate_content") as hold:
        assert (await raw_balance(client, key))["reserved"] == D(50)
        hold.used = 12
    assert hold.released is not None and hold.released.used == D(12) and hold.released.released == D(38)
    assert await raw_balance(client, key) == {"balance": D(88), "reserved": D(0), "available": D(88)}
    with pytest.raises(RuntimeError):
        hold.used = 1  # released: nothing more can be charged through it


async def test_reservation_released_on_exception_and_cancellation(client: Client, aclient: AsyncCreditsClient) -> None:
    key = aclient.settings.api_key or ""
    with pytest.raises(Boom):
        async with aclient.reservation(30, ttl_s=600) as hold:
            raise Boom
    assert hold.released is not None and hold.released.used == 0
    with pytest.raises(Boom):
        async with aclient.reservation(30, ttl_s=600) as partial:
            partial.used = D("2.5")  # work done before the failure is still paid for
            raise Boom
    assert partial.released is not None and partial.released.used == D("2.5")

    entered = asyncio.Event()

    async def long_task() -> None:
        async with aclient.reservation(40, ttl_s=600):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(long_task())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the shielded release finishes on its own
        if (await raw_balance(client, key))["reserved"] == 0:
            break
        await asyncio.sleep(0.02)
    assert await raw_balance(client, key) == {"balance": D("97.5"), "reserved": D(0), "available": D("97.5")}


async def test_reservation_expired_before_exit(client: Client, aclient: AsyncCreditsClient) -> None:
    with pytest.raises(ReservationClosed):
        async with aclient.reservation(5, ttl_s=1) as hold:
            await asyncio.sleep(1.2)
            hold.used = 3
    assert isinstance(hold.release_error, ReservationClosed)
    assert await available(client, aclient.settings.api_key or "") == D(100)  # an expired hold charges nothing


async def test_sync_reservation(client: Client, sclient: CreditsClient, agent: Agent) -> None:
    def blocking() -> None:
        with sclient.reservation(20, ttl_s=60) as hold:
            hold.used = D("0.125")
        assert hold.released is not None and hold.released.used == D("0.125")
        with pytest.raises(ValueError, match="more than the hold"), sclient.reservation(1, ttl_s=60) as small:
            small.used = 2
        with pytest.raises(ValueError, match="precision"), sclient.reservation(1, ttl_s=60) as fine:
            fine.used = D("0.0001")

    await asyncio.to_thread(blocking)
    assert await raw_balance(client, agent.key) == {"balance": D("99.875"), "reserved": D(0), "available": D("99.875")}


# -- @metered, each mode, async and sync ----------------------------------------------------------
async def test_metered_after_charges_on_success_only(client: Client, aclient: AsyncCreditsClient) -> None:
    @metered("llm_output_tokens", result_units=lambda c: c.output_tokens, client=aclient)
    async def complete(prompt: str, fail: bool = False) -> Completion:
        if fail:
            raise Boom
        return Completion(prompt.upper(), output_tokens=1500)

    assert (await complete("hi")).text == "HI"
    with pytest.raises(Boom):
        await complete("no", fail=True)
    assert await available(client, aclient.settings.api_key or "") == D(97)

    @metered("tool_call", units=lambda calls: calls, client=aclient)
    async def tools(calls: int) -> int:
        return calls

    assert await tools(0) == 0  # zero units charge nothing
    await tools(5)
    assert await available(client, aclient.settings.api_key or "") == D("96.5")


async def test_metered_before_is_a_gate(client: Client, aclient: AsyncCreditsClient) -> None:
    calls: list[int] = []

    @metered("image_generation", mode="before", units=lambda n: n, client=aclient)
    async def draw(n: int) -> int:
        calls.append(n)
        return n

    await draw(2)
    with pytest.raises(InsufficientCredits):
        await draw(50)  # refused before running
    assert calls == [2]
    assert await available(client, aclient.settings.api_key or "") == D(90)


async def test_metered_reserve_holds_then_charges_the_actual_cost(client: Client, aclient: AsyncCreditsClient) -> None:
    key = aclient.settings.api_key or ""
    seen: dict[str, decimal.Decimal] = {}

    @metered(
        "llm_output_tokens",
        mode="reserve",
        estimate=lambda prompt, max_tokens, **_: D("0.002") * max_tokens,
        result_units=lambda c: c.output_tokens,
        client=aclient,
    )
    async def generate(prompt: str, max_tokens: int, used: int = 1500, fail: bool = False) -> Completion:
        seen["reserved"] = (await raw_balance(client, key))["reserved"]
        if fail:
            raise Boom
        return Completion(prompt, output_tokens=used)

    await generate("a", max_tokens=2500)  # holds 5, charges 1500 * 0.002 = 3
    assert seen["reserved"] == D(5)
    assert await raw_balance(client, key) == {"balance": D(97), "reserved": D(0), "available": D(97)}
    with pytest.raises(Boom):
        await generate("b", max_tokens=1000, fail=True)  # held 2, released, nothing charged
    assert await raw_balance(client, key) == {"balance": D(97), "reserved": D(0), "available": D(97)}
    await generate("c", max_tokens=500, used=1501)  # overrun: hold covers 500 tokens, 1001 more consumed
    assert await available(client, key) == D("93.998")

    @metered("teleport", mode="reserve", estimate=1, client=aclient)
    async def unknown() -> None:
        raise AssertionError("must not run: the action has no price")

    with pytest.raises(UnknownAction):
        await unknown()


async def test_metered_reserve_falls_back_when_the_hold_expired(client: Client, aclient: AsyncCreditsClient) -> None:
    @metered("tool_call", mode="reserve", estimate=5, ttl_s=1, units=7, client=aclient)
    async def slow() -> str:
        await asyncio.sleep(1.2)
        return "done"

    assert await slow() == "done"
    assert await raw_balance(client, aclient.settings.api_key or "") == {
        "balance": D("99.3"),
        "reserved": D(0),
        "available": D("99.3"),
    }


async def test_metered_sync_functions_in_each_mode(client: Client, sclient: CreditsClient, agent: Agent) -> None:
    @metered("generate_content", client=sclient)
    def after() -> str:
        return "a"

    @metered("web_search", mode="before", client=sclient)
    def before() -> str:
        return "b"

    @metered("tool_call", mode="reserve", estimate=2, result_units=len, client=sclient)
    def reserve(n: int, fail: bool = False) -> list[int]:
        if fail:
            raise Boom
        return list(range(n))

    @metered("generate_content", idempotency_key=lambda task_id: f"task:{task_id}", client=sclient)
    def task(task_id: str) -> str:
        return task_id

    def blocking() -> None:
        assert (after(), before(), reserve(3)) == ("a", "b", [0, 1, 2])
        with pytest.raises(Boom):
            reserve(1, fail=True)
        task("t-1")
        task("t-1")  # the same task again: replayed, not charged

    await asyncio.to_thread(blocking)
    assert await raw_balance(client, agent.key) == {"balance": D("97.2"), "reserved": D(0), "available": D("97.2")}


async def test_metered_needs_a_client_of_the_right_kind(sclient: CreditsClient) -> None:
    @metered("tool_call")
    async def orphan() -> None:
        return None

    with pytest.raises(TypeError, match="AsyncCreditsClient"):
        await orphan()
    with credits_context(client=sclient), pytest.raises(TypeError, match="found CreditsClient"):
        await orphan()


# -- agents -------------------------------------------------------------------------------------------
class ContentAgent(MeteredAgent):
    async def write(self, topic: str) -> str:
        await self.consume_credits_for_action("generate_content", metadata={"topic": topic})
        return f"about {topic}"

    @metered("llm_output_tokens", result_units=lambda c: c.output_tokens)
    async def draft(self, outline: str) -> Completion:
        return Completion(outline, output_tokens=500)

    @metered("analyze_data", mode="reserve", estimate=3, units=1)
    async def analyze(self) -> str:
        return "insight"


async def test_metered_agent(client: Client, aclient: AsyncCreditsClient, agent: Agent) -> None:
    r = await client.post(
        "/api/credits/departments",
        json={"name": f"content-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {agent.org.admin_key}"},
    )
    dept = (await r.json())["id"]
    writer = ContentAgent(aclient, department_id=dept, metadata={"team": "growth"})
    assert await writer.write("credits") == "about credits"
    assert (await writer.draft("outline")).output_tokens == 500
    assert await writer.analyze() == "insight"
    async with writer.reservation(4, action="summarize") as hold:
        hold.used = D("0.5")
    hold2 = await writer.reserve_credits(1)
    await writer.release_credits(hold2, D("0.25"))
    balance = await writer.check_balance()
    assert balance.available == D("95.25")  # 1 + 500 * 0.002 + 2 + 0.5 + 0.25
    assert balance.department is not None and balance.department.spent == D("4.75")
    # The agent's metadata rode along: the same key without it is a different request.
    await writer.consume_credits_for_action("tool_call", idempotency_key="agent-1")
    with pytest.raises(IdempotencyConflict):
        await aclient.consume("tool_call", department_id=dept, idempotency_key="agent-1")
    await aclient.consume(
        "tool_call",
        department_id=dept,
        metadata={"agent": "ContentAgent", "team": "growth"},
        idempotency_key="agent-1",
    )
    assert await available(client, agent.key) == D("95.15")


async def test_sync_metered_agent(client: Client, sclient: CreditsClient, agent: Agent) -> None:
    class Crawler(SyncMeteredAgent):
        @metered("web_search", mode="before")
        def search(self, query: str) -> str:
            return query

    def blocking() -> None:
        crawler = Crawler(sclient, name="crawler-1")
        assert crawler.search("q") == "q"
        crawler.consume_credits_for_action("tool_call", 2)
        with crawler.reservation(1) as hold:
            hold.used = D("0.1")
        assert crawler.check_balance().available == D("99.2")

    await asyncio.to_thread(blocking)
    assert await available(client, agent.key) == D("99.2")


# -- context propagation across tasks and threads ----------------------------------------------------------
async def test_context_reaches_tasks_and_threads(client: Client, meter_url: str, agent: Agent) -> None:
    """Each worker charges with its own key inside an outer context that carries a
    trace id; replaying each key with the metadata written out shows what was sent."""
    r = await client.post(
        "/api/credits/departments", json={"name": "ctx"}, headers={"Authorization": f"Bearer {agent.org.admin_key}"}
    )
    dept = (await r.json())["id"]
    expected: dict[str, dict[str, str]] = {}
    async with AsyncCreditsClient(meter_url) as aio_sdk:
        sync_sdk = CreditsClient(meter_url)
        try:
            with credits_context(api_key=agent.key, department_id=dept, metadata={"trace_id": "T"}):

                async def in_task(name: str) -> None:
                    with credits_context(metadata={"task": name}):  # nested: adds, inner wins
                        await asyncio.sleep(0)
                        await aio_sdk.consume("tool_call", idempotency_key=f"ctx-{name}")

                def in_thread(name: str) -> None:
                    with credits_context(metadata={"task": name, "trace_id": "T2"}):
                        sync_sdk.consume("tool_call", idempotency_key=f"ctx-{name}")

                def threads() -> None:  # off the event loop, which serves the sidecar
                    worker = threading.Thread(target=bind(in_thread), args=("d",))
                    worker.start()
                    worker.join()
                    with ThreadPoolExecutor(2) as pool:
                        list(pool.map(bind(in_thread), ["e", "f"]))

                await asyncio.gather(in_task("a"), in_task("b"))
                await asyncio.to_thread(in_thread, "c")  # to_thread copies the context itself
                await asyncio.to_thread(threads)
            expected = {
                "a": {"trace_id": "T", "task": "a"},
                "b": {"trace_id": "T", "task": "b"},
                **{n: {"trace_id": "T2", "task": n} for n in "cdef"},
            }
            # Outside the context nothing leaks: no credential at all.
            with pytest.raises(Exception, match="unauthenticated"):
                await aio_sdk.balance()
        finally:
            sync_sdk.close()

    async with AsyncCreditsClient(meter_url, api_key=agent.key) as check:
        for name, meta in expected.items():
            replay = await check.consume("tool_call", department_id=dept, metadata=meta, idempotency_key=f"ctx-{name}")
            assert replay.credits == D("0.1")  # a replay of the first answer, not a conflict
        balance = await check.balance(department_id=dept)
    assert balance.available == D("99.4") and balance.department is not None and balance.department.spent == D("0.6")


async def test_unbound_thread_does_not_inherit(agent: Agent) -> None:
    seen: list[str | None] = []

    def look() -> None:
        from credits_sdk import current

        seen.append(current().api_key)

    def threads() -> None:
        plain = threading.Thread(target=look)
        plain.start()
        plain.join()
        bound = threading.Thread(target=bind(look))
        bound.start()
        bound.join()

    with credits_context(api_key=agent.key):
        await asyncio.to_thread(threads)
        await asyncio.to_thread(look)
    assert seen == [None, agent.key, agent.key]
