"""SPDZ-style multiplication with Beaver triples: elementwise, matmul, public scaling.

One round per product: every party broadcasts its shares of eps = x - a and
delta = y - b (all elements of the op in one message: ``{"eps", "delta"}``), then
locally computes z = c + eps*b + a*delta (+ eps*delta at party 0). For fixed-point
operands (both with fractional bits) the product is truncated afterwards (see
:mod:`.truncation`: +0 rounds for 2 parties, +1 round for 3+). A product with a
scale-0 operand (an integer or a bit, e.g. from a comparison) is not truncated.

Scales: the result has max(scale_x, scale_y) fractional bits.

Public operands (numbers, float tensors, integer tensors) are allowed in
:func:`mul` / :func:`matmul`: integers multiply locally and exactly; floats are
encoded, multiplied locally and truncated.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Callable

import torch

from p2pgrid.errors import BadRequest, ShapeError

from .fixedpoint import FixedPoint
from .messages import Request
from .ring import ring_matmul
from .runtime import PartyContext, Protocol, open_ring
from .sharing import Shared
from .truncation import truncate

__all__ = ["mul", "matmul", "mean", "div_public", "scale_public", "beaver_product"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def beaver_product(ctx: PartyContext, xs: torch.Tensor, ys: torch.Tensor, kind: str,
                   tag: str, prod: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> Protocol[torch.Tensor]:
    """Raw Beaver protocol on ring shares: returns this party's share of prod(x, y).

    `prod` must be bilinear over Z_2^64 (elementwise * or matmul); `kind` names the
    triple ("triple" or "matmul_triple").
    """
    t = ctx.pre.take(Request(kind, (tuple(xs.shape), tuple(ys.shape))))
    a, b, c = t["a"], t["b"], t["c"]
    opened = yield from open_ring(ctx, tag, {"eps": xs - a, "delta": ys - b})
    eps, delta = opened["eps"], opened["delta"]
    if ctx.party == 0:  # eps*b + a*delta + eps*delta = eps*b + (a + eps)*delta
        return c + prod(eps, b) + prod(a + eps, delta)
    return c + prod(eps, b) + prod(a, delta)


def _is_public(v) -> bool:
    return isinstance(v, (Real, torch.Tensor)) and not isinstance(v, bool)


def _public_ring(ctx: PartyContext, v) -> tuple[torch.Tensor, int]:
    """A public operand as (ring tensor, its scale): integers exact at scale 0."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        raise BadRequest("booleans are not numbers here; convert explicitly")
    if isinstance(v, Integral) or (isinstance(v, torch.Tensor) and v.dtype in _INT_DTYPES):
        return torch.as_tensor(v, dtype=torch.int64), 0
    return ctx.encoder.encode(v), ctx.config.frac_bits


def mul(ctx: PartyContext, x, y) -> Protocol[Shared]:
    """Elementwise x * y (broadcasting); at least one operand Shared."""
    if not isinstance(x, Shared):
        x, y = y, x  # multiplication commutes
    ctx.check_shared(x, "mul", "x")
    if isinstance(y, Shared):
        ctx.check_shared(y, "mul", "y")
        try:
            torch.broadcast_shapes(x.shape, y.shape)
        except RuntimeError:
            raise ShapeError(f"mul: shapes {list(x.shape)} and {list(y.shape)} do not broadcast") from None
        raw = yield from beaver_product(ctx, x.share, y.share, "triple", "mul/open",
                                        torch.mul)
        z = x.like(raw, x.scale + y.scale)
        return (yield from truncate(ctx, z, min(x.scale, y.scale)))
    if not _is_public(y):
        raise BadRequest(f"mul: cannot multiply a Shared by {type(y).__name__}")
    ring, scale = _public_ring(ctx, y)
    try:
        shape = torch.broadcast_shapes(x.shape, ring.shape)
    except RuntimeError:
        raise ShapeError(f"mul: shapes {list(x.shape)} and {list(ring.shape)} do not broadcast") from None
    if shape != x.shape:
        raise ShapeError(f"mul: public operand {list(ring.shape)} would grow the shared "
                         f"tensor {list(x.shape)}")
    z = x.like(x.share * ring, x.scale + scale)
    return (yield from truncate(ctx, z, min(x.scale, scale)))


def _matmul_shape(sa, sb) -> None:
    try:
        torch.empty(tuple(sa), device="meta") @ torch.empty(tuple(sb), device="meta")
    except RuntimeError:
        raise ShapeError(f"matmul: shapes {list(sa)} and {list(sb)} do not fit") from None


def matmul(ctx: PartyContext, x, y) -> Protocol[Shared]:
    """x @ y; both Shared (Beaver, one round) or one public float/int tensor (local)."""
    if isinstance(x, Shared) and isinstance(y, Shared):
        ctx.check_shared(x, "matmul", "x")
        ctx.check_shared(y, "matmul", "y")
        _matmul_shape(x.shape, y.shape)
        raw = yield from beaver_product(ctx, x.share, y.share, "matmul_triple", "matmul/open",
                                        ring_matmul)
        z = x.like(raw, x.scale + y.scale)
        return (yield from truncate(ctx, z, min(x.scale, y.scale)))
    shared, public, left = (x, y, True) if isinstance(x, Shared) else (y, x, False)
    ctx.check_shared(shared, "matmul")
    if not isinstance(public, torch.Tensor) or public.dtype == torch.bool:
        raise BadRequest(f"matmul: the other operand must be Shared or a public tensor, "
                         f"got {type(public).__name__}")
    ring, scale = _public_ring(ctx, public)
    _matmul_shape(shared.shape if left else ring.shape, ring.shape if left else shared.shape)
    raw = ring_matmul(shared.share, ring) if left else ring_matmul(ring, shared.share)
    z = shared.like(raw, shared.scale + scale)
    return (yield from truncate(ctx, z, min(shared.scale, scale)))


def scale_public(ctx: PartyContext, x: Shared, value: float, extra_bits: int = 0) -> Protocol[Shared]:
    """x * value for a public real scalar, with `extra_bits` more precision on `value`.

    `value` is encoded with frac_bits + extra_bits bits, then the product is truncated
    by as many, so the result keeps x's scale. Needs |x * value| * 2^(scale + frac_bits +
    extra_bits) < 2^62.
    """
    ctx.check_shared(x, "scale_public")
    bits = ctx.config.frac_bits + extra_bits
    ring = FixedPoint(min(bits, 40)).encode(float(value)) << max(0, bits - 40)
    z = x.like(x.share * ring, x.scale + bits)
    return (yield from truncate(ctx, z, bits))


def div_public(ctx: PartyContext, x: Shared, divisor: float) -> Protocol[Shared]:
    """x / divisor for a public divisor (relative error ~2^-frac_bits)."""
    if divisor == 0:
        raise BadRequest("division by zero")
    extra = max(0, int(abs(divisor)).bit_length())
    return (yield from scale_public(ctx, x, 1.0 / divisor, extra))


def mean(ctx: PartyContext, x: Shared, dim=None, keepdim: bool = False) -> Protocol[Shared]:
    """Mean over `dim` (all elements if None): local sum, then a public division."""
    ctx.check_shared(x, "mean")
    s = x.sum(dim, keepdim)
    count = x.numel() // max(1, s.numel())
    if count == 0:
        raise ShapeError("mean of an empty tensor")
    return (yield from div_public(ctx, s, count))
