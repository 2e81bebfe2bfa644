"""The LangChain integration against the real langchain-core package (its own fake chat
model, which reports token usage like a real one) and the real sidecar."""

from __future__ import annotations

import asyncio
import decimal
import uuid

import pytest

pytest.importorskip("langchain_core", reason="the langchain extra is not installed")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.prompts import ChatPromptTemplate

from credits_sdk import AsyncCreditsClient, CreditsClient, InsufficientCredits
from credits_sdk.integrations.langchain import (
    AsyncCreditsCallbackHandler,
    CreditsCallbackHandler,
)
from tests.e2e.sdk_support import Agent, Client, available

pytest_plugins = ("tests.e2e.conftest_sdk",)  # its fixtures: aclient, sclient, agent, ...

D = decimal.Decimal


def model(*replies: AIMessage) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter(replies))


def reply(text: str, input_tokens: int, output_tokens: int) -> AIMessage:
    return AIMessage(
        content=text,
        usage_metadata={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    )


async def test_async_handler_charges_each_run_once(client: Client, aclient: AsyncCreditsClient, agent: Agent) -> None:
    handler = AsyncCreditsCallbackHandler(aclient, metadata={"chain": "qa"})
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | model(reply("forty-two", 1200, 800), reply("again", 10, 5)) | StrOutputParser()
    assert await chain.ainvoke({"question": "meaning?"}, config={"callbacks": [handler]}) == "forty-two"
    assert await available(client, agent.key) == D("97.2")  # 1200 x 0.001 + 800 x 0.002
    assert handler.last_charge is not None and [r.credits for r in handler.last_charge.results] == [D("1.2"), D("1.6")]

    # LangChain delivering the same run's end twice charges once: the key is the run id.
    run_id = uuid.uuid4()
    result = LLMResult(generations=[[ChatGeneration(message=reply("x", 1000, 0))]])
    await handler.on_llm_end(result, run_id=run_id)
    await handler.on_llm_end(result, run_id=run_id)
    assert await available(client, agent.key) == D("96.2")

    await chain.ainvoke({"question": "again"}, config={"callbacks": [handler]})
    assert await available(client, agent.key) == D("96.18")


async def test_sync_handler_and_refusal(client: Client, sclient: CreditsClient, agent: Agent) -> None:
    def blocking() -> None:
        handler = CreditsCallbackHandler(sclient)
        llm = model(reply("short", 100, 50), reply("huge", 10, 100_000), AIMessage(content="no usage reported"))
        assert llm.invoke("hi", config={"callbacks": [handler]}).content == "short"
        with pytest.raises(InsufficientCredits):  # 200 credits of output: the chain stops
            llm.invoke("write a book", config={"callbacks": [handler]})
        assert llm.invoke("quiet", config={"callbacks": [handler]}).content == "no usage reported"

    await asyncio.to_thread(blocking)
    assert await available(client, agent.key) == D("99.8")  # only the first run: 0.1 + 0.1
