"""What ops do with entries settlement held in quarantine (ledger/migrations/0007):
look at them, replay one once its cause is fixed (it settles, exactly once, like any
entry), or discard one that should never have counted (then repair the organization's
cache from the ledger: `credits reconcile --org ORG --repair` gives the credits back).
Entries settled cleaned need nothing: their charges are in the ledger; they are listed
for the record."""

from __future__ import annotations

import getpass
from typing import Any

import msgspec

from core.money import to_credits
from ledger.settlement import DeadLetterRow, Settlement, Staged, is_poison

_decode = msgspec.msgpack.Decoder().decode


class QuarantineError(ValueError):
    """The entry cannot be replayed or discarded (not held, or not settleable yet)."""


def operator() -> str:
    """Who runs the command, for the record."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def describe(row: DeadLetterRow) -> dict[str, Any]:
    """The row as JSON-able text: its event decoded when it can be."""
    try:
        event: Any = _decode(row.raw)
    except msgspec.DecodeError:
        event = {"undecodable": row.raw.hex()}
    return {
        "id": row.id,
        "partition": row.partition,
        "entry_id": row.entry_id,
        "organization_id": row.organization_id,
        "state": row.state,
        "amount": str(to_credits(row.amount)),
        "error": row.error,
        "created_at": row.created_at.isoformat(),
        "resolved_at": row.resolved_at.isoformat() if row.resolved_at else None,
        "resolved_by": row.resolved_by,
        "resolution": row.resolution,
        "event": event,
    }


async def replay(settlement: Settlement, dead_letter_id: int, *, reason: str, by: str | None = None) -> DeadLetterRow:
    """Settle a held entry as it is (after its cause was fixed), in one transaction
    with closing it; raises QuarantineError when it cannot be."""
    row = await _held(settlement, dead_letter_id)
    if row.organization_id is None:
        raise QuarantineError(f"dead letter {dead_letter_id} names no organization: it can only be discarded")
    staged = Staged()
    try:
        staged.add(row.organization_id, _decode(row.raw))
    except Exception as exc:  # still not settleable: stays held
        raise QuarantineError(f"dead letter {dead_letter_id} still cannot be settled: {exc}") from exc
    try:
        resolved = await settlement.resolve_dead_letter(
            dead_letter_id, state="replayed", by=by or operator(), resolution=reason, staged=staged
        )
    except Exception as exc:
        if not is_poison(exc):
            raise
        raise QuarantineError(f"dead letter {dead_letter_id} still cannot be settled: {exc}") from exc
    if not resolved:
        raise QuarantineError(f"dead letter {dead_letter_id} was resolved meanwhile")
    return await _row(settlement, dead_letter_id)


async def discard(settlement: Settlement, dead_letter_id: int, *, reason: str, by: str | None = None) -> DeadLetterRow:
    await _held(settlement, dead_letter_id)
    if not await settlement.resolve_dead_letter(
        dead_letter_id, state="discarded", by=by or operator(), resolution=reason
    ):
        raise QuarantineError(f"dead letter {dead_letter_id} was resolved meanwhile")
    return await _row(settlement, dead_letter_id)


async def _held(settlement: Settlement, dead_letter_id: int) -> DeadLetterRow:
    row = await _row(settlement, dead_letter_id)
    if row.state != "held":
        raise QuarantineError(f"dead letter {dead_letter_id} is {row.state}, not held")
    return row


async def _row(settlement: Settlement, dead_letter_id: int) -> DeadLetterRow:
    row = await settlement.dead_letter(dead_letter_id)
    if row is None:
        raise QuarantineError(f"no dead letter {dead_letter_id}")
    return row
