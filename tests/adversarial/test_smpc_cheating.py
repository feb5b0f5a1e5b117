"""Attack: a party deviates from the active (MAC-checked) SMPC protocol.

For each round type (input, mul, matmul, truncation, reveal) and each deviation (add 1 to
an opened share, flip a bit, replay an old opening, a wrong MAC share, equivocation),
every honest party must fail with CheatingDetected naming the session, every time, and
never return a result. Semi-honest mode cannot catch this (no MACs), so the old code had
no way to pass.
"""

from __future__ import annotations

import os

import pytest
import torch

from p2pgrid.errors import CheatingDetected
from p2pgrid.protocols.smpc import mac

from smpc_cheater import Cheater, catching

RUNS = int(os.environ.get("SMPC_CHEAT_RUNS", "5"))   # 20+ for a thorough run
N = 3
CHEATER = 1

X = torch.randn(2, 3)
W = torch.randn(3, 2)


def _inputs(ctx):
    xs = yield from mac.input_value(ctx, 0, X if ctx.party == 0 else None, X.shape)
    ws = yield from mac.input_value(ctx, 2, W if ctx.party == 2 else None, W.shape)
    return xs, ws


def _mul(ctx):
    xs, ws = yield from _inputs(ctx)
    return (yield from mac.reveal(ctx, (yield from mac.mul(ctx, xs, xs))))


def _matmul(ctx):
    xs, ws = yield from _inputs(ctx)
    return (yield from mac.reveal(ctx, (yield from mac.matmul(ctx, xs, ws))))


def _truncation(ctx):
    xs, ws = yield from _inputs(ctx)
    z = yield from mac.truncate(ctx, (yield from mac.matmul(ctx, xs, ws)))
    return (yield from mac.reveal(ctx, z))


def _relu(ctx):
    xs, _ = yield from _inputs(ctx)
    return (yield from mac.reveal(ctx, (yield from mac.relu(ctx, xs))))


# round type -> (the round's tag, a small program that has it)
ROUND_TYPES = {"mul": ("a/mul", _mul), "matmul": ("a/matmul", _matmul),
               "truncation": ("a/trunc", _truncation), "comparison": ("a/cmp", _relu),
               "comparison-and": ("a/cmp/and", _relu), "relu": ("a/relu", _relu),
               "reveal": ("a/reveal", _mul)}


def _run(cheater: Cheater, session: str, program):
    def wrap(ctx, gen):
        return cheater.wrap(ctx, gen) if ctx.party == CHEATER else catching(gen)
    return mac.run_active(N, program, session=session, wrap=wrap).outputs


@pytest.mark.parametrize("deviation", ["add1", "flip", "replay", "mac", "equivocate"])
@pytest.mark.parametrize("round_type", sorted(ROUND_TYPES))
def test_smpc_cheating_is_always_detected(round_type, deviation):
    tag, program = ROUND_TYPES[round_type]
    cheater = Cheater(CHEATER, tag, deviation)
    if deviation == "replay":
        _run(cheater, "warm-up", program)   # an honest session it records the opening of
    for i in range(RUNS):
        session = f"s-{round_type}-{deviation}-{i}"
        outs = _run(cheater, session, program)
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
        outs = mac.run_active(N, _mul, session=f"eq-{i}", wrap=wrap).outputs
        assert all(isinstance(o, CheatingDetected) for o in outs[1:])


def test_honest_runs_never_raise():
    for i in range(RUNS):
        for program, want in ((_truncation, X.double() @ W.double()),
                              (_relu, X.double().clamp(min=0))):
            outs = mac.run_active(N, program, session=f"honest-{i}").outputs
            for out in outs:
                assert (out[0] - want).abs().max() < 1e-3
