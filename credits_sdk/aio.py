"""``AsyncCreditsClient``: the asyncio client, on aiohttp.

aiohttp because the project already depends on it (the sidecar is an aiohttp app), it
pools keep-alive connections per client (``max_connections``), has connect and total
timeouts, and speaks HTTP over a Unix socket (``UnixConnector``) as well as TCP. The
request building, answer decoding, error mapping and retry policy are shared with the
sync client (``credits_sdk._core``); this module is only the I/O around them.

One client per event loop: create it inside the loop that uses it (the aiohttp session
is opened on the first request) and close it with ``await client.aclose()`` or
``async with``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import yarl

from credits_sdk import _core, bulk, errors, models
from credits_sdk.reservation import AsyncReservationScope

T = TypeVar("T")

# What a dropped, refused, reset or timed-out exchange looks like from aiohttp.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    TimeoutError,
)
USAGE_PAGES_MAX = 10_000


class AsyncCreditsClient:
    """The credits API for asyncio code. Every method is a coroutine; see ``CreditsClient``
    for the same methods in blocking form."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        unix_socket: str | None = None,
        timeout_s: float = _core.DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = _core.DEFAULT_CONNECT_TIMEOUT_S,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        backoff_base_s: float = _core.DEFAULT_BACKOFF_BASE_S,
        backoff_max_s: float = _core.DEFAULT_BACKOFF_MAX_S,
        rate_limit_wait_max_s: float = _core.DEFAULT_RATE_LIMIT_WAIT_MAX_S,
        max_connections: int = _core.DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.settings = _core.Settings.create(
            base_url,
            api_key=api_key,
            unix_socket=unix_socket,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            rate_limit_wait_max_s=rate_limit_wait_max_s,
            max_connections=max_connections,
        )
        self._session: aiohttp.ClientSession | None = None
        self._costs = _core.CostCache()

    @classmethod
    def from_env(cls, **options: Any) -> AsyncCreditsClient:
        """``METER_URL`` and ``API_KEY`` from the environment, as ``credits dev`` prints them."""
        return cls(os.environ["METER_URL"], api_key=os.environ["API_KEY"], **options)

    # -- lifecycle ------------------------------------------------------------------
    async def __aenter__(self) -> AsyncCreditsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self.settings
            connector: aiohttp.BaseConnector
            if s.unix_socket is not None:
                connector = aiohttp.UnixConnector(path=s.unix_socket, limit=s.max_connections)
            else:
                connector = aiohttp.TCPConnector(limit=s.max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=s.timeout_s, connect=s.connect_timeout_s),
            )
        return self._session

    # -- I/O --------------------------------------------------------------------------
    async def _send(self, request: _core.Request) -> _core.Outcome:
        session = self._open()
        url = yarl.URL(self.settings.origin + request.target, encoded=True)
        try:
            async with session.request(
                request.method, url, headers=dict(request.headers), data=request.body, allow_redirects=False
            ) as response:
                length = response.content_length
                if length is not None and length > _core.RESPONSE_BYTES_MAX:
                    raise errors.UnexpectedResponse(f"answer of {length} bytes is too large", status=response.status)
                body = await response.read()
                headers = {k.lower(): v for k, v in response.headers.items()}
                return _core.RawResponse(response.status, headers, body)
        except NETWORK_ERRORS as exc:
            return _core.TransportFailure(exc)

    async def _call(self, request: _core.Request, decode: Callable[[bytes], T]) -> T:
        steps = _core.exchange(self.settings, request, decode)
        step = next(steps)
        # The exchange yields at most two steps per attempt (send, sleep); bound the loop by that.
        for _ in range(2 * (self.settings.max_retries + 1) + 1):
            try:
                if isinstance(step, _core.Sleep):
                    await asyncio.sleep(step.seconds)
                    step = steps.send(None)
                else:
                    step = steps.send(await self._send(step))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        raise RuntimeError("the exchange did not finish within its attempt bound")

    # -- the credits API ----------------------------------------------------------------
    # -- entitlements ---------------------------------------------------------------------
    async def check(
        self,
        feature: str,
        *,
        action: str | None = None,
        units: int = 1,
        department_id: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.FeatureCheck:
        """May this key use ``feature`` (answered from the sidecar's cache)? With
        ``action``, also charge it when allowed, in one atomic step. A refusal is an
        answer (``allowed`` False, ``reason``), not an exception."""
        request = _core.check_request(
            self.settings,
            feature,
            action=action,
            units=units,
            department_id=department_id,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return await self._call(request, _core.decode_check)

    async def entitlements(self) -> models.EntitlementList:
        """The organization's features: its plan's (or the free defaults), overrides, usage."""
        return await self._call(_core.entitlements_request(self.settings), _core.decode_entitlements)

    async def add_usage(
        self, feature: str, delta: int = 1, *, idempotency_key: str | None = None
    ) -> models.UsageChange:
        """Count ``delta`` units of a limit feature (negative: give back). Raises
        EntitlementLimitReached past the limit; a retry with the key counts once."""
        request = _core.feature_usage_request(self.settings, feature, delta, idempotency_key=idempotency_key)
        return await self._call(request, _core.decode_usage_change)

    async def balance(self, department_id: str | None = None) -> models.Balance:
        """Balance, reserved, available and live grants (and the department's budget)."""
        return await self._call(_core.balance_request(self.settings, department_id), _core.decode_balance)

    async def consume(
        self,
        action: str,
        units: int = 1,
        *,
        department_id: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.Consumption:
        """Charge ``units`` of ``action``. Retried on network failures with one key."""
        request = _core.consume_request(
            self.settings,
            action,
            units,
            department_id=department_id,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return await self._call(request, _core.decode_consumption)

    async def consume_batch(
        self, items: Sequence[models.Item], *, atomic: bool = False, idempotency_key: str | None = None
    ) -> models.BatchResult:
        """Charge many items in one request (at most the sidecar's MAX_BATCH_ITEMS, 5000
        by default). Best effort unless ``atomic``: per-item failures are in the results."""
        request = _core.batch_request(self.settings, items, atomic=atomic, idempotency_key=idempotency_key)
        return await self._call(request, _core.decode_batch)

    async def reserve(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        department_id: str | None = None,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.Reservation:
        """Hold ``amount`` credits for ``ttl_s`` seconds; ``release`` charges what was used."""
        request = _core.reserve_request(
            self.settings,
            amount,
            ttl_s=ttl_s,
            department_id=department_id,
            action=action,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return await self._call(request, _core.decode_reservation)

    async def release(
        self,
        reservation: str | models.Reservation,
        used: _core.Amount = 0,
        *,
        idempotency_key: str | None = None,
    ) -> models.Release:
        """Charge ``used`` (at most the hold) and return the rest to available."""
        request = _core.release_request(self.settings, reservation, used, idempotency_key=idempotency_key)
        return await self._call(request, _core.decode_release)

    def reservation(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        department_id: str | None = None,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncReservationScope:
        """``async with client.reservation(50, ttl_s=600) as hold: ... hold.used = 12``."""

        reserve = functools.partial(
            self.reserve,
            amount,
            ttl_s=ttl_s,
            department_id=department_id,
            action=action,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return AsyncReservationScope(reserve, self._release_for_scope)

    async def _release_for_scope(self, reservation_id: str, used: decimal.Decimal, key: str) -> models.Release:
        return await self.release(reservation_id, used, idempotency_key=key)

    async def costs(self) -> list[models.Cost]:
        """The cost of every action (also refreshes the cache behind ``price``)."""
        found = await self._call(_core.costs_request(self.settings), _core.decode_costs)
        self._costs.store(found)
        return found

    async def price(self, action: str) -> decimal.Decimal:
        """Credits per unit of ``action``, from a cache refreshed every 60 s."""
        cached = self._costs.get(action)
        if cached is not None:
            return cached
        await self.costs()
        return self._costs.price(action)

    async def usage(
        self,
        *,
        from_: dt.datetime | str | None = None,
        to: dt.datetime | str | None = None,
        department_id: str | None = None,
        action: str | None = None,
        limit: int | None = None,
        starting_after: str | None = None,
    ) -> models.UsagePage:
        """One page of settled usage events, newest first (``GET /api/credits/usage``)."""
        request = _core.usage_request(
            self.settings,
            from_=from_,
            to=to,
            department_id=department_id,
            action=action,
            limit=limit,
            starting_after=starting_after,
        )
        return await self._call(request, _core.decode_usage)

    async def iter_usage(
        self,
        *,
        from_: dt.datetime | str | None = None,
        to: dt.datetime | str | None = None,
        department_id: str | None = None,
        action: str | None = None,
        page_size: int = _core.USAGE_PAGE_LIMIT_MAX,
        max_pages: int = USAGE_PAGES_MAX,
    ) -> AsyncIterator[models.UsageEvent]:
        """Every usage event in the range, page by page (at most ``max_pages`` pages;
        more than that raises, so a truncated report is never mistaken for a whole one)."""
        after: str | None = None
        for _ in range(max_pages):
            page = await self.usage(
                from_=from_, to=to, department_id=department_id, action=action, limit=page_size, starting_after=after
            )
            for event in page.data:
                yield event
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id
        raise errors.CreditsError(f"usage has more than {max_pages} pages; narrow the range or raise max_pages")

    async def consume_all(
        self,
        items: Iterable[models.Item],
        *,
        job_id: str,
        batch_size: int = bulk.DEFAULT_BATCH_SIZE,
        max_in_flight: int = bulk.DEFAULT_MAX_IN_FLIGHT,
        checkpoint: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        total: int | None = None,
        on_failure: Callable[[bulk.ItemFailure], None] | None = None,
    ) -> bulk.BulkReport:
        """Charge every item of an iterable of any size; see ``credits_sdk.bulk``."""
        job = bulk.BulkJob(
            job_id,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            checkpoint=checkpoint,
            progress=progress,
            total=total if total is not None else bulk.length_of(items),
            on_failure=on_failure,
        )
        return await bulk.run_async(self, job, items)
