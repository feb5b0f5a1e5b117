"""Attack: a party deviates from the active (MAC-checked) SMPC protocol.

For each round type (input, mul, matmul, truncation, the comparison's arithmetic opening
and its two bit openings, reveal...) and each deviation (add 1 to an opened share, flip
a bit, replay an old opening, a wrong MAC share, equivocation),
every honest party must fail with CheatingDetected naming the session, every time, and
never return a result. Semi-honest mode cannot catch this (no MACs), so the old code had
no way to pass.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from p2pgrid.errors import CheatingDetected
from p2pgrid.protocols.smpc import mac, mac_compare, mac_layers

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
    out, _ = yield from mac_compare.relu(ctx, xs)
    return (yield from mac.reveal(ctx, out))


def _relu_truncated(ctx):
    """A raw product's ReLU: truncation, sign test and product on one opening."""
    xs, ws = yield from _inputs(ctx)
    out, bit = yield from mac_compare.relu(ctx, (yield from mac.matmul(ctx, xs, ws)), 16)
    return (yield from mac.reveal(ctx, out, bit))


def _truncmul(ctx):
    xs, ws = yield from _inputs(ctx)
    z = yield from mac.matmul(ctx, xs, ws)
    bit = yield from mac_compare.ge_zero(ctx, z)
    return (yield from mac.reveal(ctx, (yield from mac_layers.truncmul(ctx, z, bit, 16))))


def _relu_backward(ctx):
    """A training ReLU: forward with the backward pair dealt, then trunc(g) [x >= 0] on
    one opening of the gradient (g: the raw product, scale 2f)."""
    xs, ws = yield from _inputs(ctx)
    z = yield from mac.matmul(ctx, xs, ws)
    _, _, back = yield from mac_compare.relu_train(ctx, z, 16, 16)
    return (yield from mac.reveal(ctx, (yield from mac_compare.relu_backward(ctx, z, back))))


def _layer(ctx):
    """A training layer's passes: the forward opening and the backward one (g - G)."""
    xs, ws = yield from _inputs(ctx)
    z, saved = yield from mac_layers.linear_forward(ctx, xs, ws, train=True)
    dw, gx = yield from mac_layers.linear_backward(ctx, z, saved)
    return (yield from mac.reveal(ctx, dw, gx))


def _argmax(ctx):
    """max and one-hot argmax over X's rows: comparisons, the select products (a/max0,
    a/max1 for 3 columns) and the one-hot's comparison layer."""
    xs, _ = yield from _inputs(ctx)
    top = yield from mac_compare.max(ctx, xs, -1)
    return (yield from mac.reveal(ctx, top, (yield from mac_compare.argmax(ctx, xs, -1))))


# round type -> (the round's tag, a small program that has it)
ROUND_TYPES = {"mul": ("a/mul", _mul), "matmul": ("a/matmul", _matmul),
               "truncation": ("a/trunc", _truncation), "comparison": ("a/cmp", _relu),
               "comparison-bits-1": ("a/bit/cmp1", _relu),
               "comparison-bits-2": ("a/bit/cmp2", _relu),
               "relu-truncated": ("a/cmp", _relu_truncated),
               "relu-truncated-bits-2": ("a/bit/cmp2", _relu_truncated),
               "sign-bits-1": ("a/bit/cmp1", _truncmul),
               "reveal": ("a/reveal", _mul), "truncmul": ("a/truncmul", _truncmul),
               "relu-backward": ("a/relu/grad", _relu_backward),
               "relu-backward-bits-1": ("a/bit/cmp1", _relu_backward),
               "linear": ("a/linear", _layer), "linear-backward": ("a/linear/back", _layer),
               "max-select": ("a/max0", _argmax), "max-select-2": ("a/max1", _argmax),
               "argmax-bits-2": ("a/bit/cmp2", _argmax)}


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
        x, w = X.double(), W.double()
        for program, want in ((_truncation, [x @ w]), (_relu, [x.clamp(min=0)]),
                              (_relu_truncated, [(x @ w).clamp(min=0), (x @ w >= 0).double()]),
                              (_truncmul, [(x @ w).clamp(min=0)]),
                              (_relu_backward, [(x @ w).clamp(min=0)]),
                              (_layer, [x.T @ (x @ w), (x @ w) @ w.T]),
                              (_argmax, [x.max(-1).values, nn.functional.one_hot(
                                  x.argmax(-1), x.shape[-1]).double()])):
            outs = mac.run_active(N, program, session=f"honest-{i}").outputs
            for out in outs:
                for got, exp in zip(out, want):
                    assert (got - exp).abs().max() < 1e-3


# ---------------------------------------------------------------- over real peers

async def test_smpc_cheating_party_over_the_network(tmp_path):
    """A party whose peer adds 1 to a share it sends (a test-only PeerConfig field, which no
    profile or message can set) in an active session: the honest parties raise
    CheatingDetected, the requester gets CheatingDetected, nothing is released or kept:
    no result, no stored output, the model's parameters unchanged."""
    from torch import nn

    from p2pgrid import smpc
    from p2pgrid.config import PeerConfig
    from p2pgrid.testing import open_network

    dealer, parties = "university", ("hospital", "clinic", "public")
    cfgs = [PeerConfig(name=n, data_dir=tmp_path / n, smpc_parties=parties,
                       crypto_providers=(dealer,)) for n in parties]
    cfgs.append(PeerConfig(name=dealer, roles=("crypto-provider",), data_dir=tmp_path / dealer))
    cfgs.append(PeerConfig(name="company", data_dir=tmp_path / "company"))
    async with open_network(cfgs, tmp_path, gossip_interval=0.5, ttl=30.0) as grid:
        net = grid.net("company")
        kw = dict(parties=parties, dealer=dealer, security="active")
        a = torch.randn(3, 4, dtype=torch.float64)
        A = await net.share(a, **kw)
        model = nn.Sequential(nn.Linear(4, 2)).double()
        enc = await net.encrypt_model(model, requires_grad=True, **kw)
        Y = await net.share(torch.randn(3, 2, dtype=torch.float64), **kw)
        close_ok = (await (A * A).reveal() - a * a).abs().max()   # honest: fine
        assert close_ok < 1e-3

        honest = [grid[n].extensions["smpc"] for n in ("hospital", "public")]
        before = [dict(s.shares) for s in honest]
        # from now on the clinic's peer deviates (the field is only read, never sent)
        clinic = grid["clinic"]
        object.__setattr__(clinic.config, "smpc_test_cheat", "add1")

        attempts = [lambda: (A * A).reveal(), lambda: (A @ A.T).relu().store(),
                    lambda: enc.fit_batch(A, Y, optimizer=smpc.SGD(enc, lr=0.1)),
                    lambda: enc.predict(A)]
        for attempt in attempts:
            with pytest.raises(CheatingDetected) as err:
                await attempt()
            assert err.value.status == 409 and "\n" not in str(err.value)
        for state, old in zip(honest, before):
            outcomes = [v for v in state.finished.values() if v != "ok"]
            assert len(outcomes) == len(attempts)
            assert all(v.startswith("CheatingDetected") for v in outcomes), outcomes
            # nothing kept: the same shares as before, the model's parameters untouched
            assert set(state.shares) == set(old)
            assert all(state.shares[k] is old[k] for k in old)

        object.__setattr__(clinic.config, "smpc_test_cheat", "")
        close_ok = (await (A * A).reveal() - a * a).abs().max()   # the peers keep serving
        assert close_ok < 1e-3


def test_cheat_hook_is_not_a_profile_key(tmp_path):
    """The deviation hook is a test double's switch: no profile can turn it on."""
    from p2pgrid.config import ProfileError, load_profile
    profile = tmp_path / "p.toml"
    profile.write_text('[peer]\nname = "h"\nsmpc_test_cheat = "add1"\n')
    with pytest.raises(ProfileError, match="smpc_test_cheat"):
        load_profile(profile)
    profile.write_text('[peer]\nname = "h"\nsmpc_security = "active"\n')
    assert load_profile(profile).smpc_security == "active"
