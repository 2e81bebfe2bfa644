"""The SDK's entitlement calls against the real sidecar: check (alone and with a
charge), @requires, usage of a limit feature, and the LangChain gate."""

from __future__ import annotations

import asyncio
import decimal
import uuid
from collections.abc import Awaitable, Callable

import pytest

from accounts import entitlements
from credits_sdk import (
    AsyncCreditsClient,
    CreditsClient,
    EntitlementLimitReached,
    FeatureNotEntitled,
    credits_context,
    requires,
)
from hotpath.client import HotPath
from ledger.entitlements import EntitlementStore, Feature
from ledger.store import Ledger
from tests.e2e.sdk_support import Agent, Client, available

pytest_plugins = ("tests.e2e.conftest_sdk",)  # its fixtures: aclient, sclient, agent, ...

D = decimal.Decimal


Grant = Callable[[], Awaitable[None]]


@pytest.fixture
def grant_api_access(ledger: Ledger, hot: HotPath, agent: Agent) -> Grant:
    """An override as ops set it (credits entitlements set): pushed to the cache at once."""

    async def grant() -> None:
        store = EntitlementStore(ledger)
        feature = Feature("api_access", "boolean", enabled=True)
        await entitlements.set_override(store, hot, agent.org.id, feature, reason="test")

    return grant


async def test_check_requires_and_usage_async(
    client: Client, aclient: AsyncCreditsClient, agent: Agent, grant_api_access: Grant
) -> None:
    check = await aclient.check("api_access")
    assert not check and (check.reason, check.type, check.enabled) == ("disabled", "boolean", False)

    @requires("api_access", client=aclient)
    async def call_api() -> str:
        return "called"

    with pytest.raises(FeatureNotEntitled) as refused:
        await call_api()
    assert refused.value.reason == "disabled"
    await grant_api_access()
    assert await call_api() == "called"

    charged = await aclient.check("api_access", action="generate_content", units=2)
    assert charged.allowed and charged.charge is not None and charged.charge.credits == D(2)
    assert await available(client, agent.key) == D(98)

    ents = await aclient.entitlements()
    assert ents.plan_id is None and ents.get("api_access") is not None
    assert ents.get("api_access").source == "override"  # type: ignore[union-attr]
    key = f"project-{uuid.uuid4().hex[:8]}"
    first = await aclient.add_usage("projects", 1, idempotency_key=key)
    again = await aclient.add_usage("projects", 1, idempotency_key=key)
    assert (first.usage, first.remaining, first.replayed) == (1, 0, False)
    assert (again.usage, again.replayed) == (1, True)
    with pytest.raises(EntitlementLimitReached):
        await aclient.add_usage("projects", 1)
    assert (await aclient.check("projects")).reason == "limit_reached"


async def test_requires_from_the_context_sync(sclient: CreditsClient, agent: Agent) -> None:
    @requires("custom_integrations")
    def integrate() -> str:
        return "integrated"

    def blocking() -> None:
        with credits_context(client=sclient), pytest.raises(FeatureNotEntitled):
            integrate()
        assert sclient.check("projects").allowed

    await asyncio.to_thread(blocking)


async def test_langchain_gate_stops_the_model_call(aclient: AsyncCreditsClient, grant_api_access: Grant) -> None:
    pytest.importorskip("langchain_core", reason="the langchain extra is not installed")
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from credits_sdk.integrations.langchain import AsyncCreditsCallbackHandler

    calls: list[str] = []
    replies = iter([AIMessage(content="one"), AIMessage(content="two")])

    def counted() -> AIMessage:
        message = next(replies)
        calls.append(str(message.content))
        return message

    llm = GenericFakeChatModel(messages=(counted() for _ in range(2)))
    handler = AsyncCreditsCallbackHandler(aclient, feature="api_access")
    with pytest.raises(FeatureNotEntitled):
        await llm.ainvoke("hi", config={"callbacks": [handler]})
    assert calls == []  # the model was never asked
    await grant_api_access()
    assert (await llm.ainvoke("hi", config={"callbacks": [handler]})).content == "one"
