"""Where each grant came from (signup bonus, subscription, purchase, admin), for
`GET /balance`. A grant's source never changes, so each is asked of the ledger once and
kept; while Postgres cannot answer, grants not seen before are labelled `unknown` and
the balance (which comes from Redis) is still served."""

from __future__ import annotations

import logging
from collections import OrderedDict

from ledger.store import POSTGRES_DOWN, Ledger

log = logging.getLogger(__name__)

SOURCES_KEPT_MAX = 100_000
UNKNOWN_SOURCE = "unknown"


class GrantSources:
    def __init__(self, ledger: Ledger, *, kept_max: int = SOURCES_KEPT_MAX) -> None:
        self.ledger = ledger
        self.kept_max = kept_max
        self._known: OrderedDict[str, str] = OrderedDict()

    async def lookup(self, organization_id: str, grant_ids: list[str]) -> dict[str, str]:
        found = {g: self._known[g] for g in grant_ids if g in self._known}
        missing = [g for g in grant_ids if g not in found]
        if not missing:
            return found
        try:
            fetched = await self.ledger.grant_sources(organization_id, missing)
        except POSTGRES_DOWN as exc:
            log.warning("grant_sources_unavailable", extra={"organization_id": organization_id, "error": str(exc)})
            return {**found, **dict.fromkeys(missing, UNKNOWN_SOURCE)}
        for grant_id, source in fetched.items():
            self._known[grant_id] = source
            self._known.move_to_end(grant_id)
        while len(self._known) > self.kept_max:
            self._known.popitem(last=False)
        return {**found, **fetched}
