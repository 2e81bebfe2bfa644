"""The SDK's transport-independent core: settings, request building, error mapping, and
the retry state machine driven with made-up answers (no servers)."""

from __future__ import annotations

import datetime as dt
import decimal
import email.utils
import json
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import pytest

from credits_sdk import _core, errors, models
from credits_sdk.context import credits_context

T = TypeVar("T")
D = decimal.Decimal


def settings(**options: Any) -> _core.Settings:
    return _core.Settings.create("http://127.0.0.1:8080", api_key="ck_client", **options)


def body(request: _core.Request) -> dict[str, Any]:
    assert request.body is not None
    loaded: dict[str, Any] = json.loads(request.body, parse_float=D)
    return loaded


def answer(status: int, payload: Any = None, **headers: str) -> _core.RawResponse:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _core.RawResponse(status, {k.lower().replace("_", "-"): v for k, v in headers.items()}, raw)


def error(status: int, code: str, param: str | None = None, **headers: str) -> _core.RawResponse:
    return answer(status, {"error": {"type": "t", "code": code, "message": f"{code}!", "param": param}}, **headers)


def drive(
    request: _core.Request, outcomes: list[_core.Outcome], decode: Callable[[bytes], T], **options: Any
) -> tuple[T, list[_core.Request | _core.Sleep]]:
    """Run the exchange with canned outcomes; return its result and every step it took."""
    steps_taken: list[_core.Request | _core.Sleep] = []
    exchange = _core.exchange(settings(**options), request, decode)
    pending = list(outcomes)
    try:
        step = next(exchange)
        while True:
            steps_taken.append(step)
            step = exchange.send(None if isinstance(step, _core.Sleep) else pending.pop(0))
    except StopIteration as done:
        return done.value, steps_taken


CONSUMED = {"id": "e1", "action": "tool_call", "units": 1, "credits": 0.1, "balance": 99.9, "available": 99.9}


# -- settings ------------------------------------------------------------------------------
def test_settings_parse_urls_and_bounds() -> None:
    s = _core.Settings.create("https://meter.internal:8443/credits/", api_key=None)
    assert (s.origin, s.prefix, s.scheme, s.host, s.port, s.unix_socket) == (
        "https://meter.internal:8443",
        "/credits",
        "https",
        "meter.internal",
        8443,
        None,
    )
    u = _core.Settings.create("unix:/run/meter.sock", api_key=None)
    assert (u.origin, u.unix_socket) == ("http://localhost", "/run/meter.sock")
    for bad in ("ftp://x", "127.0.0.1:8080", "http://"):
        with pytest.raises(ValueError, match="base_url"):
            _core.Settings.create(bad, api_key=None)
    for option, value in (("max_retries", 11), ("timeout_s", 0), ("max_connections", 0), ("max_retries", True)):
        with pytest.raises(ValueError, match=option):
            settings(**{option: value})


# -- requests ------------------------------------------------------------------------------
def test_consume_request_has_exact_numbers_auth_and_a_fresh_key() -> None:
    first = _core.consume_request(
        settings(), "tool_call", 3, department_id=None, metadata={"task": "7"}, idempotency_key=None
    )
    second = _core.consume_request(settings(), "tool_call", 3, department_id=None, metadata=None, idempotency_key=None)
    assert (first.method, first.target) == ("POST", "/api/credits/use")
    assert body(first) == {"action": "tool_call", "units": 3, "metadata": {"task": "7"}}
    assert first.headers["Authorization"] == "Bearer ck_client"
    assert first.headers["Idempotency-Key"] == first.idempotency_key
    assert first.idempotency_key != second.idempotency_key  # one key per call, not per client
    given = _core.consume_request(settings(), "x", 1, department_id=None, metadata=None, idempotency_key="mine")
    assert given.headers["Idempotency-Key"] == "mine"
    with pytest.raises(ValueError, match="idempotency key"):
        _core.consume_request(settings(), "x", 1, department_id=None, metadata=None, idempotency_key="k" * 256)


def test_amounts_are_json_numbers_never_floats_on_the_way() -> None:
    reserve = _core.reserve_request(
        settings(), D("50.125"), ttl_s=600, department_id=None, action=None, metadata=None, idempotency_key=None
    )
    assert reserve.body is not None and b'"amount":50.125' in reserve.body
    assert body(reserve) == {"amount": D("50.125"), "ttl_seconds": 600}
    from_float = _core.reserve_request(
        settings(), 0.1, ttl_s=1, department_id=None, action="a", metadata=None, idempotency_key=None
    )
    assert from_float.body is not None and b'"amount":0.1,' in from_float.body
    reservation = models.Reservation(
        id="r1", amount=D(5), expires_at=dt.datetime.now(dt.UTC), balance=D(1), available=D(1)
    )
    release = _core.release_request(settings(), reservation, "2.5", idempotency_key=None)
    assert body(release) == {"reservation_id": "r1", "used": D("2.5")}
    with pytest.raises(ValueError, match="ttl_s"):
        _core.reserve_request(
            settings(), 1, ttl_s=0, department_id=None, action=None, metadata=None, idempotency_key=None
        )


def test_money_conversion() -> None:
    assert _core.to_decimal(12.5) == D("12.5") and _core.to_decimal("0.001") == D("0.001") and _core.to_decimal(3) == 3
    for bad in (True, None, [1]):
        with pytest.raises(TypeError):
            _core.to_decimal(bad)  # type: ignore[arg-type]
    for bad_value in ("lots", "NaN", float("inf")):
        with pytest.raises(ValueError):
            _core.to_decimal(bad_value)
    assert _core.check_exact(D("0.125"), "x") == D("0.125")
    with pytest.raises(ValueError, match="precision"):
        _core.check_exact(D("0.0005"), "x")


def test_context_fills_credential_department_and_metadata() -> None:
    outer = credits_context(api_key="ck_ctx", department_id="dept-a", metadata={"trace": "t", "task": "outer"})
    with outer, credits_context(metadata={"task": "inner"}):  # nested: the inner one overrides "task"
        use = _core.consume_request(
            settings(), "x", 1, department_id=None, metadata={"extra": True}, idempotency_key=None
        )
        explicit = _core.consume_request(
            settings(), "x", 1, department_id="dept-b", metadata={"task": "call"}, idempotency_key=None
        )
        batch = _core.batch_request(
            settings(),
            [models.Item(action="a"), models.Item(action="b", department_id="dept-c", metadata={"x": 1})],
            atomic=False,
            idempotency_key=None,
        )
        balance = _core.balance_request(settings(), None)
    assert use.headers["Authorization"] == "Bearer ck_ctx"
    assert body(use) == {
        "action": "x",
        "units": 1,
        "department_id": "dept-a",
        "metadata": {"trace": "t", "task": "inner", "extra": True},
    }
    assert body(explicit)["department_id"] == "dept-b" and body(explicit)["metadata"]["task"] == "call"
    assert body(batch)["items"] == [
        {"action": "a", "department_id": "dept-a", "metadata": {"trace": "t", "task": "inner"}},
        {"action": "b", "department_id": "dept-c", "metadata": {"trace": "t", "task": "inner", "x": 1}},
    ]
    assert balance.target == "/api/credits/balance?department_id=dept-a"
    outside = _core.consume_request(settings(), "x", 1, department_id=None, metadata=None, idempotency_key=None)
    assert body(outside) == {"action": "x", "units": 1} and outside.headers["Authorization"] == "Bearer ck_client"
    with pytest.raises(ValueError, match="at least one item"):
        _core.batch_request(settings(), [], atomic=False, idempotency_key=None)


def test_batch_key_only_when_some_item_lacks_one() -> None:
    keyed = [models.Item(action="a", idempotency_key="k1"), models.Item(action="a", idempotency_key="k2")]
    bare = _core.batch_request(settings(), keyed, atomic=False, idempotency_key=None)
    assert bare.idempotency_key is None and "Idempotency-Key" not in bare.headers
    mixed = _core.batch_request(settings(), [*keyed, models.Item(action="a")], atomic=True, idempotency_key=None)
    assert mixed.idempotency_key is not None and mixed.headers["Idempotency-Key"] == mixed.idempotency_key
    given = _core.batch_request(settings(), keyed, atomic=False, idempotency_key="req")
    assert given.headers["Idempotency-Key"] == "req"


def test_usage_query() -> None:
    naive = dt.datetime(2026, 11, 23, 12, 0, 0)
    aware = dt.datetime(2026, 11, 23, 13, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    request = _core.usage_request(
        settings(), from_=naive, to=aware, department_id="d", action="web_search", limit=100, starting_after="e9"
    )
    assert request.method == "GET" and request.body is None and "Idempotency-Key" not in request.headers
    assert request.target == (
        "/api/credits/usage?from=2026-11-23T12%3A00%3A00.000Z&to=2026-11-23T12%3A00%3A00.000Z"
        "&department_id=d&action=web_search&limit=100&starting_after=e9"
    )
    with pytest.raises(ValueError, match="limit"):
        _core.usage_request(
            settings(), from_=None, to=None, department_id=None, action=None, limit=101, starting_after=None
        )


def test_prefix_is_kept() -> None:
    s = _core.Settings.create("http://gateway/meter", api_key="k")
    assert _core.costs_request(s).target == "/meter/api/credits/costs"


# -- answers and errors -------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "kind"), sorted(errors.CODES.items()))
def test_every_code_has_its_class(code: str, kind: type[errors.ApiError]) -> None:
    status = {"invalid_request": 400, "unknown_action": 400}.get(code, 409)
    failure = _core.error_from(error(status, code, "$.x"), "key-1")
    assert type(failure) is kind
    assert (failure.code, failure.param, failure.idempotency_key, failure.message) == (code, "$.x", "key-1", f"{code}!")


def test_unknown_codes_and_bodies_fall_back_by_status() -> None:
    assert type(_core.error_from(error(402, "new_budget_kind"))) is errors.PaymentRequired
    assert type(_core.error_from(error(418, "teapot"))) is errors.ApiError
    html = _core.error_from(answer(502, b"<html>bad gateway</html>"))
    assert type(html) is errors.ServerError and html.code == "http_502" and "bad gateway" in html.message
    assert isinstance(_core.error_from(error(500, "internal_error")), errors.ServerError)
    assert issubclass(errors.InsufficientCredits, errors.PaymentRequired)
    assert issubclass(errors.UnknownAction, errors.InvalidRequest)
    assert "402 insufficient_credits" in str(_core.error_from(error(402, "insufficient_credits")))


def test_retry_after() -> None:
    assert _core.parse_retry_after("3") == 3.0 and _core.parse_retry_after(None) is None
    assert _core.parse_retry_after("soon") is None and _core.parse_retry_after("-5") == 0.0
    date = email.utils.formatdate(1_000_010, usegmt=True)
    assert _core.parse_retry_after(date, now_s=1_000_000) == pytest.approx(10)
    assert _core.error_from(error(429, "rate_limited", Retry_After="2")).retry_after_s == 2.0


# -- the retry state machine -------------------------------------------------------------------------
def request() -> _core.Request:
    return _core.consume_request(settings(), "tool_call", 1, department_id=None, metadata=None, idempotency_key=None)


def test_success_on_the_first_attempt() -> None:
    result, steps = drive(request(), [answer(200, CONSUMED)], _core.decode_consumption)
    assert result.credits == D("0.1") and isinstance(result.credits, decimal.Decimal)
    assert len(steps) == 1


def test_network_failures_are_retried_with_the_same_request() -> None:
    req = request()
    drop = _core.TransportFailure(ConnectionResetError("reset"))
    result, steps = drive(req, [drop, drop, answer(200, CONSUMED)], _core.decode_consumption, backoff_base_s=0.01)
    sent = [s for s in steps if isinstance(s, _core.Request)]
    sleeps = [s for s in steps if isinstance(s, _core.Sleep)]
    assert len(sent) == 3 and all(s is req for s in sent)  # same body, same Idempotency-Key
    assert len(sleeps) == 2 and all(0 <= s.seconds <= 0.02 for s in sleeps)
    assert result.id == "e1"


def test_retries_are_bounded() -> None:
    drop = _core.TransportFailure(TimeoutError("slow"))
    with pytest.raises(errors.ConnectionFailed) as failed:
        drive(request(), [drop] * 10, _core.decode_consumption, max_retries=2, backoff_base_s=0)
    assert failed.value.attempts == 3 and isinstance(failed.value.__cause__, TimeoutError)
    with pytest.raises(errors.ConnectionFailed):
        drive(request(), [drop], _core.decode_consumption, max_retries=0)


def test_outages_are_retried_and_refusals_are_not() -> None:
    result, steps = drive(
        request(), [error(503, "unavailable"), answer(200, CONSUMED)], _core.decode_consumption, backoff_base_s=0
    )
    assert result.id == "e1" and len(steps) == 3
    for status, code, kind in (
        (402, "insufficient_credits", errors.InsufficientCredits),
        (400, "invalid_request", errors.InvalidRequest),
        (409, "idempotency_conflict", errors.IdempotencyConflict),
        (500, "internal_error", errors.ServerError),
    ):
        with pytest.raises(kind):
            drive(request(), [error(status, code), answer(200, CONSUMED)], _core.decode_consumption)
    with pytest.raises(errors.Unavailable):
        drive(request(), [error(503, "unavailable")] * 4, _core.decode_consumption, backoff_base_s=0)


def test_rate_limits_wait_for_retry_after_within_bounds() -> None:
    limited = error(429, "rate_limited", Retry_After="2")
    _, steps = drive(request(), [limited, answer(200, CONSUMED)], _core.decode_consumption, rate_limit_wait_max_s=5)
    assert [s.seconds for s in steps if isinstance(s, _core.Sleep)] == [2.0]
    with pytest.raises(errors.RateLimited) as refused:
        drive(request(), [limited], _core.decode_consumption, rate_limit_wait_max_s=1)
    assert refused.value.retry_after_s == 2.0


def test_unreadable_success_is_unexpected_response() -> None:
    with pytest.raises(errors.UnexpectedResponse):
        drive(request(), [answer(200, {"id": 1})], _core.decode_consumption)
    with pytest.raises(errors.UnexpectedResponse):
        drive(request(), [answer(200, b"<html>")], _core.decode_consumption)


def test_answers_ignore_fields_the_sdk_does_not_know() -> None:
    newer = {**CONSUMED, "replayed": True, "currency_hint": "credits"}
    result, _ = drive(request(), [answer(200, newer)], _core.decode_consumption)
    assert result.id == "e1"


def test_backoff_is_bounded() -> None:
    s = settings(backoff_base_s=1, backoff_max_s=3)
    assert all(0 <= _core.backoff_s(s, attempt) <= 3 for attempt in range(1, 20))


def test_cost_cache() -> None:
    cache = _core.CostCache(ttl_s=60)
    assert cache.get("a") is None
    cache.store([models.Cost(action="a", credits=D("0.002"))])
    assert cache.get("a") == D("0.002") and cache.price("a") == D("0.002")
    with pytest.raises(errors.UnknownAction):
        cache.price("b")
    stale = _core.CostCache(ttl_s=0)
    stale.store([models.Cost(action="a", credits=D(1))])
    assert stale.get("a") is None


def test_item_encoding_omits_unset_fields() -> None:
    assert msgspec.json.encode(models.Item(action="a")) == b'{"action":"a"}'
