"""Memory bomb: a program of constants only (no data leaf, so any fresh key may send it)
whose intermediates, all alive at once, would take far more memory than the peer has.

Its host must refuse it from the dry run, before any work, with a 4xx naming the
limit (``program_memory``), without its memory growing, and keep answering a
legitimate caller during and after. The peer runs as a real process under RLIMIT_AS,
so that on code without the budget the bomb hits that fence, not the test machine.
"""

import pytest
import torch
import trio

import p2pgrid
from p2pgrid.errors import ComputeLimitExceeded
from p2pgrid.messages import Execute

from _victim import rss_peak, start

GiB = 1 << 30
PROFILE = """
[peer]
name = "hospital"

[[dataset]]
id = "births"
generator = "birth_records"
rows = 500
seed = 7
month = 2
tags = ["birth-records"]
description = "synthetic births"
compute = ["bob"]
aggregate = ["bob"]
"""


def bomb(width: int = 8192, alive: int = 16) -> dict:
    """`alive` intermediates of width x width float32 (256 MiB each), all still needed
    when the last is made: 4 GiB at once, from 64 KiB of constants."""
    col, row = torch.zeros(width, 1), torch.zeros(1, width)
    nodes = [{"op": "add", "args": [{"tensor": col}, {"tensor": row}], "kwargs": {}}
             for _ in range(alive)]
    total = 0
    for i in range(1, alive):
        nodes.append({"op": "add", "args": [{"$": total}, {"$": i}], "kwargs": {}})
        total = len(nodes) - 1
    nodes.append({"op": "sum", "args": [{"$": total}], "kwargs": {}})
    return {"nodes": nodes}


def mean_program() -> dict:
    return {"nodes": [{"op": "leaf", "obj": "births"},
                      {"op": "getitem", "args": [{"$": 0}, {"tuple": [{"slice": [None, None, None]}, 0]}],
                       "kwargs": {}},
                      {"op": "mean", "args": [{"$": 1}], "kwargs": {}}]}


async def test_memory_bomb_is_refused_before_any_work(tmp_path):
    victim = start(tmp_path, name="hospital", profile=PROFILE, address_space=4 * GiB,
                   args=["--gossip-interval", "0.2"])
    proc, seed = victim.proc, victim.seed
    try:
        async with p2pgrid.connect("bob", join=[seed], mdns=False, data_dir=tmp_path / "bob") as bob, \
                p2pgrid.connect("mallory", join=[seed], mdns=False,
                                data_dir=tmp_path / "mallory") as mallory:
            with trio.fail_after(60):
                while "hospital" not in await bob.search("#birth-records"):
                    await trio.sleep(0.2)
            legit = mean_program()
            before = float((await bob._peer.request("hospital", Execute(legit, fetch=True))).value)
            answers, refusals = [], []

            async def attack():
                try:
                    await mallory._peer.request("hospital", Execute(bomb(), fetch=True), timeout=120)
                except p2pgrid.P2PError as e:
                    refusals.append(e)

            async def legitimate():
                r = await bob._peer.request("hospital", Execute(legit, fetch=True), timeout=60)
                answers.append(float(r.value))

            with trio.fail_after(180):
                async with trio.open_nursery() as n:
                    n.start_soon(attack)
                    n.start_soon(legitimate)
            assert answers == [before]   # answered while the bomb was being dealt with
            (refusal,) = refusals
            assert isinstance(refusal, ComputeLimitExceeded), repr(refusal)
            assert 400 <= refusal.status < 500 and "program_memory" in str(refusal)
            assert proc.poll() is None, "the bomb took the peer down"
            assert rss_peak(proc.pid) < 2 * GiB, "the bomb was run, not refused"
            after = await bob._peer.request("hospital", Execute(legit, fetch=True), timeout=60)
            assert float(after.value) == pytest.approx(before)
    finally:
        victim.stop()
