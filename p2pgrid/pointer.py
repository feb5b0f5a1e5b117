"""Pointers to remote tensors and the lazy expressions built on them.

Operations on a :class:`Pointer` do not touch the network: they build a graph
of whitelisted ops, checked for shape and dtype right away on ``meta`` tensors.
Awaiting the expression runs it on the owner in one round trip and returns a
new Pointer to the result, which stays there; ``.get()`` downloads instead,
if the owner's rules allow it.

    avg = await (rec[:, 0].sum() / rec.shape[0]).get()   # one request
    ptr = await (rec[:, 0] * 2)                           # result stays remote

The graph, its operators and shape checks are :mod:`p2pgrid.expr`'s, shared with
SMPC's :class:`~p2pgrid.smpc.tensor.SharedTensor`; this module adds where it runs
(one peer, :data:`p2pgrid.ops.OPS`) and the plaintext-only ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .display import dtype_name
from .expr import LazyTensor, Node, dim_kwargs
from .ops import OPS, worst_case_nonzero

if TYPE_CHECKING:
    from .network import Network


def _dry_run(fn):
    """`fn` on meta tensors as the owner's dry run runs it: a mask selection sized at its
    worst case (torch refuses to size it otherwise; the user's own meta tensors keep that)."""
    def meta(*args, **kwargs):
        with worst_case_nonzero:
            return fn(*args, **kwargs)
    return meta


class Expr(LazyTensor):
    """A lazy value on one remote peer: ``Expr(net, peer, node, meta)`` (the graph itself:
    :class:`p2pgrid.expr.LazyTensor`)."""

    _OPS = {name: _dry_run(op.fn) for name, op in OPS.items()}
    _UNARY = frozenset({"exp", "log", "log1p", "sqrt", "square", "sigmoid", "tanh", "relu", "sign",
                        "floor", "ceil", "round", "abs", "neg", "isnan", "isfinite", "logical_not",
                        "numel"})
    _LEAF_KEY = "obj"
    _KIND = "plaintext value"
    _HINT = "share this one too (pointer.share) to compute on both in SMPC"
    _SELF_FIRST = frozenset({"add", "mul"})

    def _elsewhere(self, other: "Expr", op: str) -> str:
        return (f"operands live on different peers ({self.peer}, {other.peer}); "
                "move one with .send() or use secret sharing")

    def _place(self) -> str:
        return f"on {self.peer}"

    def _constant(self, op: str, value, reflected: bool):
        if not reflected or op in self._SELF_FIRST:
            return value
        if isinstance(value, (int, float, bool)):
            value = torch.as_tensor(value)  # torch's binary ops want the tensor on the left
        return value if isinstance(value, torch.Tensor) else NotImplemented

    # ------------------------------------------------------------ introspection
    @property
    def peer(self) -> str:
        """The peer that holds the data and runs the expression."""
        return self._where

    @property
    def dtype(self) -> torch.dtype:
        return self._meta.dtype

    def __repr__(self) -> str:
        return f"<Expr {self._node.op} on {self.peer}: {tuple(self.shape)} {self.dtype}>"

    def _describe(self):
        return ("remote expression (lazy: .get() runs it)", ["peer", "op", "shape", "dtype"],
                [self.peer, self._node.op, tuple(self.shape), dtype_name(self.dtype)])

    _NO_TRUTH = "a remote value has no truth value here; .get() it first"

    # ------------------------------------------------------------ plaintext-only ops
    def var(self, dim=None, keepdim=False, correction=1):
        return self._apply("var", **dim_kwargs(dim, keepdim), correction=correction)

    def std(self, dim=None, keepdim=False, correction=1):
        return self._apply("std", **dim_kwargs(dim, keepdim), correction=correction)

    def max(self, dim=None, keepdim=False):
        return self._apply("amax", **dim_kwargs(dim, keepdim))

    def min(self, dim=None, keepdim=False):
        return self._apply("amin", **dim_kwargs(dim, keepdim))

    def prod(self, dim=None, keepdim=False):
        return self._apply("prod", **dim_kwargs(dim, keepdim))

    def argmax(self, dim=None, keepdim=False):
        return self._apply("argmax", **dim_kwargs(dim, keepdim))

    def argmin(self, dim=None, keepdim=False):
        return self._apply("argmin", **dim_kwargs(dim, keepdim))

    def count_nonzero(self, dim=None):
        return self._apply("count_nonzero", **({"dim": dim} if dim is not None else {}))

    def histc(self, bins=10, min=0.0, max=0.0):
        return self._apply("histc", bins=bins, min=min, max=max)

    def clamp(self, min=None, max=None):
        return self._apply("clamp", **{k: v for k, v in (("min", min), ("max", max)) if v is not None})

    def softmax(self, dim):
        return self._apply("softmax", dim=dim)

    def cumsum(self, dim):
        return self._apply("cumsum", dim=dim)

    def to(self, dtype: torch.dtype):
        return self._apply("astype", dtype)

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)

    def long(self):
        return self.to(torch.int64)

    # ------------------------------------------------------------ running
    def program(self) -> dict:
        """The wire form (:mod:`p2pgrid.ops`): nodes in dependency order, the last one is the value."""
        nodes, _ = self._wire([self])
        return {"nodes": nodes}

    async def get(self, *, epsilon: float | None = None, **dp_options) -> torch.Tensor:
        """Compute on the owner and download the result (PermissionDenied if not allowed).

        With `epsilon`, ask for a differentially private release charged to your
        privacy budget on that dataset (p2pgrid.governance)."""
        if epsilon is not None:
            return await self._net._private_get(self, epsilon=epsilon, **dp_options)
        return await self._net._execute(self.peer, self.program(), fetch=True)

    async def request_release(self, *, reason: str):
        """Ask the owner to approve downloading this exact program's result (when the
        release gate refuses it); returns a request to ``await .wait()``."""
        return await self._net._request_release(self, reason=reason)

    async def store(self, *, tags=(), description: str = "") -> "Pointer":
        """Compute on the owner and keep the result there; returns its pointer."""
        return await self._net._execute(self.peer, self.program(), fetch=False, tags=tags,
                                        description=description)


class Pointer(Expr):
    """A tensor stored on a peer, with the metadata its owner published."""

    def __init__(self, net: "Network", peer: str, meta: dict):
        shape, dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
        super().__init__(net, peer, Node("leaf", leaf=meta["id"]),
                         torch.empty(shape, dtype=dtype, device="meta"))
        self.meta = meta

    id = property(lambda self: self.meta["id"])
    tags = property(lambda self: list(self.meta.get("tags", [])))

    @property
    def columns(self) -> list[str]:
        """A table's column names (its schema), [] for a plain tensor."""
        cols = self.meta.get("columns") or []
        return [c for c in cols if isinstance(c, str)] if isinstance(cols, (list, tuple)) else []

    def column(self, name: str) -> int:
        """The index of column `name` (KeyError naming the columns there are)."""
        cols = self.columns
        if name not in cols:
            have = ", ".join(cols) if cols else "none: this object has no named columns"
            raise KeyError(f"no column {name!r} in {self.id} (columns: {have})")
        return cols.index(name)

    def __getitem__(self, index) -> "Expr":
        # rec["weight_kg"] is rec[:, j], resolved here from the schema: the owner sees
        # (and its release gate judges) the very program rec[:, j] sends.
        if isinstance(index, str):
            index = (slice(None), self.column(index))
        elif isinstance(index, tuple) and any(isinstance(i, str) for i in index):
            index = tuple(self.column(i) if isinstance(i, str) else i for i in index)
        return super().__getitem__(index)
    description = property(lambda self: self.meta.get("description", ""))
    owner = property(lambda self: self.meta.get("owner", self.peer))

    def __repr__(self) -> str:
        tags = " ".join("#" + t for t in self.tags)
        return (f"<Pointer {self.peer}/{self.id}: {tuple(self.shape)} "
                f"{str(self.dtype).removeprefix('torch.')} {tags} {self.description!r}>")

    def _describe(self):
        return ("pointer", ["peer", "id", "shape", "dtype", "tags", "description"],
                [self.peer, self.id, tuple(self.shape), dtype_name(self.dtype),
                 " ".join("#" + t for t in self.tags), self.description])

    async def get(self, *, epsilon: float | None = None, **dp_options) -> torch.Tensor:
        if epsilon is not None:
            return await super().get(epsilon=epsilon, **dp_options)
        return await self._net._get(self.peer, self.id)

    async def delete(self) -> None:
        await self._net._delete(self.peer, self.id)

    async def describe(self) -> dict:
        """Fresh metadata from the owner, rules included (if you may see them)."""
        return await self._net._describe(self.peer, self.id)

    # Capabilities of plugins, reached from the pointer (see p2pgrid/plugins.py).

    async def share(self, *parties: str, dealer: str, **options):
        """Have the owner secret-share this tensor among `parties` (SMPC, p2pgrid.smpc)."""
        return await self._net._share_pointer(self, parties, dealer=dealer, **options)

    async def request_access(self, *, reason: str, epsilon: float | None = None, **options):
        """Ask the owner for access (p2pgrid.governance); returns a request to ``await .wait()``."""
        return await self._net._request_access(self, reason=reason, epsilon=epsilon, **options)

