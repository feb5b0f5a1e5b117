"""Issue 12, attack 1: a data node in a keyword argument was invisible to the rules.

``clamp(const, min=<data>)`` with a constant far below every value returns the raw
table; the old per-op levels looked at positional arguments only and labelled it
"public", so its caller fetched it and, kept remote with tags, anyone downloaded it.
"""

import pytest
import torch

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.messages import Execute, GetObject
from p2pgrid.testing import open_network

BIRTHS = birth_records(40, seed=5)


def _clamp_program(obj: str) -> dict:
    return {"nodes": [{"op": "leaf", "obj": obj},
                      {"op": "clamp", "args": [{"tensor": torch.full((40, 3), -1e9)}],
                       "kwargs": {"min": {"$": 0}}}]}


async def test_keyword_operand_is_an_input(tmp_path):
    async with open_network(["hospital", "bob", "eve"], tmp_path) as grid:
        # bob may compute; exact aggregates are not even granted (aggregate=[])
        ptr = await grid.net("hospital").publish(BIRTHS, tags=["births"], compute=["bob"],
                                                 aggregate=[])
        bob, eve = grid["bob"], grid["eve"]

        with pytest.raises(p2pgrid.PermissionDenied):
            await bob.request("hospital", Execute(_clamp_program(ptr.id), True))

        kept = await bob.request("hospital", Execute(_clamp_program(ptr.id), False,
                                                     ["births-copy"], "innocent"))
        rid = kept.meta["id"]
        assert "derivation" not in kept.meta  # the program stays with the host
        with pytest.raises(p2pgrid.PermissionDenied):
            await bob.request("hospital", GetObject(rid))
        # advertised by its tag, yet a stranger downloads nothing
        listed = await grid.net("eve").peer("hospital").objects(["births-copy"])
        assert [p.id for p in listed] == [rid]
        with pytest.raises(p2pgrid.PermissionDenied):
            await eve.request("hospital", GetObject(rid))

        # with exact aggregates granted, the keyword operand is still no aggregate
        agg = await grid.net("hospital").publish(BIRTHS, tags=["births2"], compute=["bob"],
                                                 aggregate=["bob"])
        with pytest.raises(p2pgrid.PermissionDenied, match="keyword"):
            await bob.request("hospital", Execute(_clamp_program(agg.id), True))
        summed = _clamp_program(agg.id)
        summed["nodes"].append({"op": "sum", "args": [{"$": 1}], "kwargs": {"dim": 0}})
        with pytest.raises(p2pgrid.PermissionDenied, match="keyword"):
            await bob.request("hospital", Execute(summed, True))

        # the same keyword in a harmless place still works for who may get the data
        mine = await grid.net("bob").peer("hospital").send(torch.zeros(3))
        low = {"nodes": [{"op": "leaf", "obj": mine.id},
                         {"op": "clamp", "args": [{"tensor": torch.ones(3)}],
                          "kwargs": {"min": {"$": 0}}}]}
        assert torch.equal((await bob.request("hospital", Execute(low, True))).value,
                           torch.ones(3))
