"""The SDK's clients against the real sidecar: every method, both clients, every
transport, typed errors, retries across a dropped connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from accounts import admin
from credits_sdk import (
    AsyncCreditsClient,
    ConnectionFailed,
    CreditsClient,
    DepartmentLimitExceeded,
    Forbidden,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    Item,
    KeyCapExceeded,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ReservationClosed,
    Unauthenticated,
    UnknownAction,
    credits_context,
)
from hotpath.client import HotPath
from ledger.store import Ledger
from tests.conftest import Org
from tests.e2e.sdk_support import Agent, Client, DroppingProxy, available, raw_balance

pytest_plugins = ("tests.e2e.conftest_sdk",)  # its fixtures: aclient, sclient, agent, ...

D = decimal.Decimal


async def _department(client: Client, org: Org, name: str, limit: int | None = None) -> str:
    headers = {"Authorization": f"Bearer {org.admin_key}"}
    r = await client.post("/api/credits/departments", json={"name": name}, headers=headers)
    dept: str = (await r.json())["id"]
    if limit is not None:
        r = await client.put(
            f"/api/credits/departments/{dept}/limits", json={"limit": limit, "period": "month"}, headers=headers
        )
        assert r.status == 200
    return dept


# -- every method ---------------------------------------------------------------------------
async def test_every_method_async(client: Client, aclient: AsyncCreditsClient, agent: Agent) -> None:
    balance = await aclient.balance()
    assert (balance.organization_id, balance.balance, balance.available) == (agent.org.id, D(100), D(100))
    assert [g.source for g in balance.grants] == ["signup_bonus"]

    costs = {c.action: c.credits for c in await aclient.costs()}
    assert costs["generate_content"] == D(1) and costs["llm_output_tokens"] == D("0.002")
    assert await aclient.price("llm_input_tokens") == D("0.001")

    used = await aclient.consume("llm_input_tokens", 125, metadata={"task": "t-1"})
    assert (used.action, used.units, used.credits, used.balance) == ("llm_input_tokens", 125, D("0.125"), D("99.875"))
    assert isinstance(used.credits, decimal.Decimal)

    batch = await aclient.consume_batch(
        [Item(action="generate_content"), Item(action="no_such_action"), Item(action="tool_call", units=3)]
    )
    assert [r.ok for r in batch.results] == [True, False, True]
    assert batch.results[1].error is not None and batch.results[1].error.code == "unknown_action"
    assert batch.balance == D("98.575")

    hold = await aclient.reserve(50.5, ttl_s=60, action="generate_content")
    assert hold.amount == D("50.5") and hold.available == D("48.075")
    assert hold.expires_at.tzinfo is not None and hold.expires_at > dt.datetime.now(dt.UTC)
    released = await aclient.release(hold, D("12.25"))
    assert (released.used, released.released, released.balance) == (D("12.25"), D("38.25"), D("86.325"))
    assert await raw_balance(client, agent.key) == {
        "balance": D("86.325"),
        "reserved": D(0),
        "available": D("86.325"),
    }


async def test_every_method_sync(client: Client, sclient: CreditsClient, agent: Agent) -> None:
    def work() -> None:
        assert sclient.balance().available == D(100)
        assert {c.action for c in sclient.costs()} >= {"generate_content", "tool_call"}
        assert sclient.price("tool_call") == D("0.1")
        assert sclient.consume("tool_call", 2).credits == D("0.2")
        batch = sclient.consume_batch([Item(action="tool_call"), Item(action="tool_call", units=4)], atomic=True)
        assert all(r.ok for r in batch.results) and batch.balance == D("99.3")
        hold = sclient.reserve("10", ttl_s=30)
        assert sclient.balance().reserved == D(10)
        assert sclient.release(hold.id, 1).used == D(1)

    await asyncio.to_thread(work)
    assert await raw_balance(client, agent.key) == {"balance": D("98.3"), "reserved": D(0), "available": D("98.3")}


async def test_idempotency_key_replays_and_conflicts(client: Client, aclient: AsyncCreditsClient, agent: Agent) -> None:
    first = await aclient.consume("generate_content", idempotency_key="task-7")
    again = await aclient.consume("generate_content", idempotency_key="task-7")
    assert again.replayed and not first.replayed  # the same answer, said to be a replay
    assert msgspec.structs.replace(again, replayed=False) == first
    with pytest.raises(IdempotencyConflict) as caught:
        await aclient.consume("generate_content", 2, idempotency_key="task-7")
    assert caught.value.status == 409 and caught.value.idempotency_key == "task-7"
    # A batch item with the same key replays too: the namespaces are shared.
    batch = await aclient.consume_batch([Item(action="generate_content", idempotency_key="task-7")])
    assert batch.results[0].ok and batch.results[0].id == first.id
    assert await available(client, agent.key) == D(99)


async def test_context_department_and_metadata_reach_the_sidecar(
    client: Client, aclient: AsyncCreditsClient, agent: Agent
) -> None:
    dept = await _department(client, agent.org, f"research-{uuid.uuid4().hex[:6]}", limit=10)
    with credits_context(department_id=dept, metadata={"trace_id": "tr-1"}):
        await aclient.consume("generate_content", 3, idempotency_key="ctx-1")
        assert (await aclient.balance()).department is not None
    budget = (await aclient.balance(department_id=dept)).department
    assert budget is not None and (budget.spent, budget.remaining) == (D(3), D(7))
    # The metadata was part of the request: the same key with it replays, without it conflicts.
    replay = await aclient.consume(
        "generate_content", 3, department_id=dept, metadata={"trace_id": "tr-1"}, idempotency_key="ctx-1"
    )
    assert replay.balance == D(97)
    with pytest.raises(IdempotencyConflict):
        await aclient.consume("generate_content", 3, department_id=dept, idempotency_key="ctx-1")


async def test_usage_when_the_sidecar_serves_it(
    client: Client, aclient: AsyncCreditsClient, agent: Agent, settle: Callable[[str], Awaitable[None]]
) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    if "/api/credits/usage" not in doc["paths"]:
        pytest.skip("GET /api/credits/usage is not served by this sidecar yet (issue #3)")
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    await aclient.consume("web_search", metadata={"q": "usage-test"})
    await aclient.consume("summarize", 2)
    await aclient.consume("tool_call")
    await settle(agent.org.id)

    events = [e async for e in aclient.iter_usage(page_size=1, from_=started)]  # three pages of one
    assert [e.action for e in events] == ["tool_call", "summarize", "web_search"]  # newest first
    assert [e.credits for e in events] == [D("0.1"), D(1), D("0.5")]
    assert events[2].metadata == {"q": "usage-test"} and events[2].created_at is not None
    page = await aclient.usage(action="summarize", limit=10)
    assert [e.units for e in page.data] == [2] and page.has_more is False
    assert (await aclient.usage(from_="2099-01-01T00:00:00Z")).data == []

    def blocking() -> list[str]:
        with CreditsClient(aclient.settings.origin, api_key=agent.key) as sdk:
            return [e.id for e in sdk.iter_usage(page_size=2)]

    assert await asyncio.to_thread(blocking) == [e.id for e in events]


# -- typed errors -----------------------------------------------------------------------------
async def test_errors_are_typed(
    client: Client, aclient: AsyncCreditsClient, ledger: Ledger, hot: HotPath, agent: Agent, meter_url: str
) -> None:
    with pytest.raises(InsufficientCredits) as insufficient:
        await aclient.consume("image_generation", 21)
    assert insufficient.value.status == 402 and "available" in insufficient.value.message
    with pytest.raises(UnknownAction) as unknown:
        await aclient.consume("teleport")
    assert isinstance(unknown.value, InvalidRequest) and unknown.value.param == "$.action"
    with pytest.raises(InvalidRequest) as invalid:
        await aclient.consume_batch([Item(action="tool_call"), Item(action="tool_call", units=0)])
    assert invalid.value.param == "$.items[1].units"
    with pytest.raises(InvalidRequest) as precise:
        await aclient.reserve(D("0.0001"))
    assert precise.value.param == "$.amount"
    with pytest.raises(PayloadTooLarge):
        await aclient.consume_batch([Item(action="tool_call")] * 5001)
    with pytest.raises(NotFound) as missing:
        await aclient.release("no-such-hold")
    assert missing.value.param == "$.reservation_id"
    hold = await aclient.reserve(1, ttl_s=30)
    await aclient.release(hold)
    with pytest.raises(ReservationClosed):
        await aclient.release(hold, idempotency_key="another-key")

    dept = await _department(client, agent.org, f"ops-{uuid.uuid4().hex[:6]}", limit=1)
    scoped = await admin.create_key(ledger, hot, agent.org.id, role="agent", department_id=dept)
    capped = await admin.create_key(ledger, hot, agent.org.id, role="agent", cap=500)
    async with AsyncCreditsClient(meter_url, api_key=scoped.secret) as other:
        with pytest.raises(DepartmentLimitExceeded):
            await other.consume("generate_content", 2)
        with pytest.raises(Forbidden):
            await other.consume("generate_content", department_id=str(uuid.uuid4()))
    async with AsyncCreditsClient(meter_url, api_key=capped.secret) as other:
        with pytest.raises(KeyCapExceeded):
            await other.consume("generate_content")
    async with AsyncCreditsClient(meter_url, api_key="ck_not_a_key") as other:
        with pytest.raises(Unauthenticated):
            await other.balance()
    assert await available(client, agent.key) == D(100)


async def test_rate_limited_carries_retry_after_and_is_waited_out(
    client: Client, ledger: Ledger, hot: HotPath, org: Org, meter_url: str
) -> None:
    key = await admin.create_key(ledger, hot, org.id, role="agent", rate_limit_per_s=1, rate_limit_burst=1)
    async with AsyncCreditsClient(meter_url, api_key=key.secret, rate_limit_wait_max_s=0) as impatient:
        await impatient.consume("tool_call")
        with pytest.raises(RateLimited) as limited:
            await impatient.consume("tool_call")
    assert limited.value.retry_after_s is not None and limited.value.retry_after_s >= 1
    async with AsyncCreditsClient(meter_url, api_key=key.secret, rate_limit_wait_max_s=5) as patient:
        started = time.monotonic()
        await patient.consume("tool_call")
        await patient.consume("tool_call")  # refused once, waited Retry-After, then charged
        assert time.monotonic() - started >= 0.5
    assert await available(client, org.admin_key) == D("99.7")


# -- transports ------------------------------------------------------------------------------
async def test_unix_socket_transport(client: Client, unix_socket: str, agent: Agent) -> None:
    async with AsyncCreditsClient(f"unix:{unix_socket}", api_key=agent.key) as over_unix:
        assert (await over_unix.consume("tool_call")).balance == D("99.9")

    def blocking() -> None:
        with CreditsClient("http://localhost", unix_socket=unix_socket, api_key=agent.key) as sync_unix:
            assert sync_unix.consume("tool_call").balance == D("99.8")
            assert sync_unix.balance().available == D("99.8")

    await asyncio.to_thread(blocking)
    assert await available(client, agent.key) == D("99.8")


async def test_connection_pool_is_reused(meter_url: str, agent: Agent) -> None:
    async with AsyncCreditsClient(meter_url, api_key=agent.key, max_connections=2) as pooled:
        await asyncio.gather(*(pooled.consume("tool_call") for _ in range(20)))
        session = pooled._session
        assert session is not None
        connector = session.connector
        assert connector is not None and connector.limit == 2

    def blocking() -> int:
        with CreditsClient(meter_url, api_key=agent.key, max_connections=2) as sync_pooled:
            for _ in range(10):
                sync_pooled.balance()
            return int(sync_pooled._pool.num_connections)

    assert await asyncio.to_thread(blocking) == 1


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


async def test_connection_refused_is_connection_failed() -> None:
    url = _closed_port_url()
    async with AsyncCreditsClient(url, api_key="ck_x", max_retries=2, backoff_base_s=0.01) as nowhere:
        with pytest.raises(ConnectionFailed) as failed:
            await nowhere.consume("tool_call", idempotency_key="k-1")
    assert failed.value.attempts == 3 and failed.value.idempotency_key == "k-1"

    def blocking() -> None:
        with CreditsClient(url, api_key="ck_x", max_retries=1, backoff_base_s=0.01) as nowhere:
            with pytest.raises(ConnectionFailed) as failed_sync:
                nowhere.balance()
            assert failed_sync.value.attempts == 2

    await asyncio.to_thread(blocking)


# -- retries across a dropped connection -------------------------------------------------------
async def test_dropped_answer_is_retried_without_double_charge_async(
    client: Client, dropping_proxy: DroppingProxy, agent: Agent
) -> None:
    async with AsyncCreditsClient(dropping_proxy.url, api_key=agent.key, backoff_base_s=0.01) as sdk:
        dropping_proxy.drops = 1
        used = await sdk.consume("generate_content", 5)
        assert dropping_proxy.dropped == 1 and dropping_proxy.connections >= 2
        assert used.credits == D(5) and used.balance == D(95)  # the first answer, replayed
        assert used.replayed  # ...and it says so

        dropping_proxy.drops = 1
        batch = await sdk.consume_batch([Item(action="generate_content"), Item(action="tool_call")])
        assert dropping_proxy.dropped == 2 and batch.balance == D("93.9") and batch.replayed

        dropping_proxy.drops = 1  # every item keyed: no request key, the items replay one by one
        keyed = await sdk.consume_batch([Item(action="tool_call", idempotency_key=f"drop-{i}") for i in range(5)])
        assert dropping_proxy.dropped == 3 and keyed.balance == D("93.4")
        assert all(r.ok and r.id for r in keyed.results)

        hold = await sdk.reserve(10, ttl_s=60)
        assert not hold.replayed  # answered the first time
        dropping_proxy.drops = 1
        released = await sdk.release(hold, 4)  # without the same key, the retry would be 409
        assert dropping_proxy.dropped == 4 and released.used == D(4) and released.replayed
    assert await raw_balance(client, agent.key) == {"balance": D("89.4"), "reserved": D(0), "available": D("89.4")}


async def test_dropped_answer_is_retried_without_double_charge_sync(
    client: Client, dropping_proxy: DroppingProxy, agent: Agent
) -> None:
    def blocking() -> None:
        with CreditsClient(dropping_proxy.url, api_key=agent.key, backoff_base_s=0.01) as sdk:
            dropping_proxy.drops = 2
            used = sdk.consume("analyze_data", 3)
            assert dropping_proxy.dropped == 2 and used.balance == D(94)

    await asyncio.to_thread(blocking)
    assert await available(client, agent.key) == D(94)


async def test_retries_exhausted_then_same_key_is_safe(
    client: Client, dropping_proxy: DroppingProxy, agent: Agent, meter_url: str
) -> None:
    dropping_proxy.drops = 100
    async with AsyncCreditsClient(dropping_proxy.url, api_key=agent.key, max_retries=2, backoff_base_s=0.01) as sdk:
        with pytest.raises(ConnectionFailed) as failed:
            await sdk.consume("generate_content", 7)
    assert failed.value.attempts == 3 and dropping_proxy.dropped == 3
    key = failed.value.idempotency_key
    assert key is not None
    assert await available(client, agent.key) == D(93)  # charged once, by the first attempt
    async with AsyncCreditsClient(meter_url, api_key=agent.key) as direct:
        replay = await direct.consume("generate_content", 7, idempotency_key=key)
    assert replay.balance == D(93) and await available(client, agent.key) == D(93)
