"""Gossip: spread and expiry in an in-memory network of directories, and the real loop."""

from __future__ import annotations

import math
import random

import pytest
import trio

from p2pgrid.directory import Directory, GossipReply, ObjectSummary
from p2pgrid.errors import NotFound, PeerUnavailable, Unauthenticated
from p2pgrid.gossip import Gossiper, MemoryNetwork, gossip_loop, gossip_once, wait_for
from p2pgrid.identity import Identity

KEYS = [Identity.generate() for _ in range(30)]


class Peer:
    """A directory at an address, with the state its heartbeat re-publishes."""

    def __init__(self, i: int, net: MemoryNetwork, clock, *, ttl: float, seeds=(), fanout=2):
        self.name = f"peer{i}"
        self.address = f"10.0.0.{i}:7000"
        self.directory = Directory(KEYS[i], ttl=ttl)
        self.objects: list[ObjectSummary] = [
            ObjectSummary(f"{self.name}-o", ["base"], "", [4], "float32", self.name)]
        net.add(self.address, self.directory)
        self.gossiper = Gossiper(self.directory, net.send, fanout=fanout, reissue=self.reissue,
                                 seeds=lambda: list(seeds), clock=clock,
                                 rng=random.Random(i), timeout=1.0)

    def reissue(self):
        return self.directory.issue(0.0, name=self.name, addresses=[self.address], cert=b"c",
                                    roles=[], objects=self.objects, services={})

    def publish(self, *tags):
        self.objects = self.objects + [
            ObjectSummary(f"{self.name}-new", list(tags), "", [4], "float32", self.name)]


class Sim:
    """N peers that all bootstrap from peer 0, stepped one synchronous round at a time."""

    def __init__(self, n: int, *, ttl: float = 1000.0, roundtrip: bool = True):
        self.now = 0.0
        self.net = MemoryNetwork(clock=lambda: self.now, roundtrip=roundtrip)
        clock = lambda: self.now  # noqa: E731
        self.peers = [Peer(0, self.net, clock, ttl=ttl)]
        self.peers += [Peer(i, self.net, clock, ttl=ttl, seeds=[self.peers[0].address])
                       for i in range(1, n)]
        for p in self.peers:
            p.reissue()
        self.alive = list(self.peers)
        self.stats = []

    async def round(self):
        stats = []

        async def one(p):
            stats.append(await p.gossiper.round())

        async with trio.open_nursery() as nursery:
            for p in self.alive:
                nursery.start_soon(one, p)
        self.now += 1.0
        self.stats.append(stats)

    async def rounds_until(self, predicate, limit: int) -> int:
        for r in range(limit + 1):
            if predicate():
                return r
            await self.round()
        raise AssertionError(f"not reached in {limit} rounds")

    def everyone_knows_everyone(self) -> bool:
        n = len(self.alive)
        return all(len(p.directory.peers()) == n for p in self.alive)

    def kill(self, peer: Peer):
        self.net.kill(peer.address)
        self.alive.remove(peer)


N = 30
BOUND = 4 * math.ceil(math.log2(N)) + 4


async def test_new_tag_reaches_every_peer_in_log_rounds():
    sim = Sim(N)
    boot = await sim.rounds_until(sim.everyone_knows_everyone, limit=BOUND)
    publisher = sim.peers[17]
    publisher.publish("#February", "birth-records")

    def everyone_finds_it():
        return all(publisher.name in p.directory.search("#february #birth-records")
                   for p in sim.alive)

    spread = await sim.rounds_until(everyone_finds_it, limit=BOUND)
    assert 1 <= spread <= BOUND, (boot, spread)
    print(f"N={N}: everyone knows everyone after {boot} rounds, new tag everywhere after {spread}")
    assert sim.net.bytes_sent > 0
    assert all(p.directory.rejected == 0 for p in sim.peers)
    # Everyone holds the same records, and the same (latest-seen) names.
    assert all(p.directory.lookup("peer17").key_id == KEYS[17].key_id for p in sim.alive)


async def test_killed_peer_expires_everywhere_and_stays_gone():
    ttl = 5.0
    sim = Sim(N, ttl=ttl, roundtrip=False)
    await sim.rounds_until(sim.everyone_knows_everyone, limit=BOUND)
    victim = sim.peers[5]
    sim.kill(victim)

    def nobody_has_it():
        return all(victim.directory.key_id not in p.directory.digest() for p in sim.alive)

    rounds = await sim.rounds_until(nobody_has_it, limit=int(ttl) + BOUND)
    assert rounds > ttl - 1  # not before its ttl ran out
    assert sum(s.failed for r in sim.stats for s in r) > 0  # sends to it failed, quietly
    for _ in range(int(3 * ttl)):  # the dead version is never gossiped back to life
        await sim.round()
        assert nobody_has_it()
    assert sim.everyone_knows_everyone()
    with pytest.raises(NotFound):
        sim.peers[0].directory.lookup("peer5")
    # Its name stays bound to its key everywhere.
    assert all(p.directory.bindings()["peer5"] == KEYS[5].public_bytes for p in sim.alive)


async def test_round_survives_unavailable_hanging_and_refusing_peers(autojump_clock):
    d = Directory(KEYS[0])
    d.issue(0.0, name="me", addresses=["me:1"], cert=b"", roles=[], objects=[], services={})
    calls = []

    async def send(address, msg):
        calls.append(address)
        if address == "down:1":
            raise PeerUnavailable("connection refused")
        if address == "hang:1":
            await trio.sleep_forever()
        if address == "auth:1":
            raise Unauthenticated("bad signature")
        if address == "reset:1":
            raise ConnectionResetError("reset by peer")
        return GossipReply(records=[], want=[])

    start = trio.current_time()
    stats = await gossip_once(d, send, seeds=lambda: ["down:1", "hang:1", "auth:1", "reset:1", "ok:1", "me:1"],
                              timeout=2.0)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert sorted(calls) == ["auth:1", "down:1", "hang:1", "ok:1", "reset:1"]  # never ourselves
    assert (stats.contacted, stats.failed) == (1, 4)


async def test_seeds_are_retried_until_reached():
    sim = Sim(2, roundtrip=False)
    a, b = sim.peers
    sim.net.kill(a.address)
    seen = []
    orig = sim.net.send

    async def send(address, msg):
        seen.append(address)
        return await orig(address, msg)

    b.gossiper.send = send
    await b.gossiper.round()
    await b.gossiper.round()
    assert seen == [a.address, a.address]  # unreached: tried every round
    sim.net.revive(a.address)
    await b.gossiper.round()
    assert b.directory.lookup("peer0")
    seen.clear()
    await b.gossiper.round()
    assert seen == [a.address]  # now a random live peer, no longer as a seed too
    assert a.address in b.gossiper.reached_seeds


async def test_gossip_loop_under_mock_clock(autojump_clock):
    net = MemoryNetwork(clock=trio.current_time)
    ttl = 5.0
    peers = [Peer(i, net, trio.current_time, ttl=ttl) for i in range(5)]
    seeds = [peers[0].address]
    dirs = [p.directory for p in peers]
    scopes = []

    def agreed(ps):
        return all(len(p.directory.peers()) == len(ps) for p in ps)

    async with trio.open_nursery() as nursery:
        for i, p in enumerate(peers):
            scope = trio.CancelScope()
            scopes.append(scope)

            async def run(task_status, p=p, scope=scope, i=i):
                with scope:
                    await gossip_loop(p.directory, net.send, interval=1.0, reissue=p.reissue,
                                      seeds=lambda: seeds, rng=random.Random(i),
                                      task_status=task_status)

            await nursery.start(run)
        assert all(d.own is not None for d in dirs)
        with trio.fail_after(20):
            await wait_for(dirs, lambda: agreed(peers))
        peers[3].publish("mnist")
        with trio.fail_after(20):
            await wait_for(dirs, lambda: all("peer3" in d.search("#MNIST") for d in dirs))
        # Stop peer 2: the others expire it after ttl.
        t0 = trio.current_time()
        scopes[2].cancel()
        net.kill(peers[2].address)
        rest = [p for p in peers if p is not peers[2]]
        with trio.fail_after(ttl + 20):
            await wait_for(dirs, lambda: agreed(rest))
        assert trio.current_time() - t0 >= ttl
        nursery.cancel_scope.cancel()
