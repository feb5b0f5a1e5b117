"""Fixed-point encoding of real numbers into Z_2^64.

A real x is encoded as round(x * 2^f) read as a signed 64-bit integer, so the
representable range is |x| < 2^(63-f) (2^47 for the default f = 16), with
resolution 2^-f. Products of two encodings carry 2f fractional bits and must be
truncated by f (see :mod:`p2pgrid.protocols.smpc.truncation`). Encoding refuses values
outside the range rather than wrapping them silently.

>>> fp = FixedPoint(16)
>>> fp.encode(torch.tensor([1.5, -2.0])).tolist()
[98304, -131072]
>>> fp.decode(fp.encode(torch.tensor([0.25]))).tolist()
[0.25]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pgrid.errors import BadRequest

__all__ = ["FixedPoint", "DEFAULT_FRAC_BITS"]

DEFAULT_FRAC_BITS = 16


@dataclass(frozen=True)
class FixedPoint:
    """Encoder for `frac_bits` fractional bits (0 <= frac_bits <= 40)."""

    frac_bits: int = DEFAULT_FRAC_BITS

    def __post_init__(self):
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 40:
            raise BadRequest("frac_bits must be an int in [0, 40]")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def max_abs(self) -> float:
        """Largest encodable magnitude (exclusive)."""
        return float(2 ** (63 - self.frac_bits))

    def encode(self, x) -> torch.Tensor:
        """Float tensor / number -> int64 ring elements. Integer tensors are treated as numbers."""
        t = torch.as_tensor(x)
        if t.dtype == torch.bool or t.is_complex():
            raise BadRequest(f"cannot fixed-point encode a {t.dtype} tensor")
        t = t.to(torch.float64)
        if not torch.isfinite(t).all():
            raise BadRequest("cannot encode NaN or infinity")
        scaled = torch.round(t * self.scale)
        if scaled.numel() and scaled.abs().max().item() >= 2.0 ** 63:
            raise BadRequest(f"value out of the fixed-point range |x| < 2^{63 - self.frac_bits}")
        return scaled.to(torch.int64)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """int64 ring elements -> float64 (exact while |x| < 2^53 before scaling)."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise BadRequest("decode expects an int64 tensor of ring elements")
        if self.frac_bits == 0:
            return x.to(torch.float64)
        # split so large values keep their low bits: x = hi * 2^f + lo
        hi = x >> self.frac_bits
        lo = x & (self.scale - 1)
        return hi.to(torch.float64) + lo.to(torch.float64) / self.scale
