"""Operators, their sign-in links and sessions, and the audit trail (0020_console.sql).

Operators are principals of their own, never a tenant's credential: an operator is made
by `credits operator create` (the owner's URL: making someone who can act on every
organization takes the database owner), signs in to /console with a one-time link or a
password (argon2id, argon2-cffi), and gets a server-side session that expires and can be
revoked. The console reads through credits_console, which writes no table; what it
changes here it changes through the migration's SECURITY DEFINER functions.

    link   = "op1_<random>"      cookie = "<random>"      (only their sha256 is stored)

Every operator action, in the console or with the CLI, is a row of operator_audit:
who (operator:<email>, or system:<user>@<host> for a CLI run by no named operator),
what, when, from where, the reason and the outcome. The table is append-only for
every role (triggers), and rows arrive only through record_audit().
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import getpass
import hashlib
import json
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import argon2
import asyncpg

LINK_PREFIX = "op1_"
LINK_TTL_S = 24 * 3600  # a sign-in link, from `credits operator create|link`
LINK_TTL_S_MAX = 7 * 86400
SESSION_TTL_S = 8 * 3600  # a working day; signing in again is a link or a password away
TOKEN_LENGTH_MAX = 200
PASSWORD_LENGTH_MIN = 12
PASSWORD_LENGTH_MAX = 1024
OUTCOMES = ("applied", "replayed", "refused")

# argon2id with the library's defaults (RFC 9106's second recommended option: 64 MiB,
# 3 passes, 4 lanes): memory-hard, and check_needs_rehash() tells when they change.
_hasher = argon2.PasswordHasher()


class OperatorError(ValueError):
    """An operator command cannot be done (the message says why)."""


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def normal_email(email: str) -> str:
    value = email.strip().lower()
    local, at, domain = value.partition("@")
    if not at or not local or "." not in domain or len(value) > 254 or any(c.isspace() for c in value):
        raise OperatorError(f"not an email address: {email!r}")
    return value


async def hash_password(password: str) -> str:
    """An argon2id PHC string (in a thread: it takes tens of milliseconds on purpose)."""
    if not PASSWORD_LENGTH_MIN <= len(password) <= PASSWORD_LENGTH_MAX:
        raise OperatorError(f"a password has {PASSWORD_LENGTH_MIN} to {PASSWORD_LENGTH_MAX} characters")
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(stored: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    return await asyncio.to_thread(check)


# -- who did it -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts, and from where: an operator (by email), or the system user who ran
    the CLI without naming one."""

    via: str  # console | cli
    operator_email: str | None
    source: str  # an address (console), user@host (cli)

    @property
    def label(self) -> str:
        return f"operator:{self.operator_email}" if self.operator_email else f"system:{self.source}"

    @classmethod
    def cli(cls, operator_email: str | None) -> Actor:
        """The CLI's actor: --operator / CREDITS_OPERATOR, else the OS user on this host."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a container)
            user = "uid-unknown"
        source = f"{user}@{socket.gethostname()}"
        return cls("cli", normal_email(operator_email) if operator_email else None, source)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    action: str  # credits.grant, credits.adjust, grant.void, key.revoke, cache.repair, ...
    outcome: str  # applied | replayed | refused
    organization_id: str | None = None
    target: str = ""
    amount: int | None = None
    reason: str = ""
    reference: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


async def check_actor(pool: asyncpg.Pool, actor: Actor) -> None:
    """Refuse an actor naming no active operator, before anything is done in its name."""
    if actor.operator_email is None:
        return
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT operator_active($1)", actor.operator_email):
            raise OperatorError(f"{actor.operator_email} is not an active operator (credits operator list)")


async def record(pool: asyncpg.Pool, actor: Actor, entry: AuditEntry) -> int:
    """One audit row (through record_audit(); the table takes no other write)."""
    if entry.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    async with pool.acquire() as conn:
        try:
            value = await conn.fetchval(
                "SELECT record_audit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)",
                actor.label,
                actor.operator_email,
                actor.via,
                entry.action,
                uuid.UUID(entry.organization_id) if entry.organization_id else None,
                entry.target[:300],
                entry.amount,
                entry.reason[:500],
                entry.reference[:255],
                entry.outcome,
                json.dumps(entry.detail, default=str),
                actor.source[:300],
            )
        except asyncpg.exceptions.NoDataFoundError:
            raise OperatorError(f"{actor.operator_email} is not an active operator (credits operator list)") from None
    return int(value)


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: dt.datetime
    actor: str
    via: str
    action: str
    organization_id: str | None
    target: str
    amount: int | None
    reason: str
    reference: str
    outcome: str
    source: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, r: asyncpg.Record) -> AuditRow:
        return cls(
            int(r["id"]),
            r["at"],
            r["actor"],
            r["via"],
            r["action"],
            str(r["organization_id"]) if r["organization_id"] else None,
            r["target"],
            None if r["amount"] is None else int(r["amount"]),
            r["reason"],
            r["reference"],
            r["outcome"],
            r["source"],
            json.loads(r["detail"]) if isinstance(r["detail"], str) else dict(r["detail"]),
        )


@dataclass(frozen=True, slots=True)
class AuditFilter:
    organization_id: str | None = None
    actor: str | None = None  # a substring of the actor (an email, a user)
    action: str | None = None  # a prefix: "credits." matches credits.grant and credits.adjust
    outcome: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    before_id: int | None = None  # the page after the row with this id (newest first)


async def audit_rows(pool: asyncpg.Pool, f: AuditFilter, *, limit: int) -> list[AuditRow]:
    """Audit rows, newest first, filtered (any role that may read operator_audit)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM operator_audit"
            " WHERE ($1::uuid IS NULL OR organization_id = $1) AND ($2::text IS NULL OR strpos(actor, $2) > 0)"
            " AND ($3::text IS NULL OR starts_with(action, $3)) AND ($4::text IS NULL OR outcome = $4)"
            " AND ($5::timestamptz IS NULL OR at >= $5) AND ($6::timestamptz IS NULL OR at < $6)"
            " AND ($7::bigint IS NULL OR id < $7) ORDER BY id DESC LIMIT $8",
            uuid.UUID(f.organization_id) if f.organization_id else None,
            f.actor or None,
            f.action or None,
            f.outcome or None,
            f.since,
            f.until,
            f.before_id,
            limit,
        )
    return [AuditRow.of(r) for r in rows]


# -- operators (the owner's: `credits operator ...`) ------------------------------------
@dataclass(frozen=True, slots=True)
class NewLink:
    operator_id: str
    email: str
    token: str  # shown once: the link is /console/enter/<token>
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class OperatorRow:
    id: str
    email: str
    name: str
    created_at: dt.datetime
    created_by: str
    password_set: bool
    disabled_at: dt.datetime | None
    active_sessions: int


class OperatorAdmin:
    """What the database owner does: create, link, disable. Runs on an owner connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def create(self, email: str, *, name: str, created_by: str, link_ttl_s: int = LINK_TTL_S) -> NewLink:
        email = normal_email(email)
        async with self.conn.transaction():
            try:
                operator_id = await self.conn.fetchval("SELECT operator_create($1, $2, $3)", email, name, created_by)
            except asyncpg.exceptions.UniqueViolationError:
                raise OperatorError(f"{email} is an operator already (credits operator link --email {email})") from None
            return await self._link(str(operator_id), email, created_by, link_ttl_s)

    async def link(self, email: str, *, created_by: str, link_ttl_s: int = LINK_TTL_S) -> NewLink:
        email = normal_email(email)
        row = await self.conn.fetchrow("SELECT id, disabled_at FROM operators WHERE email = $1", email)
        if row is None:
            raise OperatorError(f"no operator {email} (credits operator create --email {email})")
        if row["disabled_at"] is not None:
            raise OperatorError(f"operator {email} is disabled")
        async with self.conn.transaction():
            return await self._link(str(row["id"]), email, created_by, link_ttl_s)

    async def _link(self, operator_id: str, email: str, created_by: str, ttl_s: int) -> NewLink:
        if not 60 <= ttl_s <= LINK_TTL_S_MAX:
            raise OperatorError("a sign-in link lives 1 minute to 7 days")
        token = LINK_PREFIX + secrets.token_urlsafe(32)
        expires_at = await self.conn.fetchval(
            "INSERT INTO operator_links (id, operator_id, token_hash, created_by, expires_at)"
            " VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at",
            uuid.uuid4(),
            uuid.UUID(operator_id),
            _hash(token),
            created_by,
            float(ttl_s),
        )
        return NewLink(operator_id, email, token, expires_at)

    async def disable(self, email: str) -> int:
        """Disable an operator and revoke every session; returns the sessions revoked."""
        email = normal_email(email)
        async with self.conn.transaction():
            operator_id = await self.conn.fetchval(
                "UPDATE operators SET disabled_at = coalesce(disabled_at, now()) WHERE email = $1 RETURNING id", email
            )
            if operator_id is None:
                raise OperatorError(f"no operator {email}")
            revoked = await self.conn.fetch(
                "UPDATE operator_sessions SET revoked_at = now() WHERE operator_id = $1 AND revoked_at IS NULL"
                " RETURNING id",
                operator_id,
            )
        return len(revoked)

    async def list(self) -> list[OperatorRow]:
        rows = await self.conn.fetch(
            "SELECT o.*, (SELECT count(*) FROM operator_sessions s WHERE s.operator_id = o.id"
            " AND s.revoked_at IS NULL AND s.expires_at > now()) AS sessions FROM operators o ORDER BY o.email"
        )
        return [
            OperatorRow(
                str(r["id"]),
                r["email"],
                r["name"],
                r["created_at"],
                r["created_by"],
                r["password_hash"] is not None,
                r["disabled_at"],
                int(r["sessions"]),
            )
            for r in rows
        ]


# -- sessions (the console's, through credits_console) ---------------------------------
@dataclass(frozen=True, slots=True)
class OperatorSession:
    id: str
    operator_id: str
    email: str
    name: str
    csrf_token: str
    method: str
    expires_at: dt.datetime
    password_set: bool

    @property
    def role(self) -> str:  # what the shared page furniture shows
        return "operator"


@dataclass(frozen=True, slots=True)
class Started:
    session_id: str
    cookie: str  # shown to the browser once, never stored


class LinkRefused(Exception):
    """`reason`: malformed, unknown, used, expired, disabled."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OperatorSessions:
    def __init__(self, pool: asyncpg.Pool, *, session_ttl_s: int = SESSION_TTL_S) -> None:
        self.pool = pool
        self.session_ttl_s = session_ttl_s

    async def redeem(self, token: str, *, source: str, user_agent: str) -> Started:
        if not token.startswith(LINK_PREFIX) or len(token) > TOKEN_LENGTH_MAX:
            raise LinkRefused("malformed")
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM operator_redeem_link($1, $2, $3, $4, $5, $6)",
                _hash(token),
                _hash(secret),
                csrf,
                self.session_ttl_s,
                source,
                user_agent,
            )
        assert row is not None
        if row["outcome"] != "ok":
            raise LinkRefused(row["outcome"])
        return Started(str(row["session_id"]), secret)

    async def sign_in(self, email: str, password: str, *, source: str, user_agent: str) -> Started | None:
        """A session for the right password; None (and an audit row) for a wrong one."""
        try:
            email = normal_email(email)
        except OperatorError:
            return None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM operator_password_hash($1)", email)
        ok = row is not None and await verify_password(row["password_hash"], password)
        if row is None:  # the same work for an unknown address: no timing tells which exist
            await verify_password(_dummy_hash(), password)
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with self.pool.acquire() as conn:
            started = await conn.fetchrow(
                "SELECT * FROM operator_password_session($1, $2, $3, $4, $5, $6, $7)",
                row["operator_id"] if ok and row is not None else None,
                email,
                _hash(secret) if ok else None,
                csrf,
                self.session_ttl_s,
                source,
                user_agent,
            )
        if not ok or started is None:
            return None
        return Started(str(started["session_id"]), secret)

    async def session(self, cookie: str) -> OperatorSession | None:
        """The live session the cookie names, or None (unknown, expired, revoked, or
        its operator disabled)."""
        if not 32 <= len(cookie) <= TOKEN_LENGTH_MAX:
            return None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT s.id, s.operator_id, s.csrf_token, s.method, s.expires_at, o.email, o.name,"
                " o.password_set_at IS NOT NULL AS password_set"
                " FROM operator_sessions s JOIN operators o ON o.id = s.operator_id"
                " WHERE s.secret_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > now()"
                " AND o.disabled_at IS NULL",
                _hash(cookie),
            )
        if row is None:
            return None
        return OperatorSession(
            str(row["id"]),
            str(row["operator_id"]),
            row["email"],
            row["name"],
            row["csrf_token"],
            row["method"],
            row["expires_at"],
            bool(row["password_set"]),
        )

    async def set_password(self, cookie: str, password: str, *, source: str) -> bool:
        hashed = await hash_password(password)
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT operator_set_password($1, $2, $3)", _hash(cookie), hashed, source))

    async def sessions_of(self, operator_id: str) -> list[dict[str, Any]]:
        """An operator's live sessions, newest first."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, method, source, user_agent, created_at, expires_at FROM operator_sessions"
                " WHERE operator_id = $1 AND revoked_at IS NULL AND expires_at > now() ORDER BY created_at DESC",
                uuid.UUID(operator_id),
            )
        return [{**dict(r), "id": str(r["id"])} for r in rows]

    async def end_own(self, cookie: str, session_id: str, *, source: str) -> bool:
        """End another session of the cookie's operator (never someone else's)."""
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT operator_end_own_session($1, $2, $3)", _hash(cookie), uuid.UUID(session_id), source
                )
            )

    async def end(self, cookie: str, *, source: str) -> bool:
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT operator_end_session($1, $2)", _hash(cookie), source))


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))
