"""A metered agent: every action it takes is charged to its organization's credits.

    credits dev            # in one shell: the whole stack, keeps serving
    . .data/dev.env        # in another: METER_URL, API_KEY, ... of its demo organization
    python examples/metered_agent.py

The agent subclasses MeteredAgent. It pays per action explicitly
(`consume_credits_for_action`), per call with `@metered` (after success, or as a gate
before a call), and everything it charges carries its name and the task's trace id from
`credits_context`. A refused charge is a typed exception the agent can act on.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from dataclasses import dataclass

from credits_sdk import AsyncCreditsClient, InsufficientCredits, MeteredAgent, credits_context, metered


@dataclass(frozen=True)
class Draft:
    text: str
    output_tokens: int  # what the model reported


class ContentAgent(MeteredAgent):
    """Researches a topic and writes about it; a stand-in for calls to real models."""

    @metered("web_search", mode="before")  # a gate: no credits, no search
    async def search(self, query: str) -> list[str]:
        await asyncio.sleep(0.01)
        return [f"{query}: result {i}" for i in range(3)]

    @metered("llm_output_tokens", result_units=lambda draft: draft.output_tokens)  # per token, after success
    async def draft(self, topic: str, sources: list[str]) -> Draft:
        await asyncio.sleep(0.01)
        text = f"An article about {topic}, citing {len(sources)} sources."
        return Draft(text, output_tokens=40 * len(text))

    async def write(self, topic: str) -> str:
        sources = await self.search(topic)
        draft = await self.draft(topic, sources)
        await self.consume_credits_for_action("generate_content", metadata={"topic": topic})
        return draft.text


async def main() -> int:
    async with AsyncCreditsClient.from_env() as client:
        agent = ContentAgent(client, name="content-agent", metadata={"example": "metered_agent"})
        before = (await agent.check_balance()).available
        articles = []
        for topic in ("credits", "agents"):
            with credits_context(metadata={"trace_id": uuid.uuid4().hex[:12]}):
                try:
                    articles.append(await agent.write(topic))
                except InsufficientCredits as exc:
                    print(f"out of credits: {exc}", file=sys.stderr)
                    return 1
        after = (await agent.check_balance()).available
    print(json.dumps({"articles": articles, "available_before": str(before), "available_after": str(after)}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
