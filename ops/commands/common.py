"""What every command group shares: argument types, output (a table for people, JSON
with --json) and running a coroutine against the stack's ledger and hot path."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import decimal
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from accounts.admin import AdminError
from core.config import Config
from core.money import PrecisionError, to_credits, to_milli
from ledger.operators import Actor, AuditEntry, OperatorError, check_actor, record
from ops.runtime import Services, connect, servers

Subparsers = Any  # argparse's _SubParsersAction, which typeshed keeps private
TTL_MAX_S = 30 * 86400
_TTL = re.compile(r"^(\d+)([smhd]?)$")


def write_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def write_text(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, empty: str = "(none)") -> str:
    """Rows as aligned columns, headed by the column names."""
    if not rows:
        return empty
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def operator_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--operator",
        metavar="EMAIL",
        help="the operator the audit row names (default: CREDITS_OPERATOR, else the system user)",
    )


def cli_actor(config: Config, args: argparse.Namespace) -> Actor:
    """Who a money command's audit row names: --operator, CREDITS_OPERATOR, or the OS
    user on this host."""
    try:
        return Actor.cli(getattr(args, "operator", None) or config.operator_email)
    except OperatorError as exc:
        raise AdminError(str(exc)) from None


async def acting(s: Services, args: argparse.Namespace) -> Actor:
    """The command's actor, checked (an operator it names must be active) before the
    command does anything in its name."""
    actor = cli_actor(s.config, args)
    await check_actor(s.ledger.pool, actor)
    return actor


async def audit(s: Services, actor: Actor, entry: AuditEntry) -> None:
    """The audit row of what the command did (ledger/operators.py)."""
    await record(s.ledger.pool, actor, entry)


def identifier(text: str) -> str:
    """An organization, key or department id: a uuid (argparse names the option)."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an id (a uuid like 0b9d4c1e-…): {text!r}") from None


def credits_amount(text: str) -> int:
    """Credits as people write them (12.5) to millicredits, exactly, or an argparse error."""
    try:
        return to_milli(decimal.Decimal(text))
    except (decimal.InvalidOperation, PrecisionError) as exc:
        raise argparse.ArgumentTypeError(f"not an exact credit amount: {text} ({exc})") from None


def show_credits(milli: int | None) -> str | None:
    return None if milli is None else str(to_credits(milli))


def timestamp(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("the timestamp needs a time zone (e.g. Z)")
    return value


def ttl_seconds(text: str) -> int:
    """A lifetime like 90s, 15m, 1h or 7d (a bare number is seconds), 1 s to 30 days."""
    match = _TTL.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a lifetime: {text!r} (use e.g. 90s, 15m, 1h, 7d)")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not 1 <= seconds <= TTL_MAX_S:
        raise argparse.ArgumentTypeError(f"a lifetime must be between 1 s and 30 days, got {text!r}")
    return seconds


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _with_services(config: Config, fn: Callable[[Services], Awaitable[int]]) -> int:
    async with connect(config) as services:
        return await fn(services)


def run_with_services(config: Config, fn: Callable[[Services], Awaitable[int]]) -> int:
    """Run `fn` against the stack's ledger and hot path (ops/stack.py finds the stack)."""
    with servers(config) as cfg:
        return asyncio.run(_with_services(cfg, fn))
