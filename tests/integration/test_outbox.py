"""The settler's outbox job: grants the ledger holds but the cache never got are
pushed, once, however often the job runs."""

from __future__ import annotations

from dataclasses import replace

from core.config import Config
from hotpath.client import HotPath
from ledger.store import Ledger
from lua import Status
from settler.service import Settler
from tests.conftest import Org

CREDIT = 1000


async def test_unpushed_grant_is_pushed_once(migrated: Config, hot: HotPath, ledger: Ledger, org: Org) -> None:
    assert (await hot.balance(org.id)).payload["balance"] == 100 * CREDIT  # cached
    # Written to the ledger, but the process died before pushing it to Redis.
    grant = await ledger.grant(org.id, amount=40 * CREDIT, source="admin", reference="crashed-push", reason="t")
    assert (await hot.balance(org.id)).payload["balance"] == 100 * CREDIT
    settler = await Settler.open(replace(migrated, settler_port=0))
    try:
        assert await settler.push_outbox() >= 1
        for _ in range(3):
            await settler.push_outbox()
    finally:
        await settler.close()
    b = await hot.balance(org.id)
    assert b.status is Status.OK and b.payload["balance"] == 140 * CREDIT
    assert grant.grant_id not in [str(r["id"]) for r in await ledger.pending_pushes(org.id)]
