"""A batch job: charge a large input, item by item, without writing a loop of calls.

    credits dev            # in one shell: the whole stack, keeps serving
    . .data/dev.env        # in another: METER_URL, API_KEY, ... of its demo organization
    python examples/batch_job.py

The SDK reads the input lazily, sends bounded batches concurrently, and gives every item
a stable idempotency key (``{job_id}:{index}``). Kill the job at any point and run it
again with the same ``BATCH_JOB_ID``: items already charged replay instead of charging
twice, and the checkpoint file lets the rerun skip the finished prefix.

Environment: METER_URL, API_KEY (as `. .data/dev.env` sets them); optional BATCH_ITEMS
(default 10000), BATCH_JOB_ID (default: a new id, printed), BATCH_CHECKPOINT (default:
a file in the temporary directory named after the job), BATCH_SIZE (default 1000).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator

from credits_sdk import CreditsClient, Item, credits_context


def documents(count: int) -> Iterator[Item]:
    """The input: one `llm_input_tokens` unit per item (0.001 credits each). A real job
    would read these from a file or a queue; only `batch_size * max_in_flight` items
    are in memory at once."""
    for i in range(count):
        yield Item(action="llm_input_tokens", units=1, metadata={"shard": i % 16})


def main() -> int:
    count = int(os.environ.get("BATCH_ITEMS", "10000"))
    job_id = os.environ.get("BATCH_JOB_ID") or f"example-batch-{uuid.uuid4().hex[:8]}"
    checkpoint = os.environ.get("BATCH_CHECKPOINT") or os.path.join(tempfile.gettempdir(), f"credits-{job_id}.ckpt")
    batch_size = int(os.environ.get("BATCH_SIZE", "1000"))
    print(json.dumps({"job_id": job_id, "checkpoint": checkpoint, "items": count}), flush=True)

    with CreditsClient.from_env() as client, credits_context(metadata={"job": job_id}):
        before = client.balance().available
        report = client.consume_all(
            documents(count), job_id=job_id, checkpoint=checkpoint, total=count, batch_size=batch_size
        )
        after = client.balance().available
    print(
        json.dumps(
            {
                "job_id": job_id,
                "ok": report.ok,
                "failed": report.failed,
                "resumed_from": report.resumed_from,
                "credits": str(report.credits),
                "failures_by_code": report.failures_by_code,
                "available_before": str(before),
                "available_after": str(after),
                "elapsed_s": round(report.elapsed_s, 2),
            }
        ),
        flush=True,
    )
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
