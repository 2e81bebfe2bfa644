"""The hot path's room: the typed door to the Redis scripts (lua/), used by every other
component (the sidecar, settlement, billing, ops) and never bypassed.

- `hotpath.client.HotPath`: one method per script (consume, reserve, release, grant,
  debit, load, ...); amounts are integer millicredits.
- `hotpath.connection.PipelinedRedis`: the auto-pipelined connection the sidecar sends
  script calls over.
- `hotpath.snapshot`: what a cold-cache load receives from the ledger (the ledger
  implements `SnapshotSource`), and `hotpath.replay`: the unsettled events applied to it.

This room imports only `core` and `lua`: nothing here knows the ledger, the sidecar or
billing.
"""

from __future__ import annotations

from core.errors import Unavailable
from hotpath.client import (
    BatchItem,
    EvictionPolicyError,
    HotPath,
    LayoutError,
    Mode,
    Result,
    batch_results,
    check_eviction_policy,
    fingerprint,
    new_id,
    now_ms,
)

__all__ = [
    "BatchItem",
    "EvictionPolicyError",
    "HotPath",
    "LayoutError",
    "Mode",
    "Result",
    "Unavailable",
    "batch_results",
    "check_eviction_policy",
    "fingerprint",
    "new_id",
    "now_ms",
]
