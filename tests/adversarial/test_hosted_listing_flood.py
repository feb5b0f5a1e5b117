"""Attack 3 (issue 14): listings inside the host's record.

Any caller's tagged ``PutObject`` on the hospital used to be advertised in the
hospital's own signed record (and on its public page) as if the hospital published
it, first come first served up to the record's limit (2,000 objects): after that many
tiny tagged puts the owner's own new dataset was never advertised. After: the record
lists only what its owner published, so hosted objects are not advertised at all and
the owner's datasets always are.

The record's limit is lowered to 40 for the test (the same attack as 2,000 puts,
without spending a minute on them); the flood is 50 puts over real sockets.
"""

from __future__ import annotations

import torch
import trio

from p2pgrid import peer as peer_module
from p2pgrid.messages import PutObject
from p2pgrid.testing import open_network
from p2pgrid.web import render_status

LIMIT, FLOOD = 40, 50


async def test_hosted_puts_are_not_the_hosts_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(peer_module, "MAX_SUMMARIES", LIMIT)
    async with open_network(["hospital", "bob", "eve"], tmp_path) as grid:
        hospital, eve = grid["hospital"], grid["eve"]

        async def put(i):
            await eve.request("hospital", PutObject(torch.tensor([float(i)]),
                                                    ["birth-records", "spam"], f"spam {i}", None))

        async with trio.open_nursery() as nursery:
            for batch in range(0, FLOOD, 10):
                for i in range(batch, batch + 10):
                    nursery.start_soon(put, i)
                await trio.sleep(0)
        stored = await trio.to_thread.run_sync(hospital.store.list)
        assert sum(m.owner == "eve" for m in stored) == FLOOD  # the puts themselves worked

        real = await hospital.publish(torch.rand(200, 4), tags=["birth-records", "march"],
                                      compute=["bob"], description="March births")
        with trio.fail_after(20):
            await grid.wait_searchable("#birth-records #march")

        own = hospital.directory.own
        assert [o.id for o in own.objects] == [real.id]
        assert all(o.owner == "hospital" for o in own.objects)
        hits = grid["bob"].directory.search("#spam")
        assert "hospital" not in hits  # eve's objects are not the hospital's listing
        assert [o.id for o in grid["bob"].directory.search("#birth-records")["hospital"]] == [real.id]
        page = render_status(hospital)
        assert real.id in page and "spam" not in page
        # eve still finds what she stored by asking the host, where it is marked as hers
        mine = await grid.net("eve").peer("hospital").objects(["spam"])
        assert len(mine) == FLOOD and all(p.owner == "eve" for p in mine)
