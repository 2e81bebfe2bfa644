"""What the SDK sends and what it returns: typed, immutable, credits as ``Decimal``.

These mirror the sidecar's documented bodies (shared/API.md, ``GET /api/openapi.json``)
but are the SDK's own copies, on purpose: an agent installs the SDK without the server,
and a client must be lenient where the server is strict. The server forbids unknown
fields in what it receives; these types ignore unknown fields in what they receive, so
a sidecar that adds a field (which the contract allows) never breaks a deployed agent.
A unit test (tests/unit/test_sdk_models.py) checks field by field that these copies
have not drifted from meter/schemas.py.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Mapping
from typing import Any

import msgspec

MetadataValue = str | int | float | bool | None
Metadata = dict[str, MetadataValue]
# What callers may pass: any mapping (a dict[str, str] is one; dict itself is invariant).
MetadataInput = Mapping[str, MetadataValue]


class Model(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every response type.

    frozen: a result is a record of what happened; nobody edits it afterwards.
    kw_only: fields are built by name, so adding one never shifts another.
    Unknown fields are ignored (msgspec's default): see the module docstring.
    """


class Item(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One action to charge in a batch or a bulk job.

    ``idempotency_key`` shares the namespace of ``consume`` keys: an item retried alone
    (or in another batch) with the same key replays instead of charging again.
    omit_defaults: an unset field is left out of the request, as the API expects.
    """

    action: str
    units: int = 1
    department_id: str | None = None
    metadata: MetadataInput | None = None
    idempotency_key: str | None = None


# -- responses -------------------------------------------------------------------------
class Grant(Model, frozen=True, kw_only=True):
    id: str
    source: str
    remaining: decimal.Decimal
    expires_at: dt.datetime | None = None


class DepartmentBudget(Model, frozen=True, kw_only=True):
    id: str
    limit: decimal.Decimal | None
    period: str
    spent: decimal.Decimal
    remaining: decimal.Decimal | None
    mode: str = "hard"  # hard: refused past the limit; soft: charged, with an alert
    alert_percent: int | None = None


class Balance(Model, frozen=True, kw_only=True):
    organization_id: str
    balance: decimal.Decimal
    reserved: decimal.Decimal
    available: decimal.Decimal
    grants: list[Grant] = []
    department: DepartmentBudget | None = None
    # When available credits run out at the recent rate of spend (None: idle).
    runs_out_at: dt.datetime | None = None
    # A credit line (overdraft) set by operations: available may go down to minus
    # credit_limit; debt is what is owed on it (the next grants repay it first).
    credit_limit: decimal.Decimal = decimal.Decimal(0)
    debt: decimal.Decimal = decimal.Decimal(0)


class Consumption(Model, frozen=True, kw_only=True):
    """The answer to one consume: ``credits`` is what was charged."""

    id: str
    action: str
    units: int
    credits: decimal.Decimal
    balance: decimal.Decimal
    available: decimal.Decimal
    # True when the sidecar answered with the stored result of an earlier request with
    # the same idempotency key (a retry: yours, or the SDK's own after a dropped
    # connection): what it reports was charged once, then; this call charged nothing.
    replayed: bool = False


class ItemError(Model, frozen=True, kw_only=True):
    code: str
    message: str


class BatchItemResult(Model, frozen=True, kw_only=True):
    """One item of a batch: ``index`` is its position in the request."""

    index: int
    ok: bool
    id: str | None = None
    credits: decimal.Decimal | None = None
    error: ItemError | None = None


class BatchResult(Model, frozen=True, kw_only=True):
    results: list[BatchItemResult]
    balance: decimal.Decimal
    available: decimal.Decimal
    # True when the sidecar answered with the stored result of an earlier request with
    # the same idempotency key (a retry: yours, or the SDK's own after a dropped
    # connection): what it reports was charged once, then; this call charged nothing.
    replayed: bool = False


class Reservation(Model, frozen=True, kw_only=True):
    id: str
    amount: decimal.Decimal
    expires_at: dt.datetime
    balance: decimal.Decimal
    available: decimal.Decimal
    # True when the sidecar answered with the stored result of an earlier request with
    # the same idempotency key (a retry: yours, or the SDK's own after a dropped
    # connection): what it reports was charged once, then; this call charged nothing.
    replayed: bool = False


class Release(Model, frozen=True, kw_only=True):
    """``used`` was charged; ``released`` went back to available."""

    id: str
    used: decimal.Decimal
    released: decimal.Decimal
    balance: decimal.Decimal
    available: decimal.Decimal
    # True when the sidecar answered with the stored result of an earlier request with
    # the same idempotency key (a retry: yours, or the SDK's own after a dropped
    # connection): what it reports was charged once, then; this call charged nothing.
    replayed: bool = False


class Cost(Model, frozen=True, kw_only=True):
    action: str
    credits: decimal.Decimal
    unit: str = ""
    description: str = ""


class CostList(Model, frozen=True, kw_only=True):
    data: list[Cost]


class UsageEvent(Model, frozen=True, kw_only=True):
    id: str
    action: str
    units: int
    credits: decimal.Decimal
    department_id: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: dt.datetime | None = None
    kind: str = "use"  # "capture": a reservation's release that charged (its id is the reservation's)


class UsagePage(Model, frozen=True, kw_only=True):
    data: list[UsageEvent]
    has_more: bool


class CheckCharge(Model, frozen=True, kw_only=True):
    """What a check with an action charged."""

    id: str
    action: str
    units: int
    credits: decimal.Decimal
    balance: decimal.Decimal
    available: decimal.Decimal


class FeatureCheck(Model, frozen=True, kw_only=True):
    """May this credential use ``feature``? ``reason`` says why not (``not_included``,
    ``disabled``, ``limit_reached``, or with an action ``insufficient_credits`` ...).
    Limit features: ``limit`` (None = unlimited), ``usage``, ``remaining``."""

    allowed: bool
    feature: str
    reason: str | None = None
    type: str | None = None
    enabled: bool | None = None
    limit: int | None = None
    usage: int | None = None
    remaining: int | None = None
    value: str | None = None
    charge: CheckCharge | None = None

    def __bool__(self) -> bool:
        return self.allowed


class Entitlement(Model, frozen=True, kw_only=True):
    feature: str
    type: str
    source: str  # plan | free | override
    enabled: bool | None = None
    limit: int | None = None
    usage: int | None = None
    remaining: int | None = None
    value: str | None = None


class EntitlementList(Model, frozen=True, kw_only=True):
    plan_id: str | None = None
    data: list[Entitlement]

    def get(self, feature: str) -> Entitlement | None:
        return next((e for e in self.data if e.feature == feature), None)


class UsageChange(Model, frozen=True, kw_only=True):
    feature: str
    delta: int
    usage: int
    limit: int | None = None
    remaining: int | None = None
    replayed: bool = False


class ErrorDetail(Model, frozen=True, kw_only=True):
    type: str = ""
    code: str = ""
    message: str = ""
    param: str | None = None


class ErrorBody(Model, frozen=True, kw_only=True):
    error: ErrorDetail
