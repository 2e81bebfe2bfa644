"""API-key authentication while Postgres cannot answer: keys known before keep working,
and a failed lookup is not waited on again for every request (no servers: a ledger
stand-in that fails on demand, and fakeredis for the copy sidecars share)."""

from __future__ import annotations

import fakeredis
import pytest

from api import auth
from api.auth import Authenticator, SharedCredentials
from hotpath.client import Unavailable
from ledger.store import Credential

KEY = "ck_" + "known_key".ljust(43, "k")  # the shape of a real key
OTHER = "ck_" + "key_of_another_sidecar".ljust(43, "o")
NEVER_SEEN = "ck_" + "never_seen".ljust(43, "n")
CRED = Credential(id="k1", organization_id="00000000-0000-0000-0000-000000000001", role="agent", department_id=None)
CRED2 = Credential(id="k2", organization_id="00000000-0000-0000-0000-000000000002", role="admin", department_id=None)


class Ledger:
    """authenticate() as the real one, until `down` is set."""

    def __init__(self) -> None:
        self.down = False
        self.lookups = 0

    async def authenticate(self, secret: str) -> Credential | None:
        self.lookups += 1
        if self.down:
            raise ConnectionRefusedError("postgres is down")
        return {KEY: CRED, OTHER: CRED2}.get(secret)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(auth.time, "monotonic", c)
    return c


async def test_known_keys_outlive_their_ttl_and_a_failed_lookup_is_not_repeated(clock: Clock) -> None:
    ledger = Ledger()
    shared = SharedCredentials(fakeredis.FakeAsyncRedis(), "t")
    other_sidecar = Authenticator(ledger, None, shared)  # type: ignore[arg-type]
    sidecar = Authenticator(ledger, None, shared)  # type: ignore[arg-type]
    assert await sidecar._api_key(KEY) == CRED
    assert await other_sidecar._api_key(OTHER) == CRED2  # leaves its copy in Redis
    assert ledger.lookups == 2

    ledger.down = True
    clock.now += auth.CACHE_TTL_S + 1  # the cache entry is stale: the ledger is asked, and fails
    assert await sidecar._api_key(KEY) == CRED
    assert ledger.lookups == 3
    clock.now += 1  # within the recheck window: not asked again
    assert await sidecar._api_key(KEY) == CRED
    assert await sidecar._api_key(OTHER) == CRED2  # never seen here: the shared copy
    with pytest.raises(Unavailable):
        await sidecar._api_key(NEVER_SEEN)  # known to nobody: 503, fast
    assert ledger.lookups == 3

    clock.now += auth.LEDGER_RECHECK_S  # the window is over: asked again (and still down)
    with pytest.raises(ConnectionRefusedError):
        await sidecar._api_key(NEVER_SEEN)
    assert ledger.lookups == 4

    ledger.down = False  # back: a lookup again, fresh answers again
    clock.now += auth.LEDGER_RECHECK_S
    assert await sidecar._api_key(KEY) == CRED
    assert ledger.lookups == 5
    # A key known only to this process is trusted for STALE_IF_ERROR_S past its TTL.
    solo = Authenticator(ledger, None)  # type: ignore[arg-type]
    assert await solo._api_key(KEY) == CRED
    ledger.down = True
    clock.now += auth.CACHE_TTL_S + auth.STALE_IF_ERROR_S - 1
    assert await solo._api_key(KEY) == CRED
    clock.now += auth.LEDGER_RECHECK_S + 2
    with pytest.raises(ConnectionRefusedError):
        await solo._api_key(KEY)


class HotPathDown:
    """take_request_token() while Redis cannot be reached."""

    async def take_request_token(self, org: str, cred: str) -> object:
        raise Unavailable("redis: connection refused")


class KeyLedger:
    def __init__(self, active: bool) -> None:
        self.active = active
        self.asked: list[tuple[str, str]] = []

    async def api_key_active(self, org: str, key_id: str) -> bool:
        self.asked.append((org, key_id))
        return self.active


async def test_the_revocation_check_asks_postgres_when_redis_cannot_answer() -> None:
    from api.errors import ApiError

    for active in (True, False):
        ledger = KeyLedger(active)
        check = auth.hot_path_check(HotPathDown(), ledger)  # type: ignore[arg-type]
        if active:
            await check(CRED)
        else:
            with pytest.raises(ApiError) as refused:
                await check(CRED)
            assert refused.value.status == 401
        assert ledger.asked == [(CRED.organization_id, CRED.id)]
