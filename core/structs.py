"""The one base class for request and response bodies."""

from __future__ import annotations

import msgspec


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False, kw_only=True):
    """Base of every request/response body.

    forbid_unknown_fields: a misspelt field is a 400 naming it, not silently ignored.
    omit_defaults=False: responses always carry every documented field.
    kw_only: fields are built by name, so adding one never shifts another.
    """
