"""The SDK keeps its own copies of the API's bodies and error codes (an agent installs it
without the server). These tests fail when the copies drift from the sidecar's types
(meter/schemas.py, api/errors.py) or from the codes its handlers can answer."""

from __future__ import annotations

import ast
import pathlib

import msgspec
import pytest

from api import errors as api_errors
from credits_sdk import errors, models
from meter import handlers
from meter import schemas as server

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERIC_CODES = {"internal_error", "method_not_allowed"}  # no class of their own: ServerError / ApiError

PAIRS: list[tuple[type[msgspec.Struct], str]] = [
    (models.Balance, "BalanceResponse"),
    (models.Grant, "GrantView"),
    (models.DepartmentBudget, "DepartmentBudget"),
    (models.Consumption, "UseResponse"),
    (models.BatchResult, "BatchResponse"),
    (models.BatchItemResult, "BatchResult"),
    (models.ItemError, "ItemError"),
    (models.Reservation, "ReserveResponse"),
    (models.Release, "ReleaseResponse"),
    (models.Cost, "CostView"),
    (models.CostList, "CostList"),
    (models.UsageEvent, "UsageEvent"),
    (models.UsagePage, "UsageList"),
    (models.FeatureCheck, "CheckResponse"),
    (models.CheckCharge, "CheckCharge"),
    (models.Entitlement, "EntitlementView"),
    (models.EntitlementList, "EntitlementList"),
    (models.UsageChange, "UsageChangeResponse"),
    (models.ErrorDetail, "ErrorDetail"),
    (models.ErrorBody, "ErrorBody"),
]


def names(kind: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(kind)}


def required(kind: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(kind) if f.required}


@pytest.mark.parametrize(("sdk", "server_name"), PAIRS, ids=[p[1] for p in PAIRS])
def test_response_types_match_the_sidecar(sdk: type[msgspec.Struct], server_name: str) -> None:
    theirs = getattr(server, server_name, None) or getattr(api_errors, server_name)
    # Everything the sidecar sends is read, and nothing the SDK requires is missing from it.
    assert names(theirs) <= names(sdk), f"{sdk.__name__} ignores {names(theirs) - names(sdk)}"
    assert required(sdk) <= names(theirs), f"{sdk.__name__} requires {required(sdk) - names(theirs)}"


def test_batch_items_are_what_the_sidecar_accepts() -> None:
    assert names(models.Item) == names(server.BatchItem)


def _codes_the_sidecar_answers() -> set[str]:
    """Every literal error code in meter/ and api/ (its authentication and error shape):
    ApiError(status, "code", ...), error_response(status, "code", ...), and the per-item codes."""
    found = {code for _, code, _ in handlers.ITEM_CODES.values()}
    for path in [*(ROOT / "meter").glob("*.py"), *(ROOT / "api").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            code = node.args[1]
            if called in ("ApiError", "error_response") and isinstance(code, ast.Constant):
                found.add(str(code.value))
    return found


def test_every_code_the_sidecar_answers_has_an_exception_class() -> None:
    codes = _codes_the_sidecar_answers()
    assert {"insufficient_credits", "rate_limited", "reservation_closed"} <= codes  # the scan works
    assert codes - GENERIC_CODES <= set(errors.CODES), f"no class for {codes - GENERIC_CODES - set(errors.CODES)}"
