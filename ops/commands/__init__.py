"""The `credits` command's groups, one module each: a group's `register(sub)` adds its
subcommands (and their handlers live next to it). A new group is a module here and
one line in GROUPS."""

from __future__ import annotations

from ops.commands import (
    accounts,
    alerts,
    autotopup,
    creditline,
    dev,
    entitlements,
    operators,
    partitions,
    portal,
    quarantine,
    reconcile,
    services,
)

GROUPS = (
    dev,
    services,
    accounts,
    alerts,
    autotopup,
    creditline,
    entitlements,
    reconcile,
    quarantine,
    portal,
    partitions,
    operators,
)
