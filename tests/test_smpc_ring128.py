"""Vectorized Z_2^128 (p2pgrid.protocols.smpc.ring128) against exact Python-int arithmetic,
with the C kernels (where built) and with the numpy code, each on its own."""

import os

import numpy as np
import pytest
import torch

from p2pgrid.protocols.smpc import ring128 as R

MOD = 1 << 128
_BUILT = R._C


@pytest.fixture(autouse=True, params=["c", "numpy"])
def backend(request, monkeypatch):
    """Every test of this file runs once on the C kernels and once on numpy alone."""
    if request.param == "c" and _BUILT is None:
        pytest.skip("the C kernels are off here (not built, or P2PGRID_RING128=numpy)")
    monkeypatch.setattr(R, "_C", _BUILT if request.param == "c" else None)
    return request.param


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI builds the kernels; elsewhere optional")
def test_ci_builds_the_kernels():
    assert R.KERNELS == "c" and _BUILT is not None


def _pair(shape_a, shape_b=None):
    return R.rand(shape_a), R.rand(shape_b or shape_a)


@pytest.mark.parametrize("shape", [(), (1,), (4, 5), (2, 3, 4)])
def test_elementwise_ops_are_exact(shape):
    a, b = _pair(shape)
    ia, ib = R.to_ints(a), R.to_ints(b)
    assert np.all(R.to_ints(R.add(a, b)) == (ia + ib) % MOD)
    assert np.all(R.to_ints(R.sub(a, b)) == (ia - ib) % MOD)
    assert np.all(R.to_ints(R.neg(a)) == (-ia) % MOD)
    assert np.all(R.to_ints(R.mul(a, b)) == (ia * ib) % MOD)
    c = 3 ** 70 + 12345
    assert np.all(R.to_ints(R.mul_int(a, c)) == (ia * c) % MOD)
    assert np.all(R.to_ints(R.mul_u64(a, b[0])) == (ia * b[0].astype(object)) % MOD)
    assert np.all(R.to_ints(R.add(a, -5)) == (ia - 5) % MOD)
    for n in (0, 1, 31, 63, 64, 65, 100, 127):
        assert np.all(R.to_ints(R.rshift(a, n)) == ia >> n)
        assert np.all(R.to_ints(R.lshift(a, n)) == (ia << n) % MOD)
    assert np.all(R.to_ints(R.from_wire(R.to_wire(a))) == ia)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 2), (8, 300, 7)])
def test_matmul_and_sums_are_exact(m, k, n):
    a, b = R.rand((m, k)), R.rand((k, n))
    assert np.all(R.to_ints(R.matmul(a, b)) == R.to_ints(a).dot(R.to_ints(b)) % MOD)
    assert np.all(R.to_ints(R.sum_(a, 0)) == R.to_ints(a).sum(0) % MOD)
    assert np.all(R.to_ints(R.sum_(a, -1, True)) == R.to_ints(a).sum(-1, keepdims=True) % MOD)
    assert R.to_int(R.sum_(a)) == int(R.to_ints(a).sum()) % MOD


@pytest.mark.parametrize("k", [1, 8, 85, 86, 784, 4681, 4682])
@pytest.mark.parametrize("fill", ["random", "all ones"])
def test_matmul_is_exact_at_each_limb_width_bound(k, fill):
    """Each limb width (22, 19, 16 bits) up to the largest inner dimension it is chosen
    for, and just past it, with every limb at its largest value ("all ones": 2^128 - 1)."""
    if fill == "random":
        a, b = R.rand((3, k)), R.rand((k, 4))
    else:
        a, b = (np.full((2, *s), np.uint64(2 ** 64 - 1)) for s in ((3, k), (k, 4)))
    assert np.all(R.to_ints(R.matmul(a, b)) == R.to_ints(a).dot(R.to_ints(b)) % MOD)


def test_limb_widths_by_inner_dimension():
    assert [R._limb_plan(k) for k in (1, 85, 86, 4681, 4682, 1 << 18)] == [
        (6, 22), (6, 22), (7, 19), (7, 19), (8, 16), (8, 16)]
    with pytest.raises(ValueError):
        R._limb_plan(1 << 19)


def test_signed_lifts_and_ints():
    v = torch.tensor([0, 1, -1, 2 ** 62, -(2 ** 63)], dtype=torch.int64)
    assert [int(x) for x in R.to_ints(R.from_signed(v))] == [int(x) % MOD for x in v.tolist()]
    assert R.to_int(R.from_ints(-7)) == MOD - 7


def test_kernel_cases_numpy_takes_over(backend):
    """Non-contiguous operands, broadcasting and negative constants: the kernels take what
    they can, numpy the rest, with the same exact results."""
    a = R.rand((6, 5))
    ia = R.to_ints(a)
    t = a[:, ::2, 1:]                                      # a non-contiguous view
    it = ia[::2, 1:]
    row = R.rand((5,))
    assert np.all(R.to_ints(R.add(t, t)) == (2 * it) % MOD)
    assert np.all(R.to_ints(R.mul(a, row)) == (ia * R.to_ints(row)) % MOD)   # broadcast
    one, pairs = R.rand(()), R.rand((3, 2))            # an element against a last axis of 2
    for op, f in ((R.add, lambda x, y: x + y), (R.sub, lambda x, y: x - y),
                  (R.mul, lambda x, y: x * y)):
        assert np.all(R.to_ints(op(pairs, one)) == f(R.to_ints(pairs), R.to_int(one)) % MOD)
        assert np.all(R.to_ints(op(one, pairs)) == f(R.to_int(one), R.to_ints(pairs)) % MOD)
    col = R.rand((6, 1))
    assert np.all(R.to_ints(R.sub(col, row)) == (R.to_ints(col) - R.to_ints(row)) % MOD)
    assert np.all(R.to_ints(R.sub(a, -(1 << 100))) == (ia + (1 << 100)) % MOD)
    assert np.all(R.to_ints(R.mul_int(a, -3)) == (-3 * ia) % MOD)
    assert np.all(R.to_ints(R.mul_u64(t, np.ascontiguousarray(t[0]))) ==
                  (it * t[0].astype(object)) % MOD)
    b = R.rand((4, 6))
    assert np.all(R.to_ints(R.matmul(t.transpose(0, 2, 1), b[:, :3, :])) ==
                  it.T.dot(R.to_ints(b)[:3]) % MOD)
    z = R.matmul(R.zeros((2, 0)), R.zeros((0, 3)))
    assert R.shape(z) == (2, 3) and not z.any()
    top = np.full((2, 3, 3), np.uint64(2 ** 64 - 1))   # every word at its largest
    assert np.all(R.to_ints(R.mul(top, top)) == (R.to_ints(top) ** 2) % MOD)


@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1, -2, (0, 1), (1, 2), (0, 2), (-1, 0), ()])
@pytest.mark.parametrize("keepdims", [False, True])
def test_sums_over_any_axes(axis, keepdims):
    """Consecutive axes go to the kernels, the others (and none at all) to numpy."""
    a = R.rand((3, 4, 5))
    want = R.to_ints(a).sum(axis=axis, keepdims=keepdims) % MOD
    got = R.sum_(a, axis, keepdims)
    assert R.shape(got) == np.shape(want)
    assert np.all(R.to_ints(got) == want)


def test_lt_eq_lookup_matches_numpy(backend):
    """The comparison's table lookup (gates.lt_eq_codes), over MAC planes, on both."""
    from p2pgrid.protocols.smpc import gates
    rng = np.random.default_rng()
    fields = rng.integers(0, 1 << 16, (64, 37, 16), dtype=np.uint16)
    u = rng.integers(0, 16, (37, 16), dtype=np.uint64)
    want = gates._LT_EQ[fields.astype(np.int32) >> u.astype(np.int32)]
    assert np.array_equal(gates.lt_eq_codes(fields, u), want)
    assert np.array_equal(gates.lt_eq_codes(fields[0], u), want[0])
    assert np.array_equal(gates.lt_eq_codes(fields, u[None]), want)     # as _level1 calls it


def test_bit_check_words_match_numpy(backend):
    """The bit openings' check words (mac_bits.sigma: a GF(2) product) on both."""
    import os as _os
    from p2pgrid.protocols.smpc import mac_bits
    rng = np.random.default_rng()
    log = [(torch.from_numpy(rng.integers(-2 ** 63, 2 ** 63 - 1, (3, w), dtype=np.int64)),
            torch.from_numpy(rng.integers(-2 ** 63, 2 ** 63 - 1, (mac_bits.PLANES, 3, w),
                                          dtype=np.int64)), int(rng.integers(0, 2 ** 63)))
           for w in (1, 5)]
    seed = _os.urandom(16)
    got = mac_bits.sigma(log, seed)
    saved, R._C = R._C, None
    try:
        want = mac_bits.sigma(log, seed)
    finally:
        R._C = saved
    assert got.dtype == np.uint64 and np.array_equal(got, want) and want.any()
