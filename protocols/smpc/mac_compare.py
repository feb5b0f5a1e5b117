"""Authenticated comparison with zero, ReLU, max and argmax. The comparison: one
arithmetic opening, two rounds of binary gates, an arithmetic result; 3 rounds, about
21 bytes per element (2 parties).

[x >= 0] for |x| < 2^(k-2): open c = u + r (mod 2^(k+s)) with u = x + 2^(k-2) in
[0, 2^(k-1)) and r dealt; then, as in :func:`.mac.truncate`,

    [x >= 0] = u >> (k-2) = (c >> (k-2)) - [r_top] + 4 (1 - msb c) [r_msb] - [c_low < r_low]

where c_low, r_low are the low k-2 bits. The borrow [c_low < r_low] is the semi-honest
sign test's circuit (:mod:`.gates`) on authenticated bits (:mod:`.mac_bits`): the dealer
deals binary-authenticated one-hot tables of r's 16 4-bit chunks, so each chunk's
[c_j < r_j] and [c_j = r_j] are XORs of table bits (linear, c public); one round of
masked 4-input gates (:data:`.gates.LEVEL1`) gives each group of 4 chunks its (LT, EQ);
the second level (:data:`.gates.LEVEL2`) opens its inputs XOR dealt masks and, since its
monomials are mutually exclusive, its output is their arithmetic sum: each input
v = d XOR m = d + (1 - 2d) m with d public, so every monomial expands into public
coefficients times dealt *arithmetic* authenticated products of the masks. No bit
leaves the binary world except through those dealt products, so no conversion round.

ReLU fuses the product into the same rounds: with P, q public after the opening,
trunc(x, f) = P + q [r_msb] - [r_hi] (f = 0: x itself, mod 2^k) and the bit is
b0 + sum_j beta_j [R_j] over dealt R = (r_msb, r_top, mask products), so
trunc(x) [x >= 0] needs only dealt products [r_msb R_j], [r_hi R_j]: linear once c and
the gate openings are public. A product followed by a ReLU is thus truncated, sign-tested
and multiplied on one opening of the raw product.

max and argmax (:func:`max_with_index`) reduce pairwise as :mod:`.compare` does: per
level one comparison and one dealt-triple product selecting value and index together.

Every opening is checked by the session's MAC check (arithmetic c, binary gate inputs);
every dealt value is authenticated (the bits under a fresh per-item key Delta).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from p2pgrid.errors import BadRequest

from . import ring128 as R
from .gates import LEVEL1, LEVEL2, lt_eq_codes, n_words, slice_bits, unslice_bits
from .compare import reduced_dim
from .mac import K, ActiveParty, AuthShared, mul, open_values
from .mac_bits import PLANES, AuthBits, key_planes, open_bits, random_words

__all__ = ["CMP_BITS", "CHUNKS", "ge_zero", "relu", "relu_train", "relu_backward",
           "max_with_index", "max", "argmax", "compare_values", "arith_shapes", "bit_shapes",
           "chunks_of", "ReluBack"]

CMP_BITS = K - 2
CHUNKS = 16          # 4-bit chunks of the low CMP_BITS bits (the top one has 2 bits)
_G2 = LEVEL2.n_bits  # the second level's masks and their products, dealt arithmetic too
_RIGHT = 2 + _G2     # the bit's dealt terms: r_msb, r_top, level-2 mask products


def _chunk_mask(j: int) -> int:
    return (1 << min(4, CMP_BITS - 4 * j)) - 1


def chunks_of(low: np.ndarray) -> np.ndarray:
    """The 4-bit chunks of the low CMP_BITS bits (uint64, last axis CHUNKS, low first)."""
    return np.stack([(low >> np.uint64(4 * j)) & np.uint64(_chunk_mask(j))
                     for j in range(CHUNKS)], -1)


# ---------------------------------------------------------------- material

def arith_shapes(shape, relu: bool, bwd: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """The arithmetic authenticated values of a comparison item (relu: with the product;
    bwd: with the backward pass's truncation pair s and its products with the bit's
    dealt terms, see :func:`relu_backward`)."""
    s = tuple(shape)
    out = [("r", s), ("r_top", s), ("r_msb", s), ("m2", (_G2,) + s)]
    if relu:
        out += [("r_hi", s), ("x", (2, _RIGHT) + s)]
    if bwd:
        out += [("s", s), ("s_hi", s), ("s_msb", s), ("y", (2, _RIGHT) + s)]
    return out


def bit_shapes(shape) -> list[tuple[str, tuple[int, ...]]]:
    """The binary authenticated words of a comparison item (MAC planes not counted)."""
    n = int(np.prod(tuple(shape), dtype=np.int64))
    w = n_words(n)
    return [("tables", (n, 4)), ("g1", (LEVEL1.n_bits, 4, w)), ("g2", (LEVEL2.n_inputs, w))]


def compare_values(shape, bits: int | None, bwd: int = 0, uniform=R.uniform
                   ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """The clear values of one comparison item: arithmetic ones (ring arrays) and binary
    words (gate masks from the OS CSPRNG). `bits` is None for a sign test, else the
    truncation of the ReLU's operand; `bwd` (a ReLU in training), if not 0, the
    truncation of its backward pass's gradient. `uniform(name, shape)` draws r and s
    (:func:`.ring128.uniform`)."""
    shape = tuple(shape)
    if bits is not None and not 0 <= bits < CMP_BITS:
        raise BadRequest("truncation bits out of range")
    if bwd and (bits is None or not 0 < bwd < CMP_BITS):
        raise BadRequest("backward truncation bits out of range")
    n = int(np.prod(shape, dtype=np.int64))
    w = n_words(n)
    r = uniform("r", shape)         # the low k bits mask, the high ones hide carries
    low = r[0].reshape(-1)
    onehot = np.uint64(1) << chunks_of(low)                             # (n, 16) fields
    tables = (onehot.reshape(n, 4, 4) << (np.arange(4, dtype=np.uint64) * np.uint64(16))
              ).sum(-1, dtype=np.uint64)
    g2 = LEVEL2.deal(random_words((LEVEL2.n_inputs, w)))           # (_G2, w)
    m2 = unslice_bits(g2, n).numpy().astype(np.uint64).reshape((_G2,) + shape)
    arith = {"r": r, "r_top": R.from_u64(r[0] >> np.uint64(CMP_BITS)),
             "r_msb": R.from_u64(r[0] >> np.uint64(K - 1)), "m2": R.from_u64(m2)}
    binary = {"tables": torch.from_numpy(tables.view(np.int64)),
              "g1": LEVEL1.deal(random_words((LEVEL1.n_inputs, 4, w))),
              "g2": g2[:LEVEL2.n_inputs].clone()}
    if bits is not None:
        r_hi = R.from_u64(r[0] >> np.uint64(bits))
        right = np.concatenate([arith["r_msb"][:, None], arith["r_top"][:, None],
                                arith["m2"]], 1)
        arith["r_hi"] = r_hi
        arith["x"] = np.stack([R.mul(arith["r_msb"][:, None], right),
                               R.mul(r_hi[:, None], right)], 1)
        if bwd:         # the backward pass's mask, fresh: trunc(g) [x >= 0] on one opening
            s = uniform("s", shape)
            s_hi, s_msb = R.from_u64(s[0] >> np.uint64(bwd)), R.from_u64(s[0] >> np.uint64(K - 1))
            arith.update(s=s, s_hi=s_hi, s_msb=s_msb,
                         y=np.stack([R.mul(s_msb[:, None], right), R.mul(s_hi[:, None], right)], 1))
    return arith, binary


# ---------------------------------------------------------------- the protocol

def _terms(gate):
    """(public d indices, mask subset, its position or None) of every term of the
    gate's first output: each monomial expanded over the subsets of its masks."""
    for mono in gate.outputs[0]:
        for k in range(len(mono) + 1):
            for sub in combinations(mono, k):
                rest = tuple(i for i in mono if i not in sub)
                yield rest, sub, (gate.position(sub) if sub else None)


_LEVEL2_TERMS = tuple(_terms(LEVEL2))


def _bits(codes: np.ndarray, bit: int) -> torch.Tensor:
    """Bit `bit` of per-chunk codes (..., n, CHUNKS), bit-sliced: (..., CHUNKS, W)."""
    b = np.ascontiguousarray(np.swapaxes((codes >> np.uint8(bit)) & np.uint8(1), -1, -2))
    return slice_bits(torch.from_numpy(b))             # uint8 throughout (64 MAC planes)


def _level1_inputs(lt: torch.Tensor, eq: torch.Tensor) -> torch.Tensor:
    """(..., CHUNKS, W) lt and eq -> (..., 8, 4, W): input i of group g is chunk 4 g + i."""
    def grouped(t):
        return t.reshape(t.shape[:-2] + (4, 4, t.shape[-1])).transpose(-3, -2)
    return torch.cat([grouped(lt), grouped(eq)], -3)


def _weighted(coef: np.ndarray, x: AuthShared) -> AuthShared:
    """sum_j coef_j x_j over the first logical axis (coef: int64, public)."""
    c = R.from_signed(coef)
    return AuthShared(R.sum_(R.mul(c, x.value), 0), R.sum_(R.mul(c, x.mac), 0), 0)


def _level1(ctx: ActiveParty, m: dict, c: np.ndarray, key: int):
    """Each chunk's (lt, eq) from the one-hot tables (XORs of table bits, c public), then
    the 4 first-level gates per element: one round of bit openings. Returns the gates'
    outputs as authenticated bits, LT (4, W) and EQ (4, W) per group."""
    u = chunks_of(c.reshape(-1))                                       # (n, 16)
    tv, tm = m["tables"]
    codes_v = lt_eq_codes(tv.numpy().view(np.uint16), u)
    codes_m = lt_eq_codes(tm.numpy().view(np.uint16), u[None])         # every MAC plane
    inputs = AuthBits(_level1_inputs(_bits(codes_v, 1), _bits(codes_v, 0)),
                      _level1_inputs(_bits(codes_m, 1), _bits(codes_m, 0)), key)
    g1v, g1m = m["g1"]
    masks = AuthBits(g1v[:LEVEL1.n_inputs], g1m[:, :LEVEL1.n_inputs], key)
    d = (yield from open_bits(ctx, "a/bit/cmp1", {"d": inputs ^ masks}))["d"]
    lt_v, eq_v = LEVEL1.evaluate(d, g1v, ctx.party == 0)
    lt_m, eq_m = LEVEL1.evaluate(d, g1m.transpose(0, 1), False,
                                 one=key_planes(key).view(PLANES, 1, 1))
    return AuthBits(lt_v, lt_m, key), AuthBits(eq_v, eq_m, key)


def _level2(ctx: ActiveParty, m: dict, lt: AuthBits, eq: AuthBits, n: int):
    """The second-level gate, its inputs opened as bits (one round) and its output
    expanded in arithmetic: the borrow as k0 + sum_pos k[pos] [m2_pos], public k."""
    inputs = AuthBits(torch.cat([lt.value, eq.value[1:]]), torch.cat([lt.mac, eq.mac[:, 1:]], 1),
                      lt.key)
    g2v, g2m = m["g2"]
    d = (yield from open_bits(ctx, "a/bit/cmp2", {"d": inputs ^ AuthBits(g2v, g2m, lt.key)}))["d"]
    d = unslice_bits(d, n).numpy()                                     # (7, n) 0/1
    k0, k = np.zeros(n, np.int64), np.zeros((_G2, n), np.int64)
    for rest, sub, pos in _LEVEL2_TERMS:    # d's outside the subset, (1 - 2d)'s inside it
        term = np.ones(n, np.int64)
        for i in rest:
            term = term * d[i]
        for i in sub:
            term = term * (1 - 2 * d[i])
        if pos is None:
            k0 += term
        else:
            k[pos] += term
    return k0, k


def _stacked(m: dict, names, shape) -> AuthShared:
    """Dealt values side by side along a new first logical axis."""
    parts = [v if v[0].ndim == len(shape) + 2 else (v[0][:, None], v[1][:, None])
             for v in (m[nm] for nm in names)]
    return AuthShared(np.concatenate([p[0] for p in parts], 1),
                      np.concatenate([p[1] for p in parts], 1), 0)


def _compare(ctx: ActiveParty, x: AuthShared, bits: int | None, bwd: int = 0):
    """The rounds every entry point shares: returns [x >= 0], for a ReLU the product
    with trunc(x, bits), and with `bwd` what :func:`relu_backward` needs."""
    shape = x.shape
    n = int(np.prod(shape, dtype=np.int64))
    if bits is None:
        m = ctx.material("cmp", shape)
    elif bwd:
        m = ctx.material("relu", shape, bits, bwd)
    else:
        m = ctx.material("relu", shape, bits)
    off = 1 << CMP_BITS
    o = yield from open_values(ctx, "a/cmp", {"c": ctx.add_public(ctx.add(x, ctx.auth(m["r"])),
                                                                   off)})
    c = o["c"][0]                                          # its low k bits
    lt, eq = yield from _level1(ctx, m, c, m["delta"])
    k0, k = yield from _level2(ctx, m, lt, eq, n)

    # [x >= 0] = b0 + sum_j beta_j [R_j], R = (r_msb, r_top, level-2 mask products)
    msb_c = (c >> np.uint64(K - 1)).astype(np.int64).reshape(-1)
    beta = np.concatenate([(4 * (1 - msb_c))[None], -np.ones((1, n), np.int64), -k])
    beta = beta.reshape((_RIGHT,) + shape)
    b0 = ((c >> np.uint64(CMP_BITS)).astype(np.int64).reshape(-1) - k0).reshape(shape)
    bit = ctx.add_public(_weighted(beta, _stacked(m, ("r_msb", "r_top", "m2"), shape)),
                         R.from_signed(b0))
    bit.scale = 0
    if bits is None:
        return bit, None, None

    # trunc(x) = P + q [r_msb] - [r_hi], times the bit: linear in dealt [r_msb R_j], [r_hi R_j]
    out = _times_bit(ctx, c, bits, bit, b0, beta, m["r_msb"], m["r_hi"], m["x"])
    out.scale = x.scale - bits
    back = ReluBack(bwd, bit, b0, beta, {k: m[k] for k in ("s", "s_hi", "s_msb", "y")}) \
        if bwd else None
    return bit, out, back


def _times_bit(ctx: ActiveParty, c: np.ndarray, bits: int, bit: AuthShared, b0: np.ndarray,
               beta: np.ndarray, t_msb, t_hi, cross) -> AuthShared:
    """trunc(v, bits) [bit] from the opened low word c of v + 2^(k-2) + t, with the bit
    b0 + sum_j beta_j [R_j] and dealt [t_msb], [t_hi], cross = ([t_msb R_j], [t_hi R_j]):
    trunc(v) = P + q [t_msb] - [t_hi] with P, q public, so the product is linear."""
    off = 1 << CMP_BITS
    with np.errstate(over="ignore"):
        p = R.from_u64((c >> np.uint64(bits)) - np.uint64(off >> bits))
    q = R.mul_int(R.from_u64(np.uint64(1) - (c >> np.uint64(K - 1))), 1 << (K - bits))
    xv, xm = cross
    cross = ctx.sub(ctx.mul_public(AuthShared(xv[:, 0], xm[:, 0]), q[:, None]),
                    AuthShared(xv[:, 1], xm[:, 1]))                # q [t_msb R] - [t_hi R]
    t_mask = ctx.sub(ctx.mul_public(ctx.auth(t_msb), q), ctx.auth(t_hi))
    return ctx.add(ctx.add(ctx.mul_public(bit, p), ctx.mul_public(t_mask, R.from_signed(b0))),
                   _weighted(beta, cross))


@dataclass
class ReluBack:
    """What a training ReLU keeps for its backward pass: the bit as b0 + sum_j beta_j
    [R_j] (b0, beta public from the forward openings) and the dealt backward pair."""

    bits: int
    bit: AuthShared
    b0: np.ndarray
    beta: np.ndarray
    m: dict


def ge_zero(ctx: ActiveParty, x: AuthShared):
    """[x >= 0] as an authenticated 0/1 (scale 0), exact for |x| < 2^(k-2); 3 rounds."""
    bit, _, _ = yield from _compare(ctx, x, None)
    return bit


def relu(ctx: ActiveParty, x: AuthShared, bits: int = 0):
    """(trunc(x, bits) [x >= 0], [x >= 0]) in 3 rounds: max(x, 0) for bits = 0, a raw
    product's truncated ReLU otherwise (the sign of the raw product is the same)."""
    bit, out, _ = yield from _compare(ctx, x, bits)
    return out, bit


def relu_train(ctx: ActiveParty, x: AuthShared, bits: int, bwd: int):
    """:func:`relu` in training: (out, bit, back), the item dealt with the backward
    pass's mask, so that :func:`relu_backward` takes one opening of one element per
    element (semi-honest's count), not two (:func:`.mac_layers.truncmul`)."""
    bit, out, back = yield from _compare(ctx, x, bits, bwd)
    return out, bit, back


def relu_backward(ctx: ActiveParty, g: AuthShared, back: ReluBack):
    """trunc(g, back.bits) [x >= 0] in one round, opening only c = g + 2^(k-2) + s (s
    dealt uniform in Z_2^(k+s), fresh): the bit is linear in its dealt terms R_j with
    public coefficients, and the dealer dealt [s_msb R_j], [s_hi R_j] with the forward
    item. Exact for |g| < 2^(k-2), as :func:`.mac.truncate`."""
    if g.shape != back.bit.shape:
        raise BadRequest("relu_backward: the gradient's shape is not the forward's")
    m = back.m
    o = yield from open_values(ctx, "a/relu/grad", {"c": ctx.add_public(
        ctx.add(g, ctx.auth(m["s"])), 1 << CMP_BITS)})
    out = _times_bit(ctx, o["c"][0], back.bits, back.bit, back.b0, back.beta,
                     m["s_msb"], m["s_hi"], m["y"])
    out.scale = g.scale - back.bits
    return out


# ---------------------------------------------------------------- max, argmax

def _public(ctx: ActiveParty, values: np.ndarray) -> AuthShared:
    """Shares of public int64 `values` (party 0 holds them, every party its MAC share)."""
    zero = R.zeros(values.shape)
    out = ctx.add_public(AuthShared(zero, zero.copy(), 0), R.from_signed(values))
    out.scale = 0
    return out


def _cat(xs: list[AuthShared], axis: int) -> AuthShared:
    """Along a data axis (negative: from the last; a ring array's first axis is its limb)."""
    return AuthShared(np.concatenate([x.value for x in xs], axis),
                      np.concatenate([x.mac for x in xs], axis), xs[0].scale)


def max_with_index(ctx: ActiveParty, x: AuthShared, dim: int = -1):
    """(max over `dim`, index of the first maximum (scale 0)), `dim` removed, as
    :func:`.compare.max_with_index`: ceil(log2 m) pairwise levels of one comparison
    (3 rounds) and one product round, both selections (value and index) in one triple.
    Exact for differences below 2^(k-2), as :func:`ge_zero`."""
    dim = reduced_dim(x.shape, dim)
    vals = x.moved(lambda v: np.moveaxis(v, dim, -1))
    m = vals.shape[-1]
    idx = _public(ctx, np.broadcast_to(np.arange(m, dtype=np.int64), vals.shape))
    level = 0
    while vals.shape[-1] > 1:
        k = vals.shape[-1] // 2
        left, right = (vals.moved(lambda v, s=s: v[..., s:2 * k:2]) for s in (0, 1))
        il, ir = (idx.moved(lambda v, s=s: v[..., s:2 * k:2]) for s in (0, 1))
        d, di = ctx.sub(left, right), ctx.sub(il, ir)
        bit = yield from ge_zero(ctx, d)                            # [left >= right]
        sel = yield from mul(ctx, _cat([bit, bit], -1), _cat([d, di], -1), f"a/max{level}")
        new_vals = ctx.add(right, sel.moved(lambda v: v[..., :k]))
        new_idx = ctx.add(ir, sel.moved(lambda v: v[..., k:]))
        new_vals.scale, new_idx.scale = x.scale, 0
        if vals.shape[-1] % 2:                                      # the odd one out waits
            new_vals = _cat([new_vals, vals.moved(lambda v: v[..., -1:])], -1)
            new_idx = _cat([new_idx, idx.moved(lambda v: v[..., -1:])], -1)
        vals, idx = new_vals, new_idx
        level += 1
    return vals.moved(lambda v: v[..., 0]), idx.moved(lambda v: v[..., 0])


def max(ctx: ActiveParty, x: AuthShared, dim: int | None = -1):  # noqa: A001
    """Maximum over `dim` (all elements if None); see :func:`max_with_index`."""
    if dim is None:
        x, dim = x.moved(lambda v: v.reshape(-1)), 0
    out, _ = yield from max_with_index(ctx, x, dim)
    return out


def argmax(ctx: ActiveParty, x: AuthShared, dim: int = -1, *, one_hot: bool = True):
    """Position of the (first) maximum along `dim`, authenticated, scale 0: one-hot (one
    more comparison layer, 3 rounds: onehot_j = [i >= j] - [i >= j+1]) or, with
    ``one_hot=False``, the index with `dim` removed; as :func:`.compare.argmax`."""
    dim = reduced_dim(x.shape, dim)
    _, idx = yield from max_with_index(ctx, x, dim)
    if not one_hot:
        return idx
    m = x.shape[dim]
    if m == 1:
        return _public(ctx, np.ones(x.shape, np.int64))
    wide = idx.moved(lambda v: np.broadcast_to(v[..., None], v.shape + (m - 1,)).copy())
    q = yield from ge_zero(ctx, ctx.add_public(wide, R.from_signed(-np.arange(1, m))))
    edge = idx.shape + (1,)
    ge_j = _cat([_public(ctx, np.ones(edge, np.int64)), q, _public(ctx, np.zeros(edge, np.int64))],
                -1)                                                 # [idx >= j], j = 0..m
    hot = ctx.sub(ge_j.moved(lambda v: v[..., :-1]), ge_j.moved(lambda v: v[..., 1:]))
    hot.scale = 0
    return hot.moved(lambda v: np.ascontiguousarray(np.moveaxis(v, -1, dim)))
