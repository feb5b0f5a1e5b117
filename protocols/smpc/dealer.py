"""The dealer: correlated randomness for the online phase, behind an interface.

The protocols only ever see a :class:`Dealer` (or, party-side, a
:class:`~p2pgrid.protocols.smpc.preprocessing.Preprocessing` feed), never a concrete
implementation; :class:`LocalDealer` serves tests and in-process runs, a remote
crypto-provider peer would implement the same interface.

Every method returns one :class:`~p2pgrid.protocols.smpc.messages.Material` per party.
Components a party can draw at random are expanded from its 16-byte seed
(AES-CTR, :mod:`p2pgrid.protocols.smpc.prg`); components fixed by a relation (c = a*b,
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

from .gates import cmp_spec, deal_cmp
from .messages import Material, Request, expand_seed
from .prg import Prg, SEED_BYTES, new_seed
from .ring import logical_rshift, msb, ring_matmul

__all__ = ["Dealer", "LocalDealer", "component_shapes"]

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

    @abstractmethod
    def comparisons(self, shape: Shape, n_parties: int, with_rt: bool = False) -> list[Material]:
        """Sign-test material (see :mod:`.gates`): a uniform r (arithmetic, ``r``), the
        XOR-shared ``bits`` words (chunk tables of r, gate masks, r's top bit, a random
        bit tb), the arithmetic ``t`` = tb and, with `with_rt`, ``rt`` = r * tb."""

    @abstractmethod
    def relu_material(self, shape: Shape, n_parties: int, fwd_bits: int, bwd_bits: int,
                      backward: bool) -> list[Material]:
        """ReLU material (see :mod:`.layers`): comparison material for a mask r, and for the
        fused truncation by `fwd_bits` r >> bits and msb(r) with their products by the
        daBit t; with `backward`, a second mask q (truncated by `bwd_bits`) likewise."""

    @abstractmethod
    def linear_triples(self, shape_x: Shape, shape_w: Shape, n_parties: int,
                       backward: bool, grad_x: bool) -> list[Material]:
        """A layer's Beaver material with masks reused between forward and backward:
        A (x's mask), B (W's), C = A @ B; with `backward` G (the output gradient's mask)
        and D = A^T @ G; with `grad_x` also E = G @ B^T."""

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
    "cmp": lambda d, r, n: d.comparisons(_one_shape(r), n, bool(r.param & 1)),
    "relu": lambda d, r, n: d.relu_material(_one_shape(r), n, *relu_params(r.param)),
    "linear": lambda d, r, n: d.linear_triples(*_two_shapes(r), n, *linear_params(r.param)),
}


def _two_shapes(req: Request):
    if len(req.shapes) != 2:
        raise BadRequest(f"{req.kind} takes two shapes")
    return req.shapes[0], req.shapes[1]


def relu_params(param: int) -> tuple[int, int, bool]:
    """(fwd_bits, bwd_bits, backward) packed in a Request's int param."""
    fwd, bwd, back = param % 64, (param // 64) % 64, bool(param // 4096)
    if param < 0 or param >= 8192 or fwd > 61 or bwd > 61:
        raise BadRequest("bad relu material parameter")
    return fwd, bwd, back


def relu_param(fwd_bits: int, bwd_bits: int, backward: bool) -> int:
    return fwd_bits + 64 * bwd_bits + 4096 * int(backward)


def linear_param(train: bool, grad_x: bool = True) -> int:
    """A layer item's parameter (both modes): 0 without a backward pass, 1 for training
    without the input's gradient (a first layer: no E = G B^T), 3 for training with it."""
    return (1 | (2 if grad_x else 0)) if train else 0


def linear_params(param: int) -> tuple[bool, bool]:
    """(train, grad_x) of a layer item's parameter (:func:`linear_param`)."""
    if param not in (0, 1, 3):
        raise BadRequest("bad linear material parameter")
    return bool(param & 1), bool(param & 2)


def _relu_spec(s, fwd_bits, bwd_bits, backward):
    n = 1
    for d in s:
        n *= d
    xor = cmp_spec(n)
    spec = [("r", s), *xor, ("t", s)]
    spec += [("r_hi", s), ("r_msb", s), ("rt_hi", s), ("rt_msb", s)] if fwd_bits else [("rt", s)]
    if backward:
        spec.append(("q", s))
        spec += [("q_hi", s), ("q_msb", s), ("qt_hi", s), ("qt_msb", s)] if bwd_bits else [("qt", s)]
    derived = tuple(name for name, _ in spec if name not in ("r", "q"))
    return spec, derived, frozenset(name for name, _ in xor)


def _linear_spec(sx, sw, backward, grad_x):
    try:
        sc = tuple((torch.empty(sx, device="meta") @ torch.empty(sw, device="meta")).shape)
    except RuntimeError:
        raise ShapeError(f"cannot matmul shapes {list(sx)} and {list(sw)}") from None
    if len(sx) != 2 or len(sw) != 2:
        raise ShapeError("linear material is for 2-d x and W")
    spec = [("A", tuple(sx)), ("B", tuple(sw)), ("C", sc)]
    if backward:
        spec += [("G", sc), ("D", tuple(sw))] + ([("E", tuple(sx))] if grad_x else [])
    derived = tuple(name for name, _ in spec if name in ("C", "D", "E"))
    return spec, derived


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
            # the same expansion as Material.expand; the last party's derived components
            # are corrections
            for name, t in expand_seed(seeds[p], tuple(spec),
                                       skip=set(derived) if p == n - 1 else ()).items():
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

    def comparisons(self, shape, n_parties, with_rt=False):
        s = _shape(shape)
        spec, derived, xor = _cmp_spec(s, with_rt)

        def derive(t):
            r = t["r"]
            tb = self._prg.int64(s) & 1
            out = deal_cmp(r.reshape(-1), tb.reshape(-1), self._prg.int64)
            out["t"] = tb
            if with_rt:
                out["rt"] = r * tb
            return out

        return self._deal("cmp", n_parties, spec, derived, xor, derive)


    def relu_material(self, shape, n_parties, fwd_bits, bwd_bits, backward):
        s = _shape(shape)
        spec, derived, xor = _relu_spec(s, fwd_bits, bwd_bits, backward)

        def derive(tot):
            r = tot["r"]
            tb = self._prg.int64(s) & 1
            out = deal_cmp(r.reshape(-1), tb.reshape(-1), self._prg.int64)
            out["t"] = tb
            if fwd_bits:
                out["r_hi"], out["r_msb"] = logical_rshift(r, fwd_bits), msb(r)
                out["rt_hi"], out["rt_msb"] = out["r_hi"] * tb, out["r_msb"] * tb
            else:
                out["rt"] = r * tb
            if backward:
                q = tot["q"]
                if bwd_bits:
                    out["q_hi"], out["q_msb"] = logical_rshift(q, bwd_bits), msb(q)
                    out["qt_hi"], out["qt_msb"] = out["q_hi"] * tb, out["q_msb"] * tb
                else:
                    out["qt"] = q * tb
            return out

        return self._deal("relu", n_parties, spec, derived, xor, derive)

    def linear_triples(self, shape_x, shape_w, n_parties, backward, grad_x):
        spec, derived = _linear_spec(_shape(shape_x), _shape(shape_w), backward, grad_x)

        def derive(t):
            out = {"C": ring_matmul(t["A"], t["B"])}
            if backward:
                out["D"] = ring_matmul(t["A"].T.contiguous(), t["G"])
                if grad_x:
                    out["E"] = ring_matmul(t["G"], t["B"].T.contiguous())
            return out

        return self._deal("linear", n_parties, spec, derived, frozenset(), derive)


def _cmp_spec(s: tuple[int, ...], with_rt: bool):
    n = 1
    for d in s:
        n *= d
    xor = cmp_spec(n)
    spec = [("r", s), *xor, ("t", s)] + ([("rt", s)] if with_rt else [])
    derived = tuple(name for name, _ in xor) + ("t",) + (("rt",) if with_rt else ())
    return spec, derived, frozenset(name for name, _ in xor)


def component_shapes(request: Request) -> list[tuple[str, tuple[int, ...]]]:
    """The named components (and their shapes) a party receives for `request`, without
    dealing anything: what a dry run needs to stand in zeros for real material."""
    shapes = [_shape(s) for s in request.shapes]
    kind = request.kind
    if kind in ("triple", "matmul_triple"):
        sa = shapes[0]
        sb = shapes[1] if len(shapes) > 1 else sa
        try:
            if kind == "triple":
                sc = tuple(torch.broadcast_shapes(sa, sb))
            else:
                sc = tuple((torch.empty(sa, device="meta") @ torch.empty(sb, device="meta")).shape)
        except RuntimeError:
            raise ShapeError(f"shapes {list(sa)} and {list(sb)} do not fit a {kind}") from None
        return [("a", sa), ("b", sb), ("c", sc)]
    s = shapes[0]
    names = {"binary_triple": ("a", "b", "c"), "trunc_pair": ("r", "r_hi", "r_msb"),
             "edabit": ("r", "rb"), "dabit": ("tb", "t")}.get(kind)
    if names is None:
        extra = _EXTRA_SPECS.get(kind)
        if extra is None:
            raise BadRequest(f"unknown preprocessing kind {kind!r}")
        return extra(request, shapes)
    return [(name, s) for name in names]


# kinds defined in other modules (comparison, layers) register their component shapes here
_EXTRA_SPECS: dict[str, Callable[[Request, list], list]] = {
    "cmp": lambda req, shapes: _cmp_spec(tuple(shapes[0]), bool(req.param & 1))[0],
    "relu": lambda req, shapes: _relu_spec(tuple(shapes[0]), *relu_params(req.param))[0],
    "linear": lambda req, shapes: _linear_spec(tuple(shapes[0]), tuple(shapes[1]),
                                               *linear_params(req.param))[0],
}
