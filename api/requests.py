"""What any of our HTTP requests may carry, read the same way by every service."""

from __future__ import annotations

from aiohttp import web

from api.errors import invalid
from core.http import IDEMPOTENCY_HEADER

IDEMPOTENCY_KEY_MAX = 255


def idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key: 1 to 255 characters of valid text, no control
    characters (it is stored, hashed and echoed back, so it must encode cleanly)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    return checked_idempotency_key(key)


def checked_idempotency_key(key: str) -> str:
    """An idempotency key from anywhere (a header, a form field), or a 400."""
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        raise invalid(f"{IDEMPOTENCY_HEADER} must be 1 to {IDEMPOTENCY_KEY_MAX} characters", IDEMPOTENCY_HEADER)
    if not key.isprintable() or not _encodable(key):
        raise invalid(f"{IDEMPOTENCY_HEADER} must be printable UTF-8 text", IDEMPOTENCY_HEADER)
    return key


def _encodable(text: str) -> bool:
    """False for what aiohttp decoded from invalid UTF-8 (it keeps those bytes as
    surrogates: encoding them again raises)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
