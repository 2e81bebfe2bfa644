"""Request and response bodies of the credits API: decoded by, and documented from,
these types (the OpenAPI document is generated from them, see meter/openapi.py)."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from core.structs import NO_NUL, Body

Action = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.:-]{0,63}$", description="action name")]
Units = Annotated[int, Meta(ge=1, le=1_000_000_000, description="units of the action (tokens, requests)")]
Credits = Annotated[decimal.Decimal, Meta(description="credits, exact to 0.001")]
Identifier = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
DepartmentId = Annotated[
    str,
    Meta(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", description="department id (uuid)"),
]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL)]
METADATA_KEYS_MAX = 32
METADATA_KEY_LENGTH_MAX = 64
METADATA_VALUE_LENGTH_MAX = 500
METADATA_BYTES_MAX = 8192  # all of it, as JSON
MetadataValue = Annotated[str, Meta(max_length=METADATA_VALUE_LENGTH_MAX, pattern=NO_NUL)] | int | float | bool | None
Metadata = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=METADATA_KEY_LENGTH_MAX, pattern=NO_NUL)], MetadataValue],
    Meta(
        max_length=METADATA_KEYS_MAX,
        description=f"up to {METADATA_KEYS_MAX} flat key/value pairs kept with the usage event: keys 1 to"
        f" {METADATA_KEY_LENGTH_MAX} characters, string values up to {METADATA_VALUE_LENGTH_MAX} characters,"
        f" no NUL character, at most {METADATA_BYTES_MAX} bytes as JSON",
    ),
]
Period = Literal["day", "week", "month"]


# -- requests ----------------------------------------------------------------------
class UseRequest(Body):
    action: Action
    units: Units = 1
    department_id: DepartmentId | None = None
    metadata: Metadata | None = None


class BatchItem(Body):
    action: Action
    units: Units = 1
    department_id: DepartmentId | None = None
    metadata: Metadata | None = None
    idempotency_key: IdempotencyKey | None = None


class BatchRequest(Body):
    items: Annotated[list[BatchItem], Meta(min_length=1)]
    atomic: bool = False


class ReserveRequest(Body):
    amount: Credits
    ttl_seconds: Annotated[int, Meta(ge=1, le=7 * 86400)]
    department_id: DepartmentId | None = None
    action: Action | None = None
    metadata: Metadata | None = None


class ReleaseRequest(Body):
    reservation_id: Identifier
    used: Credits = decimal.Decimal(0)


class CostRequest(Body):
    credits: Credits
    unit: Annotated[str, Meta(min_length=1, max_length=32, pattern=NO_NUL)] | None = None
    description: Annotated[str, Meta(max_length=500, pattern=NO_NUL)] | None = None


class DepartmentRequest(Body):
    name: Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]


BudgetMode = Annotated[
    Literal["hard", "soft"],
    Meta(description="hard: a charge past the limit is refused; soft: charged, with an alert at alert_percent"),
]
AlertPercent = Annotated[int, Meta(ge=1, le=100, description="a soft budget alerts once per period at this share")]
SOFT_ALERT_PERCENT_DEFAULT = 80


class LimitRequest(Body):
    limit: Credits | None
    period: Period
    mode: BudgetMode = "hard"
    alert_percent: AlertPercent | None = None  # soft only; default 80


# -- responses ---------------------------------------------------------------------
class GrantView(Body):
    id: str
    source: str
    remaining: Credits
    expires_at: str | None


class DepartmentBudget(Body):
    id: str
    limit: Credits | None
    period: Period
    spent: Credits
    remaining: Credits | None
    mode: BudgetMode = "hard"
    alert_percent: int | None = None


class BalanceResponse(Body):
    organization_id: str
    balance: Credits
    reserved: Credits
    available: Credits
    grants: list[GrantView]
    department: DepartmentBudget | None = None
    runs_out_at: Annotated[
        str | None,
        Meta(description="when available credits run out at the recent rate of spend (null: idle, no spend lately)"),
    ] = None
    credit_limit: Annotated[
        Credits,
        Meta(description="credit line (overdraft) set by operations: available may go down to minus this (0: none)"),
    ] = decimal.Decimal(0)
    debt: Annotated[
        Credits,
        Meta(description="owed on the credit line: charged past the grants; the next grants repay it first"),
    ] = decimal.Decimal(0)


class UseResponse(Body):
    id: str
    action: str
    units: int
    credits: Credits
    balance: Credits
    available: Credits


class ItemError(Body):
    code: str
    message: str


class BatchResult(Body):
    index: int
    ok: bool
    id: str | None = None
    credits: Credits | None = None
    error: ItemError | None = None


class BatchResponse(Body):
    results: list[BatchResult]
    balance: Credits
    available: Credits


class ReserveResponse(Body):
    id: str
    amount: Credits
    expires_at: str
    balance: Credits
    available: Credits


class ReleaseResponse(Body):
    id: str
    used: Credits
    released: Credits
    balance: Credits
    available: Credits


class CostView(Body):
    action: str
    credits: Credits
    unit: str
    description: str


class CostList(Body):
    data: list[CostView]


class DepartmentView(Body):
    id: str
    name: str


class DepartmentList(Body):
    data: list[DepartmentView]


class LimitView(Body):
    department_id: str
    limit: Credits | None
    period: Period
    spent: Credits
    remaining: Credits | None
    period_start: str
    period_end: str
    mode: BudgetMode = "hard"
    alert_percent: int | None = None


Timestamp = Annotated[dt.datetime, Meta(tz=True, description="ISO 8601 with a time zone, e.g. 2026-11-23T12:00:00Z")]
Limit = Annotated[int, Meta(ge=1, le=100)]
LedgerType = Literal["grant", "usage", "reservation_capture", "expiration", "adjustment", "refund"]


class UsageQuery(Body):
    from_: Timestamp | None = msgspec.field(name="from", default=None)
    to: Timestamp | None = None
    department_id: DepartmentId | None = None
    action: Action | None = None
    limit: Limit = 20
    starting_after: Identifier | None = None


class SummaryQuery(Body):
    from_: Timestamp | None = msgspec.field(name="from", default=None)
    to: Timestamp | None = None
    group_by: Literal["action", "department", "day", "hour", "api_key"] = "action"
    action: Action | None = None
    department_id: DepartmentId | None = None


class TransactionsQuery(Body):
    type: LedgerType | None = None
    limit: Limit = 20
    starting_after: Annotated[str, Meta(pattern=r"^[0-9]{1,19}$")] | None = None


class UsageEvent(Body):
    """A settled charge: a usage event, or a reservation's capture (`kind: capture`: a
    release that charged `used > 0`; its id is the reservation's, units 1, credits the
    amount captured, created_at when it was released, action and metadata the
    reservation's)."""

    id: str
    action: str
    units: int
    credits: Credits
    department_id: str | None
    metadata: msgspec.Raw
    created_at: str
    kind: Annotated[Literal["use", "capture"], Meta(description="use: /use or /use/batch; capture: /release")] = "use"


class UsageList(Body):
    data: list[UsageEvent]
    has_more: bool


class SummaryItem(Body):
    """Usage events and reservation captures (each capture one event of one unit)
    grouped by `group_by`: an action, a department id ('' = none), a UTC day
    (YYYY-MM-DD), a UTC hour (YYYY-MM-DDTHH:00:00Z) or an API key id ('jwt:<sub>' for
    a frontend user)."""

    key: str
    events: int
    units: int
    credits: Credits


class UsageSummary(Body):
    data: list[SummaryItem]
    total_credits: Credits


class Transaction(Body):
    id: str
    type: str
    amount: Credits
    balance_after: Credits
    reference: str
    created_at: str


class TransactionList(Body):
    data: list[Transaction]
    has_more: bool


class Health(Body):
    status: str
    checks: dict[str, str] = msgspec.field(default_factory=dict)


# -- entitlements (issue 13) ---------------------------------------------------------
Feature = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="feature name (api_access, projects)")]
FeatureType = Literal["boolean", "limit", "config"]
FeatureSource = Literal["plan", "free", "override"]
CheckReason = Literal[
    "not_included",
    "disabled",
    "limit_reached",
    "insufficient_credits",
    "department_limit_exceeded",
    "key_cap_exceeded",
]


class CheckRequest(Body):
    """A feature alone, or with an action to charge when the feature allows it (one step)."""

    feature: Feature
    action: Action | None = None
    units: Units = 1
    department_id: DepartmentId | None = None
    metadata: Metadata | None = None


class CheckCharge(Body):
    id: str
    action: str
    units: int
    credits: Credits
    balance: Credits
    available: Credits


class CheckResponse(Body):
    """allowed: false with a reason when refused (nothing charged). limit features: limit
    (null = unlimited), usage, remaining (null = unlimited); boolean: enabled; config: value."""

    allowed: bool
    feature: str
    reason: CheckReason | None = None
    type: FeatureType | None = None
    enabled: bool | None = None
    limit: int | None = None
    usage: int | None = None
    remaining: int | None = None
    value: str | None = None
    charge: CheckCharge | None = None


class EntitlementView(Body):
    """One feature of the organization. source: its plan, the free defaults (no plan), or
    an override set by operations for this organization."""

    feature: str
    type: FeatureType
    source: FeatureSource
    enabled: bool | None = None
    limit: int | None = None
    usage: int | None = None
    remaining: int | None = None
    value: str | None = None


class EntitlementList(Body):
    plan_id: str | None
    data: list[EntitlementView]


class UsageChangeRequest(Body):
    delta: Annotated[int, Meta(ge=-1_000_000_000, le=1_000_000_000, description="units to add (negative: remove)")]


class UsageChangeResponse(Body):
    feature: str
    delta: int
    usage: int
    limit: int | None
    remaining: int | None
