"""Comparison (edaBits + carry circuit), ReLU, max, argmax against plaintext."""

import pytest
import torch

from p2pgrid.errors import BadRequest, ShapeError
from p2pgrid.protocols.smpc import (CMP_ROUNDS, argmax, ge, ge_zero, gt, is_negative, le, lt, max,
                            max_with_index, relu)
from p2pgrid.protocols.smpc.compare import _pack_bits, _unpack_bits
from p2pgrid.protocols.smpc.gates import LEVEL1, LEVEL2, chunks_of, slice_bits, table_lookup, unslice_bits
from p2pgrid.protocols.smpc.testing import run_op

EDGE_RING = torch.tensor([0, 1, -1, 2, -2, 2 ** 62 - 1, -(2 ** 62), 2 ** 62, -(2 ** 62) - 1,
                          2 ** 63 - 1, -(2 ** 63), 2 ** 31, -(2 ** 31), 2 ** 32 - 1, 12345, -12345],
                         dtype=torch.int64)


def _random_ring(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mags = torch.randint(0, 64, (n,), generator=g)
    x = torch.randint(-(2 ** 63), 2 ** 63 - 1, (n,), generator=g, dtype=torch.int64)
    return torch.cat([EDGE_RING, x >> (63 - mags).clamp(max=63)])


@pytest.mark.parametrize("n", [2, 3])
def test_sign_exact_on_whole_ring(n):
    x = _random_ring()
    (ge0, neg), stats = run_op(n, lambda ctx, s: _both_signs(ctx, s), x, raw=True)
    assert torch.equal(ge0, (x >= 0).long())
    assert torch.equal(neg, (x < 0).long())
    assert stats.rounds == 2 * CMP_ROUNDS


def _both_signs(ctx, s):
    a = yield from ge_zero(ctx, s)
    b = yield from is_negative(ctx, s)
    return a, b


@pytest.mark.parametrize("n", [2, 3])
def test_comparisons_fixed_point(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(200, generator=g, dtype=torch.float64) * 50
    y = torch.randn(200, generator=g, dtype=torch.float64) * 50
    y[:50] = x[:50]                      # ties
    x[50:54] = torch.tensor([2.0 ** 45, -(2.0 ** 45), 2.0 ** 45, 0.0])   # near the range limit
    y[50:54] = torch.tensor([-(2.0 ** 45), 2.0 ** 45, 2.0 ** 45 - 2.0 ** -16, -(2.0 ** -16)])
    out, stats = run_op(n, lambda ctx, a, b: _all_cmps(ctx, a, b), x, y)
    want = [x >= y, x > y, x <= y, x < y, x >= 1.5, 0.25 > y]
    for got, w in zip(out, want):
        assert torch.equal(got, w.long())
    assert stats.rounds == 6 * CMP_ROUNDS


def _all_cmps(ctx, a, b):
    out = []
    for f, u, v in ((ge, a, b), (gt, a, b), (le, a, b), (lt, a, b), (ge, a, 1.5), (gt, 0.25, b)):
        out.append((yield from f(ctx, u, v)))
    return tuple(out)


@pytest.mark.parametrize("n", [2, 3])
def test_relu(n):
    x = torch.randn(64, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    x[0, :5] = torch.tensor([0.0, -(2.0 ** -16), 2.0 ** -16, 2.0 ** 46 - 1, -(2.0 ** 46)])
    (y, mask), stats = run_op(n, lambda ctx, s: relu(ctx, s, return_mask=True), x)
    assert torch.equal(y, torch.relu(torch.round(x * 2 ** 16) / 2 ** 16))  # exact: no truncation
    assert torch.equal(mask, (x >= 0).long())
    assert stats.rounds == CMP_ROUNDS  # the product is fused into the last round
    if n == 2:
        # per element: open c (8 B), the level-1 gate bits (4 groups x 8 bits = 4 B),
        # the level-2 gate bits (7 bits) and the final bit (1 bit), bit-sliced
        e = 64 * 128
        assert stats.bytes_sent == [e * 8 + e * 4 + e * 7 // 8 + e // 8] * 2


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("m", [1, 2, 5, 10, 16])
def test_max_argmax(n, m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(4, m, generator=g, dtype=torch.float64)
    x = torch.round(x * 2 ** 16) / 2 ** 16
    if m >= 3:
        x[0, 1] = x[0, 2] = x[0].max() + 1   # tie: first index wins
        x[1] = -5.0                          # all equal
        x[2, -1] = 2.0 ** 45                 # near range
    (mx, idx, hot), stats = run_op(n, lambda ctx, s: _max_stuff(ctx, s), x)
    assert torch.equal(mx, x.max(-1).values)
    first = torch.stack([row.eq(row.max()).nonzero()[0, 0] for row in x])
    assert torch.equal(idx, first)
    assert torch.equal(hot, torch.nn.functional.one_hot(first, m))
    levels = (m - 1).bit_length()
    assert stats.rounds == levels * (CMP_ROUNDS + 1) + (levels * (CMP_ROUNDS + 1)
                                                        + (CMP_ROUNDS if m > 1 else 0))


def _max_stuff(ctx, s):
    mx, idx = yield from max_with_index(ctx, s)
    hot = yield from argmax(ctx, s)
    return mx, idx, hot


def test_max_dims():
    x = torch.randn(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = torch.round(x * 2 ** 16) / 2 ** 16
    (m_all, m1, a1, a0i), _ = run_op(2, lambda ctx, s: _dims(ctx, s), x)
    assert float(m_all) == float(x.max())
    assert torch.equal(m1, x.max(1).values)
    assert torch.equal(a1, torch.nn.functional.one_hot(x.argmax(1), 7).permute(0, 2, 1))
    assert torch.equal(a0i, x.argmax(0))


def _dims(ctx, s):
    a = yield from max(ctx, s, None)
    b = yield from max(ctx, s, 1)
    c = yield from argmax(ctx, s, 1)
    d = yield from argmax(ctx, s, 0, one_hot=False)
    return a, b, c, d


def test_errors():
    x = torch.zeros(3)
    with pytest.raises(ShapeError):
        run_op(2, lambda ctx, s: max(ctx, s, 1), x)
    with pytest.raises(ShapeError):
        run_op(2, lambda ctx, s: max(ctx, s.sum()), x)
    with pytest.raises(ShapeError):
        run_op(2, lambda ctx, s: max(ctx, s[:0]), x)
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: ge(ctx, 1.0, 2.0), x)
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: relu(ctx, torch.zeros(3)), x)
    with pytest.raises(BadRequest):  # comparing values at different scales
        run_op(2, lambda ctx, s: ge(ctx, s, s.like(s.share, 0)), x)


def test_pack_bits_roundtrip():
    bits = torch.randint(0, 2, (3, 13), generator=torch.Generator().manual_seed(0))
    packed = _pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(_unpack_bits(packed, bits.shape), bits)


def test_gates_and_tables_match_plaintext():
    g = torch.Generator().manual_seed(0)
    # chunk tables: lt/eq of a public u against a secret v, shares XOR to the truth
    u = torch.randint(0, 2 ** 62, (200,), generator=g) * 2 + torch.randint(0, 2, (200,), generator=g)
    v = torch.randint(0, 2 ** 62, (200,), generator=g)
    v[:50] = u[:50]                                     # equal words
    uc, vc = chunks_of(u), chunks_of(v)
    one = (torch.ones_like(vc) << vc).view(200, 4, 4)
    tables = (one << (torch.arange(4) * 16)).sum(-1)
    noise = torch.randint(-2 ** 62, 2 ** 62, tables.shape, generator=g)
    lt0, eq0 = table_lookup(noise, uc)
    lt1, eq1 = table_lookup(tables ^ noise, uc)
    assert torch.equal(lt0 ^ lt1, (uc < vc).long()) and torch.equal(eq0 ^ eq1, (uc == vc).long())
    # masked 4-input gates: every input combination, XOR-shared between two parties
    for gate in (LEVEL1, LEVEL2):
        k = gate.n_inputs
        x = ((torch.arange(2 ** k).unsqueeze(-1) >> torch.arange(k)) & 1).T.contiguous()  # (k, 2^k)
        masks = torch.randint(0, 2, x.shape, generator=g)
        lam = gate.deal(slice_bits(masks))
        lam0 = torch.randint(-2 ** 62, 2 ** 62, lam.shape, generator=g)
        d = slice_bits(x ^ masks)
        outs = [unslice_bits(a ^ b, 2 ** k) for a, b in
                zip(gate.evaluate(d, lam0, True), gate.evaluate(d, lam ^ lam0, False))]
        for out, monos in zip(outs, gate.outputs):
            want = torch.zeros(2 ** k, dtype=torch.int64)
            for mono in monos:
                want ^= x[list(mono)].prod(0)
            assert torch.equal(out, want)


def test_empty_and_scalar_inputs():
    y, stats = run_op(2, relu, torch.zeros(0, 3))
    assert y.shape == (0, 3)
    assert float(run_op(3, relu, torch.tensor(-2.5))[0]) == 0.0
    assert int(run_op(2, lambda ctx, a: ge(ctx, a, 0.0), torch.tensor(0.0))[0]) == 1
