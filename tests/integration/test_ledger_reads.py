"""Pages of usage (events and reservation captures, merged) stay index scans however
large the tables grow (the plan is the guarantee; `python -m bench.reads` times them
at 10 million events, figures in the README)."""

from __future__ import annotations

import json
import uuid

import asyncpg

from core.config import Config
from ledger.store import Ledger, usage_page_query
from tests.conftest import Org


def plan_nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    nodes = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        nodes += plan_nodes(child)
    return nodes


async def test_usage_page_is_an_index_scan_without_sort(
    migrated: Config, ledger: Ledger, org: Org, other_org: Org
) -> None:
    owner = await asyncpg.connect(migrated.database_url)
    try:
        for o in (org.id, other_org.id):
            await owner.execute(
                "INSERT INTO usage_events (organization_id, id, action, units, credits, credential_id, created_at)"
                " SELECT $1, 'e' || g, CASE WHEN g % 7 = 0 THEN 'web_search' ELSE 'generate_content' END, 1, 1000,"
                " 'k', now() - (g || ' seconds')::interval FROM generate_series(1, 50000) g",
                uuid.UUID(o),
            )
            # captures (released reservations that charged) page along their own index
            await owner.execute(
                "INSERT INTO reservations (organization_id, id, amount, used, status, credential_id, action,"
                " expires_at, created_at, closed_at)"
                " SELECT $1, 'r' || g, 5000, 1 + g % 4000, 'released', 'k',"
                " CASE WHEN g % 7 = 0 THEN 'web_search' ELSE 'generate_content' END,"
                " now(), now() - (g * 3 || ' seconds')::interval, now() - (g * 3 - 1 || ' seconds')::interval"
                " FROM generate_series(1, 20000) g",
                uuid.UUID(o),
            )
        await owner.execute("ANALYZE usage_events")
        await owner.execute("ANALYZE reservations")
    finally:
        await owner.close()
    async with ledger.tenant(org.id) as conn:
        cursor_at = await conn.fetchval("SELECT created_at FROM usage_events WHERE id = 'e25000'")
        org_id = uuid.UUID(org.id)
        for sql, args in (
            usage_page_query(org_id, limit=21),
            usage_page_query(org_id, cursor=(cursor_at, "e25000"), limit=21),
            usage_page_query(org_id, action="web_search", limit=21),
        ):
            raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
            plan = json.loads(raw)[0]["Plan"]
            kinds = {n["Node Type"] for n in plan_nodes(plan)}
            assert "Seq Scan" not in kinds and "Sort" not in kinds, (sql, kinds)
            assert any("Index" in k for k in kinds), kinds
