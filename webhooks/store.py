"""The durable event queue: the stripe_events table (migration 0003).

receive()  stores a verified event once (its id is the key; a duplicate is a no-op)
           and routes it to its organization, in one round trip;
due()      lists pending events whose next attempt is due, across organizations;
claim()    takes one for a lease (a crashed worker's lease runs out, and the event is
           due again: nothing received is ever lost);
finish() / retry() record the outcome.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from ledger.store import Ledger
from webhooks.events import Event, routing_ids

DUE_BATCH_MAX = 500


@dataclass(frozen=True, slots=True)
class Received:
    organization_id: str | None  # None: no organization of ours (stored as ignored)
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Claimed:
    id: str
    type: str
    attempts: int
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventState:
    status: str
    attempts: int
    last_error: str | None


class EventStore:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def receive(self, event: Event, payload: bytes) -> Received:
        created = dt.datetime.fromtimestamp(event.created, dt.UTC)
        async with self.ledger.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM receive_stripe_event($1, $2, $3, $4, $5::jsonb)",
                event.id,
                event.type,
                created,
                routing_ids(event),
                payload.decode("utf-8"),
            )
        if row is None:  # the function always answers one row
            raise LookupError(f"event {event.id} was not stored")
        org = row["organization_id"]
        return Received(str(org) if org is not None else None, bool(row["duplicate"]))

    async def due(self, limit: int = DUE_BATCH_MAX) -> list[tuple[str, str]]:
        async with self.ledger.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM due_stripe_events($1)", min(limit, DUE_BATCH_MAX))
        return [(str(r["organization_id"]), str(r["id"])) for r in rows]

    async def claim(self, org: str, event_id: str, *, lease_s: float) -> Claimed | None:
        """Take a due event for `lease_s`; None if it is done, or leased by another worker."""
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "UPDATE stripe_events SET attempts = attempts + 1,"
                " next_attempt_at = now() + make_interval(secs => $2)"
                " WHERE id = $1 AND status = 'pending' AND next_attempt_at <= now()"
                " RETURNING id, type, attempts, payload",
                event_id,
                lease_s,
            )
        if row is None:
            return None
        payload = row["payload"]
        decoded = json.loads(payload) if isinstance(payload, str) else payload
        return Claimed(row["id"], row["type"], int(row["attempts"]), decoded if isinstance(decoded, dict) else {})

    async def finish(self, org: str, event_id: str) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE stripe_events SET status = 'done', processed_at = now(), last_error = NULL WHERE id = $1",
                event_id,
            )

    async def retry(self, org: str, event_id: str, *, error: str, delay_s: float, give_up: bool) -> None:
        async with self.ledger.tenant(org) as conn:
            await conn.execute(
                "UPDATE stripe_events SET status = CASE WHEN $4 THEN 'failed' ELSE 'pending' END,"
                " next_attempt_at = now() + make_interval(secs => $3), last_error = left($2, 2000)"
                " WHERE id = $1",
                event_id,
                error,
                delay_s,
                give_up,
            )

    async def requeue(self, org: str, event_id: str) -> bool:
        """An operator's retry (the ops console): a failed or waiting event is due now,
        for one more attempt. False: no such event, or it is done."""
        async with self.ledger.tenant(org) as conn:
            found = await conn.fetchval(
                "UPDATE stripe_events SET status = 'pending', next_attempt_at = now()"
                " WHERE id = $1 AND status IN ('failed', 'pending') RETURNING id",
                event_id,
            )
        return found is not None

    async def state(self, org: str, event_id: str) -> EventState | None:
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow("SELECT status, attempts, last_error FROM stripe_events WHERE id = $1", event_id)
        return None if row is None else EventState(row["status"], int(row["attempts"]), row["last_error"])

    async def counts(self, org: str) -> dict[str, int]:
        async with self.ledger.tenant(org) as conn:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM stripe_events GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}
