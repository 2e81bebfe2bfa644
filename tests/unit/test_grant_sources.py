"""Grant sources for GET /balance: asked of the ledger once each; unknown ones are
labelled `unknown` while Postgres cannot answer (the balance itself is Redis')."""

from __future__ import annotations

from meter.sources import UNKNOWN_SOURCE, GrantSources


class Ledger:
    def __init__(self) -> None:
        self.down = False
        self.asked: list[list[str]] = []

    async def grant_sources(self, organization_id: str, grant_ids: list[str]) -> dict[str, str]:
        self.asked.append(grant_ids)
        if self.down:
            raise ConnectionRefusedError("postgres is down")
        return {g: "purchase" for g in grant_ids}


async def test_sources_are_asked_once_and_unknown_while_postgres_is_down() -> None:
    ledger = Ledger()
    sources = GrantSources(ledger, kept_max=2)  # type: ignore[arg-type]
    assert await sources.lookup("org", ["a", "b"]) == {"a": "purchase", "b": "purchase"}
    assert await sources.lookup("org", ["a", "b"]) == {"a": "purchase", "b": "purchase"}
    assert ledger.asked == [["a", "b"]]
    ledger.down = True
    assert await sources.lookup("org", ["a", "c"]) == {"a": "purchase", "c": UNKNOWN_SOURCE}
    ledger.down = False
    assert await sources.lookup("org", ["c"]) == {"c": "purchase"}  # not kept as unknown
    assert len(sources._known) == 2  # bounded
