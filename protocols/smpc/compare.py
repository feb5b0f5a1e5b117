"""Secure comparison (dealer-assisted, 4 rounds), ReLU, max and argmax.

Sign test ``x < 0`` (the MSB of x in Z_2^64), for any number of parties:

1. The dealer deals comparison material (``cmp``, see :mod:`.gates`): arithmetic
   shares of a uniform r and XOR shares of one-hot tables of r's 4-bit chunks, of
   masks for two levels of 4-input gates, of r's top bit and of a random bit tb (also
   shared arithmetically as t). Parties open c = x + r (1 round; c is uniform, so it
   reveals nothing), hence x = c - r and msb(x) = c_63 ^ r_63 ^ [c_lo < r_lo].
2. [c_lo < r_lo] for the public c_lo: table lookups give XOR shares of lt/eq per chunk
   with no communication; two levels of masked 4-input gates combine the 16 chunks
   (1 round each, 8 and 7 bits per element).
3. The boolean MSB becomes arithmetic with the bit tb: open e = msb ^ tb (1 round,
   1 bit per element, packed), then [msb] = e + [t] - 2e[t] locally.

ReLU fuses the multiplication into step 3: with b = [x >= 0] = e ^ tb for the
opened e, x * b = e x + (1 - 2e) x t, and x t = c t - r t with [r t] dealt, so
ReLU is 4 rounds too (no Beaver round). Its 0/1 mask comes out for the backward pass.

Exactness: the sign test is exact for every ring element (x read as a signed
64-bit integer). ``ge(x, y)`` tests x - y, so it is exact whenever x - y does not
overflow, guaranteed for |x|, |y| < 2^62 in the ring (|real| < 2^(62-f), 2^46 for
f = 16). Comparison results are Shared bits with scale 0. max/argmax reduce pairwise
along a dimension: each of ceil(log2 m) levels does one vectorised comparison
(4 rounds) and one Beaver round that selects both the larger value and its (shared)
index. Ties go to the lower index.
"""

from __future__ import annotations

import torch

from p2pgrid.errors import BadRequest, ShapeError

from .beaver import beaver_product
from .gates import LEVEL1, LEVEL2, lookup_sliced, slice_bits, unslice_bits
from .messages import Request
from .runtime import PartyContext, Protocol, open_ring, open_xor
from .sharing import Shared

__all__ = ["is_negative", "ge_zero", "ge", "gt", "le", "lt", "relu", "max", "argmax",
           "max_with_index", "CMP_RANGE_BITS", "CMP_ROUNDS"]

CMP_RANGE_BITS = 62   # ge/gt/le/lt are exact for |x|, |y| < 2^62 (ring units)
CMP_ROUNDS = 4        # rounds per comparison: open + 2 gate levels + bit conversion
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
_MASK63 = (1 << 63) - 1


# ---------------------------------------------------------------- boolean helpers

def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 int64 tensor -> flat uint8 tensor, 8 bits a byte."""
    flat = bits.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1
    return bits.reshape(-1)[:n].reshape(shape)


def _msb_xor(ctx: PartyContext, xs: torch.Tensor, *, with_rt: bool = False, tag: str = "cmp"
             ) -> Protocol[tuple[torch.Tensor, dict, torch.Tensor]]:
    """XOR share of msb(x) for additively shared xs, bit-sliced (ceil(N/64) words), 3 rounds.

    Returns (msb share words, the dealer material, the opened c = x + r)."""
    mat = ctx.pre.take(Request("cmp", (tuple(xs.shape),), int(with_rt)))
    c = (yield from open_ring(ctx, f"{tag}/open", {"c": xs + mat["r"]}))["c"]
    msb = yield from sign_rounds(ctx, c, mat, tag)
    return msb, mat, c


def sign_rounds(ctx: PartyContext, u: torch.Tensor, mat: dict, tag: str) -> Protocol[torch.Tensor]:
    """Bit-sliced XOR share of msb(u - r) for public u and the dealt mask r; 2 rounds."""
    party0 = ctx.party == 0
    u = u.reshape(-1)
    lt, eq = lookup_sliced(mat["tables"], u & _MASK63)                    # (16, W) each
    # level-1 inputs L0..L3, E0..E3 of group g = chunks 4g..4g+3
    w = lt.shape[-1]
    v1 = torch.cat([lt.view(4, 4, w).transpose(0, 1), eq.view(4, 4, w).transpose(0, 1)], 0)
    g1 = mat["g1"]
    d1 = v1 ^ g1[:LEVEL1.n_inputs]
    d1 = (yield from open_xor(ctx, f"{tag}/level1", {"d": d1}))["d"]
    lt_g, eq_g = LEVEL1.evaluate(d1, g1, party0)                          # (4, W) each
    v2 = torch.cat([lt_g, eq_g[1:]], 0)                                   # (7, W)
    g2 = mat["g2"]
    d2 = (yield from open_xor(ctx, f"{tag}/level2", {"d": v2 ^ g2[:LEVEL2.n_inputs]}))["d"]
    (below,) = LEVEL2.evaluate(d2, g2, party0)
    msb = below ^ mat["top"][0]
    if party0:
        msb = msb ^ slice_bits((u >> 63) & 1)
    return msb


def open_bit(ctx: PartyContext, bit: torch.Tensor, mat: dict, tag: str, shape
              ) -> Protocol[torch.Tensor]:
    """Open e = bit ^ tb (one round, bit-sliced words); returns e as 0/1 of `shape`."""
    e = (yield from open_xor(ctx, f"{tag}/b2a", {"e": bit ^ mat["top"][1]}))["e"]
    n = 1
    for d in shape:
        n *= d
    return unslice_bits(e, n).reshape(shape)


def arith_bit(ctx: PartyContext, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Arithmetic share of e ^ tb = e + t - 2 e t."""
    out = t - 2 * e * t
    return out + e if ctx.party == 0 else out


def _is_negative_raw(ctx: PartyContext, xs: torch.Tensor) -> Protocol[torch.Tensor]:
    msb, mat, _ = yield from _msb_xor(ctx, xs)
    e = yield from open_bit(ctx, msb, mat, "cmp", xs.shape)
    return arith_bit(ctx, e, mat["t"])


def _ge_zero_raw(ctx: PartyContext, xs: torch.Tensor) -> Protocol[torch.Tensor]:
    msb, mat, _ = yield from _msb_xor(ctx, xs)
    e = yield from open_bit(ctx, ~msb if ctx.party == 0 else msb, mat, "cmp", xs.shape)
    return arith_bit(ctx, e, mat["t"])


# ---------------------------------------------------------------- public API

def is_negative(ctx: PartyContext, x: Shared) -> Protocol[Shared]:
    """Shared bit [x < 0] (scale 0). Exact for every ring element."""
    ctx.check_shared(x, "is_negative")
    return x.like((yield from _is_negative_raw(ctx, x.share)), 0)


def ge_zero(ctx: PartyContext, x: Shared) -> Protocol[Shared]:
    """Shared bit [x >= 0] (scale 0). Exact for every ring element."""
    ctx.check_shared(x, "ge_zero")
    return x.like((yield from _ge_zero_raw(ctx, x.share)), 0)


def _diff(ctx: PartyContext, x, y, op: str) -> Shared:
    if isinstance(x, Shared):
        ctx.check_shared(x, op, "x")
        if isinstance(y, Shared):
            ctx.check_shared(y, op, "y")
        out = x - y
    elif isinstance(y, Shared):
        ctx.check_shared(y, op, "y")
        out = (-y) + x
    else:
        raise BadRequest(f"{op}: at least one operand must be Shared")
    return out


def ge(ctx: PartyContext, x, y) -> Protocol[Shared]:
    """[x >= y] as a shared bit; either operand may be public. 4 rounds."""
    return (yield from ge_zero(ctx, _diff(ctx, x, y, "ge")))


def le(ctx: PartyContext, x, y) -> Protocol[Shared]:
    """[x <= y]."""
    return (yield from ge_zero(ctx, _diff(ctx, y, x, "le")))


def lt(ctx: PartyContext, x, y) -> Protocol[Shared]:
    """[x < y]."""
    return (yield from is_negative(ctx, _diff(ctx, x, y, "lt")))


def gt(ctx: PartyContext, x, y) -> Protocol[Shared]:
    """[x > y]."""
    return (yield from is_negative(ctx, _diff(ctx, y, x, "gt")))


def relu(ctx: PartyContext, x: Shared, *, return_mask: bool = False) -> Protocol:
    """max(x, 0), 4 rounds. With `return_mask`, also the 0/1 bit [x >= 0] (for backward)."""
    ctx.check_shared(x, "relu")
    msb, mat, c = yield from _msb_xor(ctx, x.share, with_rt=True, tag="relu")
    e = yield from open_bit(ctx, ~msb if ctx.party == 0 else msb, mat, "relu", x.shape)
    t = mat["t"]
    xt = c * t - mat["rt"]                       # shares of x * tb
    y = x.like(e * x.share + (1 - 2 * e) * xt)   # x * (e ^ tb)
    return (y, x.like(arith_bit(ctx, e, t), 0)) if return_mask else y


def reduced_dim(shape, dim) -> int:
    """`dim` of a max/argmax over a tensor of `shape`, checked, as a non-negative axis."""
    nd = len(shape)
    if nd == 0:
        raise ShapeError("max/argmax of a 0-d tensor: nothing to reduce")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -nd <= dim < nd:
        raise ShapeError(f"dim {dim} out of range for shape {list(shape)}")
    if shape[dim] == 0:
        raise ShapeError("max over an empty dimension")
    return dim % nd


def max_with_index(ctx: PartyContext, x: Shared, dim: int = -1) -> Protocol[tuple[Shared, Shared]]:
    """(max over `dim`, index of the first maximum as a shared integer), `dim` removed.

    ceil(log2 m) levels of one comparison (4 rounds) + one selection round each.
    """
    ctx.check_shared(x, "max")
    dim = reduced_dim(x.shape, dim)
    vals = x.share.movedim(dim, -1)
    m = vals.shape[-1]
    idx = torch.arange(m, dtype=torch.int64).expand(vals.shape)
    idx = idx.clone() if ctx.party == 0 else torch.zeros_like(vals)
    level = 0
    while vals.shape[-1] > 1:
        k = vals.shape[-1] // 2
        left, right = vals[..., 0:2 * k:2], vals[..., 1:2 * k:2]
        il, ir = idx[..., 0:2 * k:2], idx[..., 1:2 * k:2]
        b = yield from _ge_zero_raw(ctx, left - right)            # [left >= right]
        sel = yield from beaver_product(ctx, b, torch.stack([left - right, il - ir]),
                                        "triple", f"max/select{level}", torch.mul)
        new_vals, new_idx = right + sel[0], ir + sel[1]
        if vals.shape[-1] % 2:                                     # odd one out waits a level
            new_vals = torch.cat([new_vals, vals[..., -1:]], -1)
            new_idx = torch.cat([new_idx, idx[..., -1:]], -1)
        vals, idx = new_vals, new_idx
        level += 1
    return x.like(vals.squeeze(-1)), x.like(idx.squeeze(-1), 0)


def max(ctx: PartyContext, x: Shared, dim: int | None = -1) -> Protocol[Shared]:  # noqa: A001
    """Maximum over `dim` (all elements if None)."""
    ctx.check_shared(x, "max")
    if dim is None:
        x, dim = x.reshape(-1), 0
    vals, _ = yield from max_with_index(ctx, x, dim)
    return vals


def argmax(ctx: PartyContext, x: Shared, dim: int = -1, *, one_hot: bool = True) -> Protocol[Shared]:
    """Position of the (first) maximum along `dim`, shared, scale 0.

    ``one_hot=True``: a 0/1 tensor shaped like x (one more comparison layer, 4 rounds,
    O(m) words per row: onehot_j = [i >= j] - [i >= j+1]). ``one_hot=False``: the
    index as a shared integer, `dim` removed.
    """
    ctx.check_shared(x, "argmax")
    dim = reduced_dim(x.shape, dim)
    _, idx = yield from max_with_index(ctx, x, dim)
    if not one_hot:
        return idx
    m = x.shape[dim]
    # q[..., j-1] = [idx >= j] for j = 1..m-1; [idx >= 0] = 1 and [idx >= m] = 0 are public
    if m > 1:
        offsets = torch.arange(1, m, dtype=torch.int64)
        diffs = idx.share.unsqueeze(-1).expand(*idx.shape, m - 1)
        if ctx.party == 0:
            diffs = diffs - offsets
        q = yield from _ge_zero_raw(ctx, diffs)
    else:
        q = idx.share.unsqueeze(-1)[..., :0]
    one = torch.ones_like(idx.share).unsqueeze(-1) if ctx.party == 0 else \
        torch.zeros_like(idx.share).unsqueeze(-1)
    zero = torch.zeros_like(idx.share).unsqueeze(-1)
    ge_j = torch.cat([one, q, zero], -1)                # [idx >= j], j = 0..m
    hot = ge_j[..., :-1] - ge_j[..., 1:]
    return x.like(hot.movedim(-1, dim).contiguous(), 0)
