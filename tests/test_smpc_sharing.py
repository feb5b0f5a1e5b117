"""Additive sharing: reconstruction, uniformity of shares, local ops, misuse errors."""

import math

import pytest
import torch

from p2pgrid.errors import BadRequest, ShapeError
from p2pgrid.protocols.smpc import (Prg, Shared, cat, reconstruct, reconstruct_float, share, share_float,
                            stack)
from p2pgrid.protocols.smpc.testing import open_outputs, run_op


@pytest.mark.parametrize("n", [2, 3, 5])
def test_share_reconstruct(n):
    x = torch.tensor([0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 123456789], dtype=torch.int64)
    shares = share(x, n, Prg(bytes(16)))
    assert len(shares) == n
    assert torch.equal(reconstruct(shares), x)
    assert not any(torch.equal(s, x) for s in shares)
    xf = torch.tensor([[-3.25, 0.0], [1e-3, 1e4]])
    back = reconstruct_float(share_float(xf, n, Prg(bytes(16))))
    assert (back - xf.double()).abs().max() <= 2 ** -17


def _chi2_top_byte(values: torch.Tensor) -> float:
    counts = torch.bincount(((values >> 56) & 0xFF).reshape(-1), minlength=256).double()
    expected = values.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _bit_bias(values: torch.Tensor) -> float:
    """Largest deviation of any of the 64 bit frequencies from 1/2, in standard errors."""
    freqs = torch.stack([((values >> i) & 1).double().mean() for i in range(64)])
    return float(((freqs - 0.5).abs() / (0.5 / math.sqrt(values.numel()))).max())


# chi-square with 255 degrees of freedom: the 99.99th percentile is ~ 347
CHI2_LIMIT = 347.0
BIT_LIMIT = 4.5


def _biased_share(secret, n, prg):
    """A broken sharing: masks drawn from only 2^56 values (top byte constant)."""
    masks = [prg.int64(secret.shape) & ((1 << 56) - 1) for _ in range(n - 1)]
    return masks + [secret - sum(masks)]


@pytest.mark.parametrize("n", [2, 3])
def test_shares_of_fixed_secret_look_uniform(n):
    secret = torch.full((40_000,), 0x0123_4567_89AB_CDEF, dtype=torch.int64)
    shares = share(secret, n, Prg(b"uniformity-test!"))
    for s in shares:  # every party's share, including the last (secret - sum of masks)
        assert _chi2_top_byte(s) < CHI2_LIMIT
        assert _bit_bias(s) < BIT_LIMIT


def test_uniformity_test_catches_biased_sharing():
    secret = torch.full((40_000,), 0x0123_4567_89AB_CDEF, dtype=torch.int64)
    biased = _biased_share(secret, 2, Prg(b"uniformity-test!"))
    assert _chi2_top_byte(biased[0]) > 10 * CHI2_LIMIT
    # a sharing whose mask misses one low bit is caught by the bit test
    prg = Prg(b"uniformity-test!")
    mask = prg.int64(secret.shape) & ~1
    assert _bit_bias(secret - mask) > 10 * BIT_LIMIT


def _wrap(x, party=0, n=2, scale=16):
    return Shared(x, party, n, scale)


def test_local_linear_ops_2_and_3_parties():
    x = torch.tensor([[1.5, -2.0, 0.0], [4.0, -0.25, 1e3]])
    y = torch.tensor([[0.5, 0.5, -1.0], [2.0, 8.0, -1e3]])
    for n in (2, 3):
        out, stats = run_op(n, lambda ctx, a, b: (a + b, a - b, -a, a * 3, 2 + a, a - 1.5,
                                                   1.0 - a, a.sum(), a.sum(0), a.sum(1, keepdim=True)),
                            x, y)
        assert stats.rounds == 0
        exp = (x + y, x - y, -x, x * 3, 2 + x, x - 1.5, 1.0 - x, x.sum(), x.sum(0), x.sum(1, keepdim=True))
        for got, want in zip(out, exp):
            assert got.shape == want.shape
            assert torch.allclose(got, want.double(), atol=1e-4)


def test_local_shape_ops():
    x = torch.arange(24.0).reshape(2, 3, 4) - 10
    y = torch.arange(8.0).reshape(2, 4)
    out, _ = run_op(3, lambda ctx, a, b: (a.reshape(6, 4), a[1], a[:, 1:, ::2], a.transpose(0, 2),
                                           a.permute(2, 0, 1), a.flatten(), a[0].T, a.unsqueeze(0),
                                           cat([a[0], b], 0), stack([a[0, 0], b[0]], 1),
                                           a[..., 0].expand(4, 2, 3), b * torch.tensor([1, -2, 3, 0])),
                    x, y)
    exp = (x.reshape(6, 4), x[1], x[:, 1:, ::2], x.transpose(0, 2), x.permute(2, 0, 1), x.flatten(),
           x[0].T, x.unsqueeze(0), torch.cat([x[0], y]), torch.stack([x[0, 0], y[0]], 1),
           x[..., 0].expand(4, 2, 3), y * torch.tensor([1, -2, 3, 0]))
    for got, want in zip(out, exp):
        assert torch.equal(got, want.double())


def test_public_add_only_party0_adds():
    x = torch.tensor([1.0, 2.0])
    out, _ = run_op(3, lambda ctx, a: a + torch.tensor([10.0, 20.0]), x)
    assert out.tolist() == [11.0, 22.0]


def test_mixing_errors():
    a = _wrap(torch.zeros(2, 3, dtype=torch.int64))
    b = _wrap(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ShapeError):
        a + b
    with pytest.raises(ShapeError):
        cat([a, b], 1)
    with pytest.raises(ShapeError):
        a.reshape(5)
    with pytest.raises(BadRequest):
        a + _wrap(torch.zeros(2, 3, dtype=torch.int64), party=1)   # another party's share
    with pytest.raises(BadRequest):
        a + _wrap(torch.zeros(2, 3, dtype=torch.int64), n=3)       # another session
    with pytest.raises(BadRequest):
        a + _wrap(torch.zeros(2, 3, dtype=torch.int64), scale=0)   # scale mismatch
    with pytest.raises(BadRequest):
        a + torch.zeros(2, 3, dtype=torch.int64)                  # raw ring words?
    with pytest.raises(BadRequest):
        a * a                                                     # needs Beaver
    with pytest.raises(BadRequest):
        a * 0.5                                                   # needs truncation
    with pytest.raises(BadRequest):
        a @ b
    with pytest.raises(BadRequest):
        a < b
    with pytest.raises(BadRequest):
        bool(a)
    with pytest.raises(BadRequest):
        a[a]
    with pytest.raises(BadRequest):
        cat([a, torch.zeros(2, 3)])
    with pytest.raises(ShapeError):
        a + torch.zeros(4, 2, 3)  # a public operand may not grow the shared tensor
    with pytest.raises(BadRequest):
        Shared(torch.zeros(2), 0, 2, 16)  # float share
    with pytest.raises(BadRequest):
        share(torch.zeros(2), 2, Prg(bytes(16)))  # floats must be encoded first
    with pytest.raises(ShapeError):
        reconstruct([torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)])
    assert "share" not in repr(a).lower().replace("shared", "")  # repr never shows values


def test_open_outputs_nested():
    s0 = Shared(torch.tensor([5], dtype=torch.int64), 0, 2, 0)
    s1 = Shared(torch.tensor([-2], dtype=torch.int64), 1, 2, 0)
    assert open_outputs([(s0, [s0]), (s1, [s1])])[1][0].tolist() == [3]
