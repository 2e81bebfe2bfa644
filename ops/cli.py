"""`credits`: the one command-line tool for developers and operations staff.

credits dev [--meter-port ...]   the whole stack on this machine, each service in its own process
credits dev card [--kind 3ds]    a test card on the stack's local Stripe stand-in
credits serve meter|settler|billing  one service (meter --workers N: N processes on one port)
credits migrate [--embedded]     apply SQL migrations (safe to repeat)
credits catalog sync             create in Stripe what the billing catalog lacks
credits org create|list|show     organizations
credits key create|revoke|list   API keys (role agent|admin, department, cap, rate)
credits token --org ORG ...      a frontend JWT (role admin|viewer|agent, --ttl)
credits grant|grant void|adjust|balance  credits with a reason (audited); an organization's balance
credits operator create|link|list|revoke  operators of the ops console (one-time sign-in links)
credits audit [--org ORG]        the operators' action log
credits anomalies list|scan|ack|dismiss  the usage audit: spikes of spend against their baseline
credits alert set|list|delete|test  low-balance alerts
credits reconcile                Redis against the ledger
credits partitions show|resize   where the usage partitions live; change their number (offline)

Each group of commands is a module of ops/commands/. Commands that need the database
find the stack as ops/stack.py says, from any directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from accounts import admin
from core import config as config_module
from core import logs
from core.config import ConfigError
from ledger.operators import OperatorError
from ops.commands import GROUPS
from ops.stack import NoStack


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credits", description="Agent credits: services and operations.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def _service(args: argparse.Namespace) -> str:
    if args.command == "serve":
        return str(args.service)
    if args.command == "dev" and getattr(args, "dev_command", None) is None:
        return "dev"
    return "cli"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    service = _service(args)
    # A one-shot command talks on stdout; its log shows only what went wrong, unless asked.
    level = config.log_level if service != "cli" or "LOG_LEVEL" in os.environ else "WARNING"
    logs.setup(level, config.log_format, service=service)
    try:
        result: int = args.fn(config, args)
    except (admin.AdminError, OperatorError, ConfigError, NoStack) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except LookupError as exc:
        sys.stderr.write(f"not found: {exc}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        sys.stderr.write("interrupted\n")
        return 130
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
