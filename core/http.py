"""HTTP names both services' contracts share (the sidecar's and billing's)."""

from __future__ import annotations

from typing import Any

IDEMPOTENCY_HEADER = "Idempotency-Key"
# On a response that repeats the first result of an Idempotency-Key (Stripe's name for
# it): the caller can tell that its retry had no effect of its own.
REPLAYED_HEADER = "Idempotent-Replayed"


def replayed_header_doc() -> dict[str, Any]:
    """The OpenAPI response-header object for REPLAYED_HEADER."""
    return {
        REPLAYED_HEADER: {
            "description": "Present (`true`) when this is the stored first result of the Idempotency-Key,"
            " returned again: the retry itself charged or changed nothing.",
            "schema": {"type": "string", "enum": ["true"]},
        }
    }
