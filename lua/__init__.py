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
    ENTITLEMENTS_NOT_LOADED = 15
    UNKNOWN_ACTION = 20
    DEPARTMENT_NOT_FOUND = 21
    INSUFFICIENT_CREDITS = 22
    DEPARTMENT_LIMIT = 23
    CAP_EXCEEDED = 24
    FEATURE_DENIED = 25
    NOT_FOUND = 30
    RESERVATION_CLOSED = 31
    USED_EXCEEDS_HOLD = 32
    NOT_YOURS = 33
    ITEM_FAILED = 40


SCRIPTS = (
    "balance",
    "check",
    "check_consume",
    "configure",
    "consume",
    "consume_batch",
    "consume_group",
    "debit",
    "entitlements",
    "grant",
    "load",
    "ratelimit",
    "reconcile",
    "release",
    "reserve",
)


# Operations made of two files, run in one script: the first (a gate) answers at once
# or lets the second run, whose reply carries the gate (lib.lua, with_gate). So a feature
# check and a charge are one atomic step without a second copy of the charge.
COMPOSITES = {"check_consume": ("check_gate", "consume")}


def _read(filename: str) -> str:
    return importlib.resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


def _body(name: str) -> str:
    """An operation's code (inside its function, after begin())."""
    parts = COMPOSITES.get(name)
    if parts is None:
        return _read(name + ".lua")
    gate, main = parts
    return (
        f"local stop, gate = (function()\n{_read(gate + '.lua')}\nend)()\n"
        "if stop then return stop end\n"
        f"return with_gate((function()\n{_read(main + '.lua')}\nend)(), gate)"
    )


def _codes() -> str:
    return "\n".join(f"local {s.name} = {s.value}" for s in Status)


@functools.cache
def source(name: str) -> str:
    """One operation as an EVAL script."""
    if name not in SCRIPTS:
        raise KeyError(f"no script {name!r}")
    # KEYS and ARGV become locals that begin() sets, as in the function library.
    prologue = "local KEYS, ARGV = KEYS, ARGV"
    return f"{_codes()}\n{prologue}\n{_read('lib.lua')}\nbegin(KEYS, ARGV)\n{_body(name)}"


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
        parts.append(f"local function op_{name}(keys, argv)\nbegin(keys, argv)\n{_body(name)}\nend")
    body = "\n".join(parts)
    version = hashlib.sha256(body.encode()).hexdigest()[:12]
    functions = {name: f"credits_{name}_{version}" for name in SCRIPTS}
    registry = "\n".join(f"redis.register_function('{functions[name]}', op_{name})" for name in SCRIPTS)
    lib_name = f"credits_{version}"
    return Library(lib_name, f"#!lua name={lib_name}\n{body}\n{registry}\n", functions)
