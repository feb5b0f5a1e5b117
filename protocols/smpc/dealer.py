"""The dealer: correlated randomness for the online phase, behind an interface.

The protocols only ever see a :class:`Dealer` (or, party-side, a
:class:`~protocols.smpc.preprocessing.Preprocessing` feed), never a concrete
implementation; :class:`LocalDealer` serves tests and in-process runs, a remote
crypto-provider peer would implement the same interface.

Every method returns one :class:`~protocols.smpc.messages.Material` per party.
Components a party can draw at random are expanded from its 16-byte seed
(AES-CTR, :mod:`protocols.smpc.prg`); components fixed by a relation (c = a*b,
bits of r, r >> f...) are drawn from the seed for parties 0..n-2, and the last
party gets an explicit *correction* tensor instead so the relation holds. Arithmetic
components are shared additively mod 2^64, boolean ones (``binary_triple``, the
bits of an ``edabit``, the boolean half of a ``dabit``) by XOR of int64 words.

Threat model: the dealer is semi-honest and does not collude with any party. It
never receives data or shares of data; it only learns shapes and the op sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from p2pgrid.errors import BadRequest, ShapeError

from .messages import Material, Request
from .prg import Prg, SEED_BYTES, new_seed
from .ring import logical_rshift, msb, ring_matmul

__all__ = ["Dealer", "LocalDealer"]

Shape = Sequence[int]


def _shape(s, what="shape") -> tuple[int, ...]:
    try:
        out = tuple(int(d) for d in s)
    except TypeError:
        raise ShapeError(f"{what} must be a sequence of ints") from None
    if any(d < 0 for d in out):
        raise ShapeError(f"{what} has a negative dimension")
    return out


def _check_n(n_parties: int) -> int:
    if not isinstance(n_parties, int) or n_parties < 2:
        raise BadRequest("SMPC needs at least 2 parties")
    return n_parties


class Dealer(ABC):
    """Deals preprocessing material; one Material per party from every call."""

    @abstractmethod
    def elementwise_triples(self, shape: Shape, n_parties: int,
                            shape_b: Shape | None = None) -> list[Material]:
        """Beaver triple a (shape), b (shape_b or shape), c = a*b (broadcast shape)."""

    @abstractmethod
    def matmul_triples(self, shape_a: Shape, shape_b: Shape, n_parties: int) -> list[Material]:
        """Beaver triple for matmul: c = a @ b."""

    @abstractmethod
    def binary_triples(self, shape: Shape, n_parties: int) -> list[Material]:
        """XOR-shared int64 words a, b and c = a & b (64 AND triples per word)."""

    @abstractmethod
    def truncation_pairs(self, shape: Shape, bits: int, n_parties: int) -> list[Material]:
        """Arithmetic shares of r (uniform), r_hi = r >> bits (unsigned), r_msb = top bit of r."""

    @abstractmethod
    def edabits(self, shape: Shape, n_parties: int) -> list[Material]:
        """Arithmetic shares of a uniform r (``r``) and XOR shares of its bits (``rb``)."""

    @abstractmethod
    def dabits(self, shape: Shape, n_parties: int) -> list[Material]:
        """A random bit t: XOR shares in bit 0 of ``tb`` and arithmetic shares ``t``."""

    def deal(self, request: Request, n_parties: int) -> list[Material]:
        """Serve a :class:`Request` (explicit table, no dispatch on names from the wire)."""
        handler = _DISPATCH.get(request.kind)
        if handler is None:  # pragma: no cover - Request validates kinds
            raise BadRequest(f"unknown preprocessing kind {request.kind!r}")
        return handler(self, request, n_parties)


def _one_shape(req: Request) -> tuple[int, ...]:
    if len(req.shapes) != 1:
        raise BadRequest(f"{req.kind} takes one shape")
    return req.shapes[0]


def _triple(d: Dealer, req: Request, n: int):
    if len(req.shapes) not in (1, 2):
        raise BadRequest("triple takes one or two shapes")
    return d.elementwise_triples(req.shapes[0], n, req.shapes[1] if len(req.shapes) == 2 else None)


def _matmul(d: Dealer, req: Request, n: int):
    if len(req.shapes) != 2:
        raise BadRequest("matmul_triple takes two shapes")
    return d.matmul_triples(req.shapes[0], req.shapes[1], n)


_DISPATCH: dict[str, Callable[[Dealer, Request, int], list[Material]]] = {
    "triple": _triple,
    "matmul_triple": _matmul,
    "binary_triple": lambda d, r, n: d.binary_triples(_one_shape(r), n),
    "trunc_pair": lambda d, r, n: d.truncation_pairs(_one_shape(r), r.param, n),
    "edabit": lambda d, r, n: d.edabits(_one_shape(r), n),
    "dabit": lambda d, r, n: d.dabits(_one_shape(r), n),
}


class LocalDealer(Dealer):
    """In-process dealer. `seed` (16 bytes) makes its output reproducible (tests only)."""

    def __init__(self, seed: bytes | None = None):
        self._prg = Prg(seed if seed is not None else new_seed())

    # ---- the generic compressed deal
    def _deal(self, kind: str, n: int, spec: list[tuple[str, tuple[int, ...]]],
              derived: tuple[str, ...], xor: frozenset[str],
              derive: Callable[[dict], dict]) -> list[Material]:
        """Expand the parties' seeds; the last party's `derived` components become corrections.

        `derive` maps the reconstructed free components to the derived ones.
        """
        n = _check_n(n)
        seeds = [self._prg.bytes(SEED_BYTES) for _ in range(n)]
        totals: dict[str, torch.Tensor] = {}
        for p in range(n):
            prg = Prg(seeds[p])
            for i, (name, shape) in enumerate(spec):
                if p == n - 1 and name in derived:
                    continue  # the last party gets this one as a correction
                t = prg.int64(shape, stream=i)  # same expansion as Material.expand
                if name not in totals:
                    totals[name] = t
                else:
                    totals[name] = totals[name] ^ t if name in xor else totals[name] + t
        targets = derive(totals)  # reads free components only (complete sums)
        corrections = {name: (targets[name] ^ totals[name]) if name in xor
                       else (targets[name] - totals[name]) for name in derived}
        spec_t = tuple(spec)
        out = [Material(kind, p, seeds[p], spec_t) for p in range(n - 1)]
        out.append(Material(kind, n - 1, seeds[n - 1], spec_t, corrections))
        return out

    # ---- the interface
    def elementwise_triples(self, shape, n_parties, shape_b=None):
        sa = _shape(shape)
        sb = sa if shape_b is None else _shape(shape_b, "shape_b")
        try:
            sc = tuple(torch.broadcast_shapes(sa, sb))
        except RuntimeError:
            raise ShapeError(f"shapes {list(sa)} and {list(sb)} do not broadcast") from None
        return self._deal("triple", n_parties, [("a", sa), ("b", sb), ("c", sc)], ("c",),
                          frozenset(), lambda t: {"c": t["a"] * t["b"]})

    def matmul_triples(self, shape_a, shape_b, n_parties):
        sa, sb = _shape(shape_a, "shape_a"), _shape(shape_b, "shape_b")
        try:
            sc = tuple((torch.empty(sa, device="meta") @ torch.empty(sb, device="meta")).shape)
        except RuntimeError:
            raise ShapeError(f"cannot matmul shapes {list(sa)} and {list(sb)}") from None
        return self._deal("matmul_triple", n_parties, [("a", sa), ("b", sb), ("c", sc)],
                          ("c",), frozenset(), lambda t: {"c": ring_matmul(t["a"], t["b"])})

    def binary_triples(self, shape, n_parties):
        s = _shape(shape)
        return self._deal("binary_triple", n_parties, [("a", s), ("b", s), ("c", s)],
                          ("c",), frozenset({"a", "b", "c"}), lambda t: {"c": t["a"] & t["b"]})

    def truncation_pairs(self, shape, bits, n_parties):
        s = _shape(shape)
        if not isinstance(bits, int) or not 0 < bits < 62:
            raise BadRequest("truncation bits must be in [1, 61]")
        return self._deal("trunc_pair", n_parties, [("r", s), ("r_hi", s), ("r_msb", s)],
                          ("r_hi", "r_msb"), frozenset(),
                          lambda t: {"r_hi": logical_rshift(t["r"], bits), "r_msb": msb(t["r"])})

    def edabits(self, shape, n_parties):
        s = _shape(shape)
        return self._deal("edabit", n_parties, [("r", s), ("rb", s)], ("rb",), frozenset({"rb"}),
                          lambda t: {"rb": t["r"]})

    def dabits(self, shape, n_parties):
        s = _shape(shape)
        return self._deal("dabit", n_parties, [("tb", s), ("t", s)], ("t",), frozenset({"tb"}),
                          lambda t: {"t": t["tb"] & 1})
