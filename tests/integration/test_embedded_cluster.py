"""ops.embedded_cluster: a real Valkey cluster the project forms itself, and its faults.

These tests start clusters of their own in temporary directories (they run in every
mode, TEST_REDIS=cluster or not) and check them with redis-py's own cluster client
(``redis.asyncio.cluster.RedisCluster``) and raw commands to single nodes. Every wait is
a bounded poll of the cluster's state; the figures printed (formation and failover
times) are for reading, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Iterator

import psutil
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, ResponseError

from ops.embedded_cluster import SLOTS, ClusterNode, EmbeddedCluster

REPO = pathlib.Path(__file__).resolve().parents[2]

# redis-py's async RedisCluster drops the nodes it replaces on a topology change (MOVED
# after a migration or failover) without awaiting their disconnection, and their
# finalizers warn (redis/redis-py#3572, fixed after 5.3). The warning is about the
# client's bookkeeping, not about the cluster under test.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unclosed ClusterNode object:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:unclosed Connection <redis.asyncio.connection:ResourceWarning"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """3 masters with one replica each, shared by the tests that leave it whole."""
    began = time.monotonic()
    with EmbeddedCluster(tmp_path_factory.mktemp("cluster") / "data") as c:
        print(f"\n3+3 cluster formed in {time.monotonic() - began:.2f} s")
        yield c


@pytest.fixture
async def client(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    rc = RedisCluster.from_url(cluster.urls()[0])
    try:
        yield rc
    finally:
        await rc.aclose()


def raw(node: ClusterNode) -> aioredis.Redis:
    """One node, no redirections followed; one connection, so ASKING holds for the next command."""
    return aioredis.Redis(host=node.host, port=node.port, single_connection_client=True)


def keys_in_slot(cluster: EmbeddedCluster, tag: str, n: int) -> list[str]:
    keys = [f"{{{tag}}}:{i}" for i in range(n)]
    assert len({cluster.slot_for_key(k) for k in keys}) == 1
    return keys


def valkey_processes_in(directory: pathlib.Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if (
                proc.info["name"] == "valkey-server"
                and proc.status() != psutil.STATUS_ZOMBIE
                and pathlib.Path(proc.cwd()).is_relative_to(directory)
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


async def redirection(command: Awaitable[object]) -> tuple[str, int, int]:
    """The redirection a single-node client got: ("ASK" or "MOVED", slot, port)."""
    with pytest.raises(ResponseError) as error:
        await command
    if isinstance(error.value, AskError):  # parsed by redis-py (MovedError is one too)
        kind = "MOVED" if isinstance(error.value, MovedError) else "ASK"
        return kind, error.value.slot_id, error.value.port
    kind, slot, address = str(error.value).split()
    return kind, int(slot), int(address.rsplit(":", 1)[1])


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------- formation


async def test_the_cluster_covers_every_slot_with_three_masters_and_three_replicas(
    cluster: EmbeddedCluster, client: RedisCluster
) -> None:
    nodes = cluster.nodes
    masters = [n for n in nodes if n.is_master]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(masters) == 3 and len(replicas) == 3
    assert all(n.state == "running" and n.pid for n in nodes)
    covered = sorted(s for m in masters for start, end in m.slots for s in range(start, end + 1))
    assert covered == list(range(SLOTS))  # every slot once: no gap, no overlap
    assert sorted(r.master_id for r in replicas) == sorted(m.id for m in masters)  # one replica each
    assert cluster.urls()[0] in cluster.primary_urls()
    assert len({n.port for n in nodes} | {n.bus_port for n in nodes}) == 12

    for node in nodes:
        r = raw(node)
        try:
            info = await r.cluster("INFO")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_assigned"]) == SLOTS and int(info["cluster_known_nodes"]) == 6
            config = await r.config_get("*")
            assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
            assert config["maxmemory-policy"] == "noeviction"
            assert int(config["cluster-node-timeout"]) == cluster.node_timeout_ms
        finally:
            await r.aclose()

    # The cluster client sees the same map.
    seen = await client.cluster_slots()
    owners = {(start, end): value["primary"][1] for (start, end), value in seen.items()}
    assert owners == {(start, end): m.port for m in masters for start, end in m.slots}


async def test_keys_spread_over_every_master(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    keys = [f"spread:{i}" for i in range(300)]
    for key in keys:
        await client.set(key, key)
    owners = {cluster.node_for_key(k).index for k in keys}
    assert owners == {m.index for m in cluster.primaries()}
    for key in keys[:30]:
        owner = raw(cluster.node_for_key(key))
        try:
            assert await owner.get(key) == key.encode()
        finally:
            await owner.aclose()
    assert await client.mget_nonatomic(keys) == [k.encode() for k in keys]


# ---------------------------------------------------------------------- slot migration


async def test_a_half_done_migration_answers_ask_for_moved_keys(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    keys = keys_in_slot(cluster, "half", 10)
    slot = cluster.slot_for_key(keys[0])
    for key in keys:
        await client.set(key, f"v-{key}")
    source = cluster.node_for_slot(slot)
    target = next(m for m in cluster.primaries() if m.index != source.index)

    migration = await asyncio.to_thread(cluster.begin_migration, slot, target)
    moved = [k.decode() for k in await asyncio.to_thread(cluster.migrate_some_keys, migration, 4)]
    assert len(moved) == 4 and migration.moved == 4
    still = [k for k in keys if k not in moved]
    assert cluster.node(source).migrating == {slot: target.id}
    assert cluster.node(target).importing == {slot: source.id}

    at_source, at_target = raw(source), raw(target)
    try:
        # The source answers for what it still has, and sends ASK for the rest.
        assert await at_source.get(still[0]) == f"v-{still[0]}".encode()
        assert await redirection(at_source.get(moved[0])) == ("ASK", slot, target.port)
        # A new key goes to the target.
        assert await redirection(at_source.set("{half}:new", "x")) == ("ASK", slot, target.port)
        # Keys on both sides: TRYAGAIN.
        with pytest.raises(ResponseError, match="TRYAGAIN"):
            await at_source.mget([still[0], moved[0]])
        # The target serves the slot only after ASKING, and only for that one command.
        assert await redirection(at_target.get(moved[0])) == ("MOVED", slot, source.port)
        await at_target.execute_command("ASKING")
        assert await at_target.get(moved[0]) == f"v-{moved[0]}".encode()
        assert await redirection(at_target.get(moved[1])) == ("MOVED", slot, source.port)
    finally:
        await at_source.aclose()
        await at_target.aclose()

    # A client that follows ASK reads every key mid-migration, one key at a time (an
    # MGET over both sides would get TRYAGAIN until the slot has moved).
    assert [await client.get(k) for k in keys] == [f"v-{k}".encode() for k in keys]

    total = await asyncio.to_thread(cluster.finish_migration, migration)
    assert total == len(keys)
    assert cluster.node_for_slot(slot).index == target.index
    at_target = raw(target)
    try:
        assert await at_target.mget(keys) == [f"v-{k}".encode() for k in keys]
        assert await at_target.cluster("COUNTKEYSINSLOT", slot) == len(keys)
    finally:
        await at_target.aclose()
    assert not cluster.node(source).migrating and not cluster.node(target).importing


async def test_a_slot_migrates_with_its_keys_while_writes_go_on(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    keys = keys_in_slot(cluster, "moving", 200)
    slot = cluster.slot_for_key(keys[0])
    for key in keys:
        await client.set(key, 0)
    source = cluster.node_for_slot(slot)
    target = next(m for m in cluster.primaries() if m.index != source.index)

    # Writers: INCRs on keys of other slots, and on the migrating slot's own keys (the
    # client follows ASK to the target for keys already moved). One cluster client each:
    # redis-py's client closes every connection on its fifth MOVED, and a command in
    # flight on a connection closed under it is sent again, so an INCR of the other writer
    # would count twice (seen here: 3 for 2 acknowledged). A client that resends a
    # command whose outcome it cannot know is not what this test is about.
    acked: dict[str, int] = {}
    stop = asyncio.Event()
    started = asyncio.Event()

    async def writer(targets: list[str]) -> None:
        own = RedisCluster.from_url(cluster.urls()[0])
        try:
            i = 0
            while not stop.is_set():
                key = targets[i % len(targets)]
                await own.incr(key)
                acked[key] = acked.get(key, 0) + 1
                i += 1
                if i == 20:
                    started.set()
        finally:
            await own.aclose()

    others = [f"busy:{i}" for i in range(50)]
    tasks = [asyncio.create_task(writer(others)), asyncio.create_task(writer(keys))]
    await started.wait()
    moved = await asyncio.to_thread(cluster.migrate_slot, slot, target, batch=20)
    stop.set()
    await asyncio.gather(*tasks)

    assert moved == len(keys)
    assert sum(acked.get(k, 0) for k in others) > 0
    assert cluster.node_for_slot(slot).index == target.index
    at_target, at_source = raw(target), raw(source)
    try:
        # Every key of the slot is on its new owner, with every acknowledged INCR.
        values = await at_target.mget(keys)
        assert [int(v) for v in values] == [acked.get(k, 0) for k in keys]
        assert await redirection(at_source.get(keys[0])) == ("MOVED", slot, target.port)
    finally:
        await at_target.aclose()
        await at_source.aclose()
    assert [int(v) for v in await client.mget_nonatomic(others)] == [acked.get(k, 0) for k in others]


# ---------------------------------------------------------------------- failover


async def test_a_killed_master_fails_over_keeps_its_data_and_rejoins_as_a_replica(tmp_path: pathlib.Path) -> None:
    with EmbeddedCluster(tmp_path / "failover") as c:
        keys = keys_in_slot(c, "kept", 50)
        victim = c.node_for_key(keys[0])
        replica = c.replicas_of(victim)[0]
        # Written on the victim and confirmed in its AOF and its replica's (WAITAOF 1 1).
        owner = raw(victim)
        try:
            for key in keys:
                await owner.set(key, key)
            assert await owner.execute_command("WAITAOF", 1, 1, 5000) == [1, 1]
        finally:
            await owner.aclose()

        killed_at = time.monotonic()
        await asyncio.to_thread(c.kill_node, victim)
        assert c.node(victim).state == "killed" and c.node(victim).pid is None
        heir = await asyncio.to_thread(c.wait_for_failover, victim)
        print(f"\nfailover after kill -9: {time.monotonic() - killed_at:.2f} s (node timeout {c.node_timeout_ms} ms)")
        assert heir.index == replica.index and heir.is_master
        assert heir.slots == victim.slots

        rc = RedisCluster.from_url(heir.url)
        try:
            assert await rc.mget_nonatomic(keys) == [k.encode() for k in keys]
            await rc.set(keys[0], "after")  # the heir takes writes
        finally:
            await rc.aclose()

        back = await asyncio.to_thread(c.restart_node, victim)
        assert back.role == "replica" and back.master_id == heir.id and back.port == victim.port
        assert back.id == victim.id and back.pid is not None
        again = raw(back)
        try:
            await again.execute_command("READONLY")
            assert await again.get(keys[0]) == b"after"  # resynced from its heir
        finally:
            await again.aclose()
        directory = c.data_dir
    assert valkey_processes_in(directory) == []


async def test_a_manual_failover_swaps_master_and_replica(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    master = cluster.primaries()[-1]
    replica = cluster.replicas_of(master)[0]
    key = next(f"manual:{i}" for i in range(1000) if cluster.node_for_key(f"manual:{i}").index == master.index)
    await client.set(key, "before")
    promoted = await asyncio.to_thread(cluster.manual_failover, replica)
    assert promoted.is_master and promoted.slots == master.slots
    demoted = cluster.node(master)
    assert demoted.role == "replica" and demoted.master_id == replica.id
    assert await client.get(key) == b"before"


async def test_a_paused_master_is_failed_over_and_comes_back_as_a_replica(tmp_path: pathlib.Path) -> None:
    with EmbeddedCluster(tmp_path / "paused", masters=3, replicas_per_master=1) as c:
        victim = c.primaries()[1]
        await asyncio.to_thread(c.pause_node, victim)
        assert c.node(victim).state == "paused"
        heir = await asyncio.to_thread(c.wait_for_failover, victim)
        assert heir.master_id is None and heir.slots == victim.slots
        back = await asyncio.to_thread(c.resume_node, victim)
        assert back.state == "running" and back.role == "replica" and back.master_id == heir.id


# ---------------------------------------------------------------------- isolation and cleanup


async def test_two_clusters_never_collide(cluster: EmbeddedCluster, tmp_path: pathlib.Path) -> None:
    other = EmbeddedCluster(tmp_path / "other", masters=3, replicas_per_master=0)
    other.start()
    try:
        mine = {p for n in cluster.nodes for p in (n.port, n.bus_port)}
        theirs = {p for n in other.nodes for p in (n.port, n.bus_port)}
        assert not mine & theirs
        assert not {n.id for n in cluster.nodes} & {n.id for n in other.nodes}
        a, b = RedisCluster.from_url(cluster.urls()[0]), RedisCluster.from_url(other.urls()[0])
        try:
            await a.set("whose", "first")
            await b.set("whose", "second")
            assert await a.get("whose") == b"first" and await b.get("whose") == b"second"
        finally:
            await a.aclose()
            await b.aclose()
        # One directory, one owner.
        with pytest.raises(RuntimeError, match="already in use by another EmbeddedCluster"):
            EmbeddedCluster(tmp_path / "other", masters=3, replicas_per_master=0).start()
        pids = [n.pid for n in other.nodes]
    finally:
        other.stop()
    assert valkey_processes_in(tmp_path / "other") == []
    assert not [p for p in pids if p is not None and running(p)]
    assert all(n.state == "running" for n in cluster.nodes)
    await asyncio.to_thread(cluster.wait_until_healthy, 30)


async def test_a_cluster_left_by_a_killed_owner_is_swept_and_comes_back_with_its_data(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "orphaned"
    owner = await asyncio.to_thread(
        subprocess.Popen,
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import pathlib, sys, redis
                from ops.embedded_cluster import EmbeddedCluster
                c = EmbeddedCluster(pathlib.Path({str(directory)!r}), masters=3, replicas_per_master=0)
                urls = c.start()
                node = c.node_for_key("survivor")
                r = redis.Redis(port=node.port)
                r.set("survivor", "yes")
                assert r.execute_command("WAITAOF", 1, 0, 5000)[0] == 1
                print(" ".join(str(n.pid) for n in c.nodes), flush=True)
                sys.stdin.read()
                """
            ),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 90)
        orphans = [int(p) for p in line.split()]
        assert len(orphans) == 3, line
    finally:
        owner.send_signal(signal.SIGKILL)  # no atexit, no stop: its nodes live on
        await asyncio.to_thread(owner.communicate)  # reaps it, closes the pipes
    assert len(valkey_processes_in(directory)) == 3

    with EmbeddedCluster(directory, masters=3, replicas_per_master=0) as c:
        assert not {n.pid for n in c.nodes} & set(orphans)
        assert not any(p.pid in orphans for p in valkey_processes_in(directory))
        rc = RedisCluster.from_url(c.urls()[0])
        try:
            assert await rc.get("survivor") == b"yes"
        finally:
            await rc.aclose()
        # A different shape on the same directory is refused, not formed over it.
    with pytest.raises(RuntimeError, match="holds a cluster of 3 masters with 0 replicas"):
        EmbeddedCluster(directory, masters=3, replicas_per_master=1).start()
    assert valkey_processes_in(directory) == []


def test_bad_arguments_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="masters"):
        EmbeddedCluster(tmp_path, masters=0)
    with pytest.raises(ValueError, match="may not set cluster-port"):
        EmbeddedCluster(tmp_path, config={"cluster-port": 1})
    with pytest.raises(ValueError, match="node_timeout_ms"):
        EmbeddedCluster(tmp_path, node_timeout_ms=10)
