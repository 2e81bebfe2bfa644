"""``@metered``: charge for a function's work, sync or async, in one line.

    @metered("generate_content")                                  # 1 unit, after success
    async def generate(prompt: str) -> str: ...

    @metered("web_search", mode="before")                         # a gate: pay, then run
    def search(query: str) -> list[str]: ...

    @metered("llm_output_tokens", result_units=lambda r: r.usage.output_tokens)
    async def complete(prompt: str) -> Completion: ...           # per token, from the result

    @metered("llm_output_tokens", mode="reserve", estimate=lambda prompt, max_tokens: max_tokens * 0.002,
             result_units=lambda r: r.usage.output_tokens)
    async def long_generation(prompt: str, max_tokens: int) -> Completion: ...

Modes:

- ``"after"`` (default): run, then charge; nothing is charged if the function raises.
  The work is done before the budget is checked, so a refused charge
  (``InsufficientCredits``) raises after the fact.
- ``"before"``: charge, then run (a gate). A refused charge means the function never
  runs; a function that raises afterwards has still been paid for.
- ``"reserve"``: hold ``estimate`` credits, run, then release the hold charging the
  actual cost (units x the action's price); on an exception the hold is released with
  nothing charged. The right mode for long tasks: the budget is checked and held before
  the work starts, and the charge is exact. If the actual cost exceeds the hold, the
  hold covers what it can and the remaining units are charged with ``consume``; if the
  hold expired meanwhile, everything is charged with ``consume``.

Units: ``units=`` is a number, or a function of the decorated function's arguments;
``result_units=`` is a function of its result (e.g. tokens used) and wins when given.
Zero units charge nothing.

Which client: ``client=`` if given; else, for a method of a ``MeteredAgent``, the
agent's client (and the call runs in the agent's scope); else the client of the
current ``credits_context``. Async functions need an ``AsyncCreditsClient``, sync
functions a ``CreditsClient``.

Idempotency: each call gets a fresh key, reused by the network retries of its charge.
Pass ``idempotency_key=`` (a function of the arguments, e.g. ``lambda task: task.id``)
to make re-running the same task charge nothing more.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from credits_sdk import _core, context, errors, models
from credits_sdk.agent import MeteredAgent, SyncMeteredAgent
from credits_sdk.aio import AsyncCreditsClient
from credits_sdk.reservation import AsyncReservationScope, ReservationScope
from credits_sdk.sync import CreditsClient

F = TypeVar("F", bound=Callable[..., Any])
Mode = Literal["before", "after", "reserve"]
MODES: tuple[Mode, ...] = ("before", "after", "reserve")

UnitsSpec = int | Callable[..., int]
AmountSpec = _core.Amount | Callable[..., _core.Amount]
MetadataSpec = Mapping[str, models.MetadataValue] | Callable[..., Mapping[str, models.MetadataValue]]


def split_charge(units: int, price: decimal.Decimal, hold: decimal.Decimal) -> tuple[decimal.Decimal, int]:
    """(credits to take from the hold, units left to charge with consume).

    The hold covers whole units only, so the total is always exactly ``units * price``.
    """
    cost = price * units
    if cost <= hold:
        return cost, 0
    covered = int(hold // price)  # price > 0 here: cost > hold >= 0
    return price * covered, units - covered


@dataclass(frozen=True)
class _Spec:
    action: str
    units: UnitsSpec
    result_units: Callable[[Any], int] | None
    mode: Mode
    estimate: AmountSpec | None
    ttl_s: int
    metadata: MetadataSpec | None
    idempotency_key: Callable[..., str] | None
    client: AsyncCreditsClient | CreditsClient | None

    def units_before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return _units(self.units(*args, **kwargs) if callable(self.units) else self.units)

    def units_after(self, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        if self.result_units is not None:
            return _units(self.result_units(result))
        return self.units_before(args, kwargs)

    def amount(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> decimal.Decimal:
        estimate = self.estimate
        if estimate is None:
            raise TypeError("reserve mode needs an estimate")
        value = estimate(*args, **kwargs) if callable(estimate) else estimate
        return _core.to_decimal(value, "estimate")

    def meta(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> models.Metadata | None:
        if self.metadata is None:
            return None
        found = self.metadata(*args, **kwargs) if callable(self.metadata) else self.metadata
        return dict(found)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self.idempotency_key is None:
            return _core.new_idempotency_key()
        return str(self.idempotency_key(*args, **kwargs))


def _units(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"units must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"units must not be negative: {value}")
    return value


def _owner(args: tuple[Any, ...]) -> MeteredAgent | SyncMeteredAgent | None:
    if args and isinstance(args[0], MeteredAgent | SyncMeteredAgent):
        return args[0]
    return None


def _scope(owner: MeteredAgent | SyncMeteredAgent | None) -> contextlib.AbstractContextManager[Any]:
    return owner.credits_scope() if owner is not None else contextlib.nullcontext()


def _resolve(spec: _Spec, owner: MeteredAgent | SyncMeteredAgent | None, kind: type[Any]) -> Any:
    found = spec.client
    if found is None and owner is not None:
        found = owner.credits_client
    if found is None:
        found = context.current().client
    if not isinstance(found, kind):
        got = "no client" if found is None else type(found).__name__
        raise TypeError(
            f"@metered({spec.action!r}) needs a {kind.__name__} (client=, an agent's, or credits_context(client=)); "
            f"found {got}"
        )
    return found


def metered(
    action: str,
    *,
    units: UnitsSpec = 1,
    result_units: Callable[[Any], int] | None = None,
    mode: Mode = "after",
    estimate: AmountSpec | None = None,
    ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
    metadata: MetadataSpec | None = None,
    idempotency_key: Callable[..., str] | None = None,
    client: AsyncCreditsClient | CreditsClient | None = None,
) -> Callable[[F], F]:
    """Charge ``action`` for each call of the decorated function; see the module doc."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "before" and result_units is not None:
        raise TypeError("mode='before' charges before the call, so it cannot use result_units")
    if mode == "reserve" and estimate is None:
        raise TypeError("mode='reserve' needs estimate= (credits to hold, or a function of the arguments)")
    if mode != "reserve" and estimate is not None:
        raise TypeError("estimate= is only used with mode='reserve'")
    spec = _Spec(action, units, result_units, mode, estimate, ttl_s, metadata, idempotency_key, client)

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):
            return cast(F, _async_wrapper(fn, spec))
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError("@metered does not wrap generators: their work happens after the call returns")
        return cast(F, _sync_wrapper(fn, spec))

    return decorate


# -- asyncio ---------------------------------------------------------------------------
def _async_wrapper(fn: Callable[..., Any], spec: _Spec) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        owner = _owner(args)
        client: AsyncCreditsClient = _resolve(spec, owner, AsyncCreditsClient)
        with _scope(owner):
            key = spec.key(args, kwargs)
            meta = spec.meta(args, kwargs)
            if spec.mode == "before":
                n = spec.units_before(args, kwargs)
                if n:
                    await client.consume(spec.action, n, metadata=meta, idempotency_key=key)
                return await fn(*args, **kwargs)
            if spec.mode == "after":
                result = await fn(*args, **kwargs)
                n = spec.units_after(result, args, kwargs)
                if n:
                    await client.consume(spec.action, n, metadata=meta, idempotency_key=key)
                return result
            return await _reserve_async(client, fn, spec, args, kwargs, key, meta)

    return wrapper


async def _reserve_async(
    client: AsyncCreditsClient,
    fn: Callable[..., Any],
    spec: _Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    meta: models.Metadata | None,
) -> Any:
    price = await client.price(spec.action)  # an unknown action fails before any work
    scope: AsyncReservationScope = client.reservation(
        spec.amount(args, kwargs), ttl_s=spec.ttl_s, action=spec.action, metadata=meta, idempotency_key=f"{key}:hold"
    )
    units = overflow = 0
    try:
        async with scope as hold:
            result = await fn(*args, **kwargs)
            units = spec.units_after(result, args, kwargs)
            hold.used, overflow = split_charge(units, price, hold.amount)
    except errors.ReservationClosed as exc:
        if scope.hold is None or scope.hold.release_error is not exc:
            raise
        overflow = units  # the hold expired before the release: nothing came from it
    if overflow:
        await client.consume(spec.action, overflow, metadata=meta, idempotency_key=f"{key}:rest")
    return result


# -- threads / blocking ---------------------------------------------------------------
def _sync_wrapper(fn: Callable[..., Any], spec: _Spec) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        owner = _owner(args)
        client: CreditsClient = _resolve(spec, owner, CreditsClient)
        with _scope(owner):
            key = spec.key(args, kwargs)
            meta = spec.meta(args, kwargs)
            if spec.mode == "before":
                n = spec.units_before(args, kwargs)
                if n:
                    client.consume(spec.action, n, metadata=meta, idempotency_key=key)
                return fn(*args, **kwargs)
            if spec.mode == "after":
                result = fn(*args, **kwargs)
                n = spec.units_after(result, args, kwargs)
                if n:
                    client.consume(spec.action, n, metadata=meta, idempotency_key=key)
                return result
            return _reserve_sync(client, fn, spec, args, kwargs, key, meta)

    return wrapper


def _reserve_sync(
    client: CreditsClient,
    fn: Callable[..., Any],
    spec: _Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    meta: models.Metadata | None,
) -> Any:
    price = client.price(spec.action)
    scope: ReservationScope = client.reservation(
        spec.amount(args, kwargs), ttl_s=spec.ttl_s, action=spec.action, metadata=meta, idempotency_key=f"{key}:hold"
    )
    units = overflow = 0
    try:
        with scope as hold:
            result = fn(*args, **kwargs)
            units = spec.units_after(result, args, kwargs)
            hold.used, overflow = split_charge(units, price, hold.amount)
    except errors.ReservationClosed as exc:
        if scope.hold is None or scope.hold.release_error is not exc:
            raise
        overflow = units
    if overflow:
        client.consume(spec.action, overflow, metadata=meta, idempotency_key=f"{key}:rest")
    return result


# -- @requires ---------------------------------------------------------------------------
def requires(feature: str, *, client: AsyncCreditsClient | CreditsClient | None = None) -> Callable[[F], F]:
    """Run the decorated function only when the organization's plan has ``feature``:

        @requires("api_access")
        async def call_the_api(request: Request) -> Response: ...

    Each call asks the sidecar first (``check``, answered from its cache); a refusal
    raises ``FeatureNotEntitled`` (with the reason) and the function does not run.
    The client is found as for ``@metered`` (client=, an agent's, credits_context).
    Stack it over ``@metered`` to gate and charge."""
    if not feature:
        raise ValueError("requires() needs a feature name")

    def find(owner: MeteredAgent | SyncMeteredAgent | None, kind: type[Any]) -> Any:
        found = client if client is not None else owner.credits_client if owner is not None else None
        if found is None:
            found = context.current().client
        if not isinstance(found, kind):
            got = "no client" if found is None else type(found).__name__
            raise TypeError(f"@requires({feature!r}) needs a {kind.__name__}; found {got}")
        return found

    def refuse(check: models.FeatureCheck) -> None:
        if not check.allowed:
            raise errors.FeatureNotEntitled(feature, check.reason, check)

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def gated_async(*args: Any, **kwargs: Any) -> Any:
                owner = _owner(args)
                with _scope(owner):
                    refuse(await find(owner, AsyncCreditsClient).check(feature))
                    return await fn(*args, **kwargs)

            return cast(F, gated_async)
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError("@requires does not wrap generators")

        @functools.wraps(fn)
        def gated(*args: Any, **kwargs: Any) -> Any:
            owner = _owner(args)
            with _scope(owner):
                refuse(find(owner, CreditsClient).check(feature))
                return fn(*args, **kwargs)

        return cast(F, gated)

    return decorate
