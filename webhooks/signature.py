"""Stripe-Signature verification on the raw body.

The HMAC check is the SDK's (`stripe.WebhookSignature.verify_header`, constant-time
compare). The SDK refuses only timestamps older than the tolerance; a timestamp further
in the future is refused here too, so a captured signature cannot be made to live
longer by a clock-skewed sender.
"""

from __future__ import annotations

import time

import stripe

TOLERANCE_S = 300
HEADER = "Stripe-Signature"


class SignatureError(ValueError):
    """The body was not signed by Stripe with our secret, or not recently."""


def _timestamp(header: str) -> int:
    stamps = [part.split("=", 1)[1] for part in header.split(",") if part.strip().startswith("t=")]
    if len(stamps) != 1:
        raise SignatureError("the signature header needs exactly one timestamp (t=...)")
    try:
        return int(stamps[0])
    except ValueError:
        raise SignatureError("the signature timestamp is not an integer") from None


def verify(
    payload: bytes, header: str | None, secret: str, *, tolerance_s: int = TOLERANCE_S, now: float | None = None
) -> int:
    """Check the signature; return its timestamp. Raises SignatureError."""
    if not header:
        raise SignatureError(f"missing {HEADER} header")
    if not header.isascii():  # Stripe's signatures are ASCII; compare_digest refuses other text
        raise SignatureError(f"the {HEADER} header is not ASCII")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("the body is not UTF-8") from None
    signed_at = _timestamp(header)
    now = time.time() if now is None else now
    if abs(now - signed_at) > tolerance_s:
        raise SignatureError(f"the signature timestamp is more than {tolerance_s} s from now")
    try:
        stripe.WebhookSignature.verify_header(text, header, secret, tolerance=None)
    except stripe.SignatureVerificationError as exc:
        raise SignatureError(str(exc)) from None
    return signed_at


def sign(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload` (tests, benchmarks, replays)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    header: str = stripe.WebhookSignature.generate_signature_header(payload.decode("utf-8"), secret, stamp)
    return header
