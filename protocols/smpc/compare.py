"""Secure comparison (dealer-assisted, edaBits), ReLU, max and argmax.

Sign test ``x < 0`` (the MSB of x in Z_2^64), 8 rounds for any number of parties:

1. The dealer deals an *edaBit*: arithmetic shares of a uniform r and XOR shares of
   r's 64 bits, packed in one int64 word per element. Parties open c = x - r
   (1 round; c is uniform, so it reveals nothing), hence x = c + r.
2. The MSB of c + r is computed on the XOR-shared bits: g = c & r and p = c ^ r are
   local (c is public); the carry into bit 63 is the group-generate of bits 0..62,
   reduced pairwise in a tree, (G, P) o (G', P') = (G ^ P & G', P & P'). Each of the
   log2(64) = 6 levels is one round of boolean Beaver ANDs, packed densely across
   elements (125 AND gates per element in all). msb = p_63 ^ carry_63.
3. The boolean MSB becomes an arithmetic bit with a *daBit* (random bit t dealt both
   XOR- and additively shared): open e = msb ^ t (1 round, 1 bit per element, packed),
   then [msb] = e + [t] - 2e[t] locally.

Exactness: the sign test is exact for every ring element (x read as a signed
64-bit integer). ``ge(x, y)`` tests x - y, so it is exact whenever x - y does not
overflow, guaranteed for |x|, |y| < 2^62 in the ring (|real| < 2^(62-f), 2^46 for
f = 16). Comparison results are Shared bits with scale 0.

ReLU(x) = x * [x >= 0] (one more Beaver round, no truncation since the bit has scale
0): 9 rounds. max/argmax reduce pairwise along a dimension: each of ceil(log2 m)
levels does one vectorised comparison (8 rounds) and one Beaver round that selects
both the larger value and its (shared) index. Ties go to the lower index.
"""

from __future__ import annotations

import torch

from p2pgrid.errors import BadRequest, ShapeError

from .beaver import beaver_product
from .messages import Request
from .runtime import PartyContext, Protocol, open_ring, open_xor
from .sharing import Shared

__all__ = ["is_negative", "ge_zero", "ge", "gt", "le", "lt", "relu", "max", "argmax",
           "max_with_index", "CMP_RANGE_BITS", "CMP_ROUNDS"]

CMP_RANGE_BITS = 62   # ge/gt/le/lt are exact for |x|, |y| < 2^62 (ring units)
CMP_ROUNDS = 8        # rounds per comparison: open + 6 carry levels + bit conversion
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)


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


def and_words(ctx: PartyContext, x: torch.Tensor, y: torch.Tensor, tag: str) -> Protocol[torch.Tensor]:
    """XOR shares of x & y for XOR-shared int64 words x, y (64 ANDs per word), one round."""
    t = ctx.pre.take(Request("binary_triple", (tuple(x.shape),)))
    a, b, c = t["a"], t["b"], t["c"]
    opened = yield from open_xor(ctx, tag, {"d": x ^ a, "e": y ^ b})
    d, e = opened["d"], opened["e"]
    z = c ^ (d & b) ^ (e & a)
    if ctx.party == 0:
        z = z ^ (d & e)
    return z


_M1 = 0x5555555555555555
_COMPACT = ((1, 0x3333333333333333), (2, 0x0F0F0F0F0F0F0F0F), (4, 0x00FF00FF00FF00FF),
            (8, 0x0000FFFF0000FFFF), (16, 0x00000000FFFFFFFF))


def _even_bits(x: torch.Tensor, width: int = 64) -> torch.Tensor:
    """Bits 0, 2, 4, ... of each `width`-bit field, compacted into its low width/2 bits."""
    x = x & _M1                       # clears bit 63, so the shifts below are logical
    for shift, mask in _COMPACT:
        if 2 * shift >= width:
            break
        x = (x | (x >> shift)) & mask
    return x


def _pack_fields(v: torch.Tensor, width: int) -> torch.Tensor:
    """Flat int64 values of `width` bits (width | 64) -> int64 words, 64 // width per word."""
    if width == 64:
        return v
    per = 64 // width
    pad = (-v.numel()) % per
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    shifts = torch.arange(per, dtype=torch.int64) * width
    return (v.view(-1, per) << shifts).sum(-1)      # disjoint fields: sum == OR


def _unpack_fields(words: torch.Tensor, width: int, count: int) -> torch.Tensor:
    if width == 64:
        return words
    per = 64 // width
    shifts = torch.arange(per, dtype=torch.int64) * width
    return ((words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(-1)[:count]


def _msb_xor(ctx: PartyContext, xs: torch.Tensor) -> Protocol[torch.Tensor]:
    """XOR share (0/1 int64) of the MSB of the additively shared xs. 7 rounds.

    x = c + r with c public and r's bits XOR-shared; msb(x) = p_63 ^ carry_63. The
    carry into bit 63 is the group-generate of bits 0..62, reduced pairwise in a
    tree (log2 64 = 6 levels). Each level halves the field width and its ANDs are
    packed densely across elements: 64 + 32 + 16 + 8 + 4 + 1 = 125 AND gates per
    element in all (a Kogge-Stone adder on whole words would open ~11x more).
    """
    shape = xs.shape
    eda = ctx.pre.take(Request("edabit", (tuple(shape),)))
    c = (yield from open_ring(ctx, "cmp/open", {"c": xs - eda["r"]}))["c"].reshape(-1)
    rb = eda["rb"].reshape(-1)
    n = rb.numel()
    g = rb & c                                 # generate: c_i AND r_i (c is public)
    p = (rb ^ c) if ctx.party == 0 else rb     # propagate: c_i XOR r_i
    top = (p >> 63) & 1                        # p_63
    # Bits 0..62 move up one place; bit 0 becomes (g=0, p=0), which leaves the group
    # generate of all 64 places equal to the carry out of bit 62.
    g, p = g << 1, p << 1
    width = 64
    while width > 1:
        h = width // 2
        g_lo, p_lo, g_hi, p_hi = _even_bits(torch.stack([g, p, g >> 1, p >> 1]), width)
        if h > 1:   # G' = g_hi ^ (p_hi & g_lo), P' = p_hi & p_lo: 2h AND gates per element
            left, right = p_hi | (p_hi << h), g_lo | (p_lo << h)
            fields = width
        else:       # last level: only G' is needed
            left, right, fields = p_hi, g_lo, 1
        z = yield from and_words(ctx, _pack_fields(left, fields), _pack_fields(right, fields),
                                 f"cmp/carry{width}")
        z = _unpack_fields(z, fields, n)
        g = g_hi ^ (z & ((1 << h) - 1))
        p = (z >> h) & ((1 << h) - 1) if h > 1 else p_hi
        width = h
    return (top ^ g).reshape(shape)            # g: the carry into bit 63


def _b2a_bit(ctx: PartyContext, bit: torch.Tensor) -> Protocol[torch.Tensor]:
    """Arithmetic share of a XOR-shared bit (0/1 int64), with a daBit. One round."""
    dab = ctx.pre.take(Request("dabit", (tuple(bit.shape),)))
    tb, t = dab["tb"] & 1, dab["t"]
    packed = (yield from open_xor(ctx, "cmp/b2a", {"e": _pack_bits(bit ^ tb)}))["e"]
    e = _unpack_bits(packed, bit.shape)
    out = t - 2 * e * t
    if ctx.party == 0:
        out = out + e
    return out


def _is_negative_raw(ctx: PartyContext, xs: torch.Tensor) -> Protocol[torch.Tensor]:
    bit = yield from _msb_xor(ctx, xs)
    return (yield from _b2a_bit(ctx, bit))


def _ge_zero_raw(ctx: PartyContext, xs: torch.Tensor) -> Protocol[torch.Tensor]:
    neg = yield from _is_negative_raw(ctx, xs)
    return (1 - neg) if ctx.party == 0 else -neg


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
    """[x >= y] as a shared bit; either operand may be public. 8 rounds."""
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
    """max(x, 0) = x * [x >= 0]: 9 rounds. With `return_mask`, also the bit (for backward)."""
    ctx.check_shared(x, "relu")
    mask = yield from ge_zero(ctx, x)
    raw = yield from beaver_product(ctx, x.share, mask.share, "triple", "relu/mul", torch.mul)
    y = x.like(raw)
    return (y, mask) if return_mask else y


def _norm_dim(x: Shared, dim) -> int:
    if x.dim() == 0:
        raise ShapeError("max/argmax of a 0-d tensor: nothing to reduce")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ShapeError(f"dim {dim} out of range for shape {list(x.shape)}")
    return dim % x.dim()


def max_with_index(ctx: PartyContext, x: Shared, dim: int = -1) -> Protocol[tuple[Shared, Shared]]:
    """(max over `dim`, index of the first maximum as a shared integer), `dim` removed.

    ceil(log2 m) levels of one comparison (8 rounds) + one selection round each.
    """
    ctx.check_shared(x, "max")
    dim = _norm_dim(x, dim)
    vals = x.share.movedim(dim, -1)
    m = vals.shape[-1]
    if m == 0:
        raise ShapeError("max over an empty dimension")
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

    ``one_hot=True``: a 0/1 tensor shaped like x (one more comparison layer, 8 rounds,
    O(m) words per row: onehot_j = [i >= j] - [i >= j+1]). ``one_hot=False``: the
    index as a shared integer, `dim` removed.
    """
    ctx.check_shared(x, "argmax")
    dim = _norm_dim(x, dim)
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
