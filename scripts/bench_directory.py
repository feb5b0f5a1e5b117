"""How long until a newly published tag is searchable from every peer?

N peers gossip over the in-memory transport (every request and reply goes through
wire.encode/wire.decode, every record is signature-checked), all heartbeating every
round as real peers do. Starting from a converged directory, one peer publishes an
object with a new tag; we count rounds until every peer's ``search`` finds it.

Reported per N:
  rounds           synchronous gossip rounds (each peer runs one round per step)
  latency_s        rounds * interval: expected wall time on a real network at the
                   default interval of 1 s, ignoring network latency
  sim_s            wall time this process took to simulate those rounds (all N peers'
                   CPU work in one process: encode, decode, verify, merge)
  cpu_ms_per_peer_round  sim_s per round / N: one peer's gossip CPU per round
  kib_per_round    gossip bytes on the wire per round, all peers together

With ``--transport http2`` the peers are real ones instead (p2pgrid.open_peer, all in
this process): TLS HTTP/2 on 127.0.0.1, signed requests, heartbeats every ttl/3. Then
``seconds`` is wall time from publish until every peer finds the tag, and
``rounds`` = seconds / interval. By default one process holds all N peers, and one
trio loop on one core cannot keep 100 peers' gossip on time at a 1 s interval;
``--procs K`` spreads the peers over K processes (this one and K-1 children that join
it), which uses every core. Either way all peers share this machine's cores, so at large
N the figure includes CPU contention a real deployment would not have.

Usage: python scripts/bench_directory.py [--sizes 10 50 100] [--trials 3] [--fanout 2]
                                         [--transport memory|http2] [--interval S] [--procs K]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time

import trio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from p2pgrid.directory import Directory, ObjectSummary  # noqa: E402
from p2pgrid.gossip import Gossiper, MemoryNetwork  # noqa: E402
from p2pgrid.identity import Identity  # noqa: E402

INTERVAL = 1.0


class Peer:
    def __init__(self, i: int, ident: Identity, net: MemoryNetwork, clock, rng, fanout: int):
        self.name = f"peer{i}"
        self.address = f"10.0.{i // 256}.{i % 256}:7443"
        self.cert = rng.randbytes(480)  # about the size of a DER Ed25519 certificate
        self.objects = [ObjectSummary(f"{self.name}-{k}", [f"topic{(i + k) % 7}", "tabular"],
                                      "a published table", [1000, 12], "float32", self.name)
                        for k in range(3)]
        self.directory = Directory(ident, ttl=30.0)
        net.add(self.address, self.directory)
        self.gossiper = Gossiper(self.directory, net.send, fanout=fanout, reissue=self.reissue,
                                 clock=clock, rng=random.Random(rng.random()), timeout=5.0)

    def reissue(self):
        return self.directory.issue(time.time(), name=self.name, addresses=[self.address],
                                    cert=self.cert, roles=[], objects=self.objects,
                                    services={"models": {"clf": {"input": [12]}}})


async def trial(n: int, idents: list[Identity], fanout: int, seed: int) -> dict:
    rng = random.Random(seed)
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    net = MemoryNetwork(clock=clock, roundtrip=True)
    peers = [Peer(i, idents[i], net, clock, rng, fanout) for i in range(n)]
    records = [p.reissue() for p in peers]
    for p in peers:  # start converged (not measured)
        p.directory.merge(records, now[0])

    async def step():
        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(p.gossiper.round)
        now[0] += INTERVAL

    for _ in range(1):  # heartbeats in flight, as in steady state
        await step()

    publisher = rng.choice(peers)
    tag = f"fresh{seed}"
    publisher.objects = publisher.objects + [
        ObjectSummary(f"{publisher.name}-new", [tag], "", [10], "int64", publisher.name)]

    def everyone_finds_it():
        return all(publisher.name in p.directory.search("#" + tag) for p in peers)

    bytes0 = net.bytes_sent
    t0 = time.perf_counter()
    rounds = 0
    while not everyone_finds_it():
        await step()
        rounds += 1
        if rounds > 20 * math.ceil(math.log2(n)) + 20:
            raise RuntimeError(f"N={n}: tag not everywhere after {rounds} rounds")
    sim = time.perf_counter() - t0
    assert all(p.directory.rejected == 0 for p in peers)
    return {"rounds": rounds, "latency_s": rounds * INTERVAL, "sim_s": sim,
            "bytes_per_round": (net.bytes_sent - bytes0) / rounds}


async def main(sizes: list[int], trials: int, fanout: int) -> dict:
    idents = [Identity.generate() for _ in range(max(sizes))]
    out = {"interval_s": INTERVAL, "fanout": fanout, "transport": "in-memory, wire encode/decode",
           "cpus": os.cpu_count(), "results": {}}
    for n in sizes:
        k = trials if n <= 50 else 1  # keep the whole run well under a minute
        runs = [await trial(n, idents, fanout, seed=1000 * n + t) for t in range(k)]
        out["results"][str(n)] = {
            "trials": k,
            "log2_n": round(math.log2(n), 2),
            "rounds": [r["rounds"] for r in runs],
            "rounds_median": statistics.median(r["rounds"] for r in runs),
            "latency_s_median": statistics.median(r["latency_s"] for r in runs),
            "sim_s_median": round(statistics.median(r["sim_s"] for r in runs), 3),
            "sim_s_per_round": round(sum(r["sim_s"] for r in runs) / sum(r["rounds"] for r in runs), 3),
            "cpu_ms_per_peer_round": round(
                1000 * sum(r["sim_s"] for r in runs) / sum(r["rounds"] for r in runs) / n, 2),
            "kib_per_round": round(statistics.median(r["bytes_per_round"] for r in runs) / 1024, 1),
        }
    return out


def _configs(names, root, fanout, join=()):
    from p2pgrid.config import PeerConfig
    return [PeerConfig(name=nm, data_dir=root / nm, mdns=False, gossip_fanout=fanout, join=join)
            for nm in names]


async def _all_known(grid, n: int) -> None:
    while not all(len(p.directory.digest()) >= n for p in grid.peers.values()):
        await trio.sleep(0.1)


async def child_group(names: list[str], n: int, seed: str, interval: float, fanout: int,
                      root) -> None:
    """--procs: peers of one child process. Prints 'ready' once they know all n peers,
    then the wall time at which all of them find the tag; ends when stdin closes."""
    from p2pgrid.testing import open_network

    configs = _configs(names, root, fanout, join=(seed,))
    async with open_network(configs, root, gossip_interval=interval, ttl=60.0,
                            timeout=600) as grid:
        await _all_known(grid, n)
        print("ready", flush=True)
        await grid.wait_searchable("#fresh-tag", timeout=600)
        print(json.dumps({"found": time.time(),
                          "bytes": sum(p.transport.bytes_sent for p in grid.peers.values())}),
              flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


async def real_trial(n: int, interval: float, fanout: int, root, procs: int = 1) -> dict:
    import subprocess

    import torch
    from p2pgrid.testing import open_network

    names = [f"peer{i}" for i in range(n)]
    groups = [names[k::procs] for k in range(procs)]  # peer0 and the publisher stay here
    root = root / f"n{n}"
    t0 = time.perf_counter()
    children: list[subprocess.Popen] = []
    try:
        async with open_network(_configs(groups[0], root, fanout), root, gossip_interval=interval,
                                ttl=60.0, timeout=600) as grid:
            first = grid[groups[0][0]]
            seed = f"{first.key_id}@{first.address}"
            for group in groups[1:]:
                children.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--child", ",".join(group),
                     "--child-n", str(n), "--child-seed", seed, "--interval", str(interval),
                     "--fanout", str(fanout), "--child-root", str(root)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for c in children:
                line = await trio.to_thread.run_sync(c.stdout.readline)
                if line.strip() != "ready":
                    raise RuntimeError(f"a child group failed to start: {line!r}")
            await _all_known(grid, n)
            converge_s = time.perf_counter() - t0
            await trio.sleep(2 * interval)
            publisher = grid[groups[0][len(groups[0]) // 2]]
            t1 = time.time()
            await publisher.publish(torch.zeros(3), tags=["fresh-tag"], compute=["*"])
            await grid.wait_searchable("#fresh-tag", timeout=600)
            found, sent = [time.time()], sum(p.transport.bytes_sent for p in grid.peers.values())
            for c in children:
                reply = json.loads(await trio.to_thread.run_sync(c.stdout.readline))
                found.append(reply["found"])
                sent += reply["bytes"]
            seconds = max(found) - t1
    finally:
        for c in children:
            with contextlib.suppress(OSError):
                c.stdin.close()
        for c in children:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.kill()
    return {"seconds": round(seconds, 2), "rounds": round(seconds / interval, 1),
            "start_and_converge_s": round(converge_s, 1), "bytes_sent_total": sent,
            "processes": procs}


async def main_http2(sizes: list[int], interval: float, fanout: int, procs: int = 1) -> dict:
    import tempfile
    from pathlib import Path

    out = {"interval_s": interval, "fanout": fanout, "cpus": os.cpu_count(),
           "transport": f"real peers in {procs} process(es): TLS HTTP/2 on 127.0.0.1",
           "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            r = await real_trial(n, interval, fanout, Path(tmp), min(procs, n))
            r["log2_n"] = round(math.log2(n), 2)
            out["results"][str(n)] = r
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--fanout", type=int, default=2)
    ap.add_argument("--transport", choices=["memory", "http2"], default="memory")
    ap.add_argument("--interval", type=float, default=1.0, help="gossip interval (http2 mode)")
    ap.add_argument("--procs", type=int, default=1,
                    help="processes to spread the real peers over (http2 mode)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-seed", help=argparse.SUPPRESS)
    ap.add_argument("--child-root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import logging
        from pathlib import Path
        logging.basicConfig(level=logging.ERROR)
        trio.run(child_group, args.child.split(","), args.child_n, args.child_seed,
                 args.interval, args.fanout, Path(args.child_root))
        sys.exit(0)
    if args.procs < 1:
        ap.error("--procs must be at least 1")
    t = time.perf_counter()
    if args.transport == "http2":
        import logging
        logging.basicConfig(level=logging.ERROR)
        result = trio.run(main_http2, args.sizes, args.interval, args.fanout, args.procs)
    else:
        result = trio.run(main, args.sizes, args.trials, args.fanout)
    result["total_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result))
