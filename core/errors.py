"""The failures every component may report: a backing service could not be reached.

Each carries `answer`, the sentence a client is told, which must be true of this
failure: `Unavailable` means the operation did not take effect; `OutcomeUnknown` means
it was sent and no answer came, so it may have taken effect (or may still) and only a
retry with the same idempotency key can tell.
"""

from __future__ import annotations


class Unavailable(Exception):
    """Redis or Postgres could not be reached (or refused to work); the operation did
    not take effect."""

    answer = "a backing service could not be reached; nothing was charged or changed"

    def __init__(self, message: str, *, answer: str | None = None) -> None:
        super().__init__(message)
        if answer is not None:
            self.answer = answer


class OutcomeUnknown(Unavailable):
    """The operation was sent and no answer came: it may have taken effect."""

    answer = (
        "no answer came in time: this request may have been charged. Retry it with the same"
        " Idempotency-Key: a retry returns the first result if it was charged, and charges once if not"
    )

    def __init__(self, message: str, *, answer: str | None = None, idempotency_key: str | None = None) -> None:
        super().__init__(message, answer=answer)
        self.idempotency_key = idempotency_key  # the key to retry with (the caller's, or one assigned)
