"""How the hot path follows a cluster's redirects (hotpath/cluster.py), without servers:
the slot map is set by hand and `send` plays the servers' answers."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hotpath import cluster as cluster_module
from hotpath.cluster import Cluster, ClusterConfigError, Node, check_cluster_url, redirect, slot_of


def test_redirects_are_read_and_other_errors_are_not() -> None:
    assert redirect(ResponseError("MOVED 3999 127.0.0.1:6381")) == ("MOVED", 3999, "127.0.0.1", 6381)
    assert redirect(ResponseError("ASK 12 10.0.0.7:7000")) == ("ASK", 12, "10.0.0.7", 7000)
    assert redirect(ResponseError("MOVED 12 :7000")) == ("MOVED", 12, "", 7000)  # host: the node asked
    assert redirect(ResponseError("ERR unknown command")) is None
    assert redirect(ResponseError("TRYAGAIN Multiple keys request during rehashing of slot")) is None


def test_the_hash_tag_decides_the_slot() -> None:
    assert slot_of("{cr7}") == slot_of("cr:{cr7}:o:abc:acct") == slot_of("cr7")
    assert slot_of("{cr7}") != slot_of("{cr8}")


def test_a_cluster_url_naming_a_database_is_refused() -> None:
    check_cluster_url("redis://127.0.0.1:7000")
    check_cluster_url("redis://127.0.0.1:7000/0")
    with pytest.raises(ClusterConfigError, match="database 3"):
        check_cluster_url("redis://127.0.0.1:7000/3")


def cluster_of(*ports: int) -> Cluster:
    c = Cluster("redis://127.0.0.1:7000")
    nodes = [c._node("127.0.0.1", p) for p in ports]
    c._primaries = nodes
    for slot in range(len(c._slots)):
        c._slots[slot] = nodes[slot * len(nodes) // len(c._slots)]
    c._refreshed_at = float("inf")  # no background refresh in these tests
    return c


async def test_moved_corrects_the_map_and_resends() -> None:
    c = cluster_of(7000, 7001)
    slot = 10
    calls: list[tuple[int, bool]] = []

    async def send(node: Node, asking: bool) -> Any:
        calls.append((node.port, asking))
        if node.port == 7000:
            raise ResponseError(f"MOVED {slot} 127.0.0.1:7001")
        return "ran"

    assert await c.route(slot, send) == "ran"
    assert calls == [(7000, False), (7001, False)]
    assert c.node(slot).port == 7001  # the next call goes straight there
    await c.close()


async def test_ask_resends_once_with_asking_and_keeps_the_map() -> None:
    c = cluster_of(7000, 7001)
    calls: list[tuple[int, bool]] = []

    async def send(node: Node, asking: bool) -> Any:
        calls.append((node.port, asking))
        if node.port == 7000:
            raise ResponseError("ASK 10 127.0.0.1:7001")
        assert asking, "the target answers ASK-redirected commands only after ASKING"
        return "ran"

    assert await c.route(10, send) == "ran"
    assert calls == [(7000, False), (7001, True)]
    assert c.node(10).port == 7000  # the slot is still migrating: the map stays
    await c.close()


async def test_tryagain_is_waited_out_then_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_module, "TRYAGAIN_WAITS_S", (0.0, 0.0))
    c = cluster_of(7000)
    tries = 0

    async def busy(node: Node, asking: bool) -> Any:
        nonlocal tries
        tries += 1
        raise ResponseError("TRYAGAIN Multiple keys request during rehashing of slot")

    with pytest.raises(ResponseError, match="TRYAGAIN"):
        await c.route(1, busy)
    assert tries == 3  # the first try and two waits

    tries = 0

    async def settles(node: Node, asking: bool) -> Any:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise ResponseError("TRYAGAIN Multiple keys request during rehashing of slot")
        return "ran"

    assert await c.route(1, settles) == "ran"
    await c.close()


async def test_redirect_loops_end() -> None:
    c = cluster_of(7000, 7001)

    async def bounce(node: Node, asking: bool) -> Any:
        other = 7001 if node.port == 7000 else 7000
        raise ResponseError(f"MOVED 10 127.0.0.1:{other}")

    with pytest.raises(ResponseError, match="MOVED"):
        await c.route(10, bounce)
    await c.close()


async def test_an_unreachable_primary_asks_for_the_map_again() -> None:
    c = cluster_of(7000)
    c._refreshed_at = 0.0
    refreshed: list[bool] = []

    async def refresh() -> None:
        refreshed.append(True)

    c.refresh = refresh  # type: ignore[method-assign]

    async def down(node: Node, asking: bool) -> Any:
        raise aioredis.ConnectionError("connection refused")

    with pytest.raises(aioredis.ConnectionError):
        await c.route(1, down)
    assert c._refreshing is not None
    await c._refreshing
    assert refreshed == [True]
    await c.close()


async def test_a_slot_nobody_serves_is_unreachable() -> None:
    c = cluster_of(7000)
    c._slots[5] = None
    with pytest.raises(aioredis.ConnectionError, match="slot 5"):
        c.node(5)
    await c.close()
