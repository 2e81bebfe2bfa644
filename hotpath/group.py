"""Group commit for the consumes of one organization (the sidecar's /use).

One Redis runs one script at a time, so an organization that every agent charges at
once is bounded by its script time per consume (~45 us: ~22k consumes/s, however many
sidecars). Most of that time is the same work every call repeats: the preamble, the
expiry sweeps, reading the balance and the grants, writing them back. So, as
TigerBeetle batches transfers: while a call for an organization is in flight, this
process's next consumes of that organization wait, and go together in one call
(lua/consume_group.lua) as soon as it returns, each decided in arrival order and
answered on its own (result, idempotency record, refusal).

- No added latency without contention: a consume of an organization with nothing in
  flight is sent at once, alone, as the plain consume script (the path it always took).
- At most one call per organization in flight from this process, and a group of at most
  `max_group` requests (the rest wait for the next one); a group of one is a plain consume.
- A request cancelled before its group is sent is left out: it was never sent, so never
  charged.
- A failure of the call (Redis unreachable, no answer) is each request's own: each gets
  its own copy of the exception (the handler writes its own key into it).
- At most `waiting_max` requests of one organization wait; past that a request is
  refused at once (Unavailable: never sent, nothing charged), as the pipe refuses.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import NamedTuple

from core.errors import Unavailable
from hotpath.client import GroupRequest, HotPath, Result, new_id

GROUP_MAX = 256  # requests per call: bounds one call's script time (~2 ms) and reply
WAITING_MAX = 16_384  # requests of one organization waiting behind its call (the pipe's own bound)


class _Waiting(NamedTuple):
    request: GroupRequest
    future: asyncio.Future[Result]


@dataclass
class GroupStats:
    """Counters for /metrics: calls sent, and requests they carried."""

    alone: int = 0  # consumes sent at once (nothing in flight), or a group of one
    groups: int = 0  # consume_group calls
    grouped: int = 0  # requests those carried
    largest: int = 0

    def observe(self, size: int) -> None:
        if size == 1:
            self.alone += 1
            return
        self.groups += 1
        self.grouped += size
        self.largest = max(self.largest, size)


class ConsumeGroups:
    """HotPath.consume, coalescing concurrent consumes of one organization (see above).
    One per process (one event loop)."""

    def __init__(
        self,
        hot: HotPath,
        *,
        max_group: int = GROUP_MAX,
        waiting_max: int = WAITING_MAX,
        stats: GroupStats | None = None,
    ) -> None:
        if max_group < 1 or waiting_max < 1:
            raise ValueError("max_group and waiting_max must be at least 1")
        self.hot = hot
        self.max_group = max_group
        self.waiting_max = waiting_max
        self.stats = GroupStats() if stats is None else stats
        # An organization is here while a call of it is in flight; its list holds the
        # requests that arrived meanwhile, in arrival order.
        self._waiting: dict[str, list[_Waiting]] = {}
        # Bound at first use (Python 3.11 asks the OS for its pid on every
        # get_running_loop(): a system call per request); one loop per instance.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def consume(
        self,
        org: str,
        cred: str,
        *,
        action: str,
        units: int,
        department_id: str = "",
        metadata: str = "",
        idempotency_key: str | None = None,
        fp: str = "",
        assigned: bool = False,
    ) -> Result:
        queue = self._waiting.get(org)
        if queue is None:  # nothing in flight: at once, alone
            self._waiting[org] = []
            self.stats.alone += 1
            try:
                return await self.hot.consume(
                    org,
                    cred,
                    action=action,
                    units=units,
                    department_id=department_id,
                    metadata=metadata,
                    idempotency_key=idempotency_key,
                    fp=fp,
                    assigned=assigned,
                )
            finally:
                self._next(org)
        if len(queue) >= self.waiting_max:
            raise Unavailable(
                f"more than {self.waiting_max} consumes of one organization waiting for Redis",
                answer="Redis is not keeping up with this organization's charges; nothing was charged",
            )
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        request = GroupRequest(cred, action, units, department_id, metadata, idempotency_key, fp, assigned, new_id())
        queue.append(_Waiting(request, future))
        return await future

    def _next(self, org: str) -> None:
        """The call in flight for `org` returned: send what waited, or leave."""
        queue = self._waiting.get(org)
        live = [w for w in queue if not w.future.done()] if queue else []
        if not live:
            self._waiting.pop(org, None)
            return
        group, self._waiting[org] = live[: self.max_group], live[self.max_group :]
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(self._send(org, group))
        task.add_done_callback(lambda _: self._next(org))

    async def _send(self, org: str, group: list[_Waiting]) -> None:
        self.stats.observe(len(group))
        try:
            if len(group) == 1:
                r = group[0].request
                results = [
                    await self.hot.consume(
                        org,
                        r.cred,
                        action=r.action,
                        units=r.units,
                        department_id=r.department_id,
                        metadata=r.metadata,
                        idempotency_key=r.idempotency_key,
                        fp=r.fingerprint,
                        assigned=r.assigned,
                    )
                ]
            else:
                results = await self.hot.consume_group(org, [w.request for w in group])
        except Exception as exc:
            for w in group:
                if not w.future.done():
                    w.future.set_exception(copy.copy(exc))
            return
        for w, result in zip(group, results, strict=True):
            if not w.future.done():
                w.future.set_result(result)
