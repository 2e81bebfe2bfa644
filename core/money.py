"""Credits are integers of millicredits everywhere inside; decimals only at the edge.

1 credit = 1000 millicredits, so per-token prices such as 0.002 credits are exact.
A value with more precision than one millicredit is refused, never rounded.
"""

from __future__ import annotations

import decimal

MILLI_PER_CREDIT = 1000
_PLACES = len(str(MILLI_PER_CREDIT)) - 1  # decimal places of one millicredit
# Largest amount accepted at the edge: 10^12 credits keeps every sum far inside the
# 2^53 integers that Lua numbers (doubles) represent exactly.
CREDITS_MAX = decimal.Decimal(10) ** 12


class PrecisionError(ValueError):
    """The amount has more precision than one millicredit, or is out of range."""


def to_milli(credits: decimal.Decimal) -> int:
    """Credits (decimal) -> millicredits (int), exactly or not at all."""
    if not credits.is_finite():
        raise PrecisionError("must be a finite number")
    if abs(credits) > CREDITS_MAX:
        raise PrecisionError(f"must be at most {CREDITS_MAX} in absolute value")
    milli = credits * MILLI_PER_CREDIT
    if milli != milli.to_integral_value():
        raise PrecisionError("has more precision than 0.001 credits")
    return int(milli)


def format_credits(milli: int) -> str:
    """Millicredits (int) -> credits as exact decimal text ("1.5", "0.001", "-3"): no
    exponent, no trailing zeros. Also a valid JSON number, so responses on the hot path
    are written without building a Decimal."""
    if milli < 0:
        return "-" + format_credits(-milli)
    digits = str(milli)  # the decimal point goes _PLACES digits from the right
    if len(digits) <= _PLACES:
        part = digits.rjust(_PLACES, "0").rstrip("0")
        return "0." + part if part else "0"
    part = digits[-_PLACES:].rstrip("0")
    return digits[:-_PLACES] + "." + part if part else digits[:-_PLACES]


def to_credits(milli: int) -> decimal.Decimal:
    """Millicredits (int) -> credits (decimal), exact."""
    return decimal.Decimal(format_credits(milli))
