"""Portal links and the browser sessions they start (as Stripe's customer portal
sessions and Orb's portal sessions work).

A platform's backend asks for a link (`POST /api/billing/portal-sessions`, admin
credential): a single-use URL, signed, valid for at most an hour, bound to one
organization and a role (admin or viewer). Opening it (portal/) redeems the link once
and starts a session: the browser gets a cookie naming a random secret, and the
server keeps the session's record (role, CSRF token, expiry), so that signing out or
revoking the link ends it at once.

    token  = "pl1.<org>.<link id>.<expires unix s>.<HMAC-SHA256 of the rest, base64url>"
    cookie = "<org>.<session secret>"          (only the secret's sha256 is stored)

Both name their organization, and each row is read inside that organization under
row-level security: a token or cookie edited to name another organization finds no
row there (and the token's signature fails first). Every refusal says why, in one
word a page can show (`RefusedLink.reason`), and changes nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

import asyncpg

from ledger.store import Ledger

ENTRY_PATH = "/portal/enter/"  # + token: where a link points (portal/ serves it)
TOKEN_VERSION = "pl1"  # noqa: S105 - the format's version, not a secret
ROLES = ("admin", "viewer")
TOKEN_LENGTH_MAX = 200
COOKIE_LENGTH_MAX = 200


class RefusedLink(Exception):
    """The link cannot start a session; `reason` is one of: malformed, tampered,
    expired, used, revoked, unknown (no such link in the organization it names)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Link:
    id: str
    organization_id: str
    role: str
    token: str
    expires_at: dt.datetime
    return_url: str | None


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    organization_id: str
    link_id: str
    role: str  # admin | viewer
    return_url: str | None
    csrf_token: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class StartedSession:
    session: Session
    cookie: str  # the cookie's value: shown to the browser once, never stored


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(hex=text)
    except ValueError:
        return None


def signing_key(portal_secret: str | None, jwt_secret: str | None) -> bytes:
    """The key that signs links: PORTAL_SECRET, else one derived from JWT_SECRET (every
    billing process shares it), else a random one (links then work only on the process
    that made them: development with one process)."""
    if portal_secret is not None:
        return hashlib.sha256(b"portal-links:" + portal_secret.encode()).digest()
    if jwt_secret is not None:
        return hmac.new(jwt_secret.encode(), b"portal-links", hashlib.sha256).digest()
    return secrets.token_bytes(32)


class PortalSessions:
    def __init__(self, ledger: Ledger, key: bytes, *, link_ttl_s: int, session_ttl_s: int) -> None:
        self.ledger = ledger
        self.key = key
        self.link_ttl_s = link_ttl_s
        self.session_ttl_s = session_ttl_s

    # -- links ------------------------------------------------------------------------
    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.key, body.encode(), hashlib.sha256).digest())

    def sign(self, organization_id: str, link_id: str, expires_at: dt.datetime) -> str:
        org, link = uuid.UUID(organization_id).hex, uuid.UUID(link_id).hex
        body = f"{TOKEN_VERSION}.{org}.{link}.{int(expires_at.timestamp())}"
        return f"{body}.{self._sign(body)}"

    async def create_link(self, organization_id: str, *, role: str, return_url: str | None, created_by: str) -> Link:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        link_id = str(uuid.uuid4())
        # Whole seconds: the token carries the expiry in seconds, the row the same instant.
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        expires_at = now + dt.timedelta(seconds=self.link_ttl_s)
        async with self.ledger.tenant(organization_id) as conn:
            await conn.execute(
                "INSERT INTO portal_links (id, organization_id, role, return_url, created_by, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                uuid.UUID(link_id),
                uuid.UUID(organization_id),
                role,
                return_url,
                created_by,
                now,
                expires_at,
            )
        token = self.sign(organization_id, link_id, expires_at)
        return Link(link_id, organization_id, role, token, expires_at, return_url)

    def _verify(self, token: str) -> tuple[str, str, dt.datetime]:
        if len(token) > TOKEN_LENGTH_MAX:
            raise RefusedLink("malformed")
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != TOKEN_VERSION:
            raise RefusedLink("malformed")
        org, link, exp = _uuid(parts[1]), _uuid(parts[2]), parts[3]
        if org is None or link is None or not exp.isdigit() or len(exp) > 12:
            raise RefusedLink("malformed")
        if not hmac.compare_digest(self._sign(".".join(parts[:4])), parts[4]):
            raise RefusedLink("tampered")
        expires_at = dt.datetime.fromtimestamp(int(exp), dt.UTC)
        if expires_at <= dt.datetime.now(dt.UTC):
            raise RefusedLink("expired")
        return str(org), str(link), expires_at

    async def redeem(self, token: str) -> StartedSession:
        """Use the link (once) and start its session; RefusedLink says why not."""
        org, link_id, _ = self._verify(token)
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        session_id = uuid.uuid4()
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "UPDATE portal_links SET used_at = now() WHERE id = $1 AND used_at IS NULL AND revoked_at IS NULL"
                " AND expires_at > now() RETURNING role, return_url",
                uuid.UUID(link_id),
            )
            if row is None:
                raise RefusedLink(await self._why(conn, link_id))
            created = await conn.fetchrow(
                "INSERT INTO portal_sessions (id, organization_id, link_id, secret_hash, role, return_url, csrf_token,"
                " expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))"
                " RETURNING expires_at",
                session_id,
                uuid.UUID(org),
                uuid.UUID(link_id),
                _hash(secret),
                row["role"],
                row["return_url"],
                csrf,
                float(self.session_ttl_s),
            )
        assert created is not None
        session = Session(str(session_id), org, link_id, row["role"], row["return_url"], csrf, created["expires_at"])
        return StartedSession(session, f"{uuid.UUID(org).hex}.{secret}")

    @staticmethod
    async def _why(conn: asyncpg.Connection, link_id: str) -> str:
        row = await conn.fetchrow(
            "SELECT used_at, revoked_at, expires_at <= now() AS expired FROM portal_links WHERE id = $1",
            uuid.UUID(link_id),
        )
        if row is None:
            return "unknown"  # signed, but for another organization than its row's (or deleted)
        if row["revoked_at"] is not None:
            return "revoked"
        if row["used_at"] is not None:
            return "used"
        return "expired"

    async def revoke_link(self, organization_id: str, link_id: str) -> bool:
        """Revoke a link and every session it started. False: no such link here."""
        parsed = _uuid(link_id.replace("-", ""))
        if parsed is None:
            return False
        async with self.ledger.tenant(organization_id) as conn:
            found = await conn.fetchval(
                "UPDATE portal_links SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING id", parsed
            )
            await conn.execute(
                "UPDATE portal_sessions SET revoked_at = now() WHERE link_id = $1 AND revoked_at IS NULL", parsed
            )
        return found is not None

    # -- sessions ---------------------------------------------------------------------
    @staticmethod
    def _parse_cookie(cookie: str) -> tuple[str, str] | None:
        if len(cookie) > COOKIE_LENGTH_MAX:
            return None
        org_hex, _, secret = cookie.partition(".")
        org = _uuid(org_hex)
        if org is None or len(secret) < 32:
            return None
        return str(org), secret

    async def session(self, cookie: str) -> Session | None:
        """The live session the cookie names, or None (unknown, expired or revoked)."""
        parsed = self._parse_cookie(cookie)
        if parsed is None:
            return None
        org, secret = parsed
        async with self.ledger.tenant(org) as conn:
            row = await conn.fetchrow(
                "SELECT id, link_id, role, return_url, csrf_token, expires_at FROM portal_sessions"
                " WHERE secret_hash = $1 AND revoked_at IS NULL AND expires_at > now()",
                _hash(secret),
            )
        if row is None:
            return None
        return Session(
            str(row["id"]),
            org,
            str(row["link_id"]),
            row["role"],
            row["return_url"],
            row["csrf_token"],
            row["expires_at"],
        )

    async def end(self, session: Session) -> None:
        """Sign out: the session's record is revoked; the cookie names nothing after."""
        async with self.ledger.tenant(session.organization_id) as conn:
            await conn.execute(
                "UPDATE portal_sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                uuid.UUID(session.id),
            )
