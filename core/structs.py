"""The one base class for request and response bodies."""

from __future__ import annotations

import msgspec

# Text that reaches Postgres: `text` and `jsonb` refuse the NUL character, so a NUL that
# got past the edge would fail (and, in the usage stream, stall) its write. Every
# string a client sends carries this pattern; api.errors names it in the message.
NO_NUL = r"^[^\x00]*$"


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False, kw_only=True):
    """Base of every request/response body.

    forbid_unknown_fields: a misspelt field is a 400 naming it, not silently ignored.
    omit_defaults=False: responses always carry every documented field.
    kw_only: fields are built by name, so adding one never shifts another.
    """
