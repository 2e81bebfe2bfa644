"""The billing API's OpenAPI 3.1 document, generated from the msgspec types the
handlers decode (billing/schemas.py) and the one table of operations
(billing.handlers.OPERATIONS), as meter/openapi.py does for the credits API."""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

from api.errors import ErrorBody
from billing.handlers import OPERATIONS
from core.http import IDEMPOTENCY_HEADER, replayed_header_doc
from core.openapi import numbers_not_strings

VERSION = "0.1.0"
_STATUS_TEXT = {
    400: "invalid_request (or invalid_signature for webhooks)",
    401: "unauthenticated",
    402: "card_declined or payment_failed: nothing was charged for a declined card",
    403: "forbidden: the admin role is needed",
    404: "not_found (another organization's objects are not found either)",
    409: "idempotency_conflict, customer_required, subscription_exists or subscription_busy",
    413: "payload_too_large",
    429: "rate_limited: the credential's request rate (Retry-After says when to retry)",
    503: "unavailable: Postgres, Redis or Stripe unreachable; retry with the same Idempotency-Key",
}


def error_statuses(op: Any) -> set[int]:
    """What an operation can answer besides success: its own list, plus what every
    operation of its kind can answer (a bad Idempotency-Key or body is a 400, a key reused
    with another body a 409, a credential is checked for revocation and rate)."""
    statuses = set(op.errors)
    if op.authenticated:
        statuses |= {401, 429, 503}
    if op.idempotent:
        statuses |= {400, 409}
    if op.request is not None:
        statuses |= {400, 413}
    if op.query:
        statuses.add(400)
    return statuses


def _operation(op: Any) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", op.path)
    ]
    params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in op.query]
    if op.idempotent:
        params.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 255},
                "description": "A retry with the same key returns the first response and charges nothing (48 h).",
            }
        )
    if not op.authenticated:
        params.append({"name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"}})
    responses: dict[str, Any] = {}
    if op.response is not None:
        responses[str(op.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.response.__name__}"}}},
        }
        if op.idempotent:
            responses[str(op.status)]["headers"] = replayed_header_doc()
    for code in sorted(error_statuses(op)):
        responses[str(code)] = {
            "description": _STATUS_TEXT[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
    entry: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.handler.__name__,
        "parameters": params,
        "responses": responses,
        "security": [{"bearer": []}] if op.authenticated else [],
    }
    if op.admin:
        entry["description"] = "Admin role only."
    if op.request is not None:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.request.__name__}"}}},
        }
    return entry


@functools.cache
def document() -> bytes:
    types: list[Any] = [op.request for op in OPERATIONS if op.request]
    types += [op.response for op in OPERATIONS if op.response]
    types.append(ErrorBody)
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Agent credits billing API", "version": VERSION},
        "paths": paths,
        "components": {
            "schemas": numbers_not_strings(components),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return msgspec.json.encode(doc)
