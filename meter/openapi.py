"""The OpenAPI 3.1 document, generated from the same msgspec types the handlers
decode (meter/schemas.py) and the one table of operations (handlers.OPERATIONS)."""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

from api.errors import ErrorBody
from core.http import IDEMPOTENCY_HEADER, replayed_header_doc
from core.openapi import numbers_not_strings
from meter.handlers import OPERATIONS

VERSION = "0.1.0"
_STATUS_TEXT = {
    400: "invalid_request or unknown_action",
    401: "unauthenticated",
    402: "insufficient_credits, department_limit_exceeded, key_cap_exceeded or entitlement_limit_reached",
    403: "forbidden",
    404: "not_found",
    409: "idempotency_conflict, reservation_closed or conflict",
    413: "payload_too_large",
    429: "rate_limited (Retry-After header)",
    503: "unavailable: nothing was charged",
}


@functools.cache
def document() -> bytes:
    types = [op.request for op in OPERATIONS if op.request] + [op.response for op in OPERATIONS if op.response]
    types.append(ErrorBody)
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
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
                    "description": "A retry with the same key returns the first result and charges nothing (48 h).",
                }
            )
        responses: dict[str, Any] = {}
        if op.response is not None:
            responses[str(op.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.response.__name__}"}}},
            }
            if op.idempotent:
                responses[str(op.status)]["headers"] = replayed_header_doc()
        for code in op.errors:
            responses[str(code)] = {
                "description": _STATUS_TEXT[code],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.handler.__name__,
            "parameters": params,
            "responses": responses,
            "security": [{"bearer": []}],
        }
        if op.admin:
            entry["description"] = "Admin role only."
        if op.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.request.__name__}"}}},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Agent credits API", "version": VERSION},
        "paths": paths,
        "components": {
            "schemas": numbers_not_strings(components),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return msgspec.json.encode(doc)
