"""The recent rate of spend behind `runs_out_at` in `GET /balance` (ledger/forecast.py),
read from Postgres at most once per RATE_KEPT_S per organization: the balance itself
comes from Redis, and a forecast a few seconds old is as good. While Postgres cannot
answer, there is no forecast (null) and the balance is still served."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from ledger.forecast import RecentSpend, recent_spend
from ledger.store import POSTGRES_DOWN, Ledger

log = logging.getLogger(__name__)

RATE_KEPT_S = 30.0
RATES_KEPT_MAX = 10_000


class SpendRates:
    def __init__(self, ledger: Ledger, *, kept_s: float = RATE_KEPT_S, kept_max: int = RATES_KEPT_MAX) -> None:
        self.ledger = ledger
        self.kept_s = kept_s
        self.kept_max = kept_max
        self._kept: OrderedDict[str, tuple[float, RecentSpend]] = OrderedDict()

    async def recent(self, organization_id: str) -> RecentSpend | None:
        now_s = time.monotonic()
        kept = self._kept.get(organization_id)
        if kept is not None and now_s - kept[0] < self.kept_s:
            return kept[1]
        try:
            async with self.ledger.tenant(organization_id) as conn:
                spend = await recent_spend(conn, organization_id)
        except POSTGRES_DOWN as exc:
            log.warning("spend_rate_unavailable", extra={"organization_id": organization_id, "error": str(exc)})
            return None
        self._kept[organization_id] = (now_s, spend)
        self._kept.move_to_end(organization_id)
        while len(self._kept) > self.kept_max:
            self._kept.popitem(last=False)
        return spend
