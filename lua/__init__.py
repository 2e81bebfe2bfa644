"""The hot path's Redis scripts, one file per operation, shipped with the package.

Two ways to send them, built from the same files:

- `library()`: one Redis function library (FUNCTION LOAD, then FCALL): the status
  codes (generated from `Status`, the one mapping of return codes) and the helpers of
  lib.lua are loaded once; each operation is a function. Names carry a digest of the
  code, so two versions of the sidecar (a rolling deploy) never call each other's
  functions.
- `source(name)`: one EVAL script per operation (status codes, lib.lua, the script),
  for servers without functions (before Redis 7).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import importlib.resources
from dataclasses import dataclass


class Status(enum.IntEnum):
    """Every script returns {status, msgpack payload}; this is the status."""

    OK = 1
    REPLAY = 2
    DUPLICATE = 3
    ALREADY_LOADED = 4
    STALE = 5
    NOT_LOADED = 10
    IDEMPOTENCY_CONFLICT = 11
    UNAUTHENTICATED = 12
    RATE_LIMITED = 13
    LAYOUT_CHANGED = 14
    UNKNOWN_ACTION = 20
    DEPARTMENT_NOT_FOUND = 21
    INSUFFICIENT_CREDITS = 22
    DEPARTMENT_LIMIT = 23
    CAP_EXCEEDED = 24
    NOT_FOUND = 30
    RESERVATION_CLOSED = 31
    USED_EXCEEDS_HOLD = 32
    NOT_YOURS = 33
    ITEM_FAILED = 40


SCRIPTS = (
    "balance",
    "configure",
    "consume",
    "consume_batch",
    "consume_group",
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


def _codes() -> str:
    return "\n".join(f"local {s.name} = {s.value}" for s in Status)


@functools.cache
def source(name: str) -> str:
    """One operation as an EVAL script."""
    if name not in SCRIPTS:
        raise KeyError(f"no script {name!r}")
    # KEYS and ARGV become locals that begin() sets, as in the function library.
    prologue = "local KEYS, ARGV = KEYS, ARGV"
    return f"{_codes()}\n{prologue}\n{_read('lib.lua')}\nbegin(KEYS, ARGV)\n{_read(name + '.lua')}"


@dataclass(frozen=True)
class Library:
    """Every operation as a function of one Redis function library."""

    name: str
    code: str
    functions: dict[str, str]  # operation -> function name


@functools.cache
def library() -> Library:
    parts = [_codes(), "local KEYS, ARGV", _read("lib.lua")]
    for name in SCRIPTS:
        parts.append(f"local function op_{name}(keys, argv)\nbegin(keys, argv)\n{_read(name + '.lua')}\nend")
    body = "\n".join(parts)
    version = hashlib.sha256(body.encode()).hexdigest()[:12]
    functions = {name: f"credits_{name}_{version}" for name in SCRIPTS}
    registry = "\n".join(f"redis.register_function('{functions[name]}', op_{name})" for name in SCRIPTS)
    lib_name = f"credits_{version}"
    return Library(lib_name, f"#!lua name={lib_name}\n{body}\n{registry}\n", functions)
