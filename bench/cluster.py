"""How long the embedded Valkey cluster (ops.embedded_cluster) takes to form, to fail over
and to move a slot, on this machine.

    python -m bench.cluster [--repeat 3] [--masters 3] [--replicas 1] [--node-timeout-ms 2000]

Not a test: it prints figures. Each round forms a new cluster in a temporary directory
and times, with the cluster's own bounded waits (each a poll of every node every 50 ms,
so a figure includes up to one poll interval and the checks themselves):

- start(): from nothing to every node ok and agreeing (nodes started side by side, config
  epochs set, slots added, MEET, gossip, REPLICATE, replicas synced);
- kill -9 of a master -> wait_for_failover(): its replica serves its slots and every
  running node is ok again; and, measured apart, the first SET on that slot that a client
  polling the master's replica every 10 ms gets accepted;
- restart_node() of the killed master: back from its nodes.conf and AOF as a replica;
- migrate_slot() of one slot holding --keys keys (batches of 100);
- stop().
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import threading
import time

import redis

from ops.embedded_cluster import EmbeddedCluster


def _first_accepted_write(port: int, key: str, deadline: float, out: list[float]) -> None:
    """SET `key` on one node every 10 ms until it answers OK (a replica answers MOVED)."""
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            try:
                if client.set(key, "x"):
                    out.append(time.monotonic())
                    return
            except redis.RedisError:
                pass
            time.sleep(0.01)
    finally:
        client.close()


def one_round(args: argparse.Namespace, directory: pathlib.Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    cluster = EmbeddedCluster(
        directory, masters=args.masters, replicas_per_master=args.replicas, node_timeout_ms=args.node_timeout_ms
    )
    began = time.monotonic()
    cluster.start()
    figures["start"] = time.monotonic() - began
    try:
        tag = "bench"
        slot = cluster.slot_for_key(f"{{{tag}}}")
        owner = cluster.node_for_slot(slot)
        writer = redis.Redis(port=owner.port)
        pipe = writer.pipeline(transaction=False)
        for i in range(args.keys):
            pipe.set(f"{{{tag}}}:{i}", i)
        pipe.execute()
        writer.close()

        if args.replicas:
            replica = cluster.replicas_of(owner)[0]
            accepted: list[float] = []
            watcher = threading.Thread(
                target=_first_accepted_write,
                args=(replica.port, f"{{{tag}}}:probe", time.monotonic() + 120, accepted),
            )
            watcher.start()
            killed = time.monotonic()
            cluster.kill_node(owner)
            cluster.wait_for_failover(owner)
            figures["failover (wait_for_failover)"] = time.monotonic() - killed
            watcher.join()
            if accepted:
                figures["failover (first write accepted)"] = accepted[0] - killed
            began = time.monotonic()
            cluster.restart_node(owner)
            figures["rejoin as replica (restart_node)"] = time.monotonic() - began

        source = cluster.node_for_slot(slot)
        target = next(m for m in cluster.primaries() if m.index != source.index)
        began = time.monotonic()
        moved = cluster.migrate_slot(slot, target)
        figures[f"migrate_slot ({moved} keys)"] = time.monotonic() - began
    finally:
        began = time.monotonic()
        cluster.stop()
        figures["stop"] = time.monotonic() - began
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--node-timeout-ms", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()

    rounds: list[dict[str, float]] = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            rounds.append(one_round(args, pathlib.Path(tmp) / "cluster"))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in rounds[-1].items()), flush=True)

    print(
        f"\n{args.masters} masters x {args.replicas} replicas, cluster-node-timeout {args.node_timeout_ms} ms, "
        f"{args.repeat} rounds (seconds)"
    )
    print("| step | median | min | max |\n| --- | --- | --- | --- |")
    for name in rounds[0]:
        values = [r[name] for r in rounds if name in r]
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
