"""Ledger reads at scale: the pages the sidecar serves (`GET /api/credits/usage`,
`/transactions`, `/usage/summary`) timed against a usage table of 10 million events.

    python -m bench.reads [--events 10000000] [--big-share 0.5] [--repeat 30]

Not a test: it prints figures for this machine. One organization holds `big-share` of
the events (the worst case for its pages), the rest are spread over 50 others. The rows
are written straight into a scratch database (as its owner, with generate_series, and
the hourly rollup settlement keeps alongside them), then read the way the sidecar reads
them: as credits_app, row-level security on, through ledger.store.LedgerReads. Each
query runs `--repeat` times after a warm-up; the plan of each page query is printed too
(it must be an index scan in order: no Sort, no Seq Scan).
Uses DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from core import config as config_module
from ledger.migrate import migrate
from ledger.store import Ledger, LedgerReads, usage_page_query

ACTIONS = ["generate_content", "web_search", "tool_call", "analyze_data", "llm_input_tokens", "llm_output_tokens"]
OTHER_ORGS = 50
SPACING_S = 1.5  # between two events of the big organization: 5M events ~ 87 days


def _with_db(url: str, name: str) -> str:
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc, "/" + name, p.query, ""))


async def _fill(owner: asyncpg.Connection, events: int, big_share: float) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """The organizations, their departments, their events and ledger entries."""
    big = uuid.uuid4()
    others = [uuid.uuid4() for _ in range(OTHER_ORGS)]
    for i, org in enumerate([big, *others]):
        await owner.execute("INSERT INTO organizations (id, name) VALUES ($1, $2)", org, f"reads-{i}")
    depts = [uuid.uuid4() for _ in range(4)]
    for i, dept in enumerate(depts):
        await owner.execute(
            "INSERT INTO departments (id, organization_id, name) VALUES ($1, $2, $3)", dept, big, f"dept-{i}"
        )
    big_events = int(events * big_share)
    per_other = (events - big_events) // OTHER_ORGS
    chunk = 1_000_000
    for start in range(0, big_events, chunk):
        n = min(chunk, big_events - start)
        began = time.perf_counter()
        # Every 5th event has no department; actions cycle; one event per SPACING_S.
        await owner.execute(
            "INSERT INTO usage_events (organization_id, id, action, units, credits, department_id,"
            " credential_id, metadata, created_at)"
            " SELECT $1, 'ev' || lpad(g::text, 9, '0') || '-0', ($2::text[])[1 + g % 6], 1 + g % 3, 100 * (1 + g % 3),"
            " CASE WHEN g % 5 = 0 THEN NULL ELSE ($3::uuid[])[1 + g % 4] END, 'key-1', '{}',"
            " now() - make_interval(secs => ($4 - g) * $5)"
            " FROM generate_series($6::bigint, $7::bigint) g",
            big,
            ACTIONS,
            depts,
            big_events,
            SPACING_S,
            start + 1,
            start + n,
        )
        print(f"  {start + n:,} of the big organization's events ({time.perf_counter() - began:.0f} s)", flush=True)
    for org in others:
        await owner.execute(
            "INSERT INTO usage_events (organization_id, id, action, units, credits, credential_id, created_at)"
            " SELECT $1, 'ev' || g || '-0', ($2::text[])[1 + g % 6], 1, 100, 'key-1',"
            " now() - make_interval(secs => ($3 - g) * 60.0)"
            " FROM generate_series(1, $3::bigint) g",
            org,
            ACTIONS,
            per_other,
        )
    # The big organization's ledger: one usage entry per settled batch, say 500k.
    await owner.execute(
        "INSERT INTO ledger_entries (organization_id, type, amount, balance_after, reference, created_at)"
        " SELECT $1, CASE WHEN g % 100 = 0 THEN 'grant' ELSE 'usage' END, -1000, 0, 'b' || g,"
        " now() - make_interval(secs => (500000 - g) * 15.0) FROM generate_series(1, 500000) g",
        big,
    )
    # Captures (released reservations that charged): one per 50 events of the big
    # organization, listed and summed with them (migrations/0010).
    await owner.execute(
        "INSERT INTO reservations (organization_id, id, amount, used, status, department_id, credential_id,"
        " action, expires_at, created_at, closed_at)"
        " SELECT $1, 'rs' || lpad(g::text, 9, '0'), 5000, 1000 + g % 4000, 'released',"
        " CASE WHEN g % 5 = 0 THEN NULL ELSE ($3::uuid[])[1 + g % 4] END, 'key-1', ($2::text[])[1 + g % 6],"
        " now(), now() - make_interval(secs => ($4 - g) * $5 * 50 + 30),"
        " now() - make_interval(secs => ($4 - g) * $5 * 50)"
        " FROM generate_series(1, $4::bigint) g",
        big,
        ACTIONS,
        depts,
        big_events // 50,
        SPACING_S,
    )
    # What settlement keeps alongside (rollup_staged_uses and _captures, migrations/0010).
    await owner.execute(
        "INSERT INTO usage_hourly (organization_id, hour, action, department_id, credential_id, events, units,"
        " credits) SELECT organization_id, date_trunc('hour', created_at, 'UTC'), action, department_id,"
        " credential_id, count(*), sum(units), sum(credits) FROM usage_events GROUP BY 1, 2, 3, 4, 5"
    )
    await owner.execute(
        "INSERT INTO usage_hourly AS h (organization_id, hour, action, department_id, credential_id, events, units,"
        " credits) SELECT organization_id, date_trunc('hour', closed_at, 'UTC'), action, department_id,"
        " credential_id, count(*), count(*), sum(used) FROM reservations WHERE used > 0 GROUP BY 1, 2, 3, 4, 5"
        " ON CONFLICT ON CONSTRAINT usage_hourly_key DO UPDATE SET events = h.events + excluded.events,"
        " units = h.units + excluded.units, credits = h.credits + excluded.credits"
    )
    await owner.execute("VACUUM ANALYZE usage_events")
    await owner.execute("VACUUM ANALYZE usage_hourly")
    await owner.execute("VACUUM ANALYZE reservations")
    await owner.execute("VACUUM ANALYZE ledger_entries")
    return big, depts


async def _time(repeat: int, run: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    for _ in range(3):
        await run()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        await run()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return {"p50": statistics.median(times), "max": times[-1]}


def _nodes(plan: dict[str, Any]) -> list[str]:
    out = [plan["Node Type"] + (f" on {plan['Index Name']}" if "Index Name" in plan else "")]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


async def run(args: argparse.Namespace) -> None:
    base_db = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"credits_bench_reads_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(base_db)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        config = config_module.load({"DATABASE_URL": _with_db(base_db, name), "REDIS_URL": "redis://unused"})
        assert config.database_url is not None
        await migrate(
            config.database_url, app_password=config.app_db_password, settler_password=config.settler_db_password
        )
        owner = await asyncpg.connect(config.database_url)
        print(f"writing {args.events:,} usage events ...", flush=True)
        began = time.perf_counter()
        big, depts = await _fill(owner, args.events, args.big_share)
        total = await owner.fetchval("SELECT count(*) FROM usage_events")
        mine = await owner.fetchval("SELECT count(*) FROM usage_events WHERE organization_id = $1", big)
        size = await owner.fetchval("SELECT pg_size_pretty(pg_total_relation_size('usage_events'))")
        print(
            f"{total:,} usage events ({size} with indexes), {mine:,} of one organization;"
            f" written in {time.perf_counter() - began:.0f} s"
        )
        await owner.close()

        ledger = await Ledger.connect(config.app_dsn(), min_size=1, max_size=2)
        reads = LedgerReads(ledger)
        org = str(big)
        now = dt.datetime.now(dt.UTC)
        deep = f"ev{int(mine * 0.2):09d}-0"  # 80% of the way back in history
        week = (now - dt.timedelta(days=7), now)
        month = now - dt.timedelta(days=30)

        def usage(**kw: Any) -> Callable[[], Awaitable[Any]]:
            base: dict[str, Any] = {
                "start": None,
                "end": None,
                "department_id": None,
                "action": None,
                "limit": 20,
                "starting_after": None,
            }
            return lambda: reads.usage(org, **{**base, **kw})

        pages: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("usage: first page (20)", usage()),
            ("usage: 100 per page", usage(limit=100)),
            ("usage: page after a cursor 80% back", usage(starting_after=deep)),
            ("usage: one action", usage(action="web_search")),
            ("usage: one department", usage(department_id=str(depts[2]))),
            ("usage: last 7 days", usage(start=week[0], end=week[1])),
            ("usage: a day 60 days ago", usage(start=now - dt.timedelta(days=61), end=now - dt.timedelta(days=60))),
            ("transactions: first page", lambda: reads.transactions(org, type_=None, limit=20, starting_after=None)),
            (
                "transactions: grants only",
                lambda: reads.transactions(org, type_="grant", limit=20, starting_after=None),
            ),
            (
                "transactions: after a cursor",
                lambda: reads.transactions(org, type_=None, limit=20, starting_after=100_000),
            ),
        ]
        summaries: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            (
                f"summary by {g}, last 24 h",
                lambda g=g: reads.usage_summary(org, start=now - dt.timedelta(days=1), end=now, group_by=g),
            )
            for g in ("action", "department", "day", "api_key")
        ] + [
            (
                "summary by day, last 7 days",
                lambda: reads.usage_summary(org, start=week[0], end=week[1], group_by="day"),
            ),
            ("summary by day, last 30 days", lambda: reads.usage_summary(org, start=month, end=now, group_by="day")),
            (
                "summary by day and action, last 30 days",
                lambda: reads.usage_summary(org, start=month, end=now, group_by="day", then_by="action"),
            ),
            ("summary by action, all time", lambda: reads.usage_summary(org, start=None, end=None, group_by="action")),
        ]
        print(f"\n{'query':45} {'p50 ms':>8} {'max ms':>8}   (x{args.repeat}, warm cache)")
        worst = 0.0
        for label, fn in pages:
            t = await _time(args.repeat, fn)
            worst = max(worst, t["max"])
            print(f"{label:45} {t['p50']:8.2f} {t['max']:8.2f}")
        for label, fn in summaries:
            t = await _time(max(3, args.repeat // 5), fn)
            print(f"{label:45} {t['p50']:8.2f} {t['max']:8.2f}   (an aggregate, not a page)")
        verdict = "met" if worst < 50 else "MISSED"
        print(f"\nslowest page: {worst:.2f} ms (target < 50 ms at 10 million events) {verdict}")

        print("\nplans (EXPLAIN ANALYZE as credits_app, row-level security on):")
        async with ledger.tenant(org) as conn:
            cursor_at = await conn.fetchval("SELECT created_at FROM usage_events WHERE id = $1", deep)
            for label, (sql, sql_args) in [
                ("first page", usage_page_query(big, limit=21)),
                ("after a cursor", usage_page_query(big, cursor=(cursor_at, deep), limit=21)),
                ("one action", usage_page_query(big, action="web_search", limit=21)),
                ("one department", usage_page_query(big, department_id=depts[2], limit=21)),
                ("last 7 days", usage_page_query(big, start=week[0], end=week[1], limit=21)),
            ]:
                raw = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *sql_args)
                top = json.loads(raw)[0]
                print(f"  {label:16} {top['Execution Time']:7.2f} ms  " + " > ".join(_nodes(top["Plan"])))
        await ledger.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reads")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--big-share", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=30)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
