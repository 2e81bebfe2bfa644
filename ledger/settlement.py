"""The ledger's settlement door: stage decoded stream events, settle them in one
transaction (the settle_staged stored procedure, migrations/0005), and the
cross-organization reads the settler's periodic jobs need. Connects as
credits_settler, never as the owner.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ledger.forecast import RecentSpend, recent_spend
from ledger.store import LedgerSide, ledger_side

# Usage events (nearly all of them) have a narrow staging table of their own.
USE_COLUMNS = (
    "org",
    "id",
    "action",
    "units",
    "amount",
    "department_id",
    "credential_id",
    "metadata",
    "created_at",
)
DEBIT_COLUMNS = ("org", "grant_id", "amount")
# Every other event: holds, closes, expirations, adjustments, refunds.
EVENT_COLUMNS = (
    "seq",
    "kind",
    "org",
    "id",
    "action",
    "units",
    "amount",
    "department_id",
    "credential_id",
    "metadata",
    "created_at",
    "reservation_id",
    "how",
    "expires_at",
    "reason",
    "grant_id",
)
ALLOC_COLUMNS = ("org", "event_id", "kind", "grant_id", "amount", "score")
# Debt changes (credit lines, migrations/0035): an overdraw per usage event charged past
# the grants (its `od`), a repayment per grant push that repaid debt first (its `rp`).
DEBT_COLUMNS = ("org", "kind", "reference", "grant_id", "amount", "seq", "created_at")

_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS settle_uses (
  org uuid, id text, action text, units bigint, amount bigint, department_id uuid,
  credential_id text, metadata jsonb, created_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS settle_debits (org uuid, grant_id uuid, amount bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS settle_events (
  seq bigint, kind text, org uuid, id text, action text, units bigint, amount bigint,
  department_id uuid, credential_id text, metadata jsonb, created_at timestamptz,
  reservation_id text, how text, expires_at timestamptz, reason text, grant_id uuid
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS settle_allocs (
  org uuid, event_id text, kind text, grant_id uuid, amount bigint, score double precision
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS settle_new (
  seq bigint, org uuid, kind text, id text, amount bigint, reservation_id text, reason text, grant_id uuid
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS settle_batch_orgs (org uuid PRIMARY KEY) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS settle_debt (
  org uuid, kind text, reference text, grant_id uuid, amount bigint, seq bigint, created_at timestamptz
) ON COMMIT DELETE ROWS;
"""

# -- what a failed settlement means -----------------------------------------------------
# Postgres could not be reached, or refused for a reason of its own (a lock, a conflict
# with another transaction, a restart): retry the same entries later. Never quarantine.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57", "58", "XX")
# The data itself was refused (invalid text, a constraint): retrying cannot help.
_DATA_SQLSTATE_CLASSES = ("22", "23")


def is_transient(exc: BaseException) -> bool:
    """A failure that says nothing about the entries (retry them as they are)."""
    if isinstance(exc, (OSError, TimeoutError, asyncpg.exceptions.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def is_poison(exc: BaseException) -> bool:
    """A failure caused by what an entry holds (isolate it; retrying cannot help)."""
    if isinstance(exc, PoisonEntry):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _DATA_SQLSTATE_CLASSES
    return False


class PoisonEntry(ValueError):
    """A stream entry that cannot be decoded or staged as it is."""


class StaleOwner(RuntimeError):
    """The partition's fence is past this settler's epoch: another owns it now."""


_TEXT_FIELDS = ("act", "why", "k")


def clean_event(ev: dict[str, Any]) -> dict[str, Any]:
    """The event with every free-form field made acceptable to Postgres, keeping what
    it did to the money: metadata emptied, NUL removed from names and reasons, a
    department that is not an id dropped. For an entry settlement refused as it was."""
    out = dict(ev)
    for name in _TEXT_FIELDS:
        if isinstance(out.get(name), str):
            out[name] = out[name].replace("\x00", "")
    if "m" in out:
        out["m"] = "{}"
    if "d" in out and not _is_uuid(out["d"]):
        out["d"] = ""
    if isinstance(out.get("ev"), list):
        out["ev"] = [clean_event(item) if isinstance(item, dict) else item for item in out["ev"]]
    return out


def _is_uuid(text: object) -> bool:
    if text == "":
        return True
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True


def balance_change(ev: dict[str, Any]) -> int:
    """What an event did to its organization's balance (millicredits, <= 0), as
    reconciliation counts unsettled events (lua/reconcile.lua); 0 when unreadable."""
    try:
        kind = ev.get("t")
        if kind in ("use", "grant_expired", "adjustment", "refund"):
            return -int(ev["amt"])
        if kind == "use_batch":
            return -sum(int(item["amt"]) for item in ev["ev"])
        if kind == "hold_closed":
            return -int(ev["used"])
    except (KeyError, TypeError, ValueError):
        return 0
    return 0


# A batch whose usage events the ledger partly holds already is staged again without
# them; more rounds than this means something else keeps inserting the same events.
RESTAGE_ROUNDS = 5


@dataclass
class Staged:
    """One batch of stream events, decoded and deduplicated, ready to COPY.

    Usage events go to `uses` (one row each) and what they took from each grant is
    summed per (organization, grant) as they are added; every other event goes to
    `events` with its allocations in `allocs`. This runs once per settled event, so it
    avoids per-event allocations it can share: organization and grant ids, and
    timestamps, are converted once per batch."""

    uses: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    allocs: list[tuple[Any, ...]] = field(default_factory=list)
    # Debt changes in stream order (DEBT_COLUMNS); an overdraw's reference is its event.
    debt: list[tuple[Any, ...]] = field(default_factory=list)
    # Per use, in step with `uses`: its grant allocations as the stream carried them
    # ([grant, amount, score, ...]), to sum again when some uses are dropped.
    _use_grants: list[Sequence[Any]] = field(default_factory=list)
    _debits: dict[tuple[uuid.UUID | None, str], int] = field(default_factory=dict)
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _seen_uses: set[str] = field(default_factory=set)
    _uuids: dict[str, uuid.UUID] = field(default_factory=dict)
    _times: dict[int, dt.datetime] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uses) + len(self.events) + len(self.debt)

    def debits(self) -> list[tuple[uuid.UUID | None, uuid.UUID | None, int]]:
        """(organization, grant, amount) the usage events took, summed per grant."""
        return [(org, self._uuid(grant), amount) for (org, grant), amount in self._debits.items() if amount]

    def without_uses(self, settled: set[tuple[uuid.UUID, str]]) -> Staged:
        """The same batch without the usage events the ledger already holds."""
        out = Staged(events=self.events, allocs=self.allocs, _uuids=self._uuids, _times=self._times)
        out.debt = [d for d in self.debt if d[1] != "overdraw" or (d[0], d[2]) not in settled]
        for row, grants in zip(self.uses, self._use_grants, strict=True):
            if (row[0], row[1]) not in settled:
                out.uses.append(row)
                out._use_grants.append(grants)
                out._debit(row[0], grants)
        return out

    def _uuid(self, text: str) -> uuid.UUID | None:
        if not text:
            return None
        u = self._uuids.get(text)
        if u is None:
            u = self._uuids[text] = uuid.UUID(text)
        return u

    def _ts(self, ms: int) -> dt.datetime:
        t = self._times.get(ms)
        if t is None:
            t = self._times[ms] = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        return t

    def _debit(self, org: uuid.UUID | None, flat: Sequence[Any]) -> None:
        debits = self._debits
        for i in range(0, len(flat), 3):
            key = (org, str(flat[i]))
            debits[key] = debits.get(key, 0) + int(flat[i + 1])

    def _event(
        self,
        kind: str,
        org: uuid.UUID | None,
        event_id: str,
        *,
        action: str | None = None,
        units: int | None = None,
        amount: int | None = None,
        department_id: uuid.UUID | None = None,
        credential_id: str | None = None,
        metadata: str | None = None,
        created_at: dt.datetime | None = None,
        reservation_id: str | None = None,
        how: str | None = None,
        expires_at: dt.datetime | None = None,
        reason: str | None = None,
        grant_id: uuid.UUID | None = None,
    ) -> bool:
        key = (kind, event_id)
        if key in self._seen:  # the same entry delivered twice within one batch
            return False
        self._seen.add(key)
        self.events.append(
            (
                len(self.events),
                kind,
                org,
                event_id,
                action,
                units,
                amount,
                department_id,
                credential_id,
                metadata,
                created_at,
                reservation_id,
                how,
                expires_at,
                reason,
                grant_id,
            )
        )
        return True

    def _allocs(self, org: uuid.UUID | None, event_id: str, kind: str, flat: Sequence[Any], width: int) -> None:
        append = self.allocs.append
        for i in range(0, len(flat), width):
            score = float(flat[i + 2]) if width == 3 else 0.0
            append((org, event_id, kind, self._uuid(str(flat[i])), int(flat[i + 1]), score))

    def add(self, org_text: str, ev: dict[str, Any]) -> None:
        """Decode one stream entry (see lua/*.lua for each event's fields)."""
        org = self._uuid(org_text)
        t = ev["t"]
        if t == "use_batch":
            cred = ev.get("k", "")
            at = self._ts(int(ev["at"]))
            for item in ev["ev"]:
                self._use(org, item, cred, at)
        elif t == "use":
            self._use(org, ev, ev.get("k", ""), self._ts(int(ev["at"])))
        elif t == "hold":
            if self._event(
                "hold",
                org,
                ev["id"],
                amount=int(ev["amt"]),
                department_id=self._uuid(ev.get("d", "")),
                credential_id=ev.get("k", ""),
                action=ev.get("act", ""),
                metadata=ev.get("m") or "{}",
                created_at=self._ts(int(ev["at"])),
                expires_at=self._ts(int(ev["x"])),
            ):
                self._allocs(org, ev["id"], "hold", ev.get("g") or [], 3)
                if ev.get("od"):  # held on the credit line
                    self._debt(org, "hold_overdraw", f"hold:{ev['id']}", int(ev["od"]), int(ev["at"]))
        elif t == "hold_closed":
            if self._event(
                "close",
                org,
                ev["id"],
                reservation_id=ev["r"],
                how=ev["how"],
                amount=int(ev["used"]),
                created_at=self._ts(int(ev["at"])),
            ):
                self._allocs(org, ev["id"], "capture", ev.get("g") or [], 2)
                if ev.get("odr"):  # what the credit line lent the hold and it did not use
                    self._debt(org, "hold_return", f"close:{ev['id']}", -int(ev["odr"]), int(ev["at"]))
        elif t == "grant_expired":
            self._event(
                "expiration",
                org,
                ev["id"],
                amount=int(ev["amt"]),
                grant_id=self._uuid(ev["g"]),
                created_at=self._ts(int(ev["at"])),
            )
        elif t in ("adjustment", "refund"):
            if self._event(
                t, org, ev["id"], amount=int(ev["amt"]), reason=ev.get("why", ""), created_at=self._ts(int(ev["at"]))
            ):
                self._allocs(org, ev["id"], t, ev.get("g") or [], 3)
        elif t == "grant_applied":
            # A change notification: the ledger wrote the grant before it was pushed. What
            # it repaid of a debt first (rp) is the cache's decision, recorded here.
            rp = int(ev.get("rp") or 0)
            if rp > 0 and ("repayment", ev["g"]) not in self._seen:
                self._seen.add(("repayment", ev["g"]))
                self._debt(org, "repayment", ev["g"], -rp, int(ev["at"]), grant=ev["g"])
        else:
            raise ValueError(f"unknown stream event type {t!r}")

    def _use(self, org: uuid.UUID | None, ev: dict[str, Any], cred: str, at: dt.datetime) -> None:
        event_id = ev["id"]
        if event_id in self._seen_uses:
            return
        self._seen_uses.add(event_id)
        self.uses.append(
            (
                org,
                event_id,
                ev["act"],
                ev["u"],
                ev["amt"],
                self._uuid(ev.get("d", "")),
                cred,
                ev.get("m") or "{}",
                at,
            )
        )
        g = ev.get("g") or ()
        self._use_grants.append(g)
        if g:
            self._debit(org, g)
        od = ev.get("od")
        if od:  # charged past the grants, on the credit line
            self.debt.append((org, "overdraw", event_id, None, int(od), len(self.debt), at))

    def _debt(self, org: uuid.UUID | None, kind: str, reference: str, amount: int, at_ms: int, grant: str = "") -> None:
        self.debt.append((org, kind, reference, self._uuid(grant), amount, len(self.debt), self._ts(at_ms)))


@dataclass(frozen=True)
class DeadLetter:
    """A stream entry in quarantine (ledger/migrations/0007_dead_letters.sql)."""

    partition: int
    entry_id: str
    organization_id: str | None
    raw: bytes  # the event as the stream held it (msgpack)
    error: str
    state: str  # cleaned | held
    amount: int = 0  # its balance change, when held (<= 0)


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    partition: int
    entry_id: str
    organization_id: str | None
    raw: bytes
    error: str
    state: str
    amount: int
    created_at: dt.datetime
    resolved_at: dt.datetime | None
    resolved_by: str
    resolution: str

    @classmethod
    def of(cls, row: asyncpg.Record) -> DeadLetterRow:
        org = row["organization_id"]
        return cls(
            id=int(row["id"]),
            partition=int(row["partition"]),
            entry_id=row["entry_id"],
            organization_id=str(org) if org is not None else None,
            raw=bytes(row["raw"]),
            error=row["error"],
            state=row["state"],
            amount=int(row["amount"]),
            created_at=row["created_at"],
            resolved_at=row["resolved_at"],
            resolved_by=row["resolved_by"],
            resolution=row["resolution"],
        )


async def _fence(conn: asyncpg.Connection, partition: int, epoch: int) -> None:
    """Move the partition's fence to `epoch` (locking it for this transaction), or
    raise StaleOwner when it is past it already."""
    moved = await conn.fetchval(
        "INSERT INTO settlement_fences AS f (partition, epoch) VALUES ($1, $2)"
        " ON CONFLICT (partition) DO UPDATE SET epoch = excluded.epoch WHERE f.epoch <= excluded.epoch"
        " RETURNING epoch",
        partition,
        epoch,
    )
    if moved is None:
        raise StaleOwner(f"partition {partition}: another settler owns it now (epoch past {epoch})")


async def _advance_watermark(conn: asyncpg.Connection, partition: int, entry_id: str) -> None:
    """The partition's watermark to entry_id, never backwards."""
    ms, _, seq = entry_id.partition("-")
    await conn.execute(
        "INSERT INTO settlement_watermarks AS w (partition, last_ms, last_seq) VALUES ($1, $2, $3)"
        " ON CONFLICT (partition) DO UPDATE SET last_ms = excluded.last_ms, last_seq = excluded.last_seq"
        " WHERE (w.last_ms, w.last_seq) < (excluded.last_ms, excluded.last_seq)",
        partition,
        int(ms),
        int(seq),
    )


async def _insert_dead_letter(conn: asyncpg.Connection, d: DeadLetter) -> bool:
    inserted = await conn.fetchval(
        "INSERT INTO settlement_dead_letters (partition, entry_id, organization_id, raw, error, state, amount)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (partition, entry_id) DO NOTHING RETURNING id",
        d.partition,
        d.entry_id,
        uuid.UUID(d.organization_id) if d.organization_id else None,
        d.raw,
        d.error[:2000],
        d.state,
        d.amount,
    )
    return inserted is not None


@dataclass(frozen=True)
class OrgBalance:
    organization_id: str
    balance: int


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(_STAGE_DDL)


class Settlement:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 8) -> Settlement:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=30, init=_init_connection
        )
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def settle(
        self,
        staged: Staged,
        *,
        batch_id: str,
        partition: int,
        first_entry: str,
        last_entry: str,
        dead_letter: DeadLetter | None = None,
        epoch: int | None = None,
    ) -> list[OrgBalance]:
        """Settle one batch in one transaction; idempotent (see migrations/0005). With
        `dead_letter`, the quarantine record of the entry this batch settles cleaned is
        written in the same transaction. With `epoch` (the owner's, from its lease), the
        transaction first moves the partition's fence to it, and StaleOwner is raised
        when another owner moved it further (migrations/0012)."""
        if not staged and dead_letter is None:
            return []
        for _ in range(RESTAGE_ROUNDS):
            try:
                return await self._settle(
                    staged,
                    batch_id=batch_id,
                    partition=partition,
                    first_entry=first_entry,
                    last_entry=last_entry,
                    dead_letter=dead_letter,
                    epoch=epoch,
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "usage_events_pkey":
                    raise
                # Some of these usage events were settled before (redelivery after a
                # crash): nothing of this attempt stayed; settle the rest.
                staged = staged.without_uses(await self._settled_uses(staged))
        raise RuntimeError(f"batch {batch_id}: usage events keep being settled by someone else")

    async def _settled_uses(self, staged: Staged) -> set[tuple[uuid.UUID, str]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT u.organization_id, u.id FROM usage_events u"
                " JOIN unnest($1::uuid[], $2::text[]) AS s(org, id) ON u.organization_id = s.org AND u.id = s.id",
                [row[0] for row in staged.uses],
                [row[1] for row in staged.uses],
            )
        return {(r["organization_id"], r["id"]) for r in rows}

    async def _settle(
        self,
        staged: Staged,
        *,
        batch_id: str,
        partition: int,
        first_entry: str,
        last_entry: str,
        dead_letter: DeadLetter | None,
        epoch: int | None,
    ) -> list[OrgBalance]:
        """One transaction: COPY the batch into staging, settle it, record the batch."""
        async with self.pool.acquire() as conn, conn.transaction():
            if epoch is not None:
                await _fence(conn, partition, epoch)
            if dead_letter is not None:
                await _insert_dead_letter(conn, dead_letter)
            balances = await self._settle_in(conn, staged, batch_id=batch_id)
            await conn.execute(
                "INSERT INTO settlement_batches (id, partition, first_entry, last_entry, events)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                batch_id,
                partition,
                first_entry,
                last_entry,
                len(staged),
            )
            await _advance_watermark(conn, partition, last_entry)
        return balances

    @staticmethod
    async def _settle_in(conn: asyncpg.Connection, staged: Staged, *, batch_id: str) -> list[OrgBalance]:
        """COPY the batch into staging and settle it, in the caller's transaction."""
        if not staged:
            return []
        if staged.uses:
            await conn.copy_records_to_table("settle_uses", records=staged.uses, columns=list(USE_COLUMNS))
            debits = staged.debits()
            if debits:
                await conn.copy_records_to_table("settle_debits", records=debits, columns=list(DEBIT_COLUMNS))
        if staged.events:
            await conn.copy_records_to_table("settle_events", records=staged.events, columns=list(EVENT_COLUMNS))
        if staged.allocs:
            await conn.copy_records_to_table("settle_allocs", records=staged.allocs, columns=list(ALLOC_COLUMNS))
        rows = []
        if staged.uses or staged.events:
            rows = await conn.fetch("SELECT * FROM settle_staged($1)", batch_id)
        if staged.debt:  # credit lines: after settle_staged, which locked the organizations
            await conn.copy_records_to_table("settle_debt", records=staged.debt, columns=list(DEBT_COLUMNS))
            await conn.execute("SELECT settle_staged_debt($1)", batch_id)
        if staged.uses:  # their hours for /usage/summary (migrations/0006, 0010)
            await conn.execute("SELECT rollup_staged_uses()")
        if staged.events:  # the captures it settled count as usage too (migrations/0010)
            await conn.execute("SELECT rollup_staged_captures()")
        if staged.uses or staged.events:  # what keys and departments spent (migrations/0008)
            await conn.execute("SELECT rollup_staged_spend()")
        return [OrgBalance(str(r["organization_id"]), int(r["balance"])) for r in rows]

    # -- quarantine -------------------------------------------------------------------
    async def fence(self, partition: int) -> int:
        """The epoch the partition's fence stands at (0: never moved)."""
        async with self.pool.acquire() as conn:
            value = await conn.fetchval("SELECT epoch FROM settlement_fences WHERE partition = $1", partition)
        return int(value or 0)

    async def hold_dead_letter(self, dead_letter: DeadLetter, *, epoch: int | None = None) -> bool:
        """Keep an entry settlement could not take (state `held`); False when this entry
        is in quarantine already (a redelivery). The partition's watermark moves past it:
        "the ledger holds every entry up to here, or quarantine does" (reconciliation and
        cold loads then count it once, from quarantine)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if epoch is not None:
                await _fence(conn, dead_letter.partition, epoch)
            inserted = await _insert_dead_letter(conn, dead_letter)
            await _advance_watermark(conn, dead_letter.partition, dead_letter.entry_id)
        return inserted

    async def dead_letter_counts(self) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT state, count(*) AS n FROM settlement_dead_letters GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    async def dead_letters(
        self, *, state: str | None = None, organization_id: str | None = None, limit: int = 100
    ) -> list[DeadLetterRow]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM settlement_dead_letters WHERE ($1::text IS NULL OR state = $1)"
                " AND ($2::uuid IS NULL OR organization_id = $2) ORDER BY id DESC LIMIT $3",
                state,
                uuid.UUID(organization_id) if organization_id else None,
                limit,
            )
        return [DeadLetterRow.of(r) for r in rows]

    async def dead_letter(self, dead_letter_id: int) -> DeadLetterRow | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM settlement_dead_letters WHERE id = $1", dead_letter_id)
        return None if row is None else DeadLetterRow.of(row)

    async def resolve_dead_letter(
        self, dead_letter_id: int, *, state: str, by: str, resolution: str, staged: Staged | None = None
    ) -> bool:
        """Close a held entry: `replayed` (settling `staged`, its events, in the same
        transaction) or `discarded`. False when it is not held (any more)."""
        if state not in ("replayed", "discarded"):
            raise ValueError("a held entry is replayed or discarded")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE settlement_dead_letters SET state = $2, resolved_at = now(), resolved_by = $3,"
                " resolution = $4 WHERE id = $1 AND state = 'held' RETURNING partition, entry_id",
                dead_letter_id,
                state,
                by,
                resolution,
            )
            if row is None:
                return False
            if staged is not None and staged:
                await self._settle_in(conn, staged, batch_id=f"replay-{dead_letter_id}")
        return True

    # -- what the periodic jobs look for -------------------------------------------
    async def orgs_with_due_expiry(self, now: dt.datetime, *, limit: int = 100) -> list[str]:
        """Organizations holding an expired open reservation or an expired grant."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT organization_id FROM reservations WHERE status = 'open' AND expires_at <= $1"
                " UNION SELECT organization_id FROM credit_grants"
                " WHERE remaining > 0 AND expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2",
                now,
                limit,
            )
        return [str(r["organization_id"]) for r in rows]

    async def outbox(self, *, limit: int = 500) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT o.grant_id, o.organization_id, g.amount, g.priority, g.expires_at, g.created_at"
                " FROM grant_outbox o"
                " JOIN credit_grants g ON g.id = o.grant_id WHERE o.next_attempt_at <= now()"
                " ORDER BY o.created_at LIMIT $1",
                limit,
            )
        return [dict(r) for r in rows]

    async def outbox_done(self, grant_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM grant_outbox WHERE grant_id = $1", grant_id)

    async def outbox_retry_later(self, grant_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE grant_outbox SET attempts = attempts + 1,"
                " next_attempt_at = now() + least(interval '60 seconds', interval '1 second' * power(2, attempts))"
                " WHERE grant_id = $1",
                grant_id,
            )

    async def balances(self, organization_ids: Iterable[str]) -> dict[str, int]:
        ids = [uuid.UUID(o) for o in organization_ids]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT id, balance FROM organizations WHERE id = ANY($1::uuid[])", ids)
        return {str(r["id"]): int(r["balance"]) for r in rows}

    async def ledger_view(self, organization_id: str, partition: int) -> LedgerSide:
        """In one snapshot: the ledger balance, the partition's watermark (the first
        stream entry the ledger does NOT hold), the grants not yet confirmed in the cache
        (outbox) and what quarantine holds out of the ledger."""
        org = uuid.UUID(organization_id)
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            balance = await conn.fetchval("SELECT balance FROM organizations WHERE id = $1", org)
            return await ledger_side(conn, org, int(balance or 0), partition)

    async def organizations(self, *, after: str | None = None, limit: int = 1000) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id FROM organizations WHERE ($1::uuid IS NULL OR id > $1::uuid) ORDER BY id LIMIT $2",
                uuid.UUID(after) if after else None,
                limit,
            )
        return [str(r["id"]) for r in rows]


@dataclass(frozen=True)
class OrganizationSummary:
    id: str
    name: str
    balance: int  # millicredits, the ledger's
    created_at: dt.datetime
    active_keys: int


@dataclass(frozen=True)
class AlertSummary:
    organization_id: str
    organization_name: str
    threshold: int  # millicredits of `available`
    webhook_url: str
    state: str  # ok | low
    updated_at: dt.datetime
    deliveries_pending: int
    last_error: str  # of the latest failed delivery attempt; '' when none failed
    days_left: decimal.Decimal | None = None  # also low when fewer days are left at the recent rate


class OperatorReads:
    """Reads across organizations for operators (`credits org list`, `credits alert
    list`), through the settler's role: its policy sees every organization, and it
    never writes here."""

    def __init__(self, settlement: Settlement) -> None:
        self.pool = settlement.pool

    async def organizations(self, *, after: str | None = None, limit: int = 100) -> list[OrganizationSummary]:
        """Organizations by id, `limit` after the id `after` (a page)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT o.id, o.name, o.balance, o.created_at,"
                " (SELECT count(*) FROM api_keys k WHERE k.organization_id = o.id AND k.revoked_at IS NULL) AS keys"
                " FROM organizations o WHERE ($1::uuid IS NULL OR o.id > $1::uuid) ORDER BY o.id LIMIT $2",
                uuid.UUID(after) if after else None,
                limit,
            )
        return [
            OrganizationSummary(str(r["id"]), r["name"], int(r["balance"]), r["created_at"], int(r["keys"]))
            for r in rows
        ]

    async def alerts(self, organization_id: str | None = None, *, limit: int = 1000) -> list[AlertSummary]:
        """Low-balance alerts (all, or one organization's), with their delivery state."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT a.organization_id, o.name, a.threshold, a.webhook_url, a.state, a.updated_at, a.days_left,"
                " (SELECT count(*) FROM webhook_deliveries d"
                "   WHERE d.organization_id = a.organization_id AND d.delivered_at IS NULL) AS pending,"
                " (SELECT d.last_error FROM webhook_deliveries d WHERE d.organization_id = a.organization_id"
                "   AND d.last_error <> '' ORDER BY d.next_attempt_at DESC LIMIT 1) AS last_error"
                " FROM balance_alerts a JOIN organizations o ON o.id = a.organization_id"
                " WHERE $1::uuid IS NULL OR a.organization_id = $1::uuid ORDER BY o.name, a.organization_id LIMIT $2",
                uuid.UUID(organization_id) if organization_id else None,
                limit,
            )
        return [
            AlertSummary(
                str(r["organization_id"]),
                r["name"],
                int(r["threshold"]),
                r["webhook_url"],
                r["state"],
                r["updated_at"],
                int(r["pending"]),
                r["last_error"] or "",
                r["days_left"],
            )
            for r in rows
        ]


class AlertStore:
    """Alert configuration and outgoing deliveries, across organizations (settler)."""

    def __init__(self, settlement: Settlement) -> None:
        self.pool = settlement.pool

    async def alert_configs(self, organization_ids: list[str] | None) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            if organization_ids is None:
                rows = await conn.fetch("SELECT organization_id, threshold, days_left, state FROM balance_alerts")
            else:
                rows = await conn.fetch(
                    "SELECT organization_id, threshold, days_left, state FROM balance_alerts"
                    " WHERE organization_id = ANY($1::uuid[])",
                    [uuid.UUID(o) for o in organization_ids],
                )
        return [dict(r) for r in rows]

    async def alert_configs_changed(self, after: tuple[dt.datetime, str] | None, *, limit: int) -> list[dict[str, Any]]:
        """Alert configurations changed after the cursor (updated_at, organization), in
        that order: the periodic check looks only at what changed (a new or edited
        threshold, or a crossing recorded since)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT organization_id, threshold, days_left, state, updated_at FROM balance_alerts"
                " WHERE $1::timestamptz IS NULL OR (updated_at, organization_id) > ($1, $2::uuid)"
                " ORDER BY updated_at, organization_id LIMIT $3",
                after[0] if after else None,
                uuid.UUID(after[1]) if after else None,
                limit,
            )
        return [dict(r) for r in rows]

    async def alert_crossed(
        self, organization_id: str, old: str, new: str, event_type: str, payload: str
    ) -> dict[str, Any] | None:
        """Record a crossing and its delivery, once: None if another run recorded it."""
        org = uuid.UUID(organization_id)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE balance_alerts SET state = $2, updated_at = now() WHERE organization_id = $1 AND state = $3"
                " RETURNING webhook_url, secret",
                org,
                new,
                old,
            )
            if row is None:
                return None
            delivery_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO webhook_deliveries (id, organization_id, event_type, payload)"
                " VALUES ($1, $2, $3, $4::jsonb)",
                delivery_id,
                org,
                event_type,
                payload,
            )
        return {"id": delivery_id, "webhook_url": row["webhook_url"], "secret": row["secret"], "payload": payload}

    async def recent_spend(self, organization_id: str) -> RecentSpend:
        async with self.pool.acquire() as conn:
            return await recent_spend(conn, organization_id)

    async def soft_departments(self, organization_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The soft budgets (with a limit) of these organizations."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, organization_id, name, limit_amount, period, alert_percent FROM departments"
                " WHERE organization_id = ANY($1::uuid[]) AND budget_mode = 'soft' AND limit_amount IS NOT NULL",
                [uuid.UUID(o) for o in organization_ids],
            )
        return [dict(r) for r in rows]

    async def department_alerted(
        self,
        organization_id: str,
        department_id: str,
        *,
        period_start: dt.datetime,
        alert_percent: int,
        spent: int,
        budget: int,
        payload: str,
    ) -> dict[str, Any] | None:
        """Record a soft budget's crossing for its period, once: None if recorded before.
        With the organization's alert webhook set, its delivery too (else {}: a log only)."""
        org = uuid.UUID(organization_id)
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO department_budget_alerts (organization_id, department_id, period_start, alert_percent,"
                " spent, budget) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1",
                org,
                uuid.UUID(department_id),
                period_start,
                alert_percent,
                spent,
                budget,
            )
            if not inserted:
                return None
            hook = await conn.fetchrow("SELECT webhook_url, secret FROM balance_alerts WHERE organization_id = $1", org)
            if hook is None:
                return {}
            delivery_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO webhook_deliveries (id, organization_id, event_type, payload)"
                " VALUES ($1, $2, 'department.budget_alert', $3::jsonb)",
                delivery_id,
                org,
                payload,
            )
        return {"id": delivery_id, "webhook_url": hook["webhook_url"], "secret": hook["secret"], "payload": payload}

    async def due_deliveries(self, *, limit: int) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT d.id, d.payload::text AS payload, a.webhook_url, a.secret FROM webhook_deliveries d"
                " JOIN balance_alerts a ON a.organization_id = d.organization_id"
                " WHERE d.delivered_at IS NULL AND d.next_attempt_at <= now() ORDER BY d.next_attempt_at LIMIT $1",
                limit,
            )
        return [dict(r) for r in rows]

    async def delivery_done(self, delivery_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET delivered_at = now(), attempts = attempts + 1 WHERE id = $1", delivery_id
            )

    async def delivery_retry(self, delivery_id: uuid.UUID, error: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = $2,"
                " next_attempt_at = now() + least(interval '1 hour', interval '1 second' * power(2, attempts))"
                " WHERE id = $1",
                delivery_id,
                error[:500],
            )
