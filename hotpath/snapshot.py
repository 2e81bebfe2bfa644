"""What a cold-cache load receives from the ledger: one organization's state."""

from __future__ import annotations

from typing import Protocol

import msgspec


class GrantSnapshot(msgspec.Struct, array_like=False):
    id: str
    rem: int
    prio: int
    exp: int  # ms since epoch; 0 = never


class DeptSnapshot(msgspec.Struct):
    id: str
    limit: int  # millicredits, -1 = none
    period: str
    pstart: int
    spent: int


class CredSnapshot(msgspec.Struct):
    id: str
    cap: int  # millicredits, -1 = none
    spent: int
    revoked: str  # "1" | "0"
    rate: float  # -1 = default
    burst: float  # -1 = default


class HoldSnapshot(msgspec.Struct):
    id: str
    a: int
    al: list[str | int]
    d: str
    ps: int
    k: str
    x: int
    act: str
    o: int = 0  # the part on the credit line (debt since the hold was made)


class Snapshot(msgspec.Struct):
    """An organization's state as the ledger knows it, for a cold-cache load.

    `after` is the first entry of the organization's usage stream that the ledger does
    not hold yet; the load replays the entries from there (hotpath/replay.py)."""

    gen: int
    grants: list[GrantSnapshot]
    applied: list[str]
    costs: dict[str, int]
    depts: list[DeptSnapshot]
    creds: list[CredSnapshot]
    holds: list[HoldSnapshot]
    after: str = "0-0"
    # Entries of this organization that settlement held in quarantine (msgpack events):
    # charged in the cache, not in the ledger; a load replays them first (they are older
    # than every stream entry after `after`).
    held: list[bytes] = msgspec.field(default_factory=list)
    # The credit line (migrations/0035): how far below zero `available` may go, and what
    # is owed on it (the load keeps bal - res == sum of grants remaining - debt).
    limit: int = 0
    debt: int = 0


class SnapshotSource(Protocol):
    """Where a cold cache loads from (the Postgres ledger)."""

    async def snapshot(self, organization_id: str, partition: int | None = None) -> Snapshot: ...
