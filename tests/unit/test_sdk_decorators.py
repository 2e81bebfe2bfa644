"""@metered's arithmetic and its checks at decoration time (the modes themselves run
against the real sidecar in tests/e2e/test_sdk_metering.py)."""

from __future__ import annotations

import decimal

import pytest

from credits_sdk import CreditsClient, metered
from credits_sdk.context import credits_context
from credits_sdk.decorators import split_charge

D = decimal.Decimal


@pytest.mark.parametrize(
    ("units", "price", "hold", "expected"),
    [
        (1500, D("0.002"), D(5), (D(3), 0)),  # fits: all from the hold
        (2500, D("0.002"), D(5), (D(5), 0)),  # exactly the hold
        (1501, D("0.002"), D(1), (D(1), 1001)),  # over: the hold covers 500 units, 1001 consumed
        (3, D("0.4"), D(1), (D("0.8"), 1)),  # whole units only: 0.2 of the hold goes back
        (7, D(0), D(1), (D(0), 0)),  # a free action
        (0, D(1), D(1), (D(0), 0)),
    ],
)
def test_split_charge_is_exact(units: int, price: D, hold: D, expected: tuple[D, int]) -> None:
    from_hold, rest = split_charge(units, price, hold)
    assert (from_hold, rest) == expected
    assert from_hold <= hold
    assert from_hold + rest * price == units * price


def test_bad_combinations_fail_at_decoration_time() -> None:
    with pytest.raises(ValueError, match="mode"):
        metered("a", mode="later")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="result_units"):
        metered("a", mode="before", result_units=len)
    with pytest.raises(TypeError, match="estimate"):
        metered("a", mode="reserve")
    with pytest.raises(TypeError, match="estimate"):
        metered("a", estimate=1)

    def generator() -> object:
        yield 1

    with pytest.raises(TypeError, match="generators"):
        metered("a")(generator)


def test_units_are_checked_before_anything_is_charged() -> None:
    client = CreditsClient("http://127.0.0.1:9", api_key="k", max_retries=0)  # never reached

    @metered("a", mode="before", units=lambda n: n, client=client)
    def gate(n: object) -> None:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="negative"):
        gate(-1)
    with pytest.raises(TypeError, match="int"):
        gate(1.5)
    with pytest.raises(TypeError, match="int"):
        gate(True)


def test_wrapped_functions_keep_their_names() -> None:
    @metered("a")
    def named() -> None:
        """Docs."""

    assert named.__name__ == "named" and named.__doc__ == "Docs."
    with credits_context(), pytest.raises(TypeError, match="needs a CreditsClient"):
        named()
