"""``CreditsClient``: the blocking client, on urllib3.

Why urllib3 and not httpx: it is already installed with the project (requests, and so
the ``stripe`` SDK, depend on it), so the SDK adds no dependency; its connection pool is
thread-safe, which the sync bulk job and threaded agents need; it has separate connect
and read timeouts; and turning its own retries off (``retries=False``) leaves exactly one
retry policy, the SDK's shared one in ``_core``, for both clients. HTTP over a Unix
socket is the one thing it lacks, and that is the small ``_UnixConnection`` below
(a socket factory; everything above the socket is urllib3's). httpx would have given one
library for both clients, but the async client is on aiohttp, which the project already
uses, and two HTTP stacks sharing one retry core is the point of ``_core``.

Thread-safe: one client may serve many threads (at most ``max_connections``
connections; a thread waits up to ``timeout_s`` for a free one).
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import urllib3
import urllib3.connection
import urllib3.exceptions

from credits_sdk import _core, bulk, errors, models
from credits_sdk.reservation import ReservationScope

T = TypeVar("T")

# What a dropped, refused, reset or timed-out exchange looks like from urllib3 (with its
# own retries off). EmptyPoolError: no free connection within the timeout, try later.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.EmptyPoolError,
    urllib3.exceptions.SSLError,
    OSError,
)
USAGE_PAGES_MAX = 10_000


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection whose socket is a Unix stream socket."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"cannot connect to {self.socket_path}: {exc}") from exc
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class CreditsClient:
    """The credits API for blocking code (threads welcome). Same methods as
    ``AsyncCreditsClient``; amounts are ``Decimal``."""

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
        self.settings = s = _core.Settings.create(
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
        self._timeout = urllib3.Timeout(connect=s.connect_timeout_s, read=s.timeout_s)
        pool_options: dict[str, Any] = {
            "maxsize": s.max_connections,
            "block": True,
            "timeout": self._timeout,
            "retries": False,
        }
        self._pool: urllib3.HTTPConnectionPool
        if s.unix_socket is not None:
            self._pool = _UnixPool("localhost", socket_path=s.unix_socket, **pool_options)
        elif s.scheme == "https":
            self._pool = urllib3.HTTPSConnectionPool(s.host, s.port, **pool_options)
        else:
            self._pool = urllib3.HTTPConnectionPool(s.host, s.port, **pool_options)
        self._costs = _core.CostCache()

    @classmethod
    def from_env(cls, **options: Any) -> CreditsClient:
        """``METER_URL`` and ``API_KEY`` from the environment, as ``credits dev`` prints them."""
        return cls(os.environ["METER_URL"], api_key=os.environ["API_KEY"], **options)

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> CreditsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    # -- I/O --------------------------------------------------------------------------
    def _send(self, request: _core.Request) -> _core.Outcome:
        try:
            response = self._pool.urlopen(
                request.method,
                request.target,
                body=request.body,
                headers=dict(request.headers),
                retries=False,
                redirect=False,
                timeout=self._timeout,
                pool_timeout=math.ceil(self.settings.timeout_s),
                preload_content=False,
            )
        except NETWORK_ERRORS as exc:
            return _core.TransportFailure(exc)
        try:
            length = response.length_remaining
            if length is not None and length > _core.RESPONSE_BYTES_MAX:
                raise errors.UnexpectedResponse(f"answer of {length} bytes is too large", status=response.status)
            body = response.read()
        except NETWORK_ERRORS as exc:
            return _core.TransportFailure(exc)
        finally:
            response.release_conn()
        headers = {k.lower(): v for k, v in response.headers.items()}
        return _core.RawResponse(response.status, headers, body)

    def _call(self, request: _core.Request, decode: Callable[[bytes], T]) -> T:
        steps = _core.exchange(self.settings, request, decode)
        step = next(steps)
        # The exchange yields at most two steps per attempt (send, sleep); bound the loop by that.
        for _ in range(2 * (self.settings.max_retries + 1) + 1):
            try:
                if isinstance(step, _core.Sleep):
                    time.sleep(step.seconds)
                    step = steps.send(None)
                else:
                    step = steps.send(self._send(step))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        raise RuntimeError("the exchange did not finish within its attempt bound")

    # -- the credits API ----------------------------------------------------------------
    # -- entitlements ---------------------------------------------------------------------
    def check(
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
        return self._call(request, _core.decode_check)

    def entitlements(self) -> models.EntitlementList:
        """The organization's features: its plan's (or the free defaults), overrides, usage."""
        return self._call(_core.entitlements_request(self.settings), _core.decode_entitlements)

    def add_usage(self, feature: str, delta: int = 1, *, idempotency_key: str | None = None) -> models.UsageChange:
        """Count ``delta`` units of a limit feature (negative: give back). Raises
        EntitlementLimitReached past the limit; a retry with the key counts once."""
        request = _core.feature_usage_request(self.settings, feature, delta, idempotency_key=idempotency_key)
        return self._call(request, _core.decode_usage_change)

    def balance(self, department_id: str | None = None) -> models.Balance:
        """Balance, reserved, available and live grants (and the department's budget)."""
        return self._call(_core.balance_request(self.settings, department_id), _core.decode_balance)

    def consume(
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
        return self._call(request, _core.decode_consumption)

    def consume_batch(
        self, items: Sequence[models.Item], *, atomic: bool = False, idempotency_key: str | None = None
    ) -> models.BatchResult:
        """Charge many items in one request (at most the sidecar's MAX_BATCH_ITEMS, 5000
        by default). Best effort unless ``atomic``: per-item failures are in the results."""
        request = _core.batch_request(self.settings, items, atomic=atomic, idempotency_key=idempotency_key)
        return self._call(request, _core.decode_batch)

    def reserve(
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
        return self._call(request, _core.decode_reservation)

    def release(
        self,
        reservation: str | models.Reservation,
        used: _core.Amount = 0,
        *,
        idempotency_key: str | None = None,
    ) -> models.Release:
        """Charge ``used`` (at most the hold) and return the rest to available."""
        request = _core.release_request(self.settings, reservation, used, idempotency_key=idempotency_key)
        return self._call(request, _core.decode_release)

    def reservation(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        department_id: str | None = None,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> ReservationScope:
        """``with client.reservation(50, ttl_s=600) as hold: ... hold.used = 12``."""
        reserve = functools.partial(
            self.reserve,
            amount,
            ttl_s=ttl_s,
            department_id=department_id,
            action=action,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return ReservationScope(reserve, self._release_for_scope)

    def _release_for_scope(self, reservation_id: str, used: decimal.Decimal, key: str) -> models.Release:
        return self.release(reservation_id, used, idempotency_key=key)

    def costs(self) -> list[models.Cost]:
        """The cost of every action (also refreshes the cache behind ``price``)."""
        found = self._call(_core.costs_request(self.settings), _core.decode_costs)
        self._costs.store(found)
        return found

    def price(self, action: str) -> decimal.Decimal:
        """Credits per unit of ``action``, from a cache refreshed every 60 s."""
        cached = self._costs.get(action)
        if cached is not None:
            return cached
        self.costs()
        return self._costs.price(action)

    def usage(
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
        return self._call(request, _core.decode_usage)

    def iter_usage(
        self,
        *,
        from_: dt.datetime | str | None = None,
        to: dt.datetime | str | None = None,
        department_id: str | None = None,
        action: str | None = None,
        page_size: int = _core.USAGE_PAGE_LIMIT_MAX,
        max_pages: int = USAGE_PAGES_MAX,
    ) -> Iterator[models.UsageEvent]:
        """Every usage event in the range, page by page (at most ``max_pages`` pages;
        more than that raises, so a truncated report is never mistaken for a whole one)."""
        after: str | None = None
        for _ in range(max_pages):
            page = self.usage(
                from_=from_, to=to, department_id=department_id, action=action, limit=page_size, starting_after=after
            )
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id
        raise errors.CreditsError(f"usage has more than {max_pages} pages; narrow the range or raise max_pages")

    def consume_all(
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
        """Charge every item of an iterable of any size, ``max_in_flight`` batches at a
        time on worker threads; see ``credits_sdk.bulk``."""
        job = bulk.BulkJob(
            job_id,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            checkpoint=checkpoint,
            progress=progress,
            total=total if total is not None else bulk.length_of(items),
            on_failure=on_failure,
        )
        return bulk.run_sync(self, job, items)
