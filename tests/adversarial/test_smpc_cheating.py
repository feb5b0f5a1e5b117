"""Attack: a party deviates from the active (MAC-checked) SMPC protocol.

For each round type (input, mul, matmul, truncation, reveal) and each deviation (add 1 to
an opened share, flip a bit, replay an old opening, a wrong MAC share, equivocation),
every honest party must fail with CheatingDetected naming the session, every time, and
never return a result. Semi-honest mode cannot catch this (no MACs), so the old code had
no way to pass.
"""

from __future__ import annotations

import pytest
import torch

from p2pgrid.errors import CheatingDetected
from protocols.smpc import mac

from smpc_cheater import Cheater, catching

RUNS = 20
N = 3
CHEATER = 1

X = torch.randn(3, 4)
W = torch.randn(4, 2)


def _program(ctx):
    xs = yield from mac.input_value(ctx, 0, X if ctx.party == 0 else None, X.shape)
    ws = yield from mac.input_value(ctx, 2, W if ctx.party == 2 else None, W.shape)
    z = yield from mac.matmul(ctx, xs, ws)
    z = yield from mac.truncate(ctx, z)
    p = yield from mac.mul(ctx, z, z)
    return (yield from mac.reveal(ctx, p))


ROUND_TYPES = {"mul": "a/mul", "matmul": "a/matmul", "truncation": "a/trunc",
               "reveal": "a/reveal"}


def _run(cheater: Cheater, session: str):
    def wrap(ctx, gen):
        return cheater.wrap(ctx, gen) if ctx.party == CHEATER else catching(gen)
    return mac.run_active(N, _program, session=session, wrap=wrap).outputs


@pytest.mark.parametrize("deviation", ["add1", "flip", "replay", "mac", "equivocate"])
@pytest.mark.parametrize("round_type", sorted(ROUND_TYPES))
def test_smpc_cheating_is_always_detected(round_type, deviation):
    cheater = Cheater(CHEATER, ROUND_TYPES[round_type], deviation)
    if deviation == "replay":
        _run(cheater, "warm-up")       # an honest session it records the opening of
    for i in range(RUNS):
        session = f"s-{round_type}-{deviation}-{i}"
        outs = _run(cheater, session)
        assert cheater.deviated
        for p in range(N):
            if p == CHEATER:
                continue
            assert isinstance(outs[p], CheatingDetected), (p, type(outs[p]))
            assert session in str(outs[p])
            assert outs[p].status == 409


def test_smpc_input_equivocation_is_detected():
    """The input owner tells one party another masked input than the rest."""
    cheater = Cheater(0, "a/input", "equivocate")

    def wrap(ctx, gen):
        return cheater.wrap(ctx, gen) if ctx.party == 0 else catching(gen)
    for i in range(RUNS):
        outs = mac.run_active(N, _program, session=f"eq-{i}", wrap=wrap).outputs
        assert all(isinstance(o, CheatingDetected) for o in outs[1:])


def test_honest_runs_never_raise():
    for i in range(RUNS):
        outs = mac.run_active(N, _program, session=f"honest-{i}").outputs
        want = (X.double() @ W.double()) ** 2
        for out in outs:
            assert (out[0] - want).abs().max() < 1e-2
