"""Group commit (lua/consume_group.lua, hotpath/group.py) against a real Redis: a group
answers each request exactly as consume answers it one by one, in arrival order."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from accounts import admin
from core.config import Config
from hotpath.client import GroupRequest, HotPath, Result, fingerprint, new_id, now_ms
from hotpath.group import ConsumeGroups
from hotpath.servers import RedisConnections
from ledger.store import Ledger
from lua import Status
from tests.conftest import Org

CREDIT = 1000


@pytest.fixture
async def piped_hot(pipelined: RedisConnections, ledger: Ledger, config: Config) -> AsyncIterator[HotPath]:
    """The hot path as the sidecar has it: script calls over the auto-pipelined connection."""
    path = HotPath.using(pipelined, ledger, config)
    await path.start()
    yield path


async def stream_events(redis: aioredis.Redis, hot: HotPath, org_id: str) -> list[dict[str, Any]]:
    rows = await redis.xrange(hot.stream_key(hot.partition(org_id)))
    return [msgspec.msgpack.decode(f[b"d"]) for _, f in rows if f[b"o"].decode() == org_id]


def use_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every charge, each with its credential, whether it came alone or in a batch."""
    out = []
    for ev in events:
        if ev["t"] == "use":
            out.append(ev)
        elif ev["t"] == "use_batch":
            out.extend({**item, "k": ev["k"]} for item in ev["ev"])
    return out


class World:
    """An organization with a department (10 credits a month), a capped key (5), a
    rate-limited key (burst 2, 1/s) and a revoked key."""

    def __init__(self, org: str, admin_key: str, dept: str, capped: str, limited: str, revoked: str) -> None:
        self.org, self.admin, self.dept = org, admin_key, dept
        self.capped, self.limited, self.revoked = capped, limited, revoked

    @classmethod
    async def make(cls, ledger: Ledger, hot: HotPath) -> World:
        org_id, key = await admin.create_organization(ledger, f"group-{uuid.uuid4().hex[:6]}")
        assert (await hot.balance(org_id)).status is Status.OK  # loaded
        dept = await ledger.create_department(org_id, "research")
        await ledger.set_department_limit(org_id, dept.id, 10 * CREDIT, "month")
        await hot.configure(org_id, "dept", dept.id, 10 * CREDIT, "month")
        capped = await admin.create_key(ledger, hot, org_id, role="agent", cap=5 * CREDIT)
        limited = await admin.create_key(ledger, hot, org_id, role="agent", rate_limit_per_s=1, rate_limit_burst=2)
        revoked = await admin.create_key(ledger, hot, org_id, role="agent")
        await admin.revoke_key(ledger, hot, org_id, revoked.id)
        return cls(org_id, key.id, dept.id, capped.id, limited.id, revoked.id)

    def requests(self) -> list[GroupRequest]:
        """A sequence that meets every answer a consume can give."""

        def r(
            cred: str, action: str, units: int, dept: str = "", key: str | None = None, assigned: bool = False
        ) -> GroupRequest:
            fp = fingerprint("use", action, units, dept, None) if key else ""
            return GroupRequest(cred, action, units, dept, "", key, fp, assigned, new_id())

        missing = str(uuid.UUID(int=7))
        return [
            r(self.admin, "generate_content", 3),  # OK
            r(self.capped, "generate_content", 4),  # OK
            r(self.capped, "generate_content", 2),  # CAP_EXCEEDED
            r(self.admin, "generate_content", 2, self.dept),  # OK
            r(self.admin, "generate_content", 9, self.dept),  # DEPARTMENT_LIMIT
            r(self.admin, "no_such_action", 1),  # UNKNOWN_ACTION
            r(self.admin, "generate_content", 1, missing),  # DEPARTMENT_NOT_FOUND
            r(self.limited, "tool_call", 1),  # OK
            r(self.limited, "tool_call", 1),  # OK
            r(self.limited, "tool_call", 1),  # RATE_LIMITED
            r(self.admin, "generate_content", 1, key="k1"),  # OK
            r(self.admin, "generate_content", 1, key="k1"),  # REPLAY of the one before
            r(self.admin, "generate_content", 2, key="k1"),  # IDEMPOTENCY_CONFLICT
            r(self.admin, "generate_content", 200),  # INSUFFICIENT_CREDITS
            r(self.admin, "generate_content", 1, key="auto_1", assigned=True),  # OK
            r(self.revoked, "generate_content", 1),  # UNAUTHENTICATED
            r(self.admin, "generate_content", 80),  # OK
            r(self.admin, "generate_content", 10),  # INSUFFICIENT_CREDITS (8.8 left)
            r(self.admin, "tool_call", 5),  # OK (the 0.5 credits it needs are there)
        ]


EXPECTED = [
    Status.OK,
    Status.OK,
    Status.CAP_EXCEEDED,
    Status.OK,
    Status.DEPARTMENT_LIMIT,
    Status.UNKNOWN_ACTION,
    Status.DEPARTMENT_NOT_FOUND,
    Status.OK,
    Status.OK,
    Status.RATE_LIMITED,
    Status.OK,
    Status.REPLAY,
    Status.IDEMPOTENCY_CONFLICT,
    Status.INSUFFICIENT_CREDITS,
    Status.OK,
    Status.UNAUTHENTICATED,
    Status.OK,
    Status.INSUFFICIENT_CREDITS,
    Status.OK,
]


def comparable(results: list[Result], requests: list[GroupRequest]) -> list[tuple[Status, dict[str, Any]]]:
    """Answers without the ids (each path draws its own), a replay's id as the index of
    the answer it replays."""
    ids = {r.payload.get("id"): i for i, r in enumerate(results) if r.status is Status.OK}
    out = []
    for r in results:
        p = dict(r.payload)
        if "id" in p:
            p["id"] = ids.get(p["id"], "?")
        out.append((r.status, p))
    return out


async def state(hot: HotPath, w: World) -> dict[str, Any]:
    b = (await hot.balance(w.org, department_id=w.dept)).payload
    creds = await hot.redis.hgetall(hot.org_key(w.org, "creds"))
    spent = {
        role: int(creds.get(f"{cred}|spent".encode(), 0))
        for role, cred in (("admin", w.admin), ("capped", w.capped), ("limited", w.limited))
    }
    return {"balance": b["balance"], "available": b["available"], "dept": b["dept"]["spent"], "spent": spent}


async def test_a_group_answers_each_request_as_one_by_one_would(
    hot: HotPath, ledger: Ledger, redis: aioredis.Redis
) -> None:
    alone, grouped = await World.make(ledger, hot), await World.make(ledger, hot)
    t = now_ms()
    one_by_one = []
    requests = alone.requests()
    for q in requests:
        one_by_one.append(
            await hot.consume(
                alone.org,
                q.cred,
                action=q.action,
                units=q.units,
                department_id=q.department_id,
                idempotency_key=q.idempotency_key,
                fp=q.fingerprint,
                assigned=q.assigned,
                now=t,
            )
        )
    group_requests = grouped.requests()
    together = await hot.consume_group(grouped.org, group_requests, now=t)
    assert [r.status for r in one_by_one] == EXPECTED
    assert comparable(together, group_requests) == comparable(one_by_one, requests)
    assert await state(hot, grouped) == await state(hot, alone)
    # Each answer's id is its own request's event id; the stream holds each charge once.
    charged = [q.event_id for q, r in zip(group_requests, together, strict=True) if r.status is Status.OK]
    assert [r.payload["id"] for r in together if r.status is Status.OK] == charged
    events = use_events(await stream_events(redis, hot, grouped.org))
    pairs = zip(group_requests, together, strict=True)
    admins = [q.event_id for q, r in pairs if r.status is Status.OK and q.cred == grouped.admin]
    assert [e["id"] for e in events if e["k"] == grouped.admin] == admins  # in arrival order
    assert sorted(e["id"] for e in events) == sorted(charged)
    alone_events = use_events(await stream_events(redis, hot, alone.org))
    shape = lambda evs, w: Counter(  # noqa: E731
        (e["act"], e["u"], e["amt"], e["d"] != "", {w.admin: "a", w.capped: "c", w.limited: "l"}[e["k"]]) for e in evs
    )
    assert shape(events, grouped) == shape(alone_events, alone)


async def test_idempotency_records_written_by_a_group_replay_alone(hot: HotPath, ledger: Ledger, org: Org) -> None:
    fp = fingerprint("use", "generate_content", 2, "", None)
    reqs = [
        GroupRequest(org.admin_key_id, "generate_content", 2, "", "", f"g-{i}", fp, False, new_id()) for i in range(5)
    ]
    first = await hot.consume_group(org.id, reqs)
    assert [r.status for r in first] == [Status.OK] * 5
    for i, r in enumerate(first):
        again = await hot.consume(
            org.id, org.admin_key_id, action="generate_content", units=2, idempotency_key=f"g-{i}", fp=fp
        )
        assert again.status is Status.REPLAY and again.payload == r.payload
    other = await hot.consume(
        org.id, org.admin_key_id, action="generate_content", units=3, idempotency_key="g-0", fp=fingerprint("x")
    )
    assert other.status is Status.IDEMPOTENCY_CONFLICT
    # And a group replays what a single consume stored.
    replays = await hot.consume_group(org.id, reqs[:2])
    assert [r.status for r in replays] == [Status.REPLAY] * 2
    assert [r.payload for r in replays] == [r.payload for r in first[:2]]
    assert (await hot.balance(org.id)).payload["balance"] == 90 * CREDIT


async def test_insufficient_credits_for_one_does_not_fail_the_others(hot: HotPath, org: Org) -> None:
    units = [60, 50, 30, 20, 10]
    reqs = [GroupRequest(org.admin_key_id, "generate_content", u, "", "", None, "", False, new_id()) for u in units]
    results = await hot.consume_group(org.id, reqs)
    assert [r.status for r in results] == [
        Status.OK,
        Status.INSUFFICIENT_CREDITS,
        Status.OK,
        Status.INSUFFICIENT_CREDITS,
        Status.OK,
    ]
    assert results[1].payload == {"available": 40 * CREDIT, "needed": 50 * CREDIT}
    assert [r.payload.get("balance") for r in results] == [40 * CREDIT, None, 10 * CREDIT, None, 0]
    assert (await hot.balance(org.id)).payload["balance"] == 0


async def test_a_group_loads_a_cold_organization_first(hot: HotPath, org: Org) -> None:
    await hot.evict(org.id)
    reqs = [GroupRequest(org.admin_key_id, "generate_content", 1, "", "", None, "", False, new_id()) for _ in range(3)]
    results = await hot.consume_group(org.id, reqs)
    assert [r.payload["balance"] for r in results] == [99 * CREDIT, 98 * CREDIT, 97 * CREDIT]


async def test_many_concurrent_clients_of_one_organization_coalesce_exactly(
    piped_hot: HotPath, ledger: Ledger, redis: aioredis.Redis, org: Org
) -> None:
    """400 clients, 10 consumes each, through the group commit: every answer its own,
    the balance exact, every charge in the stream once."""
    await admin.grant(ledger, piped_hot, org.id, amount=10_000 * CREDIT, source="admin", reason="load")
    groups = ConsumeGroups(piped_hot)
    keys = [await admin.create_key(ledger, piped_hot, org.id, role="agent") for _ in range(4)]

    async def client(n: int) -> list[Result]:
        out = []
        for i in range(10):
            out.append(
                await groups.consume(
                    org.id, keys[n % 4].id, action="tool_call", units=1 + (n + i) % 3, metadata=f'{{"n": "{n}"}}'
                )
            )
        return out

    results = [r for rs in await asyncio.gather(*(client(n) for n in range(400))) for r in rs]
    assert all(r.status is Status.OK for r in results)
    assert groups.stats.groups > 0 and groups.stats.grouped > groups.stats.groups  # it did coalesce
    charged = sum(r.payload["credits"] for r in results)
    assert charged == sum(100 * (1 + (n + i) % 3) for n in range(400) for i in range(10))
    assert (await piped_hot.balance(org.id)).payload["balance"] == 10_100 * CREDIT - charged
    ids = [r.payload["id"] for r in results]
    assert len(set(ids)) == len(ids) == 4000
    events = use_events(await stream_events(redis, piped_hot, org.id))
    assert sorted(e["id"] for e in events) == sorted(ids)
    assert sum(e["amt"] for e in events) == charged


async def test_concurrent_retries_of_one_key_through_groups_charge_once(piped_hot: HotPath, org: Org) -> None:
    groups = ConsumeGroups(piped_hot)
    fp = fingerprint("use", "generate_content", 1, "", None)

    async def one() -> Result:
        return await groups.consume(
            org.id, org.admin_key_id, action="generate_content", units=1, idempotency_key="same", fp=fp
        )

    results = await asyncio.gather(*(one() for _ in range(60)))
    assert [r.status for r in results].count(Status.OK) == 1
    assert all(r.status in (Status.OK, Status.REPLAY) for r in results)
    assert len({r.payload["id"] for r in results}) == 1
    assert groups.stats.groups > 0
    assert (await piped_hot.balance(org.id)).payload["balance"] == 99 * CREDIT


async def test_a_request_cancelled_while_it_waits_is_never_sent(piped_hot: HotPath, org: Org) -> None:
    groups = ConsumeGroups(piped_hot)
    await piped_hot.balance(org.id)

    def consume() -> asyncio.Task[Result]:
        return asyncio.ensure_future(groups.consume(org.id, org.admin_key_id, action="generate_content", units=1))

    first = consume()
    await asyncio.sleep(0)  # in flight
    waiting = consume()
    await asyncio.sleep(0)  # waiting behind it
    waiting.cancel()
    assert (await first).status is Status.OK
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.05)
    assert (await piped_hot.balance(org.id)).payload["balance"] == 99 * CREDIT
