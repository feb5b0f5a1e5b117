"""Attack 2 (issue 14): fake listings.

An attacker signs, with a key of its own, a record listing a dataset whose owner is
"hospital", and gossips it to bob. Before: bob accepted it and its `#birth-records
#february` search showed the fake dataset (owner "hospital") under the attacker's
record. After: a record listing another owner's objects is dropped whole, and an
impostor record *named* hospital is never searched (its listing would claim
hospital's data); bob keeps serving.
"""

from __future__ import annotations

import torch
import trio

from p2pgrid.directory import GossipAck, GossipPush
from p2pgrid.testing import open_network

from dirattack import listing, sybil


async def test_records_claiming_another_owners_data_are_dropped(tmp_path):
    async with open_network(["hospital", "bob", "mallory"], tmp_path) as grid:
        hospital, bob, mallory = grid["hospital"], grid["bob"], grid["mallory"]
        real = await hospital.publish(torch.rand(500, 5), tags=["birth-records", "february"],
                                      compute=["bob"], aggregate=["bob"])
        await grid.wait_searchable("#birth-records #february")

        claims_other_owner = sybil("mallory2", objects=[
            listing("fake-births", "hospital", "birth-records", "february")])
        impostor = sybil("hospital", objects=[
            listing("fake-births-2", "hospital", "birth-records", "february")])
        before = bob.directory.rejected
        ack = await mallory.request("bob", GossipPush(records=[claims_other_owner, impostor]))
        assert isinstance(ack, GossipAck)

        # Gossip keeps running: whatever bob holds after a few rounds, searches show
        # hospital's data only under hospital, and only its real dataset.
        await trio.sleep(1.0)
        hits = bob.directory.search("#birth-records #february")
        assert list(hits) == ["hospital"], hits
        assert [o.id for o in hits["hospital"]] == [real.id]
        found = await grid.net("bob").search("#birth-records #february")
        assert {p: [x.id for x in v] for p, v in found.items()} == {"hospital": [real.id]}
        # the record listing hospital's data under another name is not kept at all
        assert claims_other_owner.key_id not in bob.directory.digest()
        assert bob.directory.rejected > before
        # and it does not spread: nobody else holds it either
        assert all(claims_other_owner.key_id not in p.directory.digest()
                   for p in grid.peers.values())
        # bob still serves and computes
        assert float(await (found["hospital"][0][:, 0].mean()).get()) > 0
