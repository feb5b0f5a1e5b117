"""Active (MAC-checked) SMPC core: correctness, MAC invariants, agreement with semi-honest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pgrid.errors import CheatingDetected
from p2pgrid.protocols import smpc
from p2pgrid.protocols.smpc import mac, mac_compare, mac_layers
from p2pgrid.protocols.smpc.testing import run_op

UNIT = 2.0 ** -16


def _inputs(ctx, *tensors):
    out = []
    for owner, t in enumerate(tensors):
        owner %= ctx.n_parties
        out.append((yield from mac.input_value(ctx, owner, t if ctx.party == owner else None,
                                               t.shape)))
    return out


def _mac_holds(dealer: mac.AuthDealer, shares: list[mac.AuthShared]) -> bool:
    """sum m_i == alpha * sum x_i mod 2^128 (what every authenticated value must satisfy)."""
    x = sum(mac.ints(s.value) for s in shares) % mac.MOD
    m = sum(mac.ints(s.mac) for s in shares) % mac.MOD
    return bool(np.all((x * dealer.alpha) % mac.MOD == m))


def test_linear_ops_keep_macs_and_values():
    a, b = torch.randn(5), torch.randn(5)
    dealer = mac.AuthDealer(3)

    def prog(ctx):
        xa, xb = yield from _inputs(ctx, a, b)
        s = ctx.sub(ctx.add(xa, ctx.mul_public(xb, 3)), xa)
        s = ctx.add_public(s, mac.encode(torch.full((5,), 0.5)))
        out = yield from mac.reveal(ctx, s)
        return s, out[0]

    res = mac.run_active(3, prog, dealer=dealer)
    assert _mac_holds(dealer, [o[0] for o in res.outputs])
    for _, out in res.outputs:
        assert torch.allclose(out, 3 * b.double() + 0.5, atol=4 * UNIT)


def test_mul_matmul_truncate_match_plaintext_and_keep_macs():
    x, w = torch.randn(4, 6), torch.randn(6, 3)
    dealer = mac.AuthDealer(2)

    def prog(ctx):
        xs, ws = yield from _inputs(ctx, x, w)
        z = yield from mac.truncate(ctx, (yield from mac.matmul(ctx, xs, ws)))
        p = yield from mac.truncate(ctx, (yield from mac.mul(ctx, xs, xs)))
        return z, p, (yield from mac.reveal(ctx, z, p))

    res = mac.run_active(2, prog, dealer=dealer)
    assert _mac_holds(dealer, [o[0] for o in res.outputs])
    assert _mac_holds(dealer, [o[1] for o in res.outputs])
    z, p = res.outputs[0][2]
    assert torch.allclose(z, x.double() @ w.double(), atol=1e-3)
    assert torch.allclose(p, x.double() ** 2, atol=1e-3)
    assert torch.equal(res.outputs[1][2][0], z)


def test_truncation_of_negative_and_large_values():
    v = torch.tensor([-30000.5, -1.0, -UNIT, 0.0, UNIT, 1.0, 29999.25])

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, v)
        sq = ctx.mul_public(xs, 1 << 16)        # scale 2f, exact
        sq.scale = 32
        return (yield from mac.reveal(ctx, (yield from mac.truncate(ctx, sq))))

    out = mac.run_active(2, prog).outputs[0][0]
    assert torch.allclose(out, v.double(), atol=2 * UNIT)


def test_rounds_and_bytes_are_counted():
    x = torch.randn(2, 3)

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, x)
        return (yield from mac.reveal(ctx, (yield from mac.mul(ctx, xs, xs))))

    res = mac.run_active(2, prog)
    # input 1, mul 1, check 3 + output opening 1 + check 3
    assert res.stats.rounds == 9
    assert res.stats.tags.count("a/mul") == 1
    # each opening sends 16 bytes per element (Z_2^128), twice semi-honest mode
    assert res.stats.bytes_sent[1] >= 3 * 6 * 16


def test_a_party_opening_another_seed_is_caught():
    """The check's seed shares are committed by the dealer: a party cannot choose its own."""
    x = torch.randn(3)

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, x)
        return (yield from mac.reveal(ctx, xs))

    def wrap(ctx, gen):
        def g():
            inbox = None
            try:
                while True:
                    rnd = next(gen) if inbox is None else gen.send(inbox)
                    if ctx.party == 1 and rnd.tag == "a/check/seed":
                        b = dict(rnd.broadcast)
                        b["seed"] = b["seed"].clone()
                        b["seed"][0] ^= 1
                        yield smpc.Round(rnd.tag, b)
                        return None     # the honest party aborts here; so does it
                    inbox = yield rnd
            except StopIteration as done:
                return done.value
            except CheatingDetected as exc:
                return exc
        return g()

    outs = mac.run_active(2, prog, wrap=wrap, session="seedy").outputs
    assert isinstance(outs[0], CheatingDetected) and "seedy" in str(outs[0])


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(2, 3),
       st.integers(0, 2 ** 32 - 1))
def test_active_equals_semi_honest(n, k, m, parties, seed):
    """Same program, both modes: raw products are equal exactly, truncated ones within
    the truncations' one-unit errors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * 4
    w = torch.randn(k, m, generator=g) * 4

    def prog(ctx):
        xs, ws = yield from _inputs(ctx, x, w)
        raw = yield from mac.matmul(ctx, xs, ws)
        t = yield from mac.truncate(ctx, raw)
        return (yield from mac.reveal(ctx, raw, t, decode_out=False))

    raw_a, t_a = mac.run_active(parties, prog).outputs[0]
    semi, _ = run_op(parties, smpc.matmul, x, w, seed=seed)
    enc = smpc.FixedPoint(16)
    exact = (enc.encode(x) @ enc.encode(w))
    got_raw = torch.from_numpy(raw_a.astype(np.uint64).view(np.int64).copy())
    assert torch.equal(got_raw, exact)
    assert torch.allclose(mac.decode(t_a), semi, atol=3 * UNIT)


def test_wrong_party_program_fails_loudly():
    x = torch.randn(2)

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, x)
        if ctx.party == 0:
            xs = yield from mac.mul(ctx, xs, xs)
        else:
            xs = yield from mac.truncate(ctx, xs)
        return xs

    with pytest.raises(Exception):
        mac.run_active(2, prog)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(-2.0 ** 40, 2.0 ** 40, allow_nan=False), min_size=1, max_size=6),
       st.integers(2, 3))
def test_relu_and_sign_are_exact(values, parties):
    x = torch.tensor(values, dtype=torch.float64)
    enc = mac.ints(mac.encode(x))
    want = torch.tensor([float((v if v < (1 << 127) else v - mac.MOD)) for v in enc.tolist()],
                        dtype=torch.float64) / 2 ** 16

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, x)
        bit = yield from mac_compare.ge_zero(ctx, xs)
        r, bit2 = yield from mac_compare.relu(ctx, xs)
        return (yield from mac.reveal(ctx, bit, r, bit2))

    bit, r, bit2 = mac.run_active(parties, prog).outputs[0]
    assert torch.equal(bit, (want >= 0).double())
    assert torch.equal(bit2, bit)
    assert torch.equal(r, want.clamp(min=0))


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(-2.0 ** 20, 2.0 ** 20, allow_nan=False), min_size=1, max_size=6),
       st.integers(0, 16), st.integers(2, 3))
def test_truncated_relu_matches_truncate_then_relu_and_keeps_macs(values, bits, parties):
    """relu(z, bits) = trunc(z, bits) [z >= 0] on one opening, within truncation's one
    unit of the exact result; its outputs satisfy the MAC relation."""
    x = torch.tensor(values, dtype=torch.float64)
    dealer = mac.AuthDealer(parties)

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, x)
        out, bit = yield from mac_compare.relu(ctx, xs, bits)
        return out, bit, (yield from mac.reveal(ctx, out, bit))

    res = mac.run_active(parties, prog, dealer=dealer)
    assert _mac_holds(dealer, [o[0] for o in res.outputs])
    assert _mac_holds(dealer, [o[1] for o in res.outputs])
    got, bit = res.outputs[0][2]
    raw = torch.round(x * 2 ** 16)
    want = torch.floor(raw / 2 ** bits).clamp(min=0) / 2 ** (16 - bits)
    assert torch.equal(bit, (raw >= 0).double())
    assert (got - want).abs().max() <= 2.0 ** -(16 - bits)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(-2.0 ** 10, 2.0 ** 10, allow_nan=False), min_size=1, max_size=6),
       st.integers(1, 20), st.integers(2, 3))
def test_relu_backward_matches_truncmul_and_keeps_macs(values, bwd, parties):
    """A training ReLU's backward pass on the pair dealt with its forward item (one
    opening) gives trunc(g, bwd) [x >= 0], as truncmul (two openings) does, within
    truncation's one unit, with the MAC relation kept; the bit is the forward's."""
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.flip(x, [0]) * 3.0
    dealer = mac.AuthDealer(parties)

    def prog(ctx):
        xs, gs = yield from _inputs(ctx, x, g)
        graw = ctx.mul_public(gs, 1 << bwd)          # g with bwd more fractional bits
        graw.scale = gs.scale + bwd
        out, bit, back = yield from mac_compare.relu_train(ctx, xs, 0, bwd)
        gb = yield from mac_compare.relu_backward(ctx, graw, back)
        ref = yield from mac_layers.truncmul(ctx, graw, bit, bwd)
        return gb, (yield from mac.reveal(ctx, out, gb, ref))

    res = mac.run_active(parties, prog, dealer=dealer)
    assert _mac_holds(dealer, [o[0] for o in res.outputs])
    out, gb, ref = res.outputs[0][1]
    mask = (torch.round(x * 2 ** 16) >= 0).double()
    assert res.outputs[0][0].scale == 16
    assert torch.equal(out, x.clamp(min=0).mul(2 ** 16).round().div(2 ** 16))
    want = torch.round(g * 2 ** 16) / 2 ** 16 * mask
    assert (gb - want).abs().max() <= 2.0 ** -16
    assert (ref - want).abs().max() <= 2.0 ** -16


def _mlp_program(x, w1, w2):
    def program(ops):
        xs = yield from ops.input(0, x if ops.party == 0 else None, x.shape)
        a = yield from ops.input(1, w1 if ops.party == 1 else None, w1.shape)
        b = yield from ops.input(1, w2 if ops.party == 1 else None, w2.shape)
        h = yield from ops.relu((yield from ops.matmul(xs, a)))
        out = yield from ops.matmul(h, b)
        return (yield from ops.reveal(out, (yield from ops.mul(out, out))))
    return program


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_same_program_both_modes_agree(seed):
    from p2pgrid.protocols.smpc.modes import run_program
    g = torch.Generator().manual_seed(seed)
    x, w1, w2 = (torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g),
                 torch.randn(4, 2, generator=g))
    prog = _mlp_program(x, w1, w2)
    semi = run_program(2, prog, security="semi-honest")
    act = run_program(2, prog, security="active")
    for s_out, a_out in zip(semi.outputs[0], act.outputs[0]):
        assert torch.allclose(s_out.double(), a_out, atol=1e-3)
    plain = torch.relu(x.double() @ w1.double()) @ w2.double()
    assert torch.allclose(act.outputs[0][0], plain, atol=1e-3)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.sampled_from([0, -1]),
       st.integers(0, 2 ** 32 - 1))
def test_max_and_argmax_equal_semi_honest_and_plaintext(rows, cols, dim, seed):
    """Ties on purpose (small integers): both modes pick the first maximum, as torch does."""
    from p2pgrid.protocols.smpc.modes import run_program
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (rows, cols), generator=g).double() / 4

    def prog(ops):
        v = yield from ops.input(0, x if ops.party == 0 else None, x.shape)
        outs = [(yield from ops.max(v, dim)), (yield from ops.max(v, None)),
                (yield from ops.argmax(v, dim)), (yield from ops.argmax(v, dim, one_hot=False))]
        return (yield from ops.reveal(*outs))

    semi = run_program(2, prog, security="semi-honest").outputs[0]
    act = run_program(2, prog, security="active").outputs
    assert all(len(o) == 4 for o in act)
    first = x.argmax(dim)
    want = [x.max(dim).values, x.max(), torch.nn.functional.one_hot(first, x.shape[dim])
            .movedim(-1, dim).double(), first.double()]
    for s_out, a_out, w in zip(semi, act[0], want):
        assert torch.equal(a_out, w), (a_out, w)
        assert torch.equal(s_out.double(), w)


def test_max_refuses_what_semi_honest_refuses():
    from p2pgrid.errors import ShapeError
    from p2pgrid.protocols.smpc.modes import run_program
    for shape, dim in (((2, 0), -1), ((3,), 1), ((3,), True)):
        def prog(ops, shape=shape, dim=dim):
            v = yield from ops.input(0, torch.zeros(shape) if ops.party == 0 else None, shape)
            return (yield from ops.max(v, dim))
        for security in ("semi-honest", "active"):
            with pytest.raises(ShapeError):
                run_program(2, prog, security=security)


def test_security_mode_is_checked():
    from p2pgrid.protocols.smpc.modes import run_program
    with pytest.raises(Exception, match="security"):
        run_program(2, lambda ops: None, security="malicious-ish")


def test_security_bench_runs_at_a_small_size(capsys):
    """The benchmark of both modes (scripts/bench_smpc_local.py --security) at a tiny size."""
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_smpc_local.py"
    spec = importlib.util.spec_from_file_location("bench_smpc_local", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--security", "both", "--batch", "2", "--mlp", "6-4-2", "--reps", "1"])
    out = json.loads(capsys.readouterr().out)
    ops = out["ops"]
    for name in ("train", "inference", "relu"):
        semi, act = ops[f"{name}/semi-honest"], ops[f"{name}/active"]
        assert act["rounds"] > semi["rounds"]          # the checks' rounds are counted
        assert min(act["bytes_sent_per_party"]) > 0 and act["dealer_bytes_per_party"][0] > 0


def test_training_steps_match_plaintext_with_a_wide_first_layer():
    """Two SGD steps of a ReLU MLP: the first weight is kept at f + WIDE_BITS + 16 bits and
    updated exactly (no truncation), as in semi-honest training; parameters and loss stay
    within a few units of 2^-16 of float training."""
    from p2pgrid.protocols.smpc import mac_program
    from p2pgrid.protocols.smpc.autograd import WIDE_BITS
    g = torch.Generator().manual_seed(1)
    dims = [20, 8, 6, 3]
    x, y = torch.randn(4, dims[0], generator=g), torch.randn(4, dims[-1], generator=g)
    ws = [torch.randn(a, b, generator=g) * 0.3 for a, b in zip(dims, dims[1:])]
    bs = [torch.randn(b, generator=g) * 0.1 for b in dims[1:]]
    layers = []
    for i in range(3):
        layers.append({"kind": "linear", "weight": f"w{i}", "bias": f"b{i}"})
        if i < 2:
            layers.append({"kind": "relu"})

    def prog(ctx):
        xs, ys, *flat = yield from _inputs(ctx, x, y, *[t for p in zip(ws, bs) for t in p])
        params = {f"{k}{i}": flat[2 * i + j] for i in range(3) for j, k in enumerate("wb")}
        net = mac_program.build(layers, params)
        for _ in range(2):
            loss = yield from mac_program.train_step(ctx, net, xs, ys, 0.1)
        ps = mac_program.parameters(net)
        return [p.scale for p in ps], (yield from mac.reveal(ctx, loss, *ps))

    class Logged(mac.AuthDealer):
        def take(self, party, index, key):
            if party == 0 and key[0] == "linear":
                layer_params.append(key[3])
            return super().take(party, index, key)

    layer_params = []
    scales, got = mac.run_active(2, prog, dealer=Logged(2)).outputs[0]
    assert scales[:2] == [2 * 16 + WIDE_BITS, 16 + WIDE_BITS] and scales[2:] == [16] * 4
    assert layer_params == [1, 3, 3] * 2   # the first layer's item without E = G B^T
    W = [w.double().requires_grad_() for w in ws]
    B = [b.double().requires_grad_() for b in bs]
    for _ in range(2):
        h = x.double()
        for i in range(3):
            h = h @ W[i] + B[i]
            h = h.relu() if i < 2 else h
        loss = ((h - y.double()) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for p in W + B:
                p -= 0.1 * p.grad
                p.grad = None
    want = [loss.detach()] + [t.detach() for p in zip(W, B) for t in p]
    for a, w in zip(got, want):
        assert (a - w).abs().max() < 1e-3


@pytest.mark.parametrize("parties", [2, 3])
def test_bit_openings_keep_binary_macs(parties):
    """Every bit the comparison opens satisfies XOR_i m_i = b Delta on every MAC plane, with
    Delta = XOR_i Delta_i (what the check's bit part verifies), and the opened words are
    the same at every party."""
    from p2pgrid.protocols.smpc.mac_bits import key_planes
    x = torch.randn(3, 70)

    def prog(ctx):
        (xs,) = yield from _inputs(ctx, x)
        yield from mac_compare.relu(ctx, xs)
        return list(ctx._bit_log)

    logs = mac.run_active(parties, prog).outputs
    assert len(logs[0]) == 2                               # the two gate levels
    for entries in zip(*logs):
        opened = entries[0][0]
        assert all(torch.equal(e[0], opened) for e in entries)
        mac_total, key = entries[0][1].clone(), 0
        for _, m, _ in entries[1:]:
            mac_total ^= m
        for _, _, k in entries:
            key ^= k
        planes = key_planes(key).view((64,) + (1,) * opened.dim())
        assert torch.equal(mac_total, opened.unsqueeze(0) & planes)


def test_relu_of_an_empty_tensor():
    from p2pgrid.protocols.smpc.modes import run_program
    x = torch.randn(0, 3)

    def prog(ops):
        v = yield from ops.input(0, x if ops.party == 0 else None, x.shape)
        return (yield from ops.reveal((yield from ops.relu(v))))

    (out,) = run_program(2, prog, security="active").outputs[0]
    assert out.shape == (0, 3)


@pytest.mark.parametrize("parties,fixed", [(2, None), (3, None), (3, 0), (2, 0)])
@pytest.mark.parametrize("kind,shapes,param", [
    ("a_linear", ((3, 5), (5, 4)), 3), ("a_linear", ((3, 5), (5, 4)), 1),
    ("a_mtriple", ((2, 3), (3, 2)), 0),
    ("a_triple", ((4,),), 0), ("a_trunc", ((6,),), 12), ("a_relu", ((5,),), 12 + 64 * 8),
    ("a_truncmul", ((3,),), 12)])
def test_network_material_sums_to_authenticated_values(kind, shapes, param, parties, fixed):
    """The network dealer's seed-compressed Materials, expanded as each party does: every
    component's shares sum to the dealt value (products of its uniform parts exact mod
    2^64, the value's ring) and the MAC shares to alpha times it mod 2^128; uniform values
    travel as seeds only, the corrected party's included, the others as their low words
    (8 bytes an element); only the corrected party (the last, or `fixed`) gets
    corrections."""
    from p2pgrid.protocols.smpc import mac_material as MM, ring128 as R
    from p2pgrid.protocols.smpc.messages import Request
    key = MM.MacKey.new(parties)
    req = Request(kind, shapes, param)
    clear: dict = {}
    mats = MM.deal(req, parties, key, clear, fixed=fixed)
    corrected = parties - 1 if fixed is None else fixed
    assert [bool(m.corrections) for m in mats] == [p == corrected for p in range(parties)]
    expanded = [m.expand() for m in mats]
    vals = {}
    for comp in expanded[0]:
        if not comp.endswith(".v"):
            continue
        name = comp[:-2]
        v = sum(R.to_ints(MM.ring_component(e[comp])) for e in expanded) % MOD128
        m = sum(R.to_ints(MM.ring_component(e[f"{name}.m"])) for e in expanded) % MOD128
        assert np.all(v == R.to_ints(clear[name]) % MOD128), name
        assert np.all(m == (v * key.alpha) % MOD128), name
        vals[name] = v
    uniform = {"a_linear": {"A", "B", "G"}, "a_mtriple": {"a", "b"}, "a_triple": {"a", "b"},
               "a_trunc": {"r"}, "a_relu": {"r", "s"}, "a_truncmul": {"r", "b"}}[kind]
    fixes = mats[corrected].corrections
    assert {c[:-2] for c in fixes if c.endswith(".v")} == set(vals) - uniform
    for comp, fix in fixes.items():    # low words only: the high ones are the seed's
        if comp.endswith(".v"):
            assert tuple(fix.shape) == tuple(expanded[0][comp].shape[:-1]), comp
    if kind == "a_linear":
        assert np.all(vals["C"] % MOD64 == vals["A"].dot(vals["B"]) % MOD64)
        assert np.all(vals["D"] % MOD64 == vals["A"].T.dot(vals["G"]) % MOD64)
        assert ("E" in vals) == bool(param & 2)        # 1: a first layer, no input gradient
        if "E" in vals:
            assert np.all(vals["E"] % MOD64 == vals["G"].dot(vals["B"].T) % MOD64)
    if kind in ("a_mtriple", "a_triple"):
        prod = vals["a"].dot(vals["b"]) if kind == "a_mtriple" else vals["a"] * vals["b"]
        assert np.all(vals["c"] % MOD64 == prod % MOD64)



def test_dealer_spreads_corrections_over_parties():
    """A training plan's corrections (tens of MB) go to whichever party has had the fewest
    bytes, not all to the last one; the step still matches what every party computes."""
    from p2pgrid.protocols.smpc import mac_material as MM
    from p2pgrid.protocols.smpc.messages import Request
    key, balance = MM.MacKey.new(2), MM.Balance(2)
    big, small = Request("a_mtriple", ((8, 64), (64, 32))), Request("a_trunc", ((4,),), 12)
    got = [[bool(m.corrections) for m in balance.deal(r, key)] for r in (big, small, big)]
    assert got == [[False, True], [True, False], [True, False]]
    assert balance.bytes[0] > 0 and balance.bytes[1] > 0


MOD128 = 1 << 128
MOD64 = 1 << 64
