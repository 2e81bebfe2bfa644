"""The agent SDK for the credits sidecar: meter agents' work in one line.

    from credits_sdk import AsyncCreditsClient, metered, credits_context

    async with AsyncCreditsClient("http://127.0.0.1:8080", api_key=key) as client:
        await client.consume("generate_content", metadata={"task": "42"})

Two clients with the same methods (``CreditsClient`` for blocking code,
``AsyncCreditsClient`` for asyncio) over one transport-independent core; typed errors
(``errors``); an ambient ``credits_context``; the ``@metered`` decorator; agent base
classes; reservations that always end; bulk jobs that resume after a crash. The SDK
talks to the sidecar over HTTP only. Credit amounts are ``decimal.Decimal``.
"""

from credits_sdk._core import DEFAULT_RESERVATION_TTL_S, MAX_BATCH_ITEMS, SDK_VERSION
from credits_sdk.agent import MeteredAgent, SyncMeteredAgent
from credits_sdk.aio import AsyncCreditsClient
from credits_sdk.bulk import BulkAborted, BulkReport, ItemFailure
from credits_sdk.context import CreditsContext, bind, credits_context, current
from credits_sdk.decorators import metered, requires
from credits_sdk.errors import (
    ApiError,
    Conflict,
    ConnectionFailed,
    CreditsError,
    DepartmentLimitExceeded,
    EntitlementLimitReached,
    FeatureNotEntitled,
    Forbidden,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    KeyCapExceeded,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    PaymentRequired,
    RateLimited,
    ReservationClosed,
    ServerError,
    Unauthenticated,
    Unavailable,
    UnexpectedResponse,
    UnknownAction,
)
from credits_sdk.models import (
    Balance,
    BatchItemResult,
    BatchResult,
    Consumption,
    Cost,
    Entitlement,
    EntitlementList,
    FeatureCheck,
    Item,
    Release,
    Reservation,
    UsageChange,
    UsageEvent,
    UsagePage,
)
from credits_sdk.reservation import Hold
from credits_sdk.sync import CreditsClient

__version__ = SDK_VERSION

__all__ = [
    "DEFAULT_RESERVATION_TTL_S",
    "MAX_BATCH_ITEMS",
    "ApiError",
    "AsyncCreditsClient",
    "Balance",
    "BatchItemResult",
    "BatchResult",
    "BulkAborted",
    "BulkReport",
    "Conflict",
    "ConnectionFailed",
    "Consumption",
    "Cost",
    "CreditsClient",
    "CreditsContext",
    "CreditsError",
    "DepartmentLimitExceeded",
    "Entitlement",
    "EntitlementLimitReached",
    "EntitlementList",
    "FeatureCheck",
    "FeatureNotEntitled",
    "Forbidden",
    "Hold",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidRequest",
    "Item",
    "ItemFailure",
    "KeyCapExceeded",
    "MeteredAgent",
    "NotFound",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PaymentRequired",
    "RateLimited",
    "Release",
    "Reservation",
    "ReservationClosed",
    "ServerError",
    "SyncMeteredAgent",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedResponse",
    "UnknownAction",
    "UsageChange",
    "UsageEvent",
    "UsagePage",
    "__version__",
    "bind",
    "credits_context",
    "current",
    "metered",
    "requires",
]
