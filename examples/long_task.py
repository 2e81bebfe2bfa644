"""A long task paid through a reservation: the budget is held before the work starts,
and only what the work actually used is charged when it ends.

    credits dev            # in one shell: the whole stack, keeps serving
    . .data/dev.env        # in another: METER_URL, API_KEY, ... of its demo organization
    python examples/long_task.py

Two ways: the reservation context manager (set `hold.used`; released exactly once on
every exit path, exceptions and cancellation included), and `@metered(mode="reserve")`,
which holds an estimate and charges units x price from the result.
"""

from __future__ import annotations

import asyncio
import json
import sys
from decimal import Decimal

from credits_sdk import AsyncCreditsClient, credits_context, metered

PRICE_PER_STEP = Decimal("0.5")  # what this task decides one step of its work costs


async def crunch(steps: int) -> int:
    """Stand-in for minutes of work."""
    done = 0
    for _ in range(steps):
        await asyncio.sleep(0.01)
        done += 1
    return done


@metered(
    "llm_output_tokens",
    mode="reserve",
    estimate=lambda max_tokens: Decimal("0.002") * max_tokens,  # hold the worst case
    result_units=len,  # charge what was produced
)
async def generate_report(max_tokens: int) -> list[str]:
    await asyncio.sleep(0.05)
    return ["token"] * (max_tokens // 3)


async def main() -> int:
    async with AsyncCreditsClient.from_env() as client:
        before = (await client.balance()).available

        async with client.reservation(10, ttl_s=600, action="analyze_data") as hold:
            held = (await client.balance()).reserved
            steps = await crunch(7)
            hold.used = PRICE_PER_STEP * steps  # 3.5 of the 10 held; the rest goes back

        try:
            async with client.reservation(5, ttl_s=600, action="analyze_data"):
                raise TimeoutError("the task failed half-way")
        except TimeoutError:
            pass  # the hold was released, nothing charged

        with credits_context(client=client, metadata={"example": "long_task"}):
            report = await generate_report(max_tokens=3000)  # holds 6, charges 1000 x 0.002 = 2

        after = await client.balance()
    print(
        json.dumps(
            {
                "held": str(held),
                "charged_by_reservation": str(hold.used),
                "report_tokens": len(report),
                "available_before": str(before),
                "available_after": str(after.available),
                "reserved_after": str(after.reserved),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
