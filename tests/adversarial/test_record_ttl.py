"""Attack 4 (issue 14): records that never expire, and directories without bounds.

A record may state its own ttl; expiry used ``max(self.ttl, rec.ttl)``, so 300 Sybil
records stating ``ttl=inf`` stayed live forever after one push, and nothing bounded how
many records a peer keeps or how many one gossip partner brings. After: a record's
ttl is honoured only up to our own maximum (``max_record_ttl``, 4 x ttl by default, or
4 x the ttl our own record states in a large directory: Directory.max_lifetime),
the directory holds at most ``max_records`` (evicting the flooding source's records
first, never the peers it reached itself), and one partner introduces at most
``gossip_new_per_source`` new keys per round. Records are pushed through bob's real
gossip handler by a real peer.
"""

from __future__ import annotations

import time

import trio

from p2pgrid.config import PeerConfig
from p2pgrid.directory import GossipPush
from p2pgrid.testing import open_network

from dirattack import dead_sybils

TTL = 5.0  # the harness's


async def test_infinite_ttl_is_clamped_to_our_maximum(tmp_path):
    async with open_network(["hospital", "bob", "mallory"], tmp_path, ttl=TTL) as grid:
        bob = grid["bob"]
        sybils = dead_sybils(100, ttl=float("inf"))
        ack = await grid["mallory"].request("bob", GossipPush(records=sybils))
        assert ack.accepted == len(sybils)  # validly signed: accepted, for now
        keys = {r.key_id for r in sybils}
        assert keys <= set(bob.directory.digest())
        # Long after their last word (one push), past our maximum lifetime (4 x our
        # ttl, or 4 x the record ttl a directory of this size states, if longer): gone.
        cap = bob.directory.max_lifetime()
        assert cap <= 4 * 3 * bob.directory.book.limits.max_records / bob.directory.heads_per_s
        later = time.monotonic() + cap + 1.0
        bob.directory.expire(later)
        assert not keys & set(bob.directory.digest())
        # a relay of the same versions does not bring them back
        await grid["mallory"].request("bob", GossipPush(records=sybils))
        assert not keys & set(bob.directory.digest())


async def test_record_count_is_bounded_and_the_flood_evicts_itself(tmp_path):
    peers = ["hospital", "clinic", PeerConfig(name="bob", max_records=30), "mallory"]
    async with open_network(peers, tmp_path, ttl=TTL) as grid:
        bob = grid["bob"]
        for chunk in range(3):  # 300 Sybils, 100 per push, from one source
            await grid["mallory"].request("bob", GossipPush(
                records=dead_sybils(100, base_port=1 + 100 * chunk)))
            await trio.sleep(0.3)
        names = {r.name for r in bob.directory.peers()}
        assert len(bob.directory.peers()) <= 30
        assert {"hospital", "clinic", "bob"} <= names, names
        assert bob.directory.book.evicted > 0


async def test_one_partner_introduces_a_bounded_number_per_round(tmp_path):
    peers = ["hospital", PeerConfig(name="bob", gossip_new_per_source=20), "mallory"]
    async with open_network(peers, tmp_path, ttl=TTL) as grid:
        bob = grid["bob"]
        sybils = dead_sybils(300)
        ack = await grid["mallory"].request("bob", GossipPush(records=sybils))
        assert ack.accepted <= 20
        held = {r.key_id for r in sybils} & set(bob.directory.digest())
        assert len(held) <= 20
        # the limit is per source: hospital still brings its own updates
        await grid.wait_converged()
        assert "hospital" in {r.name for r in bob.directory.peers()}
