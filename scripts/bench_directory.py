"""What the directory's gossip costs each peer, and how fast a change reaches everyone.

In-memory mode (default): peers gossip over the in-memory transport (every request and
reply goes through wire.encode/wire.decode, every record is signature-checked) on a
simulated clock (one round = INTERVAL). They start converged. Per size N:

  steady_*       bytes and CPU per peer per round while nothing changes (no heartbeat)
  heartbeat_*    the same while every peer re-signs its record every third of its ttl,
                 which grows with N (Directory.record_ttl): about 16 new heads a second
                 network-wide once N > 160, whatever N
  spread_rounds  rounds until every peer of the N finds a newly published tag
  join_rounds    rounds until a new peer with one seed holds all N records

Bytes: every message on the wire, both ways, / peers exercised / rounds. CPU: this
process's CPU time (time.process_time: other users' load does not count) / peers
exercised / rounds; the bench's setup is not counted.

``--sample K`` (for N of 1,000 and 10,000): only K peers run in full, each holding all
N records; the other N-K are *light* (:class:`Light`): the converged directory plus
one bit (whether they hold the spreading change), and a real AddrBook choosing their
partners over the whole network. Bytes and CPU are the K full peers' exchanges (a
send to a light peer reaches a random full one, whose directory is the same); light
peers' heartbeats are signed outside the measurement and each new head handed to one
full peer. spread_rounds is the whole network's: full peers exchange in full among
themselves, and an exchange that involves a light peer carries the change whichever
way (a light peer passes on only what it held at the start of the round; a full peer,
what it held after its own exchanges of the round). The joiner runs in full;
light peers that learnt its record call it as often as a full peer would.

With ``--transport http2`` the peers are real ones instead (p2pgrid.open_peer):
TLS HTTP/2 on 127.0.0.1, signed requests, heartbeats every record ttl/3.
``--procs K`` spreads them over K processes (this one and K-1 children that join it).
Once converged, every process's CPU time and the gossip bytes (message bodies both
ways) are measured over ``--window`` seconds; then a tag is published and
``spread_seconds`` is the wall time until every peer finds it (rounds = seconds /
interval). All peers share this machine's cores, so the wall figures include
contention a real deployment would not have. ``--ttl 600`` keeps heartbeats out of
the window.

Usage: python scripts/bench_directory.py [--sizes 100 1000] [--trials 1] [--sample K]
           [--profile] | --transport http2 --procs 2 --sizes 100 [--ttl 60] [--window 20]
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
from collections.abc import Sequence

import trio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from p2pgrid.directory import Directory, ObjectSummary  # noqa: E402
from p2pgrid.addrbook import AddrBook  # noqa: E402
from p2pgrid.gossip import Gossiper, MemoryNetwork, RoundStats  # noqa: E402
from p2pgrid.identity import Identity  # noqa: E402

INTERVAL = 1.0
TTL = 30.0  # the base ttl; a record states Directory.record_ttl(), re-signed every third


class Peer:
    def __init__(self, i: int, ident: Identity, net: MemoryNetwork, clock, rng, fanout: int):
        self.name = f"peer{i}"
        self.address = address_of(i)
        self.cert = random.Random(i).randbytes(480)  # about a DER Ed25519 certificate
        self.objects = objects_of(i)
        self.directory = Directory(ident, ttl=TTL)
        self.phase = rng.randrange(1 << 20)  # heartbeats are not synchronised
        self.beating = True
        self.round = 0
        net.add(self.address, self.directory)
        self.key_id = ident.key_id
        self.gossiper = Gossiper(self.directory, net.send, fanout=fanout, reissue=self.heartbeat,
                                 clock=clock, rng=random.Random(rng.random()), timeout=5.0)

    def reissue(self):
        return self.directory.issue(time.time(), name=self.name, addresses=[self.address],
                                    cert=self.cert, roles=[], objects=self.objects,
                                    services=SERVICES)

    def heartbeat(self):
        """As a real peer: re-signed every third of its record's ttl (which grows with
        the directory: Directory.record_ttl), or at once after a change."""
        self.round += 1
        own = self.directory.own
        if own is None or list(own.objects) != list(self.objects) or (
                self.beating and (self.round + self.phase) % beat_rounds(own.ttl) == 0):
            return self.reissue()
        return own


SERVICES = {"models": {"clf": {"input": [12]}}}


def address_of(i: int) -> str:
    return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:7443"


def objects_of(i: int) -> list[ObjectSummary]:
    return [ObjectSummary(f"peer{i}-{k}", [f"topic{(i + k) % 7}", "tabular"],
                          "a published table", [1000, 12], "float32", f"peer{i}")
            for k in range(3)]


def beat_rounds(ttl: float) -> int:
    return max(1, round(ttl / 3 / INTERVAL))


class Light:
    """A peer of the network that is not simulated in full (--sample): it holds the
    converged directory (as every full peer does at the start) plus one bit, whether
    it holds the tracked record's new version, and picks its partners with a real
    address book over the whole network."""

    __slots__ = ("key_id", "index", "book", "rng", "has", "record", "phase", "ident")

    def __init__(self, index: int, ident: Identity, rng: random.Random):
        self.index = index
        self.key_id = ident.key_id
        self.ident = ident
        self.book = AddrBook()
        self.rng = random.Random(rng.random())
        self.has = False
        self.phase = rng.randrange(1 << 20)
        self.record = None  # its newest record, as the bench signed it for it


class _Others(Sequence):
    """Every node of the network but one, indexable (for AddrBook.choose)."""

    def __init__(self, nodes, me: int, by_key: dict):
        self.nodes, self.me, self.by_key = nodes, me, by_key

    def __len__(self):
        return len(self.nodes) - 1

    def __getitem__(self, j):
        return self.nodes[j + (j >= self.me)]

    def get(self, key_id):
        j = self.by_key.get(key_id)
        return None if j is None or j == self.me else self.nodes[j]


class SampledNetwork(MemoryNetwork):
    """--sample: K peers run in full; every other address is a Light node. While
    measuring, a send to a light node reaches a random full peer instead (its
    directory is the same converged one), unpinned; while a change spreads, the
    exchange with a light node is modelled (``model``)."""

    def __init__(self, *, rng, **kw):
        super().__init__(**kw)
        self.rng = rng
        self.live: list[str] = []
        self.model = None

    async def send(self, address, msg, key_id=None):
        if address not in self.directories:
            if self.model is not None:
                await trio.lowlevel.checkpoint()
                return self.model(address, msg)
            address, key_id = self.rng.choice(self.live), None
        return await super().send(address, msg, key_id=key_id)


def _cpu() -> float:
    return time.process_time()  # this process only: other users' load does not count


def _records(n: int, idents: list[Identity], now: float) -> list:
    """Every peer's record as it would issue it, in a directory of n records."""
    out = []
    for i in range(n):
        d = Directory(idents[i], ttl=TTL)
        d.summary = _NoSummary()  # only the ttl depends on n: see record_ttl
        d._records = _Sized(n)
        out.append(d.issue(now, name=f"peer{i}", addresses=[address_of(i)],
                           cert=random.Random(i).randbytes(480), roles=[],
                           objects=objects_of(i), services=SERVICES))
    return out


def _clone(src: Directory, dst: Directory) -> None:
    """Make `dst` hold what `src` holds (bench setup: copying is 100 times cheaper than
    merging N records into each of K directories). Reaches into the internals."""
    from p2pgrid.addrbook import _Source
    from p2pgrid.summary import RangeSummary
    for attr in ("_records", "_last_seen", "_pool_at", "_names", "_checked", "_tombstones"):
        setattr(dst, attr, dict(getattr(src, attr)))
    dst._pool, dst._deadlines = list(src._pool), list(src._deadlines)
    sm, ss = RangeSummary(), src.summary
    sm._levels = [list(level) for level in ss._levels]
    sm._held, sm._fine = dict(ss._held), dict(ss._fine)
    sm._keys = {b: set(keys) for b, keys in ss._keys.items()}
    dst.summary = sm
    dst.book._source_of = dict(src.book._source_of)
    dst.book._sources = {k: _Source(v.window_start, v.introduced, set(v.held))
                         for k, v in src.book._sources.items()}


class _Sized(dict):
    """A dict that says it holds n entries (to issue a record as in an n-peer directory)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def __len__(self):
        return self.n + super().__len__()


class _NoSummary:
    def set(self, *a):
        pass


async def trial(n: int, idents: list[Identity], fanout: int, seed: int, *,
                sample: int = 0, steady_rounds: int = 3, beat_measure: int = 0,
                timings: dict | None = None) -> dict:
    timings = {} if timings is None else timings
    t0 = _cpu()
    rng = random.Random(seed)
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    full = sample or n
    net = SampledNetwork(clock=clock, roundtrip=True, rng=rng)
    records = _records(n, idents, time.time())
    peers = [Peer(i, idents[i], net, clock, rng, fanout) for i in range(full)]
    net.live = [p.address for p in peers]
    lights = [Light(i, idents[i], rng) for i in range(full, n)]
    for li in lights:
        li.record = records[li.index]
    # Start converged (not measured): one directory merges every record (each
    # signature verified once, here), and every full peer starts as a copy of it
    # holding its own record as its own.
    template = Directory(Identity.generate(), ttl=TTL)
    template.merge(records, now[0])
    for k, p in enumerate(peers):
        _clone(template, p.directory)
        d, kid = p.directory, p.directory.key_id
        d._drop(kid)
        d._last_seen.pop(kid)
        d.book.removed(kid)
        d.own = records[k]
        d._put(kid, records[k])
        d.verified = 0
    timings["setup_cpu_s"] = round(_cpu() - t0, 1)

    async def step(group=None):
        async with trio.open_nursery() as nursery:
            for p in group or peers:
                nursery.start_soon(p.gossiper.round)
        now[0] += INTERVAL

    rounds_done = [0]

    def beat_lights():
        """Light peers heartbeat too (signing is theirs, not charged to the full peers):
        each new head is handed to one full peer, as if its owner had gossiped it there."""
        signed, cpu0 = [], _cpu()
        for li in lights:
            if (rounds_done[0] + li.phase) % beat_rounds(li.record.ttl) == 0:
                d = Directory(li.ident, ttl=TTL)
                d.summary = _NoSummary()
                d._records = _Sized(n)
                d.own = li.record  # a heartbeat: same content, so a new head only
                li.record = d.issue(time.time(), name=li.record.name,
                                    addresses=li.record.addresses, cert=li.record.cert,
                                    roles=[], objects=li.record.objects, services=SERVICES)
                signed.append(li.record)
        sign_cpu = _cpu() - cpu0
        for rec in signed:
            rng.choice(peers).directory.merge([rec.head()], now[0], source=rec.key_id)
        return sign_cpu

    async def measure(rounds: int, beating: bool) -> tuple[float, float]:
        b0, c0, excluded = net.bytes_sent, _cpu(), 0.0
        for _ in range(rounds):
            if beating:
                excluded += beat_lights()
            await step()
            rounds_done[0] += 1
        return ((net.bytes_sent - b0) / rounds / full,
                1000 * (_cpu() - c0 - excluded) / rounds / full)

    out = {}
    # 1. nothing changes: nobody re-signs
    for p in peers:
        p.beating = False
    await step()  # the records issued above settle
    t0 = _cpu()
    out["steady_bytes"], out["steady_cpu_ms"] = await measure(steady_rounds, False)
    timings["steady_cpu_s"] = round(_cpu() - t0, 1)
    # 2. heartbeats: every peer re-signs every third of its ttl, as real peers do
    t0 = _cpu()
    for p in peers:
        p.beating = True
    out["record_ttl_s"] = peers[0].directory.own.ttl
    await measure(min(5, beat_rounds(out["record_ttl_s"])), True)  # heads start flowing
    out["hb_bytes"], out["hb_cpu_ms"] = await measure(
        beat_measure or max(steady_rounds, min(10, beat_rounds(out["record_ttl_s"]))), True)
    timings["heartbeat_cpu_s"] = round(_cpu() - t0, 1)
    for p in peers:
        p.beating = False
    # 3. a new tag, until every peer of the whole network finds it
    t0 = _cpu()
    publisher = rng.choice(peers)
    tag = f"fresh{seed}"
    publisher.objects = publisher.objects + [
        ObjectSummary(f"{publisher.name}-new", [tag], "", [10], "int64", publisher.name)]
    pub_key = publisher.directory.key_id
    publisher.reissue()  # the change, issued at once (its round then sends it)
    new_version = [publisher.directory.own.version]

    def full_has(p) -> bool:
        rec = p.directory._records.get(pub_key)
        return rec is not None and rec.version >= new_version[0]

    by_address = {li.record.addresses[0]: li for li in lights}
    full_by_key = {p.directory.key_id: p for p in peers}
    newly: list = []

    def meet(p, li):
        """A full peer and a light one exchange: the new version goes whichever way."""
        if li.has and not full_has(p):
            p.directory.merge([publisher.directory.own], now[0], source=li.key_id)
        elif full_has(p) and not li.has:
            newly.append(li)

    def model(address, msg):
        from p2pgrid.directory import GossipReply
        p = full_by_key[msg.sender.key_id]
        meet(p, by_address[address])
        return GossipReply(records=[], want=[])

    # light nodes and full peers, one list: light ones pick partners from all of it
    everyone = [*peers, *lights]
    index_of = {id(x): i for i, x in enumerate(everyone)}
    by_key = {x.key_id: i for i, x in enumerate(everyone)}

    def light_round():
        for li in lights:
            view = _Others(everyone, index_of[id(li)], by_key)
            for other in li.book.choose(view, fanout, now[0], li.rng):
                li.book.good(other.key_id, now[0])
                if isinstance(other, Light):
                    if li.has != other.has:
                        newly.append(other if li.has else li)
                else:
                    meet(other, li)

    if lights:
        for _ in range(8):  # light books fill their protected sets as after a while
            light_round()
            now[0] += INTERVAL

    def everyone_finds_it():
        # search() walks every record: at 1,000 full peers that cost the bench 1,000
        # directory walks a round, so it is checked once, after the cheap version test
        if not (all(full_has(p) for p in peers) and all(li.has for li in lights)):
            return False
        return all(publisher.name in p.directory.search("#" + tag) for p in peers)

    rounds = 0
    b0 = net.bytes_sent
    net.model = model if lights else None
    while not everyone_finds_it():
        await step()
        light_round()  # light bits from the start of the round, full peers' from now
        for li in newly:
            li.has = True
        newly.clear()
        rounds += 1
        if rounds > 20 * math.ceil(math.log2(n)) + 20:
            raise RuntimeError(f"N={n}: tag not everywhere after {rounds} rounds")
    net.model = None
    out["spread_rounds"] = rounds
    out["spread_bytes"] = (net.bytes_sent - b0) / rounds / full
    timings["spread_cpu_s"] = round(_cpu() - t0, 1)
    # 4. a new peer joins with one seed: rounds until it holds the whole directory.
    # Its partners are full peers (a send to a light one reaches a full one: both hold
    # the converged directory); light peers that learnt its record call it as often
    # as a full peer would, through a full peer's directory.
    t0 = _cpu()
    joiner = Peer(n, idents[n], net, clock, rng, fanout)
    joiner.beating = False
    seed_addr = rng.choice(peers).address
    joiner.gossiper.seeds = lambda: [seed_addr]
    joiner.reissue()
    net.live.append(joiner.address)
    everyone_full = peers + [joiner]
    knows = bytearray(len(lights))  # light peers that hold the joiner's record
    light_at = {li.key_id: k for k, li in enumerate(lights)}
    jkey = joiner.directory.key_id
    join_rounds = 0
    whole = min(n + 1, joiner.directory.book.limits.max_records)  # its own bound at 10,000
    while len(joiner.directory) < whole:
        await step(everyone_full)
        calls = []
        for k, li in enumerate(lights):
            if knows[k]:
                if li.rng.random() < fanout / n:
                    calls.append(rng.choice(peers))
            else:  # learns it from a partner that holds it, as a tag spreads
                for other in li.book.choose(_Others(everyone, index_of[id(li)], by_key), fanout,
                                            now[0], li.rng):
                    if (isinstance(other, Light) and knows[light_at[other.key_id]]) or (
                            isinstance(other, Peer) and jkey in other.directory._records):
                        knows[k] = 1
        async with trio.open_nursery() as nursery:
            for p in calls:
                nursery.start_soon(p.gossiper._exchange_within, joiner.address,
                                   p.directory.own, RoundStats(), jkey)
        join_rounds += 1
        if join_rounds > 400:
            break
    out["join_rounds"] = join_rounds
    out["join_held"] = len(joiner.directory)
    timings["join_cpu_s"] = round(_cpu() - t0, 1)
    assert all(p.directory.rejected == 0 for p in peers)
    out["verified_per_peer"] = sum(p.directory.verified for p in peers) / full
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


async def main(sizes: list[int], trials: int, fanout: int, sample: int = 0,
               steady_rounds: int = 3) -> dict:
    t0 = _cpu()
    idents = [Identity.generate() for _ in range(max(sizes) + 1)]
    out = {"interval_s": INTERVAL, "fanout": fanout, "base_ttl_s": TTL,
           "transport": "in-memory, wire encode/decode, signatures checked",
           "cpu": "process CPU time / peers exercised (the full ones) / rounds; setup, "
                  "light peers' signing and the spread model not counted",
           "cpus": os.cpu_count(), "load_before": os.getloadavg(), "results": {}}
    setup = _cpu() - t0
    for n in sizes:
        k = trials if n <= 100 else 1
        s = sample if sample and sample < n else 0
        runs, timings = [], []
        for t in range(k):
            timings.append({})
            runs.append(await trial(n, idents, fanout, seed=1000 * n + t, sample=s,
                                    steady_rounds=steady_rounds, timings=timings[-1]))

        def med(key, nd=2):
            return round(statistics.median(r[key] for r in runs), nd)

        out["results"][str(n)] = {
            "trials": k, "full_peers": s or n, "log2_n": round(math.log2(n), 2),
            "record_ttl_s": med("record_ttl_s", 1),
            "steady_kib_per_peer_round": round(med("steady_bytes") / 1024, 2),
            "steady_cpu_ms_per_peer_round": med("steady_cpu_ms"),
            "heartbeat_kib_per_peer_round": round(med("hb_bytes") / 1024, 2),
            "heartbeat_cpu_ms_per_peer_round": med("hb_cpu_ms"),
            "spread_rounds": [r["spread_rounds"] for r in runs],
            "join_rounds": [r["join_rounds"] for r in runs],
            "join_held": [r["join_held"] for r in runs],
            "verified_per_peer": med("verified_per_peer", 1),
            "model_spread_rounds": sorted(epidemic_rounds(n, fanout, random.Random(t))
                                          for t in range(5)),
            "bench_cpu_s": timings, "load_after": os.getloadavg(),
        }
        if not s:
            out["results"][str(n)]["spread_kib_per_peer_round"] = round(
                med("spread_bytes") / 1024, 2)
        else:
            out["results"][str(n)]["note"] = (
                f"{s} full peers, each holding all {n} records, the other {n - s} light "
                "(see Light): bytes and CPU are the full peers' own exchanges; spread "
                f"rounds are the whole network's ({n}); join: the joiner's exchanges run "
                "in full")
        print(json.dumps({n: out["results"][str(n)]}), file=sys.stderr, flush=True)
    out["idents_cpu_s"] = round(setup, 1)
    return out


def _configs(names, root, fanout, join=()):
    from p2pgrid.config import PeerConfig
    return [PeerConfig(name=nm, data_dir=root / nm, mdns=False, gossip_fanout=fanout, join=join)
            for nm in names]


async def _all_known(grid, n: int) -> None:
    while not all(len(p.directory.digest()) >= n for p in grid.peers.values()):
        await trio.sleep(0.1)


async def _wait_tag(grid, publisher: str, tag: str = "fresh-tag") -> None:
    """Until every peer of `grid` holds `publisher`'s record listing `tag`. Cheap on
    purpose: grid.wait_searchable searches every directory every 50 ms, which at 100
    peers took most of a core from the peers it was timing."""
    def found(p) -> bool:
        try:
            rec = p.directory.lookup(publisher)
        except Exception:
            return False
        return any(tag in o.tags for o in rec.objects)

    with trio.fail_after(600):
        while not all(found(p) for p in grid.peers.values()):
            await trio.sleep(0.25)


def _traffic(grid) -> int:
    """Gossip message bytes both ways, counted once at the side that started each call."""
    return sum(p.transport.bytes_sent + p.transport.bytes_received for p in grid.peers.values())


async def child_group(names: list[str], n: int, seed: str, interval: float, fanout: int,
                      root, ttl: float) -> None:
    """--procs: peers of one child process. Prints 'ready' once they know all n peers;
    then answers stdin lines: 'mark' -> its CPU time and traffic so far, 'tag' -> the
    wall time at which all of its peers find the tag. Ends when stdin closes."""
    from p2pgrid.testing import open_network

    configs = _configs(names, root, fanout, join=(seed,))
    async with open_network(configs, root, gossip_interval=interval, ttl=ttl,
                            timeout=600) as grid:
        await _all_known(grid, n)
        print("ready", flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            if line.strip() == "mark":
                print(json.dumps({"cpu": time.process_time(), "bytes": _traffic(grid)}),
                      flush=True)
            elif line.startswith("tag "):
                await _wait_tag(grid, line.split()[1])
                print(json.dumps({"found": time.time()}), flush=True)


async def real_trial(n: int, interval: float, fanout: int, root, procs: int = 1,
                     ttl: float = 60.0, window: float = 20.0) -> dict:
    import subprocess

    import torch
    from p2pgrid.testing import open_network

    names = [f"peer{i}" for i in range(n)]
    groups = [names[k::procs] for k in range(procs)]  # peer0 and the publisher stay here
    root = root / f"n{n}"
    t0 = time.perf_counter()
    children: list[subprocess.Popen] = []

    async def ask(word: str) -> list[dict]:
        for c in children:
            c.stdin.write(word + "\n")
            c.stdin.flush()
        return [json.loads(await trio.to_thread.run_sync(c.stdout.readline)) for c in children]

    try:
        async with open_network(_configs(groups[0], root, fanout), root, gossip_interval=interval,
                                ttl=ttl, timeout=600) as grid:
            first = grid[groups[0][0]]
            seed = f"{first.key_id}@{first.address}"
            for group in groups[1:]:
                children.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--child", ",".join(group),
                     "--child-n", str(n), "--child-seed", seed, "--interval", str(interval),
                     "--fanout", str(fanout), "--child-root", str(root), "--ttl", str(ttl)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for c in children:
                line = await trio.to_thread.run_sync(c.stdout.readline)
                if line.strip() != "ready":
                    raise RuntimeError(f"a child group failed to start: {line!r}")
            await _all_known(grid, n)
            converge_s = time.perf_counter() - t0
            await trio.sleep(3 * interval)  # the last records settle
            # Steady state: every process's CPU time and the traffic over `window`.
            marks0 = await ask("mark") + [{"cpu": time.process_time(), "bytes": _traffic(grid)}]
            w0 = time.perf_counter()
            await trio.sleep(window)
            marks1 = await ask("mark") + [{"cpu": time.process_time(), "bytes": _traffic(grid)}]
            rounds_w = (time.perf_counter() - w0) / interval
            cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(marks0, marks1))
            traffic = sum(b["bytes"] - a["bytes"] for a, b in zip(marks0, marks1))
            record_ttl = first.directory.own.ttl
            publisher = grid[groups[0][len(groups[0]) // 2]]
            for c in children:
                c.stdin.write(f"tag {publisher.name}\n")
                c.stdin.flush()
            t1 = time.time()
            await publisher.publish(torch.zeros(3), tags=["fresh-tag"], compute=["*"])
            await _wait_tag(grid, publisher.name)
            found = [time.time()]
            for c in children:
                found.append(json.loads(await trio.to_thread.run_sync(c.stdout.readline))["found"])
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
    return {"spread_seconds": round(seconds, 2), "spread_rounds": round(seconds / interval, 1),
            "kib_per_peer_round": round(traffic / 1024 / n / rounds_w, 2),
            "cpu_ms_per_peer_round": round(1000 * cpu / n / rounds_w, 2),
            "window_rounds": round(rounds_w, 1), "record_ttl_s": record_ttl,
            "start_and_converge_s": round(converge_s, 1), "processes": procs}


async def main_http2(sizes: list[int], interval: float, fanout: int, procs: int = 1,
                     ttl: float = 60.0, window: float = 20.0) -> dict:
    import tempfile
    from pathlib import Path

    out = {"interval_s": interval, "fanout": fanout, "cpus": os.cpu_count(),
           "transport": f"real peers in {procs} process(es): TLS HTTP/2 on 127.0.0.1",
           "bytes": "gossip message bodies both ways (no TLS/HTTP/2 framing), over the window",
           "cpu": "CPU time of every process (all of each peer's work) over the window / N",
           "ttl_s": ttl, "load_before": os.getloadavg(), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            r = await real_trial(n, interval, fanout, Path(tmp), min(procs, n), ttl, window)
            r["log2_n"] = round(math.log2(n), 2)
            r["load_after"] = os.getloadavg()
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
                    help="memory mode: run only K peers of each larger size in full (their "
                         "exchanges measured); the rest are light: they hold the converged "
                         "directory and one bit of the spreading change, and pick "
                         "partners with real address books (spread rounds: all N)")
    ap.add_argument("--steady-rounds", type=int, default=3)
    ap.add_argument("--ttl", type=float, default=60.0,
                    help="http2 mode: the peers' base ttl (600: no heartbeat in the window)")
    ap.add_argument("--window", type=float, default=20.0,
                    help="http2 mode: seconds over which bytes and CPU are measured")
    ap.add_argument("--profile", action="store_true", help="cProfile the bench (to stderr)")
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
                 args.interval, args.fanout, Path(args.child_root), args.ttl)
        sys.exit(0)
    if args.procs < 1:
        ap.error("--procs must be at least 1")
    t = time.perf_counter()
    if args.transport == "http2":
        import logging
        logging.basicConfig(level=logging.ERROR)
        result = trio.run(main_http2, args.sizes, args.interval, args.fanout, args.procs,
                          args.ttl, args.window)
    else:
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            result = prof.runcall(trio.run, main, args.sizes, args.trials, args.fanout,
                                  args.sample, args.steady_rounds)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        else:
            result = trio.run(main, args.sizes, args.trials, args.fanout, args.sample,
                              args.steady_rounds)
    result["total_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result))
