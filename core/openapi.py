"""Pieces both OpenAPI documents (meter/openapi.py, billing/openapi.py) share."""

from __future__ import annotations

from typing import Any


def numbers_not_strings(node: Any) -> Any:
    """Credits are JSON numbers in and out (exact decimals), not strings: rewrite the
    `{"type": "string", "format": "decimal"}` msgspec gives Decimal fields."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "decimal":
            out = {k: v for k, v in node.items() if k not in ("type", "format")}
            out["type"] = "number"
            return out
        return {k: numbers_not_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [numbers_not_strings(v) for v in node]
    return node
