"""Additive secret sharing over Z_2^64 and the local (communication-free) ops on shares.

A secret x (int64 ring elements) is split into n shares: parties 0..n-2 get uniform
words from a cryptographic PRG, the last gets x - sum(others) mod 2^64. Any n-1
shares are jointly uniform and independent of x.

:class:`Shared` is one party's view of a shared tensor: its share, its party index,
the number of parties, and ``scale`` (fractional bits of the fixed-point encoding;
0 for integers and bits). Local ops (``+ -``, integer scaling, ``sum``, reshape,
indexing, :func:`cat`/:func:`stack`...) return new :class:`Shared` objects without
communication. Ops that need rounds (``mul``, ``matmul``, comparison...) are
protocols in :mod:`.beaver`, :mod:`.compare`; the operators refuse them with a
BadRequest saying which protocol to use.

Public operands of ``+``/``-`` are numbers or float tensors, encoded at the
shared operand's scale and added by party 0 only. Integer tensors are refused
there (raw ring words or integers? ambiguous); ``*`` takes Python ints or integer
tensors (exact, local) and refuses floats (they need truncation: ``mul(ctx, x, 0.5)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import torch

from p2pgrid.errors import BadRequest, ShapeError

from .fixedpoint import FixedPoint
from .prg import Prg

__all__ = ["Shared", "share", "reconstruct", "share_float", "reconstruct_float", "cat",
           "stack", "is_public"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def share(secret: torch.Tensor, n_parties: int, prg: Prg) -> list[torch.Tensor]:
    """Split int64 ring elements into `n_parties` additive shares."""
    if not isinstance(secret, torch.Tensor) or secret.dtype != torch.int64:
        raise BadRequest("share() takes an int64 tensor of ring elements; encode floats first")
    if not isinstance(n_parties, int) or n_parties < 2:
        raise BadRequest("SMPC needs at least 2 parties")
    shares = [prg.int64(secret.shape) for _ in range(n_parties - 1)]
    last = secret.clone()
    for s in shares:
        last -= s
    shares.append(last)
    return shares


def reconstruct(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of additive shares mod 2^64."""
    if not shares:
        raise BadRequest("no shares to reconstruct")
    shapes = {tuple(s.shape) for s in shares}
    if len(shapes) != 1:
        raise ShapeError(f"shares have different shapes: {sorted(shapes)}")
    out = shares[0].clone()
    for s in shares[1:]:
        out += s
    return out


def share_float(x, n_parties: int, prg: Prg, frac_bits: int = 16) -> list[torch.Tensor]:
    """Encode reals in fixed point, then share."""
    return share(FixedPoint(frac_bits).encode(x), n_parties, prg)


def reconstruct_float(shares: Sequence[torch.Tensor], frac_bits: int = 16) -> torch.Tensor:
    return FixedPoint(frac_bits).decode(reconstruct(shares))


def is_public(value) -> bool:
    return isinstance(value, (Real, torch.Tensor)) and not isinstance(value, Shared)


def _not_local(op: str, proto: str):
    raise BadRequest(f"{op} of a shared tensor needs communication: use {proto}")


@dataclass(frozen=True, eq=False)
class Shared:
    """One party's additive share of a tensor in Z_2^64."""

    share: torch.Tensor
    party: int
    n_parties: int
    scale: int

    def __post_init__(self):
        if not isinstance(self.share, torch.Tensor) or self.share.dtype != torch.int64:
            raise BadRequest("a share must be an int64 tensor")
        if not isinstance(self.n_parties, int) or self.n_parties < 2:
            raise BadRequest("SMPC needs at least 2 parties")
        if not 0 <= self.party < self.n_parties:
            raise BadRequest("party index out of range")
        if not isinstance(self.scale, int) or not 0 <= self.scale <= 62:
            raise BadRequest("scale must be an int in [0, 62]")

    # ---- basics
    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def dim(self) -> int:
        return self.share.dim()

    def numel(self) -> int:
        return self.share.numel()

    def __len__(self) -> int:
        return len(self.share)

    def __repr__(self) -> str:  # never print share values
        return (f"Shared(shape={list(self.shape)}, party={self.party}/{self.n_parties}, "
                f"scale={self.scale})")

    def like(self, share: torch.Tensor, scale: int | None = None) -> "Shared":
        """A Shared of this party with another share tensor."""
        return Shared(share, self.party, self.n_parties, self.scale if scale is None else scale)

    def _check_peer(self, other: "Shared", op: str) -> None:
        if not isinstance(other, Shared):
            raise BadRequest(f"{op}: expected a Shared operand, got {type(other).__name__}")
        if other.party != self.party or other.n_parties != self.n_parties:
            raise BadRequest(f"{op}: operands are shares of different parties or sessions "
                             f"({self.party}/{self.n_parties} vs {other.party}/{other.n_parties})")
        if other.scale != self.scale:
            raise BadRequest(f"{op}: operands have different fixed-point scales "
                             f"({self.scale} vs {other.scale} fractional bits)")

    def _broadcast_shape(self, other_shape, op: str) -> torch.Size:
        try:
            return torch.broadcast_shapes(self.shape, other_shape)
        except RuntimeError:
            raise ShapeError(f"{op}: shapes {list(self.shape)} and {list(other_shape)} "
                             "do not broadcast") from None

    def encode_public(self, value) -> torch.Tensor:
        """A public number / float tensor as ring elements at this tensor's scale."""
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise BadRequest("booleans are not numbers here; convert explicitly")
        if isinstance(value, torch.Tensor):
            if value.dtype in _INT_DTYPES:
                raise BadRequest("integer tensors are ambiguous as public addends (ring words "
                                 "or numbers?): pass a float tensor, or a Shared")
            return FixedPoint(self.scale).encode(value)
        if isinstance(value, Real):
            return FixedPoint(self.scale).encode(float(value))
        raise BadRequest(f"cannot combine a Shared with {type(value).__name__}")

    def add_public_ring(self, ring: torch.Tensor) -> "Shared":
        """Add public ring elements (party 0 adds; the shape must not grow)."""
        shape = self._broadcast_shape(ring.shape, "add")
        if shape != self.shape:
            raise ShapeError(f"add: a public operand of shape {list(ring.shape)} would grow "
                             f"the shared tensor {list(self.shape)}")
        return self.like(self.share + ring if self.party == 0 else self.share.clone())

    # ---- linear ops
    def __add__(self, other) -> "Shared":
        if isinstance(other, Shared):
            self._check_peer(other, "add")
            self._broadcast_shape(other.shape, "add")
            return self.like(self.share + other.share)
        return self.add_public_ring(self.encode_public(other))

    __radd__ = __add__

    def __neg__(self) -> "Shared":
        return self.like(-self.share)

    def __sub__(self, other) -> "Shared":
        if isinstance(other, Shared):
            self._check_peer(other, "sub")
            self._broadcast_shape(other.shape, "sub")
            return self.like(self.share - other.share)
        return self.add_public_ring(-self.encode_public(other))

    def __rsub__(self, other) -> "Shared":
        return (-self) + other

    def __mul__(self, other) -> "Shared":
        if isinstance(other, Shared):
            _not_local("multiplying two shared tensors", "beaver.mul(ctx, x, y)")
        if isinstance(other, bool):
            raise BadRequest("booleans are not numbers here; convert explicitly")
        if isinstance(other, Integral):
            return self.like(self.share * int(other))
        if isinstance(other, torch.Tensor) and other.dtype in _INT_DTYPES:
            shape = self._broadcast_shape(other.shape, "mul")
            if shape != self.shape:
                raise ShapeError(f"mul: a public operand of shape {list(other.shape)} would grow "
                                 f"the shared tensor {list(self.shape)}")
            return self.like(self.share * other.to(torch.int64))
        if isinstance(other, (Real, torch.Tensor)):
            _not_local("multiplying by a non-integer", "beaver.mul(ctx, x, value) (truncates)")
        raise BadRequest(f"cannot multiply a Shared by {type(other).__name__}")

    __rmul__ = __mul__

    def __matmul__(self, other):
        _not_local("matmul", "beaver.matmul(ctx, x, y)")

    __rmatmul__ = __matmul__

    def __truediv__(self, other):
        _not_local("division", "beaver.mul(ctx, x, 1 / d)")

    def _cmp(self, other):
        _not_local("comparison", "compare.ge/gt/lt/le(ctx, x, y)")

    __lt__ = __le__ = __gt__ = __ge__ = _cmp

    def __bool__(self):
        raise BadRequest("a Shared has no truth value; reveal it or compare it in MPC")

    # ---- shape ops (local)
    def __getitem__(self, index) -> "Shared":
        if isinstance(index, Shared):
            raise BadRequest("indexing by a shared index needs a protocol (one-hot and mul)")
        return self.like(self.share[index])

    def reshape(self, *shape) -> "Shared":
        try:
            return self.like(self.share.reshape(*shape))
        except RuntimeError as e:
            raise ShapeError(f"reshape {list(self.shape)} -> {list(shape)}: {e}") from None

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "Shared":
        return self.like(self.share.flatten(start_dim, end_dim))

    def transpose(self, d0: int, d1: int) -> "Shared":
        return self.like(self.share.transpose(d0, d1))

    @property
    def T(self) -> "Shared":
        if self.dim() != 2:
            raise ShapeError(".T is for 2-d shared tensors; use transpose/permute")
        return self.transpose(0, 1)

    def permute(self, *dims) -> "Shared":
        return self.like(self.share.permute(*dims))

    def unsqueeze(self, d: int) -> "Shared":
        return self.like(self.share.unsqueeze(d))

    def squeeze(self, d: int | None = None) -> "Shared":
        return self.like(self.share.squeeze() if d is None else self.share.squeeze(d))

    def expand(self, *shape) -> "Shared":
        try:
            return self.like(self.share.expand(*shape))
        except RuntimeError as e:
            raise ShapeError(f"expand {list(self.shape)} -> {list(shape)}: {e}") from None

    def sum(self, dim=None, keepdim: bool = False) -> "Shared":
        if dim is None:
            return self.like(self.share.sum())
        return self.like(self.share.sum(dim=dim, keepdim=keepdim))

    def contiguous(self) -> "Shared":
        return self.like(self.share.contiguous())


def _check_group(xs: Sequence[Shared], op: str) -> None:
    if not xs:
        raise BadRequest(f"{op}: nothing to join")
    for x in xs:
        if not isinstance(x, Shared):
            raise BadRequest(f"{op}: every operand must be Shared (share public tensors first)")
        xs[0]._check_peer(x, op)


def cat(xs: Sequence[Shared], dim: int = 0) -> Shared:
    xs = list(xs)
    _check_group(xs, "cat")
    try:
        return xs[0].like(torch.cat([x.share for x in xs], dim=dim))
    except (RuntimeError, IndexError) as e:
        raise ShapeError(f"cat of shapes {[list(x.shape) for x in xs]} along {dim}: {e}") from None


def stack(xs: Sequence[Shared], dim: int = 0) -> Shared:
    xs = list(xs)
    _check_group(xs, "stack")
    try:
        return xs[0].like(torch.stack([x.share for x in xs], dim=dim))
    except (RuntimeError, IndexError) as e:
        raise ShapeError(f"stack of shapes {[list(x.shape) for x in xs]}: {e}") from None
