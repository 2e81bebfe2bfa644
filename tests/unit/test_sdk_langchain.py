"""Reading token usage from LangChain results (no servers)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core", reason="the langchain extra is not installed")

from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult

from credits_sdk.integrations.langchain import token_usage


def test_standard_usage_metadata_is_summed_over_generations() -> None:
    def gen(i: int, o: int) -> ChatGeneration:
        usage = {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}
        return ChatGeneration(message=AIMessage(content="x", usage_metadata=usage))

    assert token_usage(LLMResult(generations=[[gen(10, 2)], [gen(5, 1)]])) == (15, 3)


def test_provider_usage_is_the_fallback() -> None:
    openai = LLMResult(
        generations=[[Generation(text="x")]], llm_output={"token_usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    )
    anthropic = LLMResult(generations=[[]], llm_output={"usage": {"input_tokens": 5, "output_tokens": 2}})
    assert token_usage(openai) == (7, 3)
    assert token_usage(anthropic) == (5, 2)
    assert token_usage(LLMResult(generations=[[]])) == (0, 0)
    assert token_usage(LLMResult(generations=[[]], llm_output={"token_usage": "n/a"})) == (0, 0)
