"""The part of both clients that does not do I/O: requests, answers, errors, retries.

``CreditsClient`` (sync, urllib3) and ``AsyncCreditsClient`` (asyncio, aiohttp) differ
only in how bytes reach the sidecar. Everything else lives here, once:

- building each request (path, query, JSON body with exact ``Decimal`` numbers, the
  credential and ``Idempotency-Key`` headers, the ambient ``credits_context``);
- reading each answer into a typed model, and each error into its exception class;
- the retry policy, written as a generator (``exchange``): it yields the ``Request``
  to send or a ``Sleep`` to wait, and is sent back a ``RawResponse`` or a
  ``TransportFailure``. A client's driver loop is a dozen lines of I/O around it, and
  the unit tests drive the same generator with made-up answers.

Retries are safe because every mutating request carries an idempotency key that is
generated once per call (when the caller gave none) and reused by every attempt: an
attempt the sidecar charged but whose answer was lost is replayed, not charged again.
"""

from __future__ import annotations

import datetime as dt
import decimal
import email.utils
import math
import platform
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import msgspec

from credits_sdk import context as ambient
from credits_sdk import errors, models

T = TypeVar("T")

SDK_VERSION = "0.1.0"
API_PREFIX = "/api/credits"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "idempotent-replayed"  # lower case, as RawResponse keeps header names
IDEMPOTENCY_KEY_LENGTH_MAX = 255  # the API's limit
MAX_BATCH_ITEMS = 5000  # the sidecar's default MAX_BATCH_ITEMS; larger batches are a 413
MILLI_PER_CREDIT = 1000  # the API is exact to 0.001 credits
DEFAULT_RESERVATION_TTL_S = 600
RESERVATION_TTL_S_MAX = 7 * 86400  # the API's limit on ttl_seconds
USAGE_PAGE_LIMIT_MAX = 100  # the API's limit on `limit`

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_MAX_RETRIES = 3
MAX_RETRIES_MAX = 10
DEFAULT_BACKOFF_BASE_S = 0.1
DEFAULT_BACKOFF_MAX_S = 2.0
DEFAULT_RATE_LIMIT_WAIT_MAX_S = 5.0
DEFAULT_MAX_CONNECTIONS = 16
COSTS_CACHE_TTL_S = 60.0
RESPONSE_BYTES_MAX = 16 * 1024 * 1024  # a 5000-item batch answer is well under 1 MiB

# Statuses that mean "nothing happened, try again": 503 is the sidecar's own
# `unavailable` (nothing was charged); 502 and 504 come from a proxy in front of it.
RETRY_STATUSES = frozenset({502, 503, 504})

Amount = decimal.Decimal | int | float | str

_encoder = msgspec.json.Encoder(decimal_format="number")


# -- settings --------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How a client reaches the sidecar. Built by ``Settings.create``, which checks bounds."""

    origin: str  # scheme://host[:port], or http://localhost for a Unix socket
    prefix: str  # path prefix before /api/credits ('' normally)
    unix_socket: str | None
    api_key: str | None
    timeout_s: float
    connect_timeout_s: float
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    rate_limit_wait_max_s: float
    max_connections: int
    user_agent: str = field(
        default=f"credits-sdk/{SDK_VERSION} python/{platform.python_version()}",
    )

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.origin).scheme

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.origin).hostname or "localhost"

    @property
    def port(self) -> int | None:
        return urllib.parse.urlsplit(self.origin).port

    @classmethod
    def create(
        cls,
        base_url: str,
        *,
        api_key: str | None,
        unix_socket: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        rate_limit_wait_max_s: float = DEFAULT_RATE_LIMIT_WAIT_MAX_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> Settings:
        """``base_url`` is ``http(s)://host:port[/prefix]``, or ``unix:/path/to.sock``
        (then requests go over that Unix socket); ``unix_socket=`` does the same with
        any base URL."""
        if base_url.startswith("unix:"):
            unix_socket = unix_socket or urllib.parse.unquote(urllib.parse.urlsplit(base_url).path)
            base_url = "http://localhost"
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port] or unix:/path, not {base_url!r}")
        if unix_socket is not None and not unix_socket:
            raise ValueError("unix_socket must be a path")
        _check_range("timeout_s", timeout_s, 0.001, 3600)
        _check_range("connect_timeout_s", connect_timeout_s, 0.001, 3600)
        _check_range("max_retries", max_retries, 0, MAX_RETRIES_MAX)
        _check_range("backoff_base_s", backoff_base_s, 0, 60)
        _check_range("backoff_max_s", backoff_max_s, 0, 600)
        _check_range("rate_limit_wait_max_s", rate_limit_wait_max_s, 0, 3600)
        _check_range("max_connections", max_connections, 1, 1024)
        return cls(
            origin=f"{parts.scheme}://{parts.netloc}",
            prefix=parts.path.rstrip("/"),
            unix_socket=unix_socket,
            api_key=api_key,
            timeout_s=float(timeout_s),
            connect_timeout_s=float(connect_timeout_s),
            max_retries=int(max_retries),
            backoff_base_s=float(backoff_base_s),
            backoff_max_s=float(backoff_max_s),
            rate_limit_wait_max_s=float(rate_limit_wait_max_s),
            max_connections=int(max_connections),
        )


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")


# -- the exchange: requests, answers, retries --------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, prefix included: /api/credits/use?x=1
    headers: Mapping[str, str]
    body: bytes | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True)
class TransportFailure:
    """The request did not get an answer: refused, reset, dropped or timed out."""

    error: BaseException


@dataclass(frozen=True)
class Sleep:
    seconds: float


Outcome = RawResponse | TransportFailure
Exchange = Generator[Request | Sleep, Outcome | None, T]


def exchange(settings: Settings, request: Request, decode: Callable[[bytes], T]) -> Exchange[T]:
    """Send ``request`` until it gets a final answer, at most ``max_retries + 1`` times.

    Retried, with the same request (so the same idempotency key): a transport failure,
    502/503/504, and 429 when its Retry-After is within ``rate_limit_wait_max_s``.
    Everything else is final: a 2xx is decoded, another status raises its ApiError.
    """
    attempts_max = settings.max_retries + 1
    for attempt in range(1, attempts_max + 1):
        outcome = yield request
        if outcome is None:
            raise RuntimeError("the driver must send the outcome of the request it was given")
        if isinstance(outcome, RawResponse) and 200 <= outcome.status < 300:
            return _decode_ok(outcome, decode)
        failure: errors.CreditsError
        if isinstance(outcome, TransportFailure):
            failure = errors.ConnectionFailed(
                f"{request.method} {request.target}: {type(outcome.error).__name__}: {outcome.error}",
                attempts=attempt,
                idempotency_key=request.idempotency_key,
            )
            failure.__cause__ = outcome.error
            delay_s: float | None = backoff_s(settings, attempt)
        else:
            failure = error_from(outcome, request.idempotency_key)
            delay_s = retry_delay_s(settings, outcome.status, failure, attempt)
        if delay_s is None or attempt == attempts_max:
            raise failure
        yield Sleep(delay_s)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def backoff_s(settings: Settings, attempt: int) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(n-1))]."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** (attempt - 1)))
    return random.uniform(0, ceiling)


def retry_delay_s(settings: Settings, status: int, failure: errors.CreditsError, attempt: int) -> float | None:
    """How long to wait before retrying this answer, or None when it is final."""
    retry_after = failure.retry_after_s if isinstance(failure, errors.ApiError) else None
    if status == 429:
        # The bucket refills at a known time: wait exactly that long, if it is short
        # enough to be worth holding the caller; otherwise let the caller decide.
        wait_s = retry_after if retry_after is not None else backoff_s(settings, attempt)
        return wait_s if wait_s <= settings.rate_limit_wait_max_s else None
    if status in RETRY_STATUSES:
        wait_s = backoff_s(settings, attempt)
        if retry_after is not None:
            wait_s = max(wait_s, min(retry_after, settings.backoff_max_s))
        return wait_s
    return None


def _decode_ok(response: RawResponse, decode: Callable[[bytes], T]) -> T:
    try:
        value = decode(response.body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise errors.UnexpectedResponse(
            f"the sidecar answered {response.status} with an unreadable body: {exc}", status=response.status
        ) from exc
    replayed = response.headers.get(REPLAYED_HEADER) == "true"
    if replayed and isinstance(value, msgspec.Struct) and "replayed" in value.__struct_fields__:
        return cast(T, msgspec.structs.replace(value, replayed=True))
    return value


_error_decoder = msgspec.json.Decoder(models.ErrorBody)


def error_from(response: RawResponse, idempotency_key: str | None = None) -> errors.ApiError:
    """The typed exception for an error answer (any body: a proxy may answer HTML)."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    try:
        detail = _error_decoder.decode(response.body).error
    except (msgspec.ValidationError, msgspec.DecodeError):
        detail = models.ErrorDetail(
            type="api_error",
            code=f"http_{response.status}",
            message=response.body[:200].decode("utf-8", "replace") or f"HTTP {response.status}",
        )
    kind = errors.error_class(response.status, detail.code)
    return kind(
        detail.message,
        status=response.status,
        code=detail.code,
        error_type=detail.type,
        param=detail.param,
        retry_after_s=retry_after,
        idempotency_key=idempotency_key,
    )


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> float | None:
    """Retry-After as seconds: either delay-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# -- money -----------------------------------------------------------------------------
def to_decimal(value: Amount, name: str = "amount") -> decimal.Decimal:
    """A credit amount as an exact Decimal. A float goes through its shortest repr
    (``12.5`` -> ``Decimal('12.5')``), which is the number its writer typed."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of credits, not a bool")
    if isinstance(value, decimal.Decimal):
        result = value
    elif isinstance(value, int | str):
        try:
            result = decimal.Decimal(value)
        except decimal.InvalidOperation:
            raise ValueError(f"{name} must be a number of credits, not {value!r}") from None
    elif isinstance(value, float):
        result = decimal.Decimal(repr(value))
    else:
        raise TypeError(f"{name} must be a Decimal, int, float or str, not {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"{name} must be finite, not {value!r}")
    return result


def check_exact(value: decimal.Decimal, name: str) -> decimal.Decimal:
    """Refuse more precision than the API's 0.001 credits (it would be a 400 anyway)."""
    milli = value * MILLI_PER_CREDIT
    if milli != milli.to_integral_value():
        raise ValueError(f"{name} has more precision than 0.001 credits: {value}")
    return value


# -- building requests -----------------------------------------------------------------
def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def _check_key(key: str) -> str:
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_LENGTH_MAX:
        raise ValueError(f"an idempotency key must be 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} characters")
    return key


def _headers(settings: Settings, *, body: bool, idempotency_key: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": settings.user_agent}
    api_key = ambient.current().api_key or settings.api_key
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if body:
        headers["Content-Type"] = "application/json"
    if idempotency_key is not None:
        headers[IDEMPOTENCY_HEADER] = idempotency_key
    return headers


def _get(settings: Settings, path: str, query: Sequence[tuple[str, str]] = ()) -> Request:
    target = settings.prefix + API_PREFIX + path
    if query:
        target += "?" + urllib.parse.urlencode(list(query))
    return Request("GET", target, _headers(settings, body=False, idempotency_key=None))


def _post(
    settings: Settings, path: str, body: Any, idempotency_key: str | None, *, generate_key: bool = True
) -> Request:
    key = _check_key(idempotency_key) if idempotency_key is not None else None
    if key is None and generate_key:
        key = new_idempotency_key()
    return Request(
        "POST",
        settings.prefix + API_PREFIX + path,
        _headers(settings, body=True, idempotency_key=key),
        _encoder.encode(body),
        key,
    )


def _department(explicit: str | None) -> str | None:
    return explicit if explicit is not None else ambient.current().department_id


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def balance_request(settings: Settings, department_id: str | None) -> Request:
    dept = _department(department_id)
    return _get(settings, "/balance", [("department_id", dept)] if dept else [])


def consume_request(
    settings: Settings,
    action: str,
    units: int,
    *,
    department_id: str | None,
    metadata: models.MetadataInput | None,
    idempotency_key: str | None,
) -> Request:
    body = _drop_none(
        {
            "action": action,
            "units": units,
            "department_id": _department(department_id),
            "metadata": ambient.current().merged_metadata(metadata),
        }
    )
    return _post(settings, "/use", body, idempotency_key)


def with_context(item: models.Item, scope: ambient.CreditsContext) -> models.Item:
    """The item as it is sent: the context's department and metadata filled in."""
    dept = item.department_id if item.department_id is not None else scope.department_id
    meta = scope.merged_metadata(item.metadata)
    if dept == item.department_id and meta == item.metadata:
        return item
    return msgspec.structs.replace(item, department_id=dept, metadata=meta)


def batch_request(
    settings: Settings, items: Iterable[models.Item], *, atomic: bool, idempotency_key: str | None
) -> Request:
    """When every item has its own key and the caller gave no request key, none is sent:
    the items' keys already make a retry replay item by item, and a request record would
    make the sidecar keep a second copy of every result (the whole answer) for its
    idempotency TTL; that adds up for bulk jobs."""
    scope = ambient.current()
    sent = [with_context(it, scope) for it in items]
    if not sent:
        raise ValueError("a batch needs at least one item")
    all_keyed = all(it.idempotency_key is not None for it in sent)
    body = {"items": sent, "atomic": atomic}
    return _post(settings, "/use/batch", body, idempotency_key, generate_key=not all_keyed)


def reserve_request(
    settings: Settings,
    amount: Amount,
    *,
    ttl_s: int,
    department_id: str | None,
    action: str | None,
    metadata: models.MetadataInput | None,
    idempotency_key: str | None,
) -> Request:
    _check_range("ttl_s", ttl_s, 1, RESERVATION_TTL_S_MAX)
    body = _drop_none(
        {
            "amount": to_decimal(amount),
            "ttl_seconds": int(ttl_s),
            "department_id": _department(department_id),
            "action": action,
            "metadata": ambient.current().merged_metadata(metadata),
        }
    )
    return _post(settings, "/reserve", body, idempotency_key)


def release_request(
    settings: Settings, reservation: str | models.Reservation, used: Amount, *, idempotency_key: str | None
) -> Request:
    reservation_id = reservation.id if isinstance(reservation, models.Reservation) else reservation
    body = {"reservation_id": reservation_id, "used": to_decimal(used, "used")}
    return _post(settings, "/release", body, idempotency_key)


def costs_request(settings: Settings) -> Request:
    return _get(settings, "/costs")


def _timestamp(value: dt.datetime | str) -> str:
    """ISO 8601 UTC, as the API writes them (a naive datetime is taken as UTC)."""
    if isinstance(value, str):
        return value
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


def usage_request(
    settings: Settings,
    *,
    from_: dt.datetime | str | None,
    to: dt.datetime | str | None,
    department_id: str | None,
    action: str | None,
    limit: int | None,
    starting_after: str | None,
) -> Request:
    query: list[tuple[str, str]] = []
    if from_ is not None:
        query.append(("from", _timestamp(from_)))
    if to is not None:
        query.append(("to", _timestamp(to)))
    dept = _department(department_id)
    if dept:
        query.append(("department_id", dept))
    if action is not None:
        query.append(("action", action))
    if limit is not None:
        _check_range("limit", limit, 1, USAGE_PAGE_LIMIT_MAX)
        query.append(("limit", str(limit)))
    if starting_after is not None:
        query.append(("starting_after", starting_after))
    return _get(settings, "/usage", query)


def check_request(
    settings: Settings,
    feature: str,
    *,
    action: str | None,
    units: int,
    department_id: str | None,
    metadata: models.MetadataInput | None,
    idempotency_key: str | None,
) -> Request:
    """A feature check; with an action it also charges (a key then guards the retries)."""
    if action is None:
        return _post(settings, "/check", {"feature": feature}, idempotency_key, generate_key=False)
    body = _drop_none(
        {
            "feature": feature,
            "action": action,
            "units": units,
            "department_id": _department(department_id),
            "metadata": ambient.current().merged_metadata(metadata),
        }
    )
    return _post(settings, "/check", body, idempotency_key)


def entitlements_request(settings: Settings) -> Request:
    return _get(settings, "/entitlements")


def feature_usage_request(settings: Settings, feature: str, delta: int, *, idempotency_key: str | None) -> Request:
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise TypeError(f"delta must be an int, not {type(delta).__name__}")
    return _post(
        settings, f"/entitlements/{urllib.parse.quote(feature, safe='')}/usage", {"delta": delta}, idempotency_key
    )


# -- reading answers ---------------------------------------------------------------------
def decoder(kind: type[T]) -> Callable[[bytes], T]:
    return msgspec.json.Decoder(kind).decode


decode_balance = decoder(models.Balance)
decode_consumption = decoder(models.Consumption)
decode_batch = decoder(models.BatchResult)
decode_reservation = decoder(models.Reservation)
decode_release = decoder(models.Release)
decode_usage = decoder(models.UsagePage)
_decode_costs = decoder(models.CostList)
decode_check = decoder(models.FeatureCheck)
decode_entitlements = decoder(models.EntitlementList)
decode_usage_change = decoder(models.UsageChange)


def decode_costs(body: bytes) -> list[models.Cost]:
    return _decode_costs(body).data


class CostCache:
    """Prices by action, kept ``COSTS_CACHE_TTL_S`` (the decorator's reserve mode turns
    units into credits with them). Thread-safe; a stale read is at most one TTL old."""

    def __init__(self, ttl_s: float = COSTS_CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._prices: dict[str, decimal.Decimal] = {}
        self._loaded_at_s = -math.inf

    def get(self, action: str) -> decimal.Decimal | None:
        """The cached price, or None when the cache is stale or lacks the action."""
        with self._lock:
            if time.monotonic() - self._loaded_at_s > self.ttl_s:
                return None
            return self._prices.get(action)

    def store(self, costs: Iterable[models.Cost]) -> None:
        with self._lock:
            self._prices = {c.action: c.credits for c in costs}
            self._loaded_at_s = time.monotonic()

    def price(self, action: str) -> decimal.Decimal:
        """After ``store``: the price, or UnknownAction (as the sidecar would say)."""
        with self._lock:
            found = self._prices.get(action)
        if found is None:
            raise errors.UnknownAction(
                f"no cost is configured for action {action!r}", status=400, code="unknown_action", param="action"
            )
        return found
