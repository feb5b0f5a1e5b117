"""Randomness that protects privacy: DP noise and DP sampling from a cryptographic PRG.

Every :class:`PrivateRandom` is AES-128-CTR (:class:`p2pgrid.protocols.smpc.prg.Prg`) keyed with
16 fresh bytes from the OS CSPRNG of the peer that applies it. Nothing a caller, a
coordinator or a config sets can seed it, and unlike ``torch.Generator`` (a Mersenne
twister, predictable from its output) its stream cannot be extended from noise someone
observed. AES-CTR fills a whole tensor in one call (several GB/s), so it costs little
beside the training step it protects.

Floating-point samplers still have the side channels Mironov (2012) described; the
guarantee here is that nobody can reproduce or predict the noise, not a hardened
discrete mechanism (see docs/SECURITY.md).

>>> r = PrivateRandom()
>>> r.normal((1000,), std=2.0).std().item() > 1.5
True
>>> bool(PrivateRandom().uniform((4,)).equal(PrivateRandom().uniform((4,))))
False
"""

from __future__ import annotations

import math

import torch

__all__ = ["PrivateRandom"]

_TWO_TO_MINUS_53 = 2.0 ** -53


class PrivateRandom:
    """Uniform, Gaussian, Laplace and Bernoulli samples from a fresh OS-keyed AES-CTR stream."""

    __slots__ = ("_prg",)

    def __init__(self):
        # imported here: protocols.smpc's package imports the peer side, which imports us
        from .smpc.prg import Prg
        self._prg = Prg.from_entropy()

    def uniform(self, shape) -> torch.Tensor:
        """float64 uniform on the open interval (0, 1): 53 random bits, offset by half a step."""
        bits = self._prg.int64(tuple(shape))
        mantissa = torch.bitwise_right_shift(bits, 11) & ((1 << 53) - 1)
        return (mantissa.to(torch.float64) + 0.5) * _TWO_TO_MINUS_53

    def normal(self, shape, std: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """N(0, std^2) by the Box-Muller transform."""
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        u = self.uniform((2, (n + 1) // 2))
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = (2.0 * math.pi) * u[1]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (z * float(std)).reshape(shape).to(dtype)

    def laplace(self, shape, scale: float) -> torch.Tensor:
        """Laplace(0, scale) in float64, by inverting the CDF."""
        u = self.uniform(shape) - 0.5
        return -float(scale) * torch.sign(u) * torch.log1p(-2.0 * u.abs())

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """The indices i < n kept by independent coins of probability `p` (Poisson sampling)."""
        return torch.nonzero(self.uniform((int(n),)) < float(p)).flatten()
