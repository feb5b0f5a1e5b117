"""Sign-test material: chunk lookup tables and one-round 4-input boolean gates.

The sign test (see :mod:`.compare`) opens c = x + r for a dealer-random r, so that
x = c - r. With u = c (public) and v = r (known to the dealer only),

    msb(x) = u_63 XOR v_63 XOR [u mod 2^63 < v mod 2^63]

The comparison of the public u with the secret v runs on 16 chunks of 4 bits (the
top one 3 bits). For every chunk the dealer XOR-shares the one-hot vector of v's
chunk (16 bits), so a party reads XOR shares of ``lt_j = [u_j < v_j]`` (the parity of
the one-hot bits above u_j) and ``eq_j = [u_j == v_j]`` (the bit at u_j) without any
communication. The 16 (lt, eq) pairs are then combined like a carry-lookahead tree
with fan-in 4:

    LT = L3 ^ E3 L2 ^ E3 E2 L1 ^ E3 E2 E1 L0,    EQ = E3 E2 E1 E0

(the terms are mutually exclusive, so XOR is OR). Each group is one *masked gate*:
the dealer gives XOR shares of a random mask bit per input and of the AND of every
subset of masks a monomial needs; the parties open d = input XOR mask (one round for
all groups of a level) and then every monomial prod(d_i ^ m_i) expands into a sum of
public d-products times shared mask products, locally. Two levels (16 -> 4 -> 1): two
rounds, 8 + 7 bits opened per element.

Material layout (all XOR-shared): ``tables`` (..., 4) int64 words per element, chunk j's
16-bit one-hot field in word j // 4 at bit 16 (j % 4); the gates' mask bits
*bit-sliced* over elements, so a gate level costs a few word operations per 64
elements: ``g1`` (30, 4, W) for the 4 level-1 groups, ``g2`` (22, W) and ``top`` (2, W)
holding r's top bit and the daBit's boolean half tb, where W = ceil(N / 64) words.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import combinations

import numpy as np
import torch

from . import ring128

__all__ = ["Gate", "LEVEL1", "LEVEL2", "CHUNKS", "deal_cmp", "cmp_spec", "chunks_of",
           "table_lookup", "lookup_sliced", "slice_bits", "unslice_bits", "n_words",
           "lt_eq_codes"]

CHUNKS = 16
_MASK63 = (1 << 63) - 1
_BYTE_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)


@dataclass(frozen=True)
class Gate:
    """XOR of monomials (tuples of input indices) per output; inputs are masked bits."""

    n_inputs: int
    outputs: tuple[tuple[tuple[int, ...], ...], ...]

    @cached_property
    def products(self) -> tuple[tuple[int, ...], ...]:
        """Mask products the dealer shares (subsets of size >= 2 of some monomial)."""
        seen = set()
        for out in self.outputs:
            for mono in out:
                for k in range(2, len(mono) + 1):
                    for sub in combinations(sorted(mono), k):
                        seen.add(sub)
        return tuple(sorted(seen, key=lambda s: (len(s), s)))

    @property
    def n_bits(self) -> int:
        return self.n_inputs + len(self.products)

    def position(self, subset: tuple[int, ...]) -> int:
        if len(subset) == 1:
            return subset[0]
        return self.n_inputs + self.products.index(tuple(sorted(subset)))

    @cached_property
    def terms(self) -> tuple[tuple[tuple[tuple[int, ...], int | None], ...], ...]:
        """Per output, (public d indices, mask-product position or None) of every term."""
        out = []
        for monos in self.outputs:
            terms = []
            for mono in monos:
                for k in range(len(mono) + 1):
                    for sub in combinations(mono, k):
                        rest = tuple(i for i in mono if i not in sub)
                        terms.append((rest, self.position(sub) if sub else None))
            out.append(tuple(terms))
        return tuple(out)

    def deal(self, masks: torch.Tensor) -> torch.Tensor:
        """All gate bits (masks then products), bit-sliced: masks (n_inputs, ...) words."""
        rows = [masks[i] for i in range(self.n_inputs)]
        for sub in self.products:
            p = masks[sub[0]]
            for i in sub[1:]:
                p = p & masks[i]
            rows.append(p)
        return torch.stack(rows, 0)

    def evaluate(self, d: torch.Tensor, lam: torch.Tensor, party0: bool,
                 one: torch.Tensor | None = None) -> list[torch.Tensor]:
        """XOR shares of the outputs (bit-sliced words), given the opened d (n_inputs, ...)
        and this party's gate bits lam (n_bits, ...). Each monomial prod(d_i ^ m_i) is the
        XOR over subsets S of (AND of d outside S) AND (shared product of masks in S).

        `one` is this party's share of the all-ones word (default: party 0 holds it);
        authenticated bits (:mod:`.mac_bits`) evaluate their MAC planes with their key
        share there, since every step is linear in the shares."""
        if one is None:
            one = torch.tensor(-1 if party0 else 0, dtype=torch.int64)
        outs = []
        cache: dict[tuple[int, ...], torch.Tensor] = {}

        def coef(rest):          # AND of public d's, shared across terms
            if rest not in cache:
                cache[rest] = d[rest[0]] if len(rest) == 1 else coef(rest[:-1]) & d[rest[-1]]
            return cache[rest]

        for terms in self.terms:
            acc = torch.zeros_like(d[0])
            for rest, pos in terms:
                if pos is None:
                    acc = acc ^ (coef(rest) & one if rest else one)
                    continue
                acc = acc ^ (coef(rest) & lam[pos] if rest else lam[pos])
            outs.append(acc)
        return outs


# inputs L0..L3 = 0..3 and E0..E3 = 4..7; outputs LT, EQ
LEVEL1 = Gate(8, (((3,), (7, 2), (7, 6, 1), (7, 6, 5, 0)), ((7, 6, 5, 4),)))
# inputs LT0..LT3 = 0..3 and EQ1..EQ3 = 4..6; output LT
LEVEL2 = Gate(7, (((3,), (6, 2), (6, 5, 1), (6, 5, 4, 0)),))


def n_words(n: int) -> int:
    return -(-n // 64)


def slice_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 int (..., N) -> bit-sliced words (..., ceil(N / 64)); bit i of word w is
    element 64 w + i."""
    n = bits.shape[-1]
    if n == 0:
        return torch.zeros(*bits.shape[:-1], 0, dtype=torch.int64)
    pad = n_words(n) * 64 - n
    a = bits.numpy().astype(np.uint8, copy=False)
    if pad:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], pad), np.uint8)], -1)
    packed = np.packbits(a, axis=-1, bitorder="little")          # (..., N / 8) bytes
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int64))


def unslice_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(*words.shape[:-1], 0, dtype=torch.int64)
    by = words.contiguous().numpy().view(np.uint8)
    bits = np.unpackbits(by, axis=-1, count=n, bitorder="little")
    return torch.from_numpy(bits).to(torch.int64)


def chunks_of(u_lo: torch.Tensor) -> torch.Tensor:
    """(..., 16) chunk values of 63-bit non-negative words: 4 bits each, the top one 3."""
    shifts = torch.arange(CHUNKS, dtype=torch.int64) * 4
    return (u_lo.unsqueeze(-1) >> shifts) & 15


def _lookup_table() -> np.ndarray:
    # entry v (a 16-bit field shifted right by u): bit 0 = [field bit u] (eq), bit 1 = the
    # parity of the field bits above u (lt), for XOR shares of a one-hot field
    v = np.arange(1 << 16, dtype=np.uint32)
    above, parity = v >> 1, np.zeros(1 << 16, np.uint32)
    for k in range(15):
        parity ^= (above >> k) & 1
    return ((parity << 1) | (v & 1)).astype(np.uint8)


_LT_EQ = _lookup_table()


def lt_eq_codes(fields: np.ndarray, u_chunks: np.ndarray) -> np.ndarray:
    """uint8 codes: bit 0 the share of [u = v], bit 1 the share of [u < v], per chunk,
    from XOR shares of v's one-hot 16-bit fields (any shape) and the public chunks u
    (broadcast over fields' leading axes, e.g. every MAC plane)."""
    kernels = ring128.kernels()
    u = u_chunks
    while u.ndim > 1 and u.shape[0] == 1:     # leading 1s broadcast over fields' planes
        u = u[0]
    if kernels is not None and fields.shape[fields.ndim - u.ndim:] == u.shape:
        out = np.empty(fields.shape, np.uint8)
        kernels.lt_eq(np.ascontiguousarray(fields, np.uint16), np.ascontiguousarray(u, np.uint8),
                      _LT_EQ, out)
        return out
    return _LT_EQ[fields.astype(np.int32) >> u_chunks.astype(np.int32)]


def _lt_eq(tables: torch.Tensor, u_chunks: torch.Tensor) -> np.ndarray:
    """uint8 codes (..., 16): bit 0 the share of eq, bit 1 the share of lt, per chunk."""
    fields = tables.contiguous().numpy().view(np.uint16)                    # (..., 16)
    return lt_eq_codes(fields, u_chunks.numpy())


def table_lookup(tables: torch.Tensor, u_chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XOR shares of (lt, eq) per chunk from shares of the one-hot tables (..., 4 words)."""
    t = torch.from_numpy(_lt_eq(tables, u_chunks)).to(torch.int64)
    return t >> 1, t & 1


def lookup_sliced(tables: torch.Tensor, u_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`table_lookup` for flat public u_lo (N,), bit-sliced: (lt, eq) words (16, W)."""
    t = torch.from_numpy(np.ascontiguousarray(_lt_eq(tables, chunks_of(u_lo)).T))   # (16, N)
    return slice_bits(t >> 1), slice_bits(t & 1)


def cmp_spec(n: int) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes of the XOR-shared components for N = n elements (flattened)."""
    w = n_words(n)
    return [("tables", (n, 4)), ("g1", (LEVEL1.n_bits, 4, w)), ("g2", (LEVEL2.n_bits, w)),
            ("top", (2, w))]


def deal_cmp(r: torch.Tensor, tb: torch.Tensor, rand_words) -> dict[str, torch.Tensor]:
    """Plaintext XOR components for flat mask r (N,) and daBit tb (N,) 0/1;
    `rand_words(shape)` draws uniform int64 words (the dealer's PRG)."""
    n = r.numel()
    w = n_words(n)
    v_chunks = chunks_of(r & _MASK63)                          # (N, 16)
    onehot = (torch.ones_like(v_chunks) << v_chunks).view(n, 4, 4)
    tables = (onehot << (torch.arange(4, dtype=torch.int64) * 16)).sum(-1)   # (N, 4)
    g1 = LEVEL1.deal(rand_words((LEVEL1.n_inputs, 4, w)))
    g2 = LEVEL2.deal(rand_words((LEVEL2.n_inputs, w)))
    top = torch.stack([slice_bits((r >> 63) & 1), slice_bits(tb & 1)], 0)
    return {"tables": tables, "g1": g1, "g2": g2, "top": top}
