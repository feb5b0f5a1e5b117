"""Vectorized arithmetic in Z_2^128: arrays of two uint64 limbs, no Python ints.

An element array of logical shape S is a numpy ``uint64`` array of shape ``(2, *S)``:
``a[0]`` the low 64 bits, ``a[1]`` the high 64 bits. Every operation is exact mod
2^128 and runs in numpy: additions carry with a comparison, products split into 32-bit
halves, matrix products go through 22-, 19- or 16-bit limbs in float64 BLAS, the widest
whose dot products stay below 2^53 (exact) for the inner dimension, sums split into
32-bit pieces. Local ops that move elements (reshape, slicing, transpose, concatenation) apply
the same numpy function to each limb (:func:`apply`).

Why not Python ints in object arrays (the first version of :mod:`.mac`): a 784x128
matrix product cost ~10^6 interpreted multiplications per party; here it is the 21 to
36 limb products that matter mod 2^128, in 6 to 8 float64 BLAS calls.

Where the optional C kernels were built (``_ring128.c``, setup.py), additions,
subtractions, products, matrix products and sums along an axis run there instead: one
pass with 128-bit words instead of a dozen numpy passes, and a matrix product 2 to 6 times
faster than the limbs. The numpy code stays for machines without a C compiler at install
time and as the reference the tests hold the kernels to; ``P2PGRID_RING128=numpy`` forces
it. :data:`KERNELS` says which is in use.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch

__all__ = ["zeros", "from_ints", "to_ints", "from_u64", "from_signed", "rand", "add", "sub", "neg",
           "mul", "mul_int", "mul_u64", "matmul", "sum_", "rshift", "lshift", "low", "apply", "to_wire",
           "from_wire", "shape", "numel", "to_int", "MASK64", "KERNELS", "matmul_each", "uniform"]

MASK64 = (1 << 64) - 1
_U = np.uint64
_LO32 = _U(0xFFFFFFFF)
_EXACT = 1 << 53              # float64 holds every integer below this
_MAX_INNER = 1 << 18          # dot-product length that keeps 16-bit limb sums exact in float64


_ABI = 3                      # _ring128.ABI of the _ring128.c this file was written for


def _load_kernels():
    """The C kernels (module :mod:`._ring128`), or None: not built, built from another
    version of _ring128.c, or P2PGRID_RING128=numpy."""
    if os.environ.get("P2PGRID_RING128", "").lower() == "numpy":
        return None
    try:
        from . import _ring128
    except ImportError:
        _ring128 = None
    abi = getattr(_ring128, "ABI", None)
    if abi != _ABI:
        logging.getLogger("p2pgrid.smpc").info(
            "active SMPC runs on numpy, slower: its C kernels are %s (reinstall p2pgrid "
            "where a C compiler is installed)", "not built" if abi is None else "out of date")
        return None
    return _ring128


_C = _load_kernels()
KERNELS = "c" if _C is not None else "numpy"


def kernels():
    """The C kernels module, or None (for other SMPC modules' hot loops: gates.lt_eq_codes)."""
    return _C


def _c_op(op: str, a, b) -> np.ndarray | None:
    """a op b (add, sub, mul) by the kernels into a fresh array, for a ring array a and an
    int or a ring array (operands that broadcast or are not contiguous are copied first:
    one pass, where numpy takes several); None for other operands (numpy then)."""
    if _C is None or not isinstance(a, np.ndarray) or a.dtype != _U:
        return None
    if isinstance(b, int):
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        c = (-b if op == "sub" else b) % (1 << 128)
        (_C.mul_scalar if op == "mul" else _C.add_scalar)(a, c & MASK64, c >> 64, out)
        return out
    if not isinstance(b, np.ndarray) or b.dtype != _U or b.ndim < 1 or len(b) != 2:
        return None
    if b.shape != a.shape:           # broadcast the logical shapes (axis 0 holds the words)
        try:
            logical = np.broadcast_shapes(a.shape[1:], b.shape[1:])
        except ValueError:
            return None
        a, b = (np.broadcast_to(x.reshape((2,) + (1,) * (len(logical) - x.ndim + 1) + x.shape[1:]),
                                (2,) + logical) for x in (a, b))
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    out = np.empty_like(a)
    getattr(_C, op)(a, b, out)
    return out


def shape(a: np.ndarray) -> tuple[int, ...]:
    return tuple(a.shape[1:])


def numel(a: np.ndarray) -> int:
    return int(a[0].size)


def zeros(s) -> np.ndarray:
    return np.zeros((2, *tuple(s)), dtype=_U)


def from_u64(lo) -> np.ndarray:
    """Values below 2^64 (uint64 array) as ring elements."""
    lo = np.asarray(lo, dtype=_U)
    return np.stack([lo, np.zeros_like(lo)])


def from_signed(v) -> np.ndarray:
    """int64 values (numpy or torch) as their lifts in Z_2^128 (negatives sign-extended)."""
    v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.int64)
    lo = v.astype(np.int64).view(_U)
    hi = np.where(v < 0, _U(MASK64), _U(0)).astype(_U)
    return np.stack([lo, hi])


def from_ints(v) -> np.ndarray:
    """Python ints (any sign; an object array or a scalar) reduced mod 2^128."""
    o = np.asarray(v, dtype=object) % (1 << 128)
    return np.stack([np.asarray(o & MASK64, dtype=object).astype(_U),
                     np.asarray(o >> 64, dtype=object).astype(_U)])


def to_ints(a: np.ndarray) -> np.ndarray:
    """Exact Python ints (an object array), for tests and reports only."""
    return a[0].astype(object) + (a[1].astype(object) << 64)


def to_int(a: np.ndarray) -> int:
    """The only element of a one-element array."""
    return int(a[0].reshape(-1)[0]) + (int(a[1].reshape(-1)[0]) << 64)


def rand(s, bits: int = 128) -> np.ndarray:
    """Uniform below 2^bits (64 or 128) from the OS CSPRNG."""
    s = tuple(s)
    n = int(np.prod(s, dtype=np.int64)) if s else 1
    lo = np.frombuffer(os.urandom(8 * n), dtype=_U).reshape(s)
    hi = np.frombuffer(os.urandom(8 * n), dtype=_U).reshape(s) if bits > 64 else \
        np.zeros(s, dtype=_U)
    return np.stack([lo, hi])


def uniform(name: str, s) -> np.ndarray:
    """Uniform in Z_2^128 from the OS CSPRNG (`name` unused): the default way dealt
    material draws its uniform values, where the network dealer draws them from the
    parties' seeds instead (:func:`.mac_material.deal`)."""
    return rand(s)


def _split(c: int) -> tuple[np.uint64, np.uint64]:
    c %= 1 << 128
    return _U(c & MASK64), _U(c >> 64)


def _out(a, b0) -> np.ndarray:
    """A fresh result of the broadcast shape: ops write its two words in place, as
    out[0, ...] and out[1, ...] (views even for 0-d results, where out[0] is a scalar).
    Stacking two temporaries instead cost about 10x the arithmetic on 10^5 elements."""
    return np.empty((2,) + np.broadcast_shapes(a.shape[1:], np.shape(b0)), dtype=_U)


def _words(b) -> tuple:
    return _split(b) if isinstance(b, int) else (b[0], b[1])


def add(a, b) -> np.ndarray:
    fast = _c_op("add", a, b)
    if fast is not None:
        return fast
    b0, b1 = _words(b)
    out = _out(a, b0)
    with np.errstate(over="ignore"):
        np.add(a[0], b0, out=out[0, ...])
        np.add(a[1], b1, out=out[1, ...])
        out[1, ...] += out[0, ...] < a[0]             # the carry
    return out


def sub(a, b) -> np.ndarray:
    fast = _c_op("sub", a, b)
    if fast is not None:
        return fast
    b0, b1 = _words(b)
    out = _out(a, b0)
    with np.errstate(over="ignore"):
        np.subtract(a[1], b1, out=out[1, ...])
        out[1, ...] -= a[0] < b0                      # the borrow
        np.subtract(a[0], b0, out=out[0, ...])
    return out


def neg(a) -> np.ndarray:
    return sub(zeros(()), a) if a.ndim == 1 else sub(np.zeros_like(a), a)


def _add_high(x, y, out) -> None:
    """out += the high words of the full 128-bit products x y (uint64, broadcasting), from
    32-bit halves (the low words are x y itself, wrapping)."""
    x0, x1 = x & _LO32, x >> _U(32)
    y0, y1 = y & _LO32, y >> _U(32)
    p01, p10 = x0 * y1, x1 * y0
    mid = (x0 * y0) >> _U(32)
    mid += p01 & _LO32
    mid += p10 & _LO32
    out += x1 * y1
    out += p01 >> _U(32)
    out += p10 >> _U(32)
    out += mid >> _U(32)


def _times(a, b0, b1) -> np.ndarray:
    """a (b0 + 2^64 b1) mod 2^128 (b1 None: a 64-bit multiplier)."""
    out = _out(a, b0)
    with np.errstate(over="ignore"):
        np.multiply(a[0], b0, out=out[0, ...])
        np.multiply(a[1], b0, out=out[1, ...])
        if b1 is not None:
            out[1, ...] += a[0] * b1
        _add_high(a[0], b0, out[1, ...])
    return out


def mul(a, b) -> np.ndarray:
    """Elementwise product mod 2^128 (broadcasting)."""
    if isinstance(b, int):
        return mul_int(a, b)
    fast = _c_op("mul", a, b)
    return fast if fast is not None else _times(a, b[0], b[1])


def mul_u64(a, c: np.ndarray) -> np.ndarray:
    """a times uint64 values c (below 2^64: no high word to multiply), elementwise."""
    if _C is not None and isinstance(a, np.ndarray) and a.dtype == _U \
            and isinstance(c, np.ndarray) and c.dtype == _U and c.shape == a.shape[1:]:
        a, c = np.ascontiguousarray(a), np.ascontiguousarray(c)
        out = np.empty_like(a)
        _C.mul_u64(a, c, out)
        return out
    return _times(a, c, None)


def mul_int(a, c: int) -> np.ndarray:
    fast = _c_op("mul", a, int(c))
    if fast is not None:
        return fast
    c0, c1 = _split(int(c))
    return _times(a, c0, c1)


def _limb_plan(n_inner: int) -> tuple[int, int]:
    """(limbs L, bits b) for a product of inner dimension `n_inner`: the fewest limbs
    (b = ceil(128 / L) bits each) whose sums stay exact in float64. Output limb s sums the
    products of limbs i + j = s (at most L pairs), each a dot product of `n_inner` terms
    below 2^(2b): exact while L n_inner (2^b - 1)^2 < 2^53. L = 6 (22 bits, 21 products)
    up to 85 terms, L = 7 (19 bits, 28 products) up to 4681, else L = 8 (16 bits, 36)."""
    for limbs in (6, 7, 8):
        bits = -(-128 // limbs)
        if limbs * n_inner * ((1 << bits) - 1) ** 2 < _EXACT:
            return limbs, bits
    raise ValueError(f"inner dimension {n_inner}: split it (matmul splits at {_MAX_INNER})")


def _limbs(a: np.ndarray, limbs: int, bits: int) -> np.ndarray:
    """The `limbs` b-bit limbs of a ring array, low first: shape (limbs, *logical shape),
    uint64 (the last limb holds the 128 - (limbs - 1) b top bits)."""
    out = np.empty((limbs,) + a.shape[1:], dtype=_U)
    mask = _U((1 << bits) - 1)
    for t in range(limbs):
        lo = t * bits
        if lo + bits <= 64:
            np.bitwise_and(a[0] >> _U(lo), mask, out=out[t])
        elif lo < 64:                                  # straddles the two words
            np.bitwise_and((a[0] >> _U(lo)) | (a[1] << _U(64 - lo)), mask, out=out[t])
        else:
            np.bitwise_and(a[1] >> _U(lo - 64), mask, out=out[t])
    return out


def _shifted(v: np.ndarray, bits: int) -> np.ndarray:
    """A uint64 array times 2^bits, as a ring element (bits < 128)."""
    if bits == 0:
        return from_u64(v)
    if bits < 64:
        return np.stack([v << _U(bits), v >> _U(64 - bits)])
    return np.stack([np.zeros_like(v), v << _U(bits - 64)])


def _combine(t: np.ndarray, bits: int) -> np.ndarray:
    """sum_s t[s] 2^(bits s) mod 2^128 for uint64 t of shape (L, ...), carrying."""
    lo, hi = t[0].copy(), np.zeros_like(t[0])
    with np.errstate(over="ignore"):
        for s in range(1, len(t)):
            sh = bits * s
            if sh < 64:
                add = t[s] << _U(sh)
                lo += add
                hi += (t[s] >> _U(64 - sh)) + (lo < add)
            else:
                hi += t[s] << _U(sh - 64)
    return np.stack([lo, hi])


def matmul(a, b) -> np.ndarray:
    """Matrix product mod 2^128 of 2-d ring arrays: float64 BLAS on b-bit limbs, b by
    the inner dimension (:func:`_limb_plan`)."""
    n_inner = a.shape[-1]
    m, n = a.shape[1], b.shape[2]
    if _C is not None and a.dtype == _U and b.dtype == _U:
        out = np.empty((2, m, n), dtype=_U)
        _C.matmul(np.ascontiguousarray(a), np.ascontiguousarray(b), out, m, n_inner, n)
        return out
    if n_inner > _MAX_INNER:
        acc = None
        for s in range(0, n_inner, _MAX_INNER):
            part = matmul(a[..., s:s + _MAX_INNER], b[:, s:s + _MAX_INNER])
            acc = part if acc is None else add(acc, part)
        return acc
    limbs, bits = _limb_plan(n_inner)
    # Output limb s = sum_{i+j=s} A_i B_j (only s < L matters mod 2^128: L(L+1)/2 limb
    # products, not L^2) is one BLAS call: the rows of [A_0 .. A_s] (a's limbs side by side,
    # a prefix of la's rows) times [B_s; ..; B_0] stacked (a suffix of lb, limbs reversed).
    # Each is a dot product of (s + 1) n_inner terms below 2^(2 bits): exact (_limb_plan).
    la = torch.from_numpy(np.ascontiguousarray(
        _limbs(a, limbs, bits).transpose(1, 0, 2), dtype=np.float64)).view(m, limbs * n_inner)
    lb = torch.from_numpy(np.ascontiguousarray(
        _limbs(b, limbs, bits)[::-1], dtype=np.float64)).view(limbs * n_inner, n)
    total = torch.empty(limbs, m, n, dtype=torch.float64)
    for s in range(limbs):
        torch.mm(la[:, :(s + 1) * n_inner], lb[(limbs - 1 - s) * n_inner:], out=total[s])
    return _combine(total.numpy().astype(_U), bits)


def matmul_each(xs: list, c, left: bool = False) -> list:
    """[x @ c for x in xs] (left: [c @ x ...]), e.g. a value share and its MAC share times
    one public matrix. numpy: one product of the stacked xs, so c's limbs are split once
    and BLAS gets one larger call; the kernels: one product each (contiguous results)."""
    if _C is not None:
        return [matmul(c, x) if left else matmul(x, c) for x in xs]
    axis = 2 if left else 1
    both = matmul(c, np.concatenate(xs, axis)) if left else matmul(np.concatenate(xs, axis), c)
    out, at = [], 0
    for x in xs:
        width = x.shape[axis]
        out.append(both[:, :, at:at + width] if left else both[:, at:at + width])
        at += width
    return out


def _c_sum(a, axis, keepdims: bool) -> np.ndarray | None:
    """sum_ by the kernels when the summed axes are consecutive (None otherwise)."""
    shape = a.shape[1:]
    nd = len(shape)
    axes = range(nd) if axis is None else axis if isinstance(axis, (tuple, list)) else (axis,)
    if _C is None or a.dtype != _U or not nd or not all(-nd <= x < nd for x in axes):
        return None
    axes = sorted({x % nd for x in axes})
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    i, j = axes[0], axes[-1] + 1
    out = np.empty((2,) + shape[:i] + ((1,) * (j - i) if keepdims else ()) + shape[j:], _U)
    _C.sum_axis(np.ascontiguousarray(a), out, int(np.prod(shape[:i], dtype=np.int64)),
                int(np.prod(shape[i:j], dtype=np.int64)), int(np.prod(shape[j:], dtype=np.int64)))
    return out


def sum_(a, axis=None, keepdims: bool = False) -> np.ndarray:
    """Sum over logical `axis` (None: all), mod 2^128."""
    fast = _c_sum(a, axis, keepdims)
    if fast is not None:
        return fast
    if axis is None:
        axes = tuple(range(1, a.ndim))
    elif isinstance(axis, (tuple, list)):
        axes = tuple(x + 1 if x >= 0 else x for x in axis)
    else:
        axes = (axis + 1 if axis >= 0 else axis,)
    pieces = [(a[0] & _LO32), (a[0] >> _U(32)), (a[1] & _LO32), (a[1] >> _U(32))]
    sums = [np.sum(p[None], axis=axes, keepdims=keepdims, dtype=_U)[0] for p in pieces]
    acc = from_u64(sums[0])
    for k in range(1, 4):
        acc = add(acc, _shifted(sums[k], 32 * k))
    return acc


def rshift(a, n: int) -> np.ndarray:
    """Logical right shift of the 128-bit value."""
    if n == 0:
        return a.copy()
    if n < 64:
        return np.stack([(a[0] >> _U(n)) | (a[1] << _U(64 - n)), a[1] >> _U(n)])
    return np.stack([a[1] >> _U(n - 64), np.zeros_like(a[1])])


def lshift(a, n: int) -> np.ndarray:
    if n == 0:
        return a.copy()
    if n < 64:
        return np.stack([a[0] << _U(n), (a[1] << _U(n)) | (a[0] >> _U(64 - n))])
    return np.stack([np.zeros_like(a[0]), a[0] << _U(n - 64)])


def low(a) -> np.ndarray:
    """The low 64 bits (a uint64 array of the logical shape)."""
    return a[0].copy()


def apply(a, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A function that only moves elements (reshape, index, transpose...), on both limbs."""
    return np.stack([np.array(fn(a[0])), np.array(fn(a[1]))])


def to_wire(a) -> torch.Tensor:
    """(…, 2) int64: low then high word (what openings and dealer corrections carry).
    One strided copy per word: np.moveaxis then a contiguous copy was 20x slower."""
    out = np.empty(a.shape[1:] + (2,), dtype=_U)
    out[..., 0] = a[0]
    out[..., 1] = a[1]
    return torch.from_numpy(out.view(np.int64))


def from_wire(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(t.contiguous().numpy().view(_U), -1, 0))
