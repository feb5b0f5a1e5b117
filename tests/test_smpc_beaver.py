"""Beaver multiplication / matmul, truncation, public scaling, mean."""

import pytest
import torch

from p2pgrid.errors import BadRequest, ShapeError
from p2pgrid.protocols.smpc import (FixedPoint, Shared, SmpcConfig, div_public, matmul, mean, mul,
                            truncate)
from p2pgrid.protocols.smpc.testing import run_op

F = 16
FP = FixedPoint(F)
DEALER = SmpcConfig(truncation="dealer")


def _ring_ref_close(got_ring, exact_product_ring, tol=1):
    """got ~ exact / 2^f within tol units of round(exact / 2^f)."""
    ref = (exact_product_ring + (1 << (F - 1))) >> F
    return int((got_ring - ref).abs().max()) <= tol


def _edge_pair(shape=(6, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 100
    y = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    x[0, :6] = torch.tensor([0.0, -0.0, -1.0, 1.0, 2.0 ** -16, -(2.0 ** 15)])
    y[0, :6] = torch.tensor([5.0, 0.0, -1.0, -7.5, 2.0 ** -16, 2.0 ** 13])
    return x, y


@pytest.mark.parametrize("n", [2, 3])
def test_mul_random_and_edges(n):
    x, y = _edge_pair()
    got, stats = run_op(n, mul, x, y, raw_out=True)
    assert _ring_ref_close(got, FP.encode(x) * FP.encode(y))
    assert stats.rounds == (1 if n == 2 else 2)
    # one message per round to every other party: eps and delta, 8 bytes each per element
    open_bytes = 2 * x.numel() * 8 * (n - 1)
    trunc_bytes = 0 if n == 2 else x.numel() * 8 * (n - 1)
    assert stats.bytes_sent == [open_bytes + trunc_bytes] * n
    assert stats.dealer_bytes[:-1] == [16 * (1 if n == 2 else 2)] * (n - 1)


@pytest.mark.parametrize("n", [2, 3])
def test_mul_near_range_limit_with_dealer_truncation(n):
    # products up to ~2^61 in the ring (real |x*y| ~ 2^29), dealer truncation has no failures
    x = torch.tensor([2.0 ** 15 - 0.5, -(2.0 ** 15), 2.0 ** 45, -(2.0 ** 45), 3.0, -(2.0 ** 14)])
    y = torch.tensor([2.0 ** 14 - 1, 2.0 ** 14 - 3, 2.0 ** -16, 2.0 ** -16, -(2.0 ** 28), -(2.0 ** 15)])
    got, _ = run_op(n, mul, x, y, config=DEALER, raw_out=True)
    assert _ring_ref_close(got, FP.encode(x) * FP.encode(y))


def test_mul_broadcast_and_scale0_operand():
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    got, stats = run_op(3, mul, x, y)
    assert torch.allclose(got, x * y, atol=1e-3)
    # eps travels at x's shape, delta at y's shape
    assert stats.bytes_sent[0] == (4 * 5 + 5) * 8 * 2 + 4 * 5 * 8 * 2
    vals = torch.tensor([1.5, -2.0, -3.25])
    out, stats = run_op(2, lambda ctx, v: mul(ctx, v, ctx.wrap(
        torch.tensor([1, 0, 1]) if ctx.party == 0 else torch.zeros(3, dtype=torch.int64), 0)), vals)
    assert out.tolist() == [1.5, 0.0, -3.25] and stats.rounds == 1  # no truncation for bits


@pytest.mark.parametrize("n", [2, 3])
def test_matmul_64x784_784x128(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(64, 784, generator=g, dtype=torch.float64)
    b = torch.randn(784, 128, generator=g, dtype=torch.float64) * 0.05
    got, stats = run_op(n, matmul, a, b, raw_out=True)
    assert _ring_ref_close(got, FP.encode(a) @ FP.encode(b))
    assert stats.rounds == (1 if n == 2 else 2)
    assert stats.bytes_sent[0] == ((64 * 784 + 784 * 128) * 8 + (64 * 128 * 8 if n == 3 else 0)) * (n - 1)
    decoded = FP.decode(got)
    assert (decoded - a @ b).abs().max() < 0.01


def test_matmul_batched_and_vector():
    a = torch.randn(2, 3, 4, dtype=torch.float64)
    b = torch.randn(4, 5, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64)
    (ab, av), _ = run_op(3, lambda ctx, x, y, z: _both(ctx, x, y, z), a, b, v)
    assert torch.allclose(ab, a @ b, atol=1e-3) and torch.allclose(av, a @ v, atol=1e-3)


def _both(ctx, x, y, z):
    ab = yield from matmul(ctx, x, y)
    av = yield from matmul(ctx, x, z)
    return ab, av


def test_public_operands():
    x = torch.tensor([[1.5, -2.0], [0.25, 8.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=torch.float64)
    for n in (2, 3):
        outs, stats = run_op(n, lambda ctx, s: _public_ops(ctx, s, w), x)
        xw, wx, xh, x3, xi = outs
        assert torch.allclose(xw, x @ w, atol=1e-4) and torch.allclose(wx, w @ x, atol=1e-4)
        assert torch.allclose(xh, x * 0.5, atol=1e-4)
        assert torch.equal(x3, x * 3) and torch.equal(xi, x * torch.tensor([2, -1]))
        assert stats.rounds == (0 if n == 2 else 3)  # integer products never truncate


def _public_ops(ctx, s, w):
    xw = yield from matmul(ctx, s, w)
    wx = yield from matmul(ctx, w, s)
    xh = yield from mul(ctx, s, 0.5)
    x3 = yield from mul(ctx, 3, s)
    xi = yield from mul(ctx, s, torch.tensor([2, -1]))
    return xw, wx, xh, x3, xi


@pytest.mark.parametrize("mode,n", [("local", 2), ("dealer", 2), ("dealer", 3), ("dealer", 4)])
def test_truncation_error_bound(mode, n):
    """|result - round(x / 2^f)| <= 1 unit for |x| < 2^50 (local) or < 2^62 (dealer)."""
    g = torch.Generator().manual_seed(7)
    mags = torch.randint(0, 51 if mode == "local" else 62, (20_000,), generator=g)
    x = torch.randint(-(2 ** 62), 2 ** 62, (20_000,), generator=g, dtype=torch.int64) >> (62 - mags)
    x[:6] = torch.tensor([0, 1, -1, 2 ** 15, -(2 ** 15), -(2 ** 16)])
    if mode == "dealer":
        x[6:8] = torch.tensor([2 ** 62 - 2 ** 17, -(2 ** 62)])
    got, stats = run_op(n, lambda ctx, s: truncate(ctx, s, F), x, raw=True, scale=2 * F,
                        config=SmpcConfig(truncation=mode), raw_out=True)
    ref = (x + (1 << (F - 1))) >> F
    err = got - ref
    assert int(err.abs().max()) <= 1
    assert stats.rounds == (0 if mode == "local" else 1)
    assert abs(float(err.double().mean())) < 0.6  # no systematic drift beyond the documented borrow


def test_local_truncation_fails_near_range_as_documented():
    # SecureML: for |x| ~ 2^61 the failure probability is large (2^(k+1-64)); the dealer
    # protocol has none. This pins the documented difference.
    x = torch.full((2_000,), 2 ** 61 + 12345, dtype=torch.int64)
    local, _ = run_op(2, lambda ctx, s: truncate(ctx, s, F), x, raw=True, scale=2 * F,
                      config=SmpcConfig(truncation="local"), raw_out=True)
    dealer, _ = run_op(2, lambda ctx, s: truncate(ctx, s, F), x, raw=True, scale=2 * F,
                       config=DEALER, raw_out=True)
    ref = (x + (1 << (F - 1))) >> F
    assert int(((local - ref).abs() > 1).sum()) > 100
    assert int((dealer - ref).abs().max()) <= 1


def test_local_truncation_needs_two_parties():
    with pytest.raises(BadRequest):
        run_op(3, lambda ctx, s: truncate(ctx, s, F), torch.tensor([1 << 20]), raw=True, scale=32,
               config=SmpcConfig(truncation="local"))


@pytest.mark.parametrize("n", [2, 3])
def test_mean_and_div(n):
    x = torch.randn(64, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    (m_all, m0, m1, d), _ = run_op(n, lambda ctx, s: _means(ctx, s), x)
    assert abs(float(m_all) - float(x.mean())) < 1e-3
    assert torch.allclose(m0, x.mean(0), atol=1e-3)
    assert torch.allclose(m1, x.mean(1, keepdim=True), atol=1e-3)
    assert torch.allclose(d, x / 3.0, atol=1e-3)


def _means(ctx, s):
    a = yield from mean(ctx, s)
    b = yield from mean(ctx, s, 0)
    c = yield from mean(ctx, s, 1, keepdim=True)
    d = yield from div_public(ctx, s, 3.0)
    return a, b, c, d


def test_shape_and_mixing_errors():
    x = torch.zeros(3, 4)
    with pytest.raises(ShapeError):
        run_op(2, mul, x, torch.zeros(2, 4))
    with pytest.raises(ShapeError):
        run_op(2, matmul, x, torch.zeros(3, 4))
    with pytest.raises(ShapeError):
        run_op(2, lambda ctx, s: matmul(ctx, s, torch.zeros(5, 2)), x)
    with pytest.raises(ShapeError):
        run_op(2, lambda ctx, s: mul(ctx, s, torch.zeros(2, 3, 4)), x)
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: mul(ctx, torch.zeros(3, 4), torch.ones(3, 4)), x)
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: mul(ctx, s, "2"), x)
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: matmul(ctx, s, 2.0), x)
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: mul(ctx, s, Shared(s.share, 1 - ctx.party, 2, 16)), x)  # other party's
    with pytest.raises(BadRequest):
        run_op(2, lambda ctx, s: div_public(ctx, s, 0), x)
