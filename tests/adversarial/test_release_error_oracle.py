"""Issue 12, attack 4: errors were an oracle.

The dry run on meta tensors cannot see values; a torch error from the real run came
back (``ShapeError``, with torch's message) before the permission check, so a user who
may not receive anything read a cell by bisection: index a constant of length t with the
cell's value and watch for the error. Now the release decision comes first: a refused
download never runs, and a result kept remote fails silently into a placeholder.
"""

import pytest
import torch

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.messages import Execute
from p2pgrid.testing import open_network

BIRTHS = birth_records(30, seed=9)  # weights in kg, 0.8 to 5.8


def _probe(obj: str, t: int) -> dict:
    """Index arange(t) by 10 * weight of record 4: fails iff that value >= t."""
    return {"nodes": [
        {"op": "leaf", "obj": obj},
        {"op": "getitem", "args": [{"$": 0}, {"tuple": [{"slice": [4, 5, None]}, 0]}], "kwargs": {}},
        {"op": "mul", "args": [{"$": 1}, 10.0], "kwargs": {}},
        {"op": "astype", "args": [{"$": 2}, {"dtype": "int64"}], "kwargs": {}},
        {"op": "getitem", "args": [{"tensor": torch.arange(t, dtype=torch.float32)}, {"$": 3}],
         "kwargs": {}}]}


async def _outcome(peer, program, fetch):
    try:
        reply = await peer.request("hospital", Execute(program, fetch))
    except p2pgrid.P2PError as e:
        return type(e).__name__, str(e)
    return "ok", tuple(reply.meta["shape"]) if not fetch else None


async def test_failures_on_data_tell_nothing(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr = await grid.net("hospital").publish(BIRTHS, tags=["births"], compute=["bob"],
                                                 aggregate=[])
        await grid.wait_searchable("#births")
        bob = grid["bob"]
        always, never = _probe(ptr.id, 1), _probe(ptr.id, 1000)  # fails / never fails
        for fetch in (True, False):
            a, b = await _outcome(bob, always, fetch), await _outcome(bob, never, fetch)
            assert a == b, (fetch, a, b)
            assert "out of bounds" not in a[1:].__repr__()
        assert (await _outcome(bob, always, True))[0] == "PermissionDenied"
        # a failed placeholder says nothing more when used, even in a granted aggregate
        kept = await bob.request("hospital", Execute(always, False))
        more = {"nodes": [{"op": "leaf", "obj": kept.meta["id"]},
                          {"op": "sum", "args": [{"$": 0}], "kwargs": {}}]}
        with pytest.raises(p2pgrid.PermissionDenied):
            await bob.request("hospital", Execute(more, True))
