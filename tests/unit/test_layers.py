"""Each component is a room with a clear door: a module imports only the rooms below
its own. Read from the source with `ast`, so a late import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROOMS = (
    "accounts",
    "api",
    "billing",
    "core",
    "credits_sdk",
    "hotpath",
    "ledger",
    "lua",
    "meter",
    "ops",
    "portal",
    "settler",
    "webhooks",
)

# room -> the rooms it may import (itself always).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "lua": set(),
    "credits_sdk": set(),  # the SDK talks HTTP only
    "hotpath": {"core", "lua"},
    "ledger": {"core", "hotpath"},  # hotpath.snapshot: the shape of a cold-cache load
    "accounts": {"core", "lua", "hotpath", "ledger"},  # ledger first, then the cache
    "api": {"core", "hotpath", "ledger", "lua"},
    "settler": {"accounts", "core", "lua", "hotpath", "ledger"},
    "billing": {"accounts", "api", "core", "lua", "hotpath", "ledger", "webhooks"},
    "webhooks": {"api", "billing", "core", "hotpath", "ledger"},  # billing's own webhook half
    "meter": {"accounts", "api", "core", "lua", "hotpath", "ledger"},
    # The customer portal: pages of the billing service, through the API's own doors
    # (meter: only the credits API's request types, so a form is checked as the API
    # checks it). Nothing but ops imports the portal: billing.app mounts what ops hands it.
    # The ops console (portal/console.py) shows what settlement computes (lag per
    # partition, reconciliation, usage findings) and repairs with reconcile.repair, as
    # ops/commands/reconcile.py does: it reads the settler's modules, never the reverse.
    "portal": {"accounts", "api", "billing", "core", "hotpath", "ledger", "lua", "meter", "webhooks", "settler"},
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_room_imports_above_itself() -> None:
    wrong: list[str] = []
    for room, allowed in ALLOWED.items():
        for path in sorted((ROOT / room).rglob("*.py")):
            for module in _imports(path):
                top = module.split(".")[0]
                if top not in ROOMS or top == room:
                    continue
                if top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert wrong == []


def test_only_ops_imports_the_portal() -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for room in ROOMS
        if room not in ("ops", "portal")
        for path in sorted((ROOT / room).rglob("*.py"))
        for module in _imports(path)
        if module.split(".")[0] == "portal"
    ]
    assert wrong == []


def test_every_room_is_checked() -> None:
    packaged = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "examples"}
    assert packaged <= set(ALLOWED) | {"ops"}, packaged - set(ALLOWED)
