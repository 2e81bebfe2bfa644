"""A small pure-Python model of one organization's money, written from the README's
rules (not from the scripts): what each operation must answer and what it must change.

Amounts are millicredits. Time is the model's own clock (ms); the hot path is called
with the same `now`. The model keeps what the cache must agree with after every step:
grants in burn-down order (priority, then soonest expiry, then id), open holds, the
balance (grants remaining + open holds), the reserved amount, each department's spend
in its current period and each credential's lifetime spend, and the idempotency
records (key -> fingerprint and first answer).

Rules, from README "Semantics worth knowing" and DESIGN.md:
- Expired holds return to `available` before any other operation is decided; an
  expired grant is never spent and leaves the balance.
- Every check runs before any charge: a refusal charges nothing.
- A reservation takes its amount from the grants at reserve time; a release charges
  `used` (<= the hold) from the hold's allocation in order and returns the rest to the
  grants it came from; department and key get back what was not used.
- Idempotency records only successes; the same key with other parameters is refused.
- A new department period starts counting at zero.
- Credit line (README "Credit lines"): usage and holds may take `available` down to
  minus the limit (adjustments never); what a charge or hold takes past the grants is
  debt; a release charges the hold's grants first, and what the line lent and was not
  used leaves the debt; a grant pushed to the cache repays the debt first (but not
  what open holds took on the line: their release settles that), the rest is
  spendable. So balance == grants remaining + open holds - debt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.periods import period_starts_ms
from lua import Status

SCORE_SCALE = 10**13  # as the cache orders grants: priority * 1e13 + expiry (ms)
NEVER = SCORE_SCALE - 1
PERIODS = ("day", "week", "month")


def score(priority: int, expires_ms: int) -> int:
    return priority * SCORE_SCALE + (expires_ms if expires_ms > 0 else NEVER)


@dataclass
class Grant:
    id: str
    remaining: int
    score: int

    @property
    def expires_ms(self) -> int:
        exp = self.score % SCORE_SCALE
        return 0 if exp == NEVER else exp


@dataclass
class Hold:
    id: str
    amount: int
    alloc: list[tuple[str, int, int]]  # (grant id, amount, score) in the order taken
    dept: str
    period_start: int  # of the department's period when reserved (0: no department)
    cred: str
    expires_ms: int
    status: str = "open"  # open | released | expired
    used: int = 0
    od: int = 0  # the part on the credit line


@dataclass
class Dept:
    limit: int  # -1: none
    period: str
    period_start: int = 0
    spent: int = 0


@dataclass
class Cred:
    cap: int  # -1: none
    spent: int = 0


@dataclass
class Answer:
    """What the model says an operation answers: a status and, for OK, the amounts."""

    status: Status
    payload: dict[str, Any] = field(default_factory=dict)


class Money:
    """One organization. `now` is set by the caller before each operation."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.grants: dict[str, Grant] = {}
        self.holds: dict[str, Hold] = {}  # every hold the cache knows (open and closed)
        self.costs: dict[str, int] = {}
        self.depts: dict[str, Dept] = {}
        self.creds: dict[str, Cred] = {}
        self.idem: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (fingerprint, first payload)
        self.balance = 0
        self.reserved = 0
        self.limit = 0  # the credit line
        self.debt = 0
        self.max_limit = 0  # the highest limit set (a lower one keeps what is owed)
        self._pushed: set[str] = set()
        # What the ledger must end up holding, once settled.
        self.uses: dict[str, int] = {}  # usage event id -> credits
        self.captured = 0  # sum of `used` of released holds
        self.expired = 0  # credits that left with expired grants
        self.adjusted = 0  # credits taken by adjustments
        self.granted = 0

    # -- what the cache must show -------------------------------------------------
    @property
    def available(self) -> int:
        return self.balance - self.reserved

    def queue(self) -> list[Grant]:
        """The live grants in burn-down order, as the cache lists them."""
        return sorted((g for g in self.grants.values() if g.remaining > 0), key=lambda g: (g.score, g.id))

    def usable(self) -> int:
        return sum(g.remaining for g in self.queue())

    def dept_spent(self, dept_id: str) -> int:
        d = self.depts[dept_id]
        return d.spent if d.period_start >= self._period_start(d) else 0

    def open_holds(self) -> list[Hold]:
        return [h for h in self.holds.values() if h.status == "open"]

    # -- configuration (mirrors what the test configures) ---------------------------
    def add_grant(self, grant_id: str, amount: int, priority: int, expires_ms: int) -> None:
        """A grant the ledger holds, pushed to the cache (counted once by id)."""
        if grant_id in self._pushed:
            return
        self._pushed.add(grant_id)
        on_holds = sum(h.od for h in self.open_holds())
        repaid = min(amount, max(0, self.debt - on_holds))  # the debt first
        self.debt -= repaid
        if amount > repaid:
            self.grants[grant_id] = Grant(grant_id, amount - repaid, score(priority, expires_ms))
        self.balance += amount
        self.granted += amount
        self._expire_grants()

    # -- time ----------------------------------------------------------------------
    def _period_start(self, d: Dept) -> int:
        return dict(zip(PERIODS, period_starts_ms(self.now), strict=True))[d.period]

    def _dept_now(self, dept_id: str) -> Dept:
        """The department as of now: a new period counts from zero."""
        d = self.depts[dept_id]
        current = self._period_start(d)
        if d.period_start < current:
            d.period_start, d.spent = current, 0
        return d

    def sweep(self) -> None:
        """Expired holds return to available; then expired grants leave the balance."""
        for h in sorted(self.open_holds(), key=lambda h: (h.expires_ms, h.id)):
            if h.expires_ms <= self.now:
                self._close(h, 0, "expired")
        self._expire_grants()

    def _expire_grants(self) -> None:
        for g in list(self.grants.values()):
            if g.expires_ms and g.expires_ms <= self.now:
                del self.grants[g.id]
                self.balance -= g.remaining
                self.expired += g.remaining

    # -- spending --------------------------------------------------------------------
    def _take(self, amount: int) -> list[tuple[str, int, int]]:
        alloc = []
        for g in self.queue():
            if amount <= 0:
                break
            t = min(g.remaining, amount)
            g.remaining -= t
            amount -= t
            alloc.append((g.id, t, g.score))
        assert amount == 0, "the caller checked that enough is usable"
        for g in [g for g in self.grants.values() if g.remaining == 0]:
            del self.grants[g.id]  # spent: leaves the queue
        return alloc

    def _return(self, grant_id: str, amount: int, grant_score: int) -> None:
        g = self.grants.get(grant_id)
        if g is None:
            self.grants[grant_id] = Grant(grant_id, amount, grant_score)
        else:
            g.remaining += amount

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.max_limit = max(self.max_limit, limit)

    def _refusal(self, charge: int, dept_id: str, cred_id: str) -> Answer | None:
        """The first budget a charge would break (organization, department, key)."""
        usable = self.available
        if charge > usable + self.limit:
            return Answer(Status.INSUFFICIENT_CREDITS, {"available": usable, "needed": charge})
        if dept_id:
            d = self._dept_now(dept_id)
            if d.limit >= 0 and d.spent + charge > d.limit:
                return Answer(Status.DEPARTMENT_LIMIT, {"remaining": max(0, d.limit - d.spent), "needed": charge})
        c = self.creds[cred_id]
        if c.cap >= 0 and c.spent + charge > c.cap:
            return Answer(Status.CAP_EXCEEDED, {"remaining": max(0, c.cap - c.spent), "needed": charge})
        return None

    def _charge(self, charge: int, dept_id: str, cred_id: str) -> list[tuple[str, int, int]]:
        from_grants = min(charge, self.usable())
        alloc = self._take(from_grants)
        self.debt += charge - from_grants  # past the grants: on the credit line
        if dept_id:
            d = self._dept_now(dept_id)
            d.spent += charge
        self.creds[cred_id].spent += charge
        return alloc

    def _replay(self, key: str | None, fp: str) -> Answer | None:
        if key is None or key not in self.idem:
            return None
        stored_fp, payload = self.idem[key]
        if stored_fp != fp:
            return Answer(Status.IDEMPOTENCY_CONFLICT)
        return Answer(Status.REPLAY, payload)

    def _unknown(self, action: str, dept_id: str) -> Answer | None:
        if action not in self.costs:
            return Answer(Status.UNKNOWN_ACTION)
        if dept_id and dept_id not in self.depts:
            return Answer(Status.DEPARTMENT_NOT_FOUND)
        return None

    # -- operations --------------------------------------------------------------------
    def consume(self, cred: str, action: str, units: int, dept: str, key: str | None, fp: str) -> Answer:
        """What a consume must answer; on OK the caller calls `consumed(event id)`."""
        replay = self._replay(key, fp)
        if replay is not None:
            return replay
        self.sweep()
        refused = self._unknown(action, dept) or self._refusal(self.costs[action] * units, dept, cred)
        if refused is not None:
            return refused
        charge = self.costs[action] * units
        self._charge(charge, dept, cred)
        self.balance -= charge
        return Answer(Status.OK, {"credits": charge, "balance": self.balance, "available": self.available})

    def consumed(self, event_id: str, credits: int) -> None:
        """A charge the hot path acknowledged under `event_id`: the ledger must hold it once."""
        assert event_id not in self.uses, f"event id {event_id} given twice"
        self.uses[event_id] = credits

    def remember(self, key: str | None, fp: str, payload: dict[str, Any]) -> None:
        """A success under an idempotency key: a retry answers `payload` again."""
        if key is not None:
            self.idem[key] = (fp, payload)

    def batch(
        self, cred: str, items: list[tuple[str, int, str, str | None, str]], *, atomic: bool
    ) -> tuple[Answer, list[dict[str, Any]]]:
        """Items (action, units, dept, key, fingerprint), in order. Returns the answer and
        per item {ok, credits, replay?, key, fp} or {ok: False, err}. The caller records
        the charged ones (`consumed`, `remember`) under the ids the hot path gave them."""
        self.sweep()
        usable = self.available
        results: list[dict[str, Any]] = []
        plan: list[tuple[int, str]] = []  # (charge, dept) of the items to charge, in order
        spent_dept: dict[str, int] = {}
        spent_cred = 0
        for i, (action, units, dept, key, fp) in enumerate(items):
            replay = self._replay(key, fp)
            failure: Answer | None
            if replay is not None and replay.status is Status.REPLAY:
                results.append({"ok": True, "replay": True, **replay.payload})
                continue
            failure = replay or self._unknown(action, dept)
            charge = 0
            if failure is None:
                charge = self.costs[action] * units
                failure = self._batch_refusal(charge, dept, cred, usable, spent_dept, spent_cred)
            if failure is not None:
                if atomic:
                    return Answer(Status.ITEM_FAILED, {"i": i, "err": int(failure.status)}), []
                results.append({"ok": False, "err": failure.status})
                continue
            usable -= charge
            spent_cred += charge
            if dept:
                spent_dept[dept] = spent_dept.get(dept, 0) + charge
            plan.append((charge, dept))
            results.append({"ok": True, "credits": charge, "key": key, "fp": fp})
        total = 0
        for charge, dept in plan:
            self._charge(charge, dept, cred)
            total += charge
        self.balance -= total
        return Answer(Status.OK, {"balance": self.balance, "available": self.available}), results

    def _batch_refusal(
        self, charge: int, dept: str, cred: str, usable: int, spent_dept: dict[str, int], spent_cred: int
    ) -> Answer | None:
        """_refusal, counting what earlier items of the same batch take."""
        if charge > usable + self.limit:
            return Answer(Status.INSUFFICIENT_CREDITS)
        if dept:
            d = self._dept_now(dept)
            if d.limit >= 0 and d.spent + spent_dept.get(dept, 0) + charge > d.limit:
                return Answer(Status.DEPARTMENT_LIMIT)
        c = self.creds[cred]
        if c.cap >= 0 and c.spent + spent_cred + charge > c.cap:
            return Answer(Status.CAP_EXCEEDED)
        return None

    def reserve(self, cred: str, amount: int, ttl_ms: int, dept: str, key: str | None, fp: str) -> Answer:
        replay = self._replay(key, fp)
        if replay is not None:
            return replay
        self.sweep()
        if dept and dept not in self.depts:
            return Answer(Status.DEPARTMENT_NOT_FOUND)
        refused = self._refusal(amount, dept, cred)
        if refused is not None:
            return refused
        self.reserved += amount
        return Answer(
            Status.OK,
            {"amount": amount, "expires_ms": self.now + ttl_ms, "balance": self.balance, "available": self.available},
        )

    def reserved_as(self, hold_id: str, cred: str, amount: int, ttl_ms: int, dept: str) -> Hold:
        """The hold of an OK reserve (the id comes from the hot path)."""
        debt = self.debt
        alloc = self._charge(amount, dept, cred)
        period_start = self._dept_now(dept).period_start if dept else 0
        hold = Hold(hold_id, amount, alloc, dept, period_start, cred, self.now + ttl_ms, od=self.debt - debt)
        self.holds[hold_id] = hold
        return hold

    def release(self, hold_id: str, used: int, key: str | None, fp: str) -> Answer:
        replay = self._replay(key, fp)
        if replay is not None:
            return replay
        self.sweep()
        h = self.holds.get(hold_id)
        if h is None:
            return Answer(Status.NOT_FOUND)
        if h.status != "open":
            return Answer(Status.RESERVATION_CLOSED, {"how": h.status, "used": h.used})
        if used > h.amount:
            return Answer(Status.USED_EXCEEDS_HOLD, {"amount": h.amount})
        released = self._close(h, used, "released")
        self._expire_grants()
        payload = {"id": hold_id, "used": used, "released": released, "balance": self.balance}
        return Answer(Status.OK, {**payload, "available": self.available})

    def _close(self, h: Hold, used: int, how: str) -> int:
        to_charge = used
        for grant_id, amount, grant_score in h.alloc:
            c = min(amount, to_charge)
            to_charge -= c
            if amount - c > 0:
                self._return(grant_id, amount - c, grant_score)
        self.debt -= h.od - to_charge  # what the line lent and was not used
        released = h.amount - used
        if h.dept and released > 0:
            d = self._dept_now(h.dept)
            if d.period_start == h.period_start:
                d.spent = max(0, d.spent - released)
        if released > 0:
            c = self.creds[h.cred]
            c.spent = max(0, c.spent - released)
        self.balance -= used
        self.reserved -= h.amount
        self.captured += used
        h.status, h.used = how, used
        return released

    def adjust_down(self, amount: int) -> Answer:
        """An adjustment down: all or nothing, never below zero (no key: the caller
        keeps the references)."""
        self._expire_grants()
        usable = self.available
        if amount > usable:
            return Answer(Status.INSUFFICIENT_CREDITS, {"available": usable, "needed": amount})
        self._take(amount)
        self.balance -= amount
        self.adjusted += amount
        return Answer(Status.OK, {"debited": amount, "balance": self.balance, "available": self.available})

    def reloaded(self) -> None:
        """A cold load from the ledger: only open holds come back (a closed one is
        unknown to the reloaded cache); every amount stays what it was."""
        self.holds = {h.id: h for h in self.open_holds()}
