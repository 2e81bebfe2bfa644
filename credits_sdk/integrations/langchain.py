"""LangChain: charge per token from the usage each model run reports.

    from credits_sdk.integrations.langchain import CreditsCallbackHandler

    handler = CreditsCallbackHandler(client)                 # CreditsClient
    chain.invoke(question, config={"callbacks": [handler]})

    handler = AsyncCreditsCallbackHandler(async_client)      # AsyncCreditsClient
    await chain.ainvoke(question, config={"callbacks": [handler]})

Needs the ``langchain`` extra (``langchain-core``). At the end of every LLM or chat
model run, the handler reads the tokens the model reported (the standard
``AIMessage.usage_metadata``, else the provider's ``llm_output["token_usage"]`` /
``["usage"]``) and charges input and output tokens as two actions
(``llm_input_tokens``, ``llm_output_tokens`` by default) in one atomic batch.

Exactly once per run: the charge's idempotency key is derived from LangChain's
``run_id`` (a UUID per model run), so a callback delivered twice charges once.
A run that reports no usage charges nothing (and is logged at DEBUG).

A feature gate: with ``feature="api_access"`` the handler asks the sidecar before each
model run starts (``check``) and raises ``FeatureNotEntitled`` when the organization's
plan does not allow it, so the model is never called (LangChain propagates the error
because ``raise_error`` is True).

``raise_error`` is True by default: a refused charge (``InsufficientCredits``, ...)
propagates out of the chain instead of LangChain's default of logging callback errors,
because an agent that cannot pay should stop. Pass ``raise_error=False`` to only log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.outputs import ChatGeneration, LLMResult

from credits_sdk import errors, models
from credits_sdk.aio import AsyncCreditsClient
from credits_sdk.sync import CreditsClient

log = logging.getLogger("credits_sdk.langchain")

INPUT_ACTION = "llm_input_tokens"
OUTPUT_ACTION = "llm_output_tokens"


def token_usage(response: LLMResult) -> tuple[int, int]:
    """(input tokens, output tokens) that one model run reported; (0, 0) if none."""
    input_tokens = output_tokens = 0
    found = False
    for generations in response.generations:
        for generation in generations:
            if not isinstance(generation, ChatGeneration):
                continue
            usage = getattr(generation.message, "usage_metadata", None)
            if usage:
                found = True
                input_tokens += int(usage.get("input_tokens", 0))
                output_tokens += int(usage.get("output_tokens", 0))
    if found:
        return input_tokens, output_tokens
    llm_output = response.llm_output or {}
    reported = llm_output.get("token_usage") or llm_output.get("usage") or {}
    if isinstance(reported, Mapping):
        input_tokens = int(reported.get("prompt_tokens", reported.get("input_tokens", 0)) or 0)
        output_tokens = int(reported.get("completion_tokens", reported.get("output_tokens", 0)) or 0)
    return input_tokens, output_tokens


class _Charges:
    def __init__(
        self, input_action: str, output_action: str, metadata: models.MetadataInput | None, key_prefix: str
    ) -> None:
        self.input_action = input_action
        self.output_action = output_action
        self.metadata = metadata
        self.key_prefix = key_prefix

    def items(self, response: LLMResult, run_id: UUID) -> tuple[list[models.Item], str]:
        """The batch to send for this run, and its idempotency key."""
        input_tokens, output_tokens = token_usage(response)
        key = f"{self.key_prefix}{run_id}"
        meta = {"langchain_run_id": str(run_id), **(self.metadata or {})}
        items = [
            models.Item(action=action, units=tokens, metadata=meta, idempotency_key=f"{key}:{suffix}")
            for action, tokens, suffix in (
                (self.input_action, input_tokens, "in"),
                (self.output_action, output_tokens, "out"),
            )
            if tokens > 0
        ]
        if not items:
            log.debug("langchain run %s reported no token usage; nothing charged", run_id)
        return items, key


class CreditsCallbackHandler(BaseCallbackHandler):
    """Charges each model run's tokens through a blocking ``CreditsClient``."""

    def __init__(
        self,
        client: CreditsClient,
        *,
        input_action: str = INPUT_ACTION,
        output_action: str = OUTPUT_ACTION,
        metadata: models.MetadataInput | None = None,
        key_prefix: str = "langchain:",
        raise_error: bool = True,
        feature: str | None = None,
    ) -> None:
        self.client = client
        self.charges = _Charges(input_action, output_action, metadata, key_prefix)
        self.raise_error = raise_error
        self.feature = feature
        self.last_charge: models.BatchResult | None = None

    def _gate(self) -> None:
        if self.feature is not None:
            check = self.client.check(self.feature)
            if not check.allowed:
                raise errors.FeatureNotEntitled(self.feature, check.reason, check)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
        self._gate()

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], **kwargs: Any) -> None:
        self._gate()

    def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        items, key = self.charges.items(response, run_id)
        if items:
            self.last_charge = self.client.consume_batch(items, atomic=True, idempotency_key=key)


class AsyncCreditsCallbackHandler(AsyncCallbackHandler):
    """Charges each model run's tokens through an ``AsyncCreditsClient``."""

    def __init__(
        self,
        client: AsyncCreditsClient,
        *,
        input_action: str = INPUT_ACTION,
        output_action: str = OUTPUT_ACTION,
        metadata: models.MetadataInput | None = None,
        key_prefix: str = "langchain:",
        raise_error: bool = True,
        feature: str | None = None,
    ) -> None:
        self.client = client
        self.charges = _Charges(input_action, output_action, metadata, key_prefix)
        self.raise_error = raise_error
        self.feature = feature
        self.last_charge: models.BatchResult | None = None

    async def _gate(self) -> None:
        if self.feature is not None:
            check = await self.client.check(self.feature)
            if not check.allowed:
                raise errors.FeatureNotEntitled(self.feature, check.reason, check)

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
        await self._gate()

    async def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], **kwargs: Any) -> None:
        await self._gate()

    async def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        items, key = self.charges.items(response, run_id)
        if items:
            self.last_charge = await self.client.consume_batch(items, atomic=True, idempotency_key=key)
