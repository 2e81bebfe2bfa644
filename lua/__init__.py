"""The hot path's Redis scripts, one file per operation, shipped with the package.

`source(name)` returns what is sent to Redis: the status codes (generated from
`Status`, the one mapping of return codes), the shared helpers of lib.lua, then the
script itself.
"""

from __future__ import annotations

import enum
import functools
import importlib.resources


class Status(enum.IntEnum):
    """Every script returns {status, msgpack payload}; this is the status."""

    OK = 1
    REPLAY = 2
    DUPLICATE = 3
    ALREADY_LOADED = 4
    NOT_LOADED = 10
    IDEMPOTENCY_CONFLICT = 11
    UNAUTHENTICATED = 12
    RATE_LIMITED = 13
    UNKNOWN_ACTION = 20
    DEPARTMENT_NOT_FOUND = 21
    INSUFFICIENT_CREDITS = 22
    DEPARTMENT_LIMIT = 23
    CAP_EXCEEDED = 24
    NOT_FOUND = 30
    RESERVATION_CLOSED = 31
    USED_EXCEEDS_HOLD = 32
    ITEM_FAILED = 40


SCRIPTS = (
    "balance",
    "configure",
    "consume",
    "consume_batch",
    "debit",
    "grant",
    "load",
    "ratelimit",
    "reconcile",
    "release",
    "reserve",
)


def _read(filename: str) -> str:
    return importlib.resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


@functools.cache
def source(name: str) -> str:
    if name not in SCRIPTS:
        raise KeyError(f"no script {name!r}")
    codes = "\n".join(f"local {s.name} = {s.value}" for s in Status)
    return f"{codes}\n{_read('lib.lua')}\n{_read(name + '.lua')}"
