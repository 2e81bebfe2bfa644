"""`credits partitions`: where the usage partitions live, and changing their number.

Every organization belongs to one of USAGE_PARTITIONS partitions (crc32 of its id):
its cached state, its idempotency records and its usage stream share the partition's
hash tag `{crN}`, so on a Redis Cluster each partition is one slot, on one primary.

`resize` is offline, by design: a process still charging with the old count would
cache an organization under its old partition while the others load it under the new
one, and both balances could be spent. So it refuses to start unless Redis is quiet
(no usage appended for a few seconds: stop every sidecar and billing service first)
and every stream is settled, then marks every partition as being resized (a load of
any organization is refused meanwhile, and so is a process starting with either
count), drops every organization's cached state (it loads again from the ledger, under
its new partition), moves the idempotency records to their new partitions with their
time to live, removes the streams of partitions that no longer exist, marks the new
count, and verifies organizations by loading them and comparing with the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from dataclasses import replace
from typing import Any

from redis.exceptions import ResponseError

from core.config import Config
from hotpath.client import HotPath, now_ms
from hotpath.cluster import slot_of
from ops.commands.common import Subparsers, json_flag, run_with_services, table, write_json, write_text
from ops.runtime import Services

QUIET_S = 5.0  # no usage appended for this long: nothing is charging
POLL_S = 0.5


def register(sub: Subparsers) -> None:
    parts = sub.add_parser("partitions", help="the usage partitions: where they live, changing their number")
    psub = parts.add_subparsers(dest="partitions_command", required=True)
    show = psub.add_parser("show", help="each partition: its slot and server, stream, lag, layout mark")
    json_flag(show)
    show.set_defaults(fn=cmd_show)
    resize = psub.add_parser(
        "resize", help="change USAGE_PARTITIONS (offline: stop sidecars and billing first; settlers keep running)"
    )
    resize.add_argument("--to", type=_count, required=True, help="the new number of partitions")
    resize.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to wait for settlement to catch up (default 120)"
    )
    resize.add_argument(
        "--verify", type=int, default=1000, help="organizations to load and compare with the ledger (default 1000)"
    )
    json_flag(resize)
    resize.set_defaults(fn=cmd_resize)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of partitions: {text!r}") from None
    if not 1 <= value <= 16384:
        raise argparse.ArgumentTypeError("between 1 and 16384 partitions (a cluster has 16384 slots)")
    return value


async def _partition_rows(s: Services) -> list[dict[str, Any]]:
    from settler.stream import lag

    hot = s.hot
    marks = await hot.layout()
    now = now_ms()
    rows = []
    for p in range(hot.partitions):
        slot = slot_of(f"{{cr{p}}}")
        entries, age_s = await lag(s.redis, hot, p, now)
        server = hot.cluster.node(slot).address if hot.cluster is not None else "-"
        rows.append(
            {
                "partition": p,
                "slot": slot,
                "server": server,
                "unsettled": entries,
                "oldest_s": round(age_s, 1),
                "layout": marks.get(p),
            }
        )
    return rows


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        rows = await _partition_rows(s)
        per_server = collections.Counter(r["server"] for r in rows)
        out = {"partitions": s.hot.partitions, "rows": rows, "per_server": dict(per_server)}
        if args.json:
            write_json(out)
            return 0
        write_text(table(rows, ["partition", "slot", "server", "unsettled", "oldest_s", "layout"]))
        if s.hot.cluster is not None:
            primaries = [n.address for n in s.hot.cluster.primaries]
            counts = ", ".join(f"{a}: {per_server.get(a, 0)}" for a in primaries)
            write_text(f"partitions per primary: {counts}")
            if any(per_server.get(a, 0) == 0 for a in primaries):
                write_text("a primary serves no partition: raise USAGE_PARTITIONS (docs/scaling.md) or move slots")
        return 0

    return run_with_services(config, run)


class ResizeRefused(RuntimeError):
    pass


async def _last_append_ms(s: Services) -> int:
    """When usage was last appended to any partition (ms; 0: never)."""
    last = 0
    for p in range(s.hot.partitions):
        try:
            info = await s.redis.xinfo_stream(s.hot.stream_key(p))
        except ResponseError:  # no stream (nothing ever appended)
            continue
        raw = info.get("last-generated-id") or b"0-0"
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        last = max(last, int(text.split("-")[0]))
    return last


async def _wait_quiet_and_settled(s: Services, timeout_s: float) -> None:
    from settler.stream import lag

    deadline = time.monotonic() + timeout_s
    while True:
        now = now_ms()
        unsettled = 0
        for p in range(s.hot.partitions):
            entries, _ = await lag(s.redis, s.hot, p, now)
            unsettled += entries
        quiet_s = (now - await _last_append_ms(s)) / 1000
        if unsettled == 0 and quiet_s >= QUIET_S:
            return
        if time.monotonic() > deadline:
            if quiet_s < QUIET_S:
                raise ResizeRefused(
                    f"usage was appended {quiet_s:.1f} s ago: something is still charging."
                    " Stop every sidecar and billing service (settlers keep running), then try again"
                )
            raise ResizeRefused(
                f"{unsettled} usage entries are not settled yet: is a settler running? Nothing was changed"
            )
        await asyncio.sleep(POLL_S)


async def resize(s: Services, to: int, *, drain_timeout_s: float, verify: int) -> dict[str, Any]:
    from ledger.settlement import Settlement
    from settler import reconcile

    old = s.hot.partitions
    marks = await s.hot.layout_marks(max(old, to))
    stale = {p: m for p, m in marks.items() if p < old and m != str(old)}
    if stale:
        raise ResizeRefused(
            f"USAGE_PARTITIONS here is {old}, but the cache is marked {sorted(set(stale.values()))}:"
            " run this with the count the services use now"
        )
    if to == old:
        return {"from": old, "to": to, "changed": False}
    await _wait_quiet_and_settled(s, drain_timeout_s)
    everything = range(max(old, to))
    await s.hot.set_layout_marks(everything, "0")  # every load refused from here on
    try:
        await _wait_quiet_and_settled(s, drain_timeout_s)  # nothing slipped in meanwhile
    except ResizeRefused:
        await s.hot.set_layout_marks(range(old), str(old))
        await s.hot.set_layout_marks(range(old, max(old, to)), None)
        raise
    dropped, moved = await s.hot.relayout(to)
    removed = 0
    for p in range(to, old):  # settled, and no organization's partition any more
        removed += int(await s.redis.delete(s.hot.stream_key(p), s.hot.partition_key(p, "settler-lease")))
    await s.hot.set_layout_marks(range(to), str(to))
    await s.hot.set_layout_marks(range(to, max(old, to)), None)
    # Verify with the new count: load organizations from the ledger, compare.
    config = replace(s.config, usage_partitions=to)
    new_hot = HotPath.from_config(s.redis, s.ledger, config, cluster=s.hot.cluster)
    settlement = await Settlement.connect(config.settler_dsn(), max_size=2)
    try:
        orgs = await settlement.organizations(limit=verify) if verify > 0 else []
        for org in orgs:
            await new_hot.load(org)
        report = reconcile.Report()
        await reconcile.check_many(new_hot, settlement, orgs, report)
    finally:
        await settlement.close()
    return {
        "from": old,
        "to": to,
        "changed": True,
        "cache_keys_dropped": dropped,
        "idempotency_records_moved": moved,
        "streams_removed": removed,
        "verified": len(orgs),
        "drifts": [{"organization_id": d.organization_id, "difference": d.difference} for d in report.drifts],
    }


def cmd_resize(config: Config, args: argparse.Namespace) -> int:
    async def run(s: Services) -> int:
        try:
            out = await resize(s, args.to, drain_timeout_s=args.drain_timeout, verify=args.verify)
        except ResizeRefused as exc:
            if args.json:
                write_json({"error": str(exc)})
            else:
                write_text(f"not resized: {exc}")
            return 1
        if args.json:
            write_json(out)
        elif not out["changed"]:
            write_text(f"already {out['to']} partitions: nothing to do")
        else:
            write_text(
                f"resized {out['from']} -> {out['to']} partitions: {out['cache_keys_dropped']} cached keys dropped"
                f" (organizations load again from the ledger), {out['idempotency_records_moved']} idempotency"
                f" records moved, {out['streams_removed']} streams removed; {out['verified']} organizations"
                f" verified, {len(out['drifts'])} drifting"
            )
            write_text(f"now start every service with USAGE_PARTITIONS={out['to']}")
        return 1 if out.get("drifts") else 0

    return run_with_services(config, run)
