"""Cold-cache loads while events are still unsettled: the ledger snapshot, plus the
organization's stream entries the ledger does not hold yet, replayed in order.

While an organization is not cached, no script appends entries for it (every script
first answers NOT_LOADED), so the stream read before the snapshot holds all of its
unsettled entries; entries the settler commits in between are filtered out by the
snapshot's watermark (`after`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from core.periods import period_starts_ms
from hotpath.snapshot import GrantSnapshot, HoldSnapshot, Snapshot

log = logging.getLogger(__name__)


def entry_after(entry_id: str, after: str) -> bool:
    ms, _, seq = entry_id.partition("-")
    ams, _, aseq = after.partition("-")
    return (int(ms), int(seq)) >= (int(ams), int(aseq))


def _triples(flat: list[Any]) -> Iterable[tuple[str, int, float]]:
    for i in range(0, len(flat), 3):
        yield str(flat[i]), int(flat[i + 1]), float(flat[i + 2])


def _pairs(flat: list[Any]) -> Iterable[tuple[str, int]]:
    for i in range(0, len(flat), 2):
        yield str(flat[i]), int(flat[i + 1])


class _State:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.grants = {g.id: g for g in snap.grants}
        self.holds = {h.id: h for h in snap.holds}
        self.depts = {d.id: d for d in snap.depts}
        self.creds = {c.id: c for c in snap.creds}

    def debit(self, alloc: list[Any]) -> None:
        for gid, amount, _score in _triples(alloc):
            g = self.grants.get(gid)
            if g is not None:
                g.rem -= amount

    def credit(self, gid: str, amount: int, score: float) -> None:
        g = self.grants.get(gid)
        if g is None:
            prio, exp = divmod(int(score), 10**13)
            self.grants[gid] = GrantSnapshot(id=gid, rem=amount, prio=prio, exp=0 if exp >= 10**13 - 1 else exp)
        else:
            g.rem += amount

    def spend(self, dept: str, cred: str, amount: int, at_ms: int) -> None:
        d = self.depts.get(dept) if dept else None
        if d is not None:
            starts = dict(zip(("day", "week", "month"), period_starts_ms(at_ms), strict=True))
            if starts[d.period] >= d.pstart:
                if starts[d.period] > d.pstart:
                    d.pstart, d.spent = starts[d.period], 0
                d.spent += amount
        c = self.creds.get(cred) if cred else None
        if c is not None:
            c.spent += amount

    def repaid(self, gid: str, rp: int) -> None:
        """A grant push that repaid debt first: the ledger holds the grant whole until
        settlement records the repayment (migrations/0035)."""
        if rp > 0:
            self.snap.debt -= rp
            g = self.grants.get(gid)
            if g is not None:
                g.rem -= rp

    def apply(self, ev: dict[str, Any]) -> None:
        t = ev["t"]
        at = int(ev.get("at", 0))
        if t == "use":
            self.debit(ev.get("g") or [])
            self.spend(ev.get("d", ""), ev.get("k", ""), int(ev["amt"]), at)
            self.snap.debt += int(ev.get("od") or 0)
        elif t == "use_batch":
            for item in ev["ev"]:
                self.debit(item.get("g") or [])
                self.spend(item.get("d", ""), ev.get("k", ""), int(item["amt"]), at)
                self.snap.debt += int(item.get("od") or 0)
        elif t == "grant_applied":
            self.repaid(ev["g"], int(ev.get("rp") or 0))
        elif t == "hold":
            alloc = ev.get("g") or []
            self.debit(alloc)
            self.spend(ev.get("d", ""), ev.get("k", ""), int(ev["amt"]), at)
            d = self.depts.get(ev.get("d", ""))
            self.holds[ev["r"]] = HoldSnapshot(
                id=ev["r"],
                a=int(ev["amt"]),
                al=list(alloc),
                d=ev.get("d", ""),
                ps=d.pstart if d is not None else 0,
                k=ev.get("k", ""),
                x=int(ev["x"]),
                act=ev.get("act", ""),
                o=int(ev.get("od") or 0),
            )
            self.snap.debt += int(ev.get("od") or 0)
        elif t == "hold_closed":
            h = self.holds.pop(ev["r"], None)
            if h is None:
                return
            charged = dict(_pairs(ev.get("g") or []))
            for gid, amount, score in _triples(h.al):
                back = amount - charged.get(gid, 0)
                if back > 0:
                    self.credit(gid, back, score)
            self.snap.debt -= int(ev.get("odr") or 0)  # what the line lent and was not used
            released = int(ev.get("rel", 0))
            d = self.depts.get(h.d) if h.d else None
            if d is not None and d.pstart == h.ps:
                d.spent = max(0, d.spent - released)
            c = self.creds.get(h.k) if h.k else None
            if c is not None:
                c.spent = max(0, c.spent - released)
        elif t == "grant_expired":
            self.grants.pop(ev["g"], None)
        elif t in ("adjustment", "refund"):
            self.debit(ev.get("g") or [])

    def result(self) -> Snapshot:
        s = self.snap
        s.grants = [g for g in self.grants.values() if g.rem > 0]
        s.holds = list(self.holds.values())
        return s


def replay(snapshot: Snapshot, events: Iterable[dict[str, Any]]) -> Snapshot:
    """The snapshot with the unsettled events applied, in stream order. An event that
    lacks what its type needs is left out (settlement quarantines it too)."""
    state = _State(snapshot)
    for ev in events:
        try:
            state.apply(ev)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("replay_skipped_malformed_event", extra={"type": str(ev.get("t")), "error": repr(exc)})
    return state.result()
