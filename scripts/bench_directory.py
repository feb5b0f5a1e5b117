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
TTL = 30.0  # a real peer's default: it re-signs its record every ttl/3 (HEARTBEAT rounds)
HEARTBEAT = 10


class Peer:
    def __init__(self, i: int, ident: Identity, net: MemoryNetwork, clock, rng, fanout: int):
        self.name = f"peer{i}"
        self.address = f"10.0.{i // 256}.{i % 256}:7443"
        self.cert = rng.randbytes(480)  # about the size of a DER Ed25519 certificate
        self.objects = [ObjectSummary(f"{self.name}-{k}", [f"topic{(i + k) % 7}", "tabular"],
                                      "a published table", [1000, 12], "float32", self.name)
                        for k in range(3)]
        self.directory = Directory(ident, ttl=TTL)
        self.phase = rng.randrange(HEARTBEAT)  # heartbeats are not synchronised
        self.beating = True
        self.round = 0
        net.add(self.address, self.directory)
        self.gossiper = Gossiper(self.directory, net.send, fanout=fanout, reissue=self.heartbeat,
                                 clock=clock, rng=random.Random(rng.random()), timeout=5.0)

    @staticmethod
    def record(i: int, ident: Identity, rng):
        """The record peer i would issue (for peers that are not simulated)."""
        d = Directory(ident, ttl=TTL)
        name = f"peer{i}"
        return d.issue(time.time(), name=name, addresses=[f"10.0.{i // 256}.{i % 256}:7443"],
                       cert=rng.randbytes(480), roles=[], objects=[
                           ObjectSummary(f"{name}-{k}", [f"topic{(i + k) % 7}", "tabular"],
                                         "a published table", [1000, 12], "float32", name)
                           for k in range(3)], services={"models": {"clf": {"input": [12]}}})

    def reissue(self):
        return self.directory.issue(time.time(), name=self.name, addresses=[self.address],
                                    cert=self.cert, roles=[], objects=self.objects,
                                    services={"models": {"clf": {"input": [12]}}})

    def heartbeat(self):
        """As a real peer: re-signed every HEARTBEAT rounds, or at once after a change."""
        self.round += 1
        own = self.directory.own
        if own is None or list(own.objects) != list(self.objects) or (
                self.beating and (self.round + self.phase) % HEARTBEAT == 0):
            return self.reissue()
        return own


class SampledNetwork(MemoryNetwork):
    """--sample: only some peers are simulated; a send to any other address reaches a
    random simulated one (whose directory is the same converged one), unpinned."""

    def __init__(self, *, rng, **kw):
        super().__init__(**kw)
        self.rng = rng
        self.live: list[str] = []

    async def send(self, address, msg, key_id=None):
        if address not in self.directories:
            address, key_id = self.rng.choice(self.live), None
        return await super().send(address, msg, key_id=key_id)


def _cpu() -> float:
    return time.process_time()  # this process only: other users' load does not count


async def trial(n: int, idents: list[Identity], fanout: int, seed: int, *,
                sample: int = 0, steady_rounds: int = 3) -> dict:
    rng = random.Random(seed)
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    simulated = sample or n
    net = (SampledNetwork(clock=clock, roundtrip=True, rng=rng) if sample
           else MemoryNetwork(clock=clock, roundtrip=True))
    peers = [Peer(i, idents[i], net, clock, rng, fanout) for i in range(simulated)]
    net.live = [p.address for p in peers]
    records = [p.reissue() for p in peers]
    if sample:  # the rest of the network: records only
        for i in range(simulated, n):
            records.append(Peer.record(i, idents[i], rng))
    for k, p in enumerate(peers):  # start converged (not measured)
        if k and hasattr(p.directory, "_checked"):
            p.directory._checked = dict(peers[0].directory._checked)  # setup: verify once here
        p.directory.merge(records, now[0])
        if hasattr(p.directory, "verified"):
            p.directory.verified = 0

    async def step(group=None):
        async with trio.open_nursery() as nursery:
            for p in group or peers:
                nursery.start_soon(p.gossiper.round)
        now[0] += INTERVAL

    async def measure(rounds: int) -> tuple[float, float]:
        b0, c0 = net.bytes_sent, _cpu()
        for _ in range(rounds):
            await step()
        return ((net.bytes_sent - b0) / rounds / simulated,
                1000 * (_cpu() - c0) / rounds / simulated)

    out = {}
    # 1. nothing changes: nobody re-signs
    for p in peers:
        p.beating = False
    await step()  # the records issued above settle
    out["steady_bytes"], out["steady_cpu_ms"] = await measure(steady_rounds)
    # 2. heartbeats: every peer re-signs every HEARTBEAT rounds, as real peers do
    for p in peers:
        p.beating = True
    out["hb_bytes"], out["hb_cpu_ms"] = await measure(max(steady_rounds, 2))
    # 3. a new tag, until every simulated peer finds it
    publisher = rng.choice(peers)
    tag = f"fresh{seed}"
    publisher.objects = publisher.objects + [
        ObjectSummary(f"{publisher.name}-new", [tag], "", [10], "int64", publisher.name)]

    def everyone_finds_it():
        return all(publisher.name in p.directory.search("#" + tag) for p in peers)

    rounds = 0
    b0, c0 = net.bytes_sent, _cpu()
    while not everyone_finds_it():
        await step()
        rounds += 1
        if rounds > 20 * math.ceil(math.log2(n)) + 20:
            raise RuntimeError(f"N={n}: tag not everywhere after {rounds} rounds")
    out["spread_rounds"] = rounds
    out["spread_bytes"] = (net.bytes_sent - b0) / rounds / simulated
    # 4. a new peer joins with one seed: rounds until it holds the whole directory
    joiner = Peer(n, Identity.generate(), net, clock, rng, fanout)
    seed_addr = rng.choice(peers).address
    joiner.gossiper.seeds = lambda: [seed_addr]
    joiner.reissue()
    net.live.append(joiner.address)
    everyone = peers + [joiner]
    join_rounds = 0
    while len(joiner.directory.digest()) < n + 1:
        await step(everyone)
        join_rounds += 1
        if join_rounds > 400:
            break
    out["join_rounds"] = join_rounds
    out["join_held"] = len(joiner.directory.digest())
    assert all(p.directory.rejected == 0 for p in peers)
    out["verified_per_peer"] = sum(getattr(p.directory, "verified", 0) for p in peers) / simulated
    return out


def epidemic_rounds(n: int, fanout: int, rng: random.Random) -> int:
    """Model (no records): rounds until a new version held by one peer reaches all n,
    when every peer runs a push-pull exchange with `fanout` uniform random others per
    round and an exchange carries the version whichever side holds it. The state is
    read at the start of each round (a real round, whose exchanges run one after
    another, can only be faster). Checked against the simulation at 100 and 1,000."""
    has = [False] * n
    has[rng.randrange(n)] = True
    rounds = 0
    while not all(has):
        before = has[:]
        for i in range(n):
            for _ in range(fanout):
                j = rng.randrange(n - 1)
                j += j >= i
                if before[i] or before[j]:
                    has[i] = has[j] = True
        rounds += 1
    return rounds


async def main(sizes: list[int], trials: int, fanout: int, sample: int = 0) -> dict:
    idents = [Identity.generate() for _ in range(max(sizes) + 1)]
    out = {"interval_s": INTERVAL, "fanout": fanout, "heartbeat_rounds": HEARTBEAT,
           "transport": "in-memory, wire encode/decode, signatures checked",
           "cpu": "process CPU time of this process / simulated peers / rounds",
           "cpus": os.cpu_count(), "results": {}}
    for n in sizes:
        k = trials if n <= 100 else 1
        s = sample if sample and sample < n else 0
        runs = [await trial(n, idents, fanout, seed=1000 * n + t, sample=s) for t in range(k)]

        def med(key, nd=2):
            return round(statistics.median(r[key] for r in runs), nd)

        out["results"][str(n)] = {
            "trials": k, "simulated_peers": s or n, "log2_n": round(math.log2(n), 2),
            "steady_kib_per_peer_round": round(med("steady_bytes") / 1024, 2),
            "steady_cpu_ms_per_peer_round": med("steady_cpu_ms"),
            "heartbeat_kib_per_peer_round": round(med("hb_bytes") / 1024, 2),
            "heartbeat_cpu_ms_per_peer_round": med("hb_cpu_ms"),
            "spread_rounds": [r["spread_rounds"] for r in runs],
            "spread_kib_per_peer_round": round(med("spread_bytes") / 1024, 2),
            "join_rounds": [r["join_rounds"] for r in runs],
            "join_held": [r["join_held"] for r in runs],
            "verified_per_peer": med("verified_per_peer", 1),
            "model_spread_rounds": sorted(epidemic_rounds(n, fanout, random.Random(t))
                                          for t in range(5)),
        }
        if s:
            out["results"][str(n)]["note"] = (
                f"only {s} peers simulated, each holding all {n} records: steady, heartbeat "
                f"and join figures are per simulated peer; spread_rounds among {s} peers says "
                f"nothing about {n} (see model_spread_rounds)")
        print(json.dumps({n: out["results"][str(n)]}), file=sys.stderr, flush=True)
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
    ap.add_argument("--sample", type=int, default=0,
                    help="memory mode: simulate only this many peers of each size (the rest "
                         "are records whose sends reach a simulated peer); for 10,000")
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
        result = trio.run(main, args.sizes, args.trials, args.fanout, args.sample)
    result["total_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result))
