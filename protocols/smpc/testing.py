"""Helpers for testing and benchmarking SMPC protocols in memory.

:func:`run_op` secret-shares plaintext inputs, runs ``op(ctx, *shared_inputs)`` for
every party through :func:`~.harness.run_parties`, and reconstructs the outputs, so
a test reads like plaintext code:

>>> import torch
>>> from p2pgrid.protocols.smpc import relu
>>> out, stats = run_op(2, relu, torch.tensor([-1.0, 2.5]), seed=0)
>>> out.tolist(), stats.rounds
([0.0, 2.5], 4)

:class:`DealerConformance` is the test mixin every :class:`~.dealer.Dealer`
implementation must pass (subclass it in a test module and define ``make_dealer``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .dealer import Dealer
from .fixedpoint import FixedPoint
from .harness import RunStats, _seed_bytes, run_parties
from .messages import Request
from .prg import Prg
from .ring import logical_rshift, msb, ring_matmul
from .runtime import PartyContext, SmpcConfig
from .sharing import Shared, reconstruct, share

__all__ = ["run_op", "share_inputs", "open_outputs", "DealerConformance"]


def share_inputs(n_parties: int, inputs, *, frac_bits: int = 16, seed=0,
                 raw: bool = False) -> list[list[torch.Tensor]]:
    """Per input, a list of n shares. Floats are encoded; with `raw`, int64 inputs are
    shared as ring elements as they are."""
    prg = Prg(_seed_bytes(seed, "inputs"))
    out = []
    for x in inputs:
        ring = x if raw else FixedPoint(frac_bits).encode(x)
        out.append(share(ring, n_parties, prg))
    return out


def open_outputs(per_party: list[Any], *, raw: bool = False):
    """Reconstruct nested (tuple/list) outputs of Shared; scale 0 or `raw` -> int64 ring
    elements, else decoded float64."""
    first = per_party[0]
    if isinstance(first, Shared):
        ring = reconstruct([o.share for o in per_party])
        return ring if raw or first.scale == 0 else FixedPoint(first.scale).decode(ring)
    if isinstance(first, (tuple, list)):
        return type(first)(open_outputs([o[i] for o in per_party], raw=raw)
                           for i in range(len(first)))
    return first


def run_op(n_parties: int, op: Callable[..., Any], *inputs, seed=0,
           config: SmpcConfig | None = None, raw: bool = False, scale: int | None = None,
           raw_out: bool = False, dealer: Dealer | None = None, feed=None
           ) -> tuple[Any, RunStats]:
    """Share `inputs`, run `op(ctx, *shared)` on every party, reconstruct the outputs.

    Inputs are float tensors encoded at frac_bits, or with `raw` int64 ring elements
    shared as they are (at `scale`, default 0). With `raw_out`, outputs stay ring elements.
    """
    config = config or SmpcConfig()
    shares = share_inputs(n_parties, inputs, frac_bits=config.frac_bits, seed=seed, raw=raw)
    in_scale = (0 if raw else config.frac_bits) if scale is None else scale

    def party(ctx: PartyContext):
        return op(ctx, *[ctx.wrap(s[ctx.party], in_scale) for s in shares])

    res = run_parties(n_parties, party, seed=seed, config=config, dealer=dealer, feed=feed)
    return open_outputs(res.outputs, raw=raw_out), res.stats


def _sum(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out += t
    return out


def _xor(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out ^= t
    return out


class DealerConformance:
    """Checks any Dealer: relations hold, compression holds, shares are well formed.

    Subclass in a test module and define ``make_dealer(self) -> Dealer``.
    """

    n_values = (2, 3, 4)

    def make_dealer(self) -> Dealer:  # pragma: no cover - overridden
        raise NotImplementedError

    def _expand(self, mats):
        return [m.expand() for m in mats]

    def _check_compressed(self, mats, n):
        assert len(mats) == n
        assert [m.party for m in mats] == list(range(n))
        for m in mats[:-1]:
            assert m.corrections == {} and m.nbytes == 16
        assert len({m.seed for m in mats}) == n

    def test_elementwise_triples(self):
        d = self.make_dealer()
        for n in self.n_values:
            mats = d.elementwise_triples((3, 5), n)
            self._check_compressed(mats, n)
            ex = self._expand(mats)
            a, b, c = (_sum([e[k] for e in ex]) for k in "abc")
            assert torch.equal(c, a * b)

    def test_broadcast_triples(self):
        d = self.make_dealer()
        ex = self._expand(d.elementwise_triples((4, 1), 3, (2, 4, 6)))
        a, b, c = (_sum([e[k] for e in ex]) for k in "abc")
        assert c.shape == (2, 4, 6) and torch.equal(c, a * b)

    def test_matmul_triples(self):
        d = self.make_dealer()
        for n in self.n_values:
            mats = d.matmul_triples((4, 7), (7, 3), n)
            self._check_compressed(mats, n)
            ex = self._expand(mats)
            a, b, c = (_sum([e[k] for e in ex]) for k in "abc")
            assert torch.equal(c, a @ b)

    def test_binary_triples(self):
        d = self.make_dealer()
        for n in self.n_values:
            ex = self._expand(d.binary_triples((10,), n))
            a, b, c = (_xor([e[k] for e in ex]) for k in "abc")
            assert torch.equal(c, a & b)

    def test_truncation_pairs(self):
        d = self.make_dealer()
        for n in self.n_values:
            ex = self._expand(d.truncation_pairs((50,), 16, n))
            r, hi, top = (_sum([e[k] for e in ex]) for k in ("r", "r_hi", "r_msb"))
            assert torch.equal(hi, logical_rshift(r, 16))
            assert torch.equal(top, msb(r))

    def test_edabits(self):
        d = self.make_dealer()
        for n in self.n_values:
            ex = self._expand(d.edabits((50,), n))
            assert torch.equal(_sum([e["r"] for e in ex]), _xor([e["rb"] for e in ex]))

    def test_dabits(self):
        d = self.make_dealer()
        for n in self.n_values:
            ex = self._expand(d.dabits((400,), n))
            t = _sum([e["t"] for e in ex])
            assert torch.equal(t, _xor([e["tb"] for e in ex]) & 1)
            assert 100 < int(t.sum()) < 300  # random bits, not constant

    def test_deal_matches_methods(self):
        d = self.make_dealer()
        mats = d.deal(Request("matmul_triple", ((2, 3), (3, 4))), 2)
        ex = self._expand(mats)
        assert torch.equal(_sum([e["c"] for e in ex]), ring_matmul(*(_sum([e[k] for e in ex]) for k in "ab")))

    def test_linear_triples(self):
        d = self.make_dealer()
        for n in self.n_values:
            mats = d.linear_triples((4, 7), (7, 3), n, True, True)
            self._check_compressed(mats, n)
            ex = self._expand(mats)
            A, B, C, G, D, E = (_sum([e[k] for e in ex]) for k in "ABCGDE")
            assert torch.equal(C, ring_matmul(A, B)) and torch.equal(D, ring_matmul(A.T, G))
            assert torch.equal(E, ring_matmul(G, B.T))

    def test_comparison_and_relu_material(self):
        from .gates import chunks_of, unslice_bits
        d = self.make_dealer()
        for n in self.n_values:
            ex = self._expand(d.relu_material((5, 30), n, 16, 16, True))
            r, t, q = (_sum([e[k] for e in ex]) for k in ("r", "t", "q"))
            tables, top = _xor([e["tables"] for e in ex]), _xor([e["top"] for e in ex])
            assert set(t.unique().tolist()) <= {0, 1}
            assert torch.equal(unslice_bits(top[1], 150).view(5, 30), t)
            assert torch.equal(unslice_bits(top[0], 150).view(5, 30), msb(r))
            fields = (tables.unsqueeze(-1) >> (torch.arange(4) * 16)) & 0xFFFF
            onehot = fields.flatten(-2)
            want = torch.ones_like(onehot) << chunks_of(r.reshape(-1) & ((1 << 63) - 1))
            assert torch.equal(onehot, want)
            for mask, v in (("r", r), ("q", q)):
                hi, top_bit = (_sum([e[f"{mask}_{k}"] for e in ex]) for k in ("hi", "msb"))
                assert torch.equal(hi, logical_rshift(v, 16)) and torch.equal(top_bit, msb(v))
                for k, part in (("hi", hi), ("msb", top_bit)):
                    assert torch.equal(_sum([e[f"{mask}t_{k}"] for e in ex]), part * t)

    def test_fresh_randomness(self):
        d = self.make_dealer()
        a1 = _sum([e["a"] for e in self._expand(d.elementwise_triples((8,), 2))])
        a2 = _sum([e["a"] for e in self._expand(d.elementwise_triples((8,), 2))])
        assert not torch.equal(a1, a2)
