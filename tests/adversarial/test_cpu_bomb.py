"""CPU bomb: a small program (a broadcast then an 8192x8192 matmul, 64 KiB of constants)
that would keep its host's CPU busy for minutes.

Its host refuses it under the default FLOP budget; where a caller's budget lets it
run, it stops at the caller's wall-clock limit, and it stops within 1 s of its
caller giving up: the work runs in a worker process that is killed then, where a
thread would have gone on burning CPU for nobody. A legitimate caller is answered
during and after. The peer is a real process; its CPU time is read from /proc.
"""

import time

import pytest
import torch
import trio

import p2pgrid
from p2pgrid.errors import ComputeLimitExceeded, PeerUnavailable
from p2pgrid.messages import Execute

from _victim import alive, children, cpu, start, started, uptime

GiB = 1 << 30
PROFILE = """
[peer]
name = "hospital"

[peer.program_limits.mallory]   # budgets big enough to let the bomb start
flops = 1e13
seconds = 600

[peer.program_limits.eve]
flops = 1e13
seconds = 2

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


def matmul_bomb(n: int = 8192) -> dict:
    return {"nodes": [
        {"op": "add", "args": [{"tensor": torch.zeros(n, 1)}, {"tensor": torch.ones(1, n)}],
         "kwargs": {}},
        {"op": "matmul", "args": [{"$": 0}, {"$": 0}], "kwargs": {}},
        {"op": "sum", "args": [{"$": 1}], "kwargs": {}}]}


def warm_up() -> dict:
    """Just over the size that runs inline: it takes a worker and leaves it ready."""
    return {"nodes": [
        {"op": "add", "args": [{"tensor": torch.zeros(4096, 1)}, {"tensor": torch.ones(1, 4096)}],
         "kwargs": {}},
        {"op": "sum", "args": [{"$": 0}], "kwargs": {}}]}


MEAN = {"nodes": [{"op": "leaf", "obj": "births"},
                  {"op": "getitem", "args": [{"$": 0}, {"tuple": [{"slice": [None, None, None]}, 0]}],
                   "kwargs": {}},
                  {"op": "mean", "args": [{"$": 1}], "kwargs": {}}]}


def tree_cpu(pids: list[int]) -> float:
    return sum(cpu(p) for p in pids)


async def test_cpu_bomb_stops_when_its_caller_gives_up(tmp_path):
    victim = start(tmp_path, name="hospital", profile=PROFILE, address_space=8 * GiB,
                   args=["--gossip-interval", "0.2"])
    proc, seed = victim.proc, victim.seed
    try:
        async with p2pgrid.connect("bob", join=[seed], mdns=False, data_dir=tmp_path / "bob") as bob, \
                p2pgrid.connect("mallory", join=[seed], mdns=False,
                                data_dir=tmp_path / "mallory") as mallory, \
                p2pgrid.connect("eve", join=[seed], mdns=False, data_dir=tmp_path / "eve") as eve:
            with trio.fail_after(60):
                while "hospital" not in await bob.search("#birth-records"):
                    await trio.sleep(0.2)

            async def legit():
                return float((await bob._peer.request("hospital", Execute(MEAN, fetch=True),
                                                      timeout=60)).value)
            expected = await legit()

            # under the default budget the bomb is refused before any work
            with pytest.raises(ComputeLimitExceeded, match="program_flops") as refused:
                await bob._peer.request("hospital", Execute(matmul_bomb(), fetch=True), timeout=60)
            assert 400 <= refused.value.status < 500

            # a worker ready, so that the bomb computes at once
            await mallory._peer.request("hospital", Execute(warm_up(), fetch=True), timeout=180)
            sent = uptime()
            during = []

            async def caller_during():
                await trio.sleep(1.0)
                during.append(await legit())

            async with trio.open_nursery() as n:
                n.start_soon(caller_during)
                with pytest.raises(PeerUnavailable):   # mallory gives up after 3 s
                    await mallory._peer.request("hospital", Execute(matmul_bomb(), fetch=True),
                                                timeout=3)
            gave_up = time.monotonic()
            assert during == [pytest.approx(expected)]
            # the peer and the workers it had when the bomb came (not one started since)
            pids = [proc.pid] + [c for c in children(proc.pid) if started(c) <= sent]
            await trio.sleep(max(0.0, gave_up + 1.0 - time.monotonic()))
            before = {p: cpu(p) for p in pids}
            await trio.sleep(6.0)
            spent = sum(cpu(p) - before[p] for p in pids if alive(p) and before[p])
            assert spent < 0.6, f"{spent:.2f} s of CPU spent in the 6 s after the caller gave up"
            assert [p for p in pids[1:] if alive(p)] == [], "the bomb's worker still runs"

            # a budget's wall-clock limit stops it as well, with a 4xx naming the limit
            with pytest.raises(ComputeLimitExceeded, match="program_seconds") as stopped:
                await eve._peer.request("hospital", Execute(matmul_bomb(), fetch=True), timeout=300)
            assert 400 <= stopped.value.status < 500
            assert await legit() == pytest.approx(expected)
            assert proc.poll() is None
    finally:
        victim.stop()
