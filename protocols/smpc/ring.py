"""Arithmetic in the ring Z_2^64, held in ``torch.int64``.

torch's int64 ``+ - * @ <<`` wrap around modulo 2^64 (two's complement), which is
exactly ring arithmetic; ``>>`` is an arithmetic (sign-extending) shift, and
:func:`logical_rshift` gives the unsigned one. Ring elements are read as signed
integers in [-2^63, 2^63) when they stand for numbers.

:func:`ring_matmul` has two exact routes. torch's int64 matmul wraps like the rest of
int64 arithmetic but has no BLAS behind it: in torch 2.13 on this project's CPUs it
runs at about 0.4 G multiply-adds per second (16 ms for 64x784 @ 784x128, one
thread). The float64 route splits each operand into three *balanced* limbs (22, 21,
21 bits, each |limb| <= 2^21); the six limb products that land below bit 64 are
float64 BLAS matmuls whose sums stay below 2^53 while the inner dimension is at most
2048, hence exact (longer inner dimensions go in chunks). Six times the multiply-adds,
yet about 3x faster (5.7 ms for the product above). Which route a product takes depends
on its size (the int64 kernel for small ones, where the limb splitting costs more than
it saves) and on a timing of both routes at first use, so a build whose int64 matmul is
fast keeps it; both give the same bits. The int64 route is used only if a self-check
at first use finds that it wraps exactly on this build.
"""

from __future__ import annotations

import time

import torch

__all__ = ["RING_BITS", "ring_matmul", "ring_matmul_limbs", "logical_rshift", "msb", "check_ring"]

RING_BITS = 64
_LIMB_SHIFTS = (0, 22, 43)
_LIMB_WIDTHS = (22, 21, 21)
_MAX_EXACT_K = 2048   # k * 2^21 * 2^21 <= 2^53
_PAIRS = ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0))  # shift sums 0, 22, 22, 44, 43, 43


def check_ring(t: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise TypeError(f"{what} must be a torch.int64 tensor of ring elements")
    return t


def logical_rshift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned right shift of int64 words (fills with zeros)."""
    if bits == 0:
        return x
    return (x >> bits) & ((1 << (RING_BITS - bits)) - 1)


def msb(x: torch.Tensor) -> torch.Tensor:
    """Top bit of each word as 0/1 int64."""
    return (x >> (RING_BITS - 1)) & 1


_LIMB_OFFSET = (1 << 21) + (1 << 42)   # rounds the low and middle limbs to the nearest


def _limbs(x: torch.Tensor) -> list[torch.Tensor]:
    """Balanced limbs l0 + l1*2^22 + l2*2^43 == x (mod 2^64), as float64.

    With y = x + 2^21 + 2^42, the bit fields of y less those offsets: l0 = y[0:22] - 2^21,
    l1 = y[22:43] - 2^20, l2 = y >> 43 (arithmetic), so |l0| <= 2^21, |l1|, |l2| <= 2^20.
    """
    y = x + _LIMB_OFFSET
    l0 = (y & ((1 << 22) - 1)).to(torch.float64) - float(1 << 21)
    l1 = ((y >> 22) & ((1 << 21) - 1)).to(torch.float64) - float(1 << 20)
    l2 = (y >> 43).to(torch.float64)
    return [l0, l1, l2]


def _matmul_limbs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    la, lb = _limbs(a), _limbs(b)
    acc = None
    for i, j in _PAIRS:
        part = torch.matmul(la[i], lb[j]).to(torch.int64) << (_LIMB_SHIFTS[i] + _LIMB_SHIFTS[j])
        acc = part if acc is None else acc + part
    return acc


_INT64_WRAPS: bool | None = None
_LIMBS_FROM: int | None = None   # multiply-adds from which the limb route is faster here
_SMALL = 1 << 15                 # below this the int64 kernel always wins (no limb splitting)


def _int64_matmul_wraps() -> bool:
    """Does torch's int64 matmul agree with the exact limb route on full-range words?"""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-2 ** 63, 2 ** 63 - 1, (9, 300), dtype=torch.int64, generator=g)
    b = torch.randint(-2 ** 63, 2 ** 63 - 1, (300, 7), dtype=torch.int64, generator=g)
    return torch.equal(torch.matmul(a, b), _matmul_limbs(a, b)) and \
        torch.equal(torch.matmul(a.T.contiguous().T, b), _matmul_limbs(a, b))


def _limbs_threshold() -> int:
    """Multiply-adds from which the limb route beats the int64 kernel on this build
    (the best of three timings of each on a mid-sized product)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-2 ** 63, 2 ** 63 - 1, (64, 256), dtype=torch.int64, generator=g)
    b = torch.randint(-2 ** 63, 2 ** 63 - 1, (256, 64), dtype=torch.int64, generator=g)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)
    return _SMALL if best(_matmul_limbs) < best(torch.matmul) else 1 << 62


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` modulo 2^64 for int64 tensors (torch.matmul broadcasting rules)."""
    global _INT64_WRAPS, _LIMBS_FROM
    check_ring(a, "left operand")
    check_ring(b, "right operand")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul needs tensors of at least one dimension")
    if _INT64_WRAPS is None:
        _INT64_WRAPS = _int64_matmul_wraps()
    if not _INT64_WRAPS:
        return ring_matmul_limbs(a, b)
    macs = a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
    if macs >= _SMALL:
        if _LIMBS_FROM is None:
            _LIMBS_FROM = _limbs_threshold()
        if macs >= _LIMBS_FROM:
            return ring_matmul_limbs(a, b)
    return torch.matmul(a, b)


def ring_matmul_limbs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`ring_matmul` through float64 BLAS (exact)."""
    k = a.shape[-1]
    if k <= _MAX_EXACT_K:
        return _matmul_limbs(a, b)
    acc = None
    b2 = b if b.dim() > 1 else b.unsqueeze(-1)
    for start in range(0, k, _MAX_EXACT_K):
        stop = min(start + _MAX_EXACT_K, k)
        part = _matmul_limbs(a[..., start:stop], b2[..., start:stop, :])
        acc = part if acc is None else acc + part
    return acc if b.dim() > 1 else acc.squeeze(-1)
