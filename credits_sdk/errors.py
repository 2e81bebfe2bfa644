"""Every failure the SDK raises, one class per API error code.

The sidecar answers errors as ``{"error": {type, code, message, param}}``; ``code`` picks
the class here (``CODES``), the HTTP status is the fallback for a code this SDK does not
know yet (a newer sidecar), so a caller can always catch by meaning:

    try:
        client.consume("generate_content")
    except InsufficientCredits:      # 402, nothing was charged
        ...
    except RateLimited as exc:       # 429, after the SDK's own bounded waiting
        time.sleep(exc.retry_after_s)

``CreditsError`` is the root of everything raised here; ``ApiError`` is every answer
from the sidecar that was an error; ``ConnectionFailed`` is the network failing after
the SDK's retries (each retry reused the same idempotency key, so none charged twice).
"""

from __future__ import annotations


class CreditsError(Exception):
    """Root of every error the SDK raises."""


class ConnectionFailed(CreditsError):
    """The sidecar could not be reached, or the connection broke, on every attempt.

    Whether the last attempt was charged is unknown; retrying the call with the same
    ``idempotency_key`` is safe (a charged attempt replays, it does not charge again).
    """

    def __init__(self, message: str, *, attempts: int, idempotency_key: str | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.idempotency_key = idempotency_key


class UnexpectedResponse(CreditsError):
    """The sidecar answered with a body this SDK cannot read (not the documented shape)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ApiError(CreditsError):
    """An error answer from the sidecar, in the one documented shape."""

    status_default = 0
    code_default = ""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        error_type: str = "",
        param: str | None = None,
        retry_after_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = error_type  # the API's error `type` (invalid_request_error, ...)
        self.param = param
        self.retry_after_s = retry_after_s
        self.idempotency_key = idempotency_key

    def __str__(self) -> str:
        where = f" (at {self.param})" if self.param else ""
        return f"{self.status} {self.code}: {self.message}{where}"


class InvalidRequest(ApiError):
    """400: malformed or out-of-range input; ``param`` names the field (``$.items[3].units``)."""


class UnknownAction(InvalidRequest):
    """400: no cost is configured for this action."""


class Unauthenticated(ApiError):
    """401: missing, malformed, expired or revoked credential."""


class PaymentRequired(ApiError):
    """402: a budget refused the charge; nothing was charged."""


class InsufficientCredits(PaymentRequired):
    """402: not enough available credits in the organization."""


class DepartmentLimitExceeded(PaymentRequired):
    """402: the department's budget for this period is spent."""


class KeyCapExceeded(PaymentRequired):
    """402: this API key's lifetime spending cap is reached."""


class EntitlementLimitReached(PaymentRequired):
    """402: counting this usage would pass the plan's limit for the feature."""


class Forbidden(ApiError):
    """403: the credential is valid but may not do this (role, department scope)."""


class NotFound(ApiError):
    """404: unknown reservation, department or endpoint."""


class Conflict(ApiError):
    """409: the request conflicts with the current state."""


class IdempotencyConflict(Conflict):
    """409: the idempotency key was used before with a different request."""


class ReservationClosed(Conflict):
    """409: the reservation was already released, or expired."""


class PayloadTooLarge(ApiError):
    """413: the body or the batch is over the sidecar's maximum."""


class RateLimited(ApiError):
    """429: too many requests for this credential; wait ``retry_after_s`` seconds."""


class Unavailable(ApiError):
    """503 `unavailable`: Redis or Postgres unreachable behind the sidecar; nothing was charged."""


class OutcomeUnknown(Unavailable):
    """503 `outcome_unknown`: the sidecar sent the charge and no answer came, so it may
    have been charged. The SDK retries it with the same Idempotency-Key (a retry returns
    the first result, charging nothing more); raised when the retries run out."""


class ServerError(ApiError):
    """Any other 5xx (a bug in the sidecar, or a proxy in front of it)."""


class FeatureNotEntitled(CreditsError):
    """Raised by ``@requires`` (and the LangChain gate) when a check says no: the
    organization's plan does not include ``feature``, has it off, or its limit is
    reached (``reason``). Nothing was charged."""

    def __init__(self, feature: str, reason: str | None, check: object = None) -> None:
        super().__init__(f"feature {feature!r} is not available: {reason or 'not allowed'}")
        self.feature = feature
        self.reason = reason
        self.check = check


CODES: dict[str, type[ApiError]] = {
    "invalid_request": InvalidRequest,
    "unknown_action": UnknownAction,
    "unauthenticated": Unauthenticated,
    "insufficient_credits": InsufficientCredits,
    "department_limit_exceeded": DepartmentLimitExceeded,
    "key_cap_exceeded": KeyCapExceeded,
    "entitlement_limit_reached": EntitlementLimitReached,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "idempotency_conflict": IdempotencyConflict,
    "reservation_closed": ReservationClosed,
    "payload_too_large": PayloadTooLarge,
    "rate_limited": RateLimited,
    "unavailable": Unavailable,
    "outcome_unknown": OutcomeUnknown,
}

STATUSES: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}


def error_class(status: int, code: str) -> type[ApiError]:
    """The class for an error answer: by code, else by status, else ApiError/ServerError."""
    known = CODES.get(code)
    if known is not None:
        return known
    by_status = STATUSES.get(status)
    if by_status is not None:
        return by_status
    return ServerError if status >= 500 else ApiError
