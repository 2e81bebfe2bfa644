"""The failure every component may report: a backing service could not be reached."""

from __future__ import annotations


class Unavailable(Exception):
    """Redis or Postgres could not be reached (or answered too late).

    Whether the operation took effect is for the raiser to say: the hot path raises it
    before a command was written (nothing ran) and, separately, `OutcomeUnknown` when a
    written command got no answer."""
