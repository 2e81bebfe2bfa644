"""Who is calling: an organization API key (agents, batch jobs) or a signed JWT
(the frontend). The organization always comes from the credential.

API keys are looked up by their sha256 in Postgres and cached in-process for a short
time; revocation still takes effect at once, because every credits script checks the
credential's revoked flag in Redis in the same atomic step as the charge. For the same
reason a key authenticated before keeps working while Postgres is unreachable
(stale-if-error): from this process's cache, or from the copy every sidecar keeps in
Redis (SharedCredentials), so that a sidecar started during the outage knows it too.
The hot path keeps serving through a ledger outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import jwt
import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from api.errors import ApiError
from core.errors import Unavailable
from hotpath.client import HotPath
from ledger.store import API_KEY_PREFIX, POSTGRES_DOWN, Credential, Ledger
from lua import Status

CACHE_TTL_S = 30.0
STALE_IF_ERROR_S = 24 * 3600.0  # how long a cached key outlives its TTL while Postgres is down
# After a failed lookup, keys known to be valid are served without asking Postgres again
# for this long: with an unreachable host each attempt waits for the connect timeout.
LEDGER_RECHECK_S = 5.0
CACHE_ENTRIES_MAX = 10_000
UNKNOWN_TTL_S = 30.0  # a key Postgres did not know is refused without asking again this long
UNKNOWN_ENTRIES_MAX = 10_000
# What ledger.Ledger.create_api_key makes: the prefix and 32 random bytes, base64url.
API_KEY_SHAPE = re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")
JWT_LEEWAY_S = 30
# agent: spends; admin: spends and manages; viewer (frontend tokens only): reads, changes nothing.
ROLES = ("agent", "admin", "viewer")
_BEARER_API_KEY = "Bearer " + API_KEY_PREFIX  # the usual spelling of an API key header
_BEARER_LENGTH = len("Bearer ")


log = logging.getLogger(__name__)
# An API key's cache entry: (fresh until, usable while Postgres is down until, credential).
_Entry = tuple[float, float, Credential]


class SharedCredentials:
    """API keys the sidecars have authenticated, by sha256, in Redis for
    STALE_IF_ERROR_S: consulted only when Postgres cannot answer. (A revoked key found
    here charges nothing: the scripts refuse it.)"""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, digest: bytes) -> str:
        return f"{self.prefix}:auth:{digest.hex()}"

    async def put(self, digest: bytes, cred: Credential) -> None:
        record = [cred.id, cred.organization_id, cred.role, cred.department_id]
        with contextlib.suppress(aioredis.RedisError, OSError):  # an optimization only
            await self.redis.set(self._key(digest), msgspec.json.encode(record), px=int(STALE_IF_ERROR_S * 1000))

    async def get(self, digest: bytes) -> Credential | None:
        try:
            raw = await self.redis.get(self._key(digest))
        except (aioredis.RedisError, OSError):
            return None
        if raw is None:
            return None
        cid, org, role, dept = msgspec.json.decode(raw)
        return Credential(id=cid, organization_id=org, role=role, department_id=dept)


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


# A check every request of a credential passes besides authentication, in the same
# step as nothing else: the hot path's revoked flag and rate limit (see hot_path_check).
CredentialCheck = Callable[[Credential], Awaitable[None]]


class Authenticator:
    """Credentials of one process. API keys are looked up in Postgres by their sha256
    and cached CACHE_TTL_S; keys Postgres does not know are remembered as unknown for
    UNKNOWN_TTL_S (every bogus key would otherwise cost a query), and text that cannot
    be one of our keys is refused without asking at all.

    `check`, when given, runs for every API-key request, cached or not: services whose
    requests do not run a hot-path script (billing, the pages) pass hot_path_check, so a
    revoked key is refused at its next request there too, as the scripts refuse it."""

    def __init__(
        self,
        ledger: Ledger,
        jwt_secret: str | None,
        shared: SharedCredentials | None = None,
        *,
        check: CredentialCheck | None = None,
    ) -> None:
        self.ledger = ledger
        self.jwt_secret = jwt_secret
        self.shared = shared
        self.check = check
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # digest -> unknown until (monotonic)
        self._ledger_down_until = 0.0  # monotonic time

    def forget(self, secret: str) -> None:
        self._cache.pop(hashlib.sha256(secret.encode()).digest(), None)

    def cached(self, request: web.Request) -> Credential | None:
        """The credential of an API key authenticated in the last CACHE_TTL_S, without
        a coroutine (the hot path's common case); None: await the authenticator."""
        if self.check is not None:
            return None
        header = request.headers.get("Authorization")
        if header is None or not header.startswith(_BEARER_API_KEY):  # other spellings: __call__
            return None
        try:
            digest = hashlib.sha256(header[_BEARER_LENGTH:].encode()).digest()
        except UnicodeEncodeError:  # not UTF-8 (aiohttp kept the bytes as surrogates)
            return None
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[2]
        return None

    async def __call__(self, request: web.Request) -> Credential:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("send Authorization: Bearer <api key or token>")
        token = token.strip()
        if not token.isascii():  # keys and JWTs are ASCII; anything else is not ours
            raise unauthenticated("malformed credential: not an API key or a token")
        if token.startswith(API_KEY_PREFIX):
            cred = await self._api_key(token)
            if self.check is not None:
                await self.check(cred)
            return cred
        return self._jwt(token)

    async def _api_key(self, secret: str) -> Credential:
        if not API_KEY_SHAPE.fullmatch(secret):
            raise unauthenticated("unknown or revoked API key")
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[2]
        unknown_until = self._unknown.get(digest)
        if unknown_until is not None and unknown_until > now:
            raise unauthenticated("unknown or revoked API key")
        if now < self._ledger_down_until:  # a lookup failed moments ago: do not wait on another
            known = await self._known(digest, hit, now)
            if known is None:
                raise Unavailable("postgres: unreachable")
            return known
        try:
            cred = await self.ledger.authenticate(secret)
        except POSTGRES_DOWN:
            self._ledger_down_until = now + LEDGER_RECHECK_S
            known = await self._known(digest, hit, now)
            if known is None:
                raise
            return known
        if cred is None:
            self._cache.pop(digest, None)
            self._unknown[digest] = now + UNKNOWN_TTL_S
            self._unknown.move_to_end(digest)
            while len(self._unknown) > UNKNOWN_ENTRIES_MAX:
                self._unknown.popitem(last=False)
            raise unauthenticated("unknown or revoked API key")
        if self.shared is not None:
            await self.shared.put(digest, cred)
        self._cache[digest] = (now + CACHE_TTL_S, now + CACHE_TTL_S + STALE_IF_ERROR_S, cred)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_ENTRIES_MAX:
            self._cache.popitem(last=False)
        return cred

    async def _known(self, digest: bytes, hit: _Entry | None, now: float) -> Credential | None:
        """While Postgres cannot answer: the key as this process knew it, or as another
        sidecar left it in Redis (the scripts still check revocation)."""
        if hit is not None and hit[1] > now:
            return hit[2]
        shared = await self.shared.get(digest) if self.shared is not None else None
        if shared is not None:
            log.warning("credential_from_shared_cache", extra={"credential_id": shared.id})
            self._cache[digest] = (now, now + STALE_IF_ERROR_S, shared)
        return shared

    def _jwt(self, token: str) -> Credential:
        if self.jwt_secret is None:
            raise unauthenticated("JWT authentication is not configured (JWT_SECRET)")
        try:
            claims = jwt.decode(
                token,
                self.jwt_secret,
                algorithms=["HS256"],
                options={"require": ["exp", "sub", "org", "role"]},
                leeway=JWT_LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise unauthenticated(f"invalid token: {exc}") from None
        org, role, sub = claims["org"], claims["role"], claims["sub"]
        if not isinstance(org, str) or not isinstance(sub, str) or role not in ROLES:
            raise unauthenticated("invalid token claims")
        try:
            org = str(uuid.UUID(org))
        except ValueError:
            raise unauthenticated("invalid token claims: org is not an organization id") from None
        dept = claims.get("department_id")
        return Credential(
            id=f"jwt:{sub}", organization_id=org, role=role, department_id=dept if isinstance(dept, str) else None
        )


def issue_jwt(
    secret: str, *, organization_id: str, subject: str, role: str, ttl_s: int = 3600, department_id: str | None = None
) -> str:
    """A token for the frontend (and tests): HS256 with the shared secret."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "org": organization_id, "role": role, "iat": now, "exp": now + ttl_s}
    if department_id is not None:
        claims["department_id"] = department_id
    return jwt.encode(claims, secret, algorithm="HS256")


def require_admin(cred: Credential) -> None:
    if cred.role != "admin":
        raise ApiError(403, "forbidden", "this operation needs an admin credential")


def hot_path_check(hot: HotPath, ledger: Ledger) -> CredentialCheck:
    """A CredentialCheck that takes one request token for the credential in Redis: the
    revoked flag and the rate limit, exactly as the sidecar's scripts check them. When
    Redis cannot answer, the key is looked up in Postgres again (revocation is there
    too), so a revoked key is never served from the cache."""

    async def check(cred: Credential) -> None:
        try:
            result = await hot.take_request_token(cred.organization_id, cred.id)
        except Unavailable:
            if not await ledger.api_key_active(cred.organization_id, cred.id):
                raise unauthenticated("this credential was revoked") from None
            return
        if result.status is Status.UNAUTHENTICATED:
            raise unauthenticated("this credential was revoked")
        if result.status is Status.RATE_LIMITED:
            retry_s = max(1, -(-int(result.payload.get("retry_after_ms", 1000)) // 1000))
            raise ApiError(
                429, "rate_limited", "too many requests for this credential", headers={"Retry-After": str(retry_s)}
            )
        if result.status is not Status.OK:
            raise Unavailable(f"the hot path refused the request token: {result.status.name}")

    return check


def refuse_viewer(cred: Credential) -> None:
    """Spending (use, reserve, release) needs an agent or admin credential."""
    if cred.role == "viewer":
        raise ApiError(403, "forbidden", "a viewer token reads only; spending needs an agent or admin credential")
