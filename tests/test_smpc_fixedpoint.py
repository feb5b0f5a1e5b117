"""Fixed-point encoding, ring helpers and the PRG."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pgrid.errors import BadRequest
from p2pgrid.protocols.smpc import FixedPoint, Prg
from p2pgrid.protocols.smpc.ring import logical_rshift, msb, ring_matmul, ring_matmul_limbs

I64 = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)


@pytest.mark.parametrize("f", [0, 8, 16, 24])
def test_encode_decode_roundtrip(f):
    fp = FixedPoint(f)
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.14159, -2.5e4, 1e-9, 2.0 ** (40 - f)], dtype=torch.float64)
    back = fp.decode(fp.encode(x))
    assert (back - x).abs().max() <= 2.0 ** (-f - 1)


def test_encode_rounds_to_nearest():
    fp = FixedPoint(16)
    assert fp.encode(torch.tensor([2.0 ** -17 * 1.01, -(2.0 ** -17) * 1.01])).tolist() == [1, -1]


def test_decode_is_exact_for_large_values():
    fp = FixedPoint(16)
    big = torch.tensor([2 ** 62 + 1, -(2 ** 63)], dtype=torch.int64)
    assert fp.decode(big).tolist() == [2.0 ** 46 + 2.0 ** -16, -(2.0 ** 47)]


def test_encode_range_and_bad_input():
    fp = FixedPoint(16)
    fp.encode(torch.tensor([2.0 ** 46]))  # fine
    with pytest.raises(BadRequest):
        fp.encode(torch.tensor([2.0 ** 47]))
    with pytest.raises(BadRequest):
        fp.encode(torch.tensor([float("nan")]))
    with pytest.raises(BadRequest):
        fp.encode(torch.tensor([True]))
    with pytest.raises(BadRequest):
        FixedPoint(41)
    with pytest.raises(BadRequest):
        fp.decode(torch.tensor([1.0]))


def test_ring_arithmetic_wraps():
    big = torch.tensor([2 ** 63 - 1], dtype=torch.int64)
    assert (big + 1).item() == -(2 ** 63)
    assert (big * 2).item() == -2


@settings(max_examples=40, deadline=None)
@given(st.lists(I64, min_size=6, max_size=6), st.lists(I64, min_size=6, max_size=6))
def test_ring_matmul_exact_hypothesis(xa, xb):
    a = torch.tensor(xa, dtype=torch.int64).reshape(2, 3)
    b = torch.tensor(xb, dtype=torch.int64).reshape(3, 2)
    # the reference: Python integers reduced mod 2^64 into the signed range
    want = [[(sum(xa[3 * i + k] * xb[2 * k + j] for k in range(3)) + 2 ** 63) % 2 ** 64 - 2 ** 63
             for j in range(2)] for i in range(2)]
    assert ring_matmul(a, b).tolist() == want
    assert ring_matmul_limbs(a, b).tolist() == want


@pytest.mark.parametrize("shape_a,shape_b", [((5, 300), (300, 7)), ((3, 2500), (2500, 4)),
                                             ((2, 4, 6), (6, 3)), ((9,), (9, 2)), ((4, 9), (9,))])
def test_ring_matmul_matches_int64(shape_a, shape_b):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-(2 ** 63), 2 ** 63 - 1, shape_a, generator=g, dtype=torch.int64)
    b = torch.randint(-(2 ** 63), 2 ** 63 - 1, shape_b, generator=g, dtype=torch.int64)
    extremes = torch.tensor([-(2 ** 63), 2 ** 63 - 1, -1, 0], dtype=torch.int64)
    a.view(-1)[:4] = extremes
    b.view(-1)[:4] = extremes
    # two independent routes (int64 kernel, float64 limbs) agree, the fast one picked
    assert torch.equal(ring_matmul(a, b), ring_matmul_limbs(a, b))
    assert torch.equal(ring_matmul(a, b), a @ b)


def test_shifts_and_msb():
    x = torch.tensor([-1, 2 ** 62, -(2 ** 63), 5], dtype=torch.int64)
    assert logical_rshift(x, 60).tolist() == [15, 4, 8, 0]
    assert msb(x).tolist() == [1, 0, 1, 0]


def test_prg_deterministic_streams_and_uniform():
    p = Prg(bytes(16))
    a, b = p.int64((1000,)), p.int64((1000,))
    assert not torch.equal(a, b)  # successive calls use fresh streams
    assert torch.equal(Prg(bytes(16)).int64((1000,), stream=1), b)
    assert not torch.equal(Prg(bytes(range(16))).int64((1000,), stream=0), a)
    bits = torch.stack([(a >> i) & 1 for i in range(64)]).double().mean(1)
    assert ((bits - 0.5).abs() < 0.07).all()
    assert p.int64((0, 3)).shape == (0, 3)
    with pytest.raises(ValueError):
        Prg(b"short")
    assert len(p.bytes(16)) == 16 and p.child().int64((2,)).shape == (2,)
