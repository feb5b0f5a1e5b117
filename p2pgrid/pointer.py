"""Pointers to remote tensors and the lazy expressions built on them.

Operations on a :class:`Pointer` do not touch the network: they build a graph
of whitelisted ops, checked for shape and dtype right away on ``meta`` tensors.
Awaiting the expression runs it on the owner in one round trip and returns a
new Pointer to the result, which stays there; ``.get()`` downloads instead,
if the owner's rules allow it.

    avg = await (rec[:, 0].sum() / rec.shape[0]).get()   # one request
    ptr = await (rec[:, 0] * 2)                           # result stays remote
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import BadRequest, ShapeError
from .ops import OPS, encode_arg

if TYPE_CHECKING:
    from .network import Network


class _Node:
    __slots__ = ("op", "args", "kwargs", "obj")

    def __init__(self, op: str, args: tuple = (), kwargs: dict | None = None, obj: str | None = None):
        self.op, self.args, self.kwargs, self.obj = op, args, kwargs or {}, obj


def _meta_of(value):
    if isinstance(value, Expr):
        return value._meta
    if isinstance(value, tuple):
        return tuple(_meta_of(v) for v in value)
    if isinstance(value, list):
        return [_meta_of(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, slice):
        return slice(_meta_of(value.start), _meta_of(value.stop), _meta_of(value.step))
    return value


class Expr:
    """A lazy value on one remote peer."""

    __hash__ = object.__hash__

    def __init__(self, net: "Network", peer: str, node: _Node, meta: torch.Tensor):
        self._net, self._peer, self._node, self._meta = net, peer, node, meta

    # ------------------------------------------------------------ introspection
    @property
    def peer(self) -> str:
        return self._peer

    @property
    def shape(self) -> torch.Size:
        return self._meta.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._meta.dtype

    @property
    def ndim(self) -> int:
        return self._meta.dim()

    def size(self, dim: int | None = None):
        return self._meta.size() if dim is None else self._meta.size(dim)

    def dim(self) -> int:
        return self._meta.dim()

    def __len__(self) -> int:
        return self._meta.shape[0]

    def __repr__(self) -> str:
        return f"<Expr {self._node.op} on {self._peer}: {tuple(self.shape)} {self.dtype}>"

    def __bool__(self):
        raise TypeError("a remote value has no truth value here; .get() it first")

    # ------------------------------------------------------------ building
    def _apply(self, op: str, *args, **kwargs) -> "Expr":
        return self._op(op, (self, *args), kwargs)

    def _op(self, op: str, args: tuple, kwargs: dict) -> "Expr":
        for a in args:
            if isinstance(a, Expr) and a._peer != self._peer:
                raise BadRequest(f"operands live on different peers ({self._peer}, {a._peer}); "
                                 "move one with .send() or use secret sharing")
            if isinstance(a, Expr) and a._net is not self._net:
                raise BadRequest("operands come from different connections")
        try:
            meta = OPS[op].fn(*[_meta_of(a) for a in args],
                              **{k: _meta_of(v) for k, v in kwargs.items()})
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ShapeError(f"{op}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return Expr(self._net, self._peer, _Node(op, args, kwargs), meta)

    def _rapply(self, op: str, other) -> "Expr":
        if isinstance(other, (int, float, bool)):
            other = torch.as_tensor(other)  # torch's binary ops want the tensor on the left
        if isinstance(other, torch.Tensor):
            return self._op(op, (other, self), {})
        return NotImplemented

    __add__ = lambda s, o: s._apply("add", o)
    __radd__ = lambda s, o: s._apply("add", o)
    __sub__ = lambda s, o: s._apply("sub", o)
    __rsub__ = lambda s, o: s._rapply("sub", o)
    __mul__ = lambda s, o: s._apply("mul", o)
    __rmul__ = lambda s, o: s._apply("mul", o)
    __truediv__ = lambda s, o: s._apply("div", o)
    __rtruediv__ = lambda s, o: s._rapply("div", o)
    __floordiv__ = lambda s, o: s._apply("floordiv", o)
    __mod__ = lambda s, o: s._apply("remainder", o)
    __pow__ = lambda s, o: s._apply("pow", o)
    __matmul__ = lambda s, o: s._apply("matmul", o)
    __rmatmul__ = lambda s, o: s._rapply("matmul", o)
    __neg__ = lambda s: s._apply("neg")
    __abs__ = lambda s: s._apply("abs")
    __invert__ = lambda s: s._apply("logical_not")
    __and__ = lambda s, o: s._apply("logical_and", o)
    __or__ = lambda s, o: s._apply("logical_or", o)
    __lt__ = lambda s, o: s._apply("lt", o)
    __le__ = lambda s, o: s._apply("le", o)
    __gt__ = lambda s, o: s._apply("gt", o)
    __ge__ = lambda s, o: s._apply("ge", o)
    __eq__ = lambda s, o: s._apply("eq", o)
    __ne__ = lambda s, o: s._apply("ne", o)

    def __getitem__(self, index) -> "Expr":
        return self._apply("getitem", index)

    def sum(self, dim=None, keepdim=False):
        return self._apply("sum", **_dimkw(dim, keepdim))

    def mean(self, dim=None, keepdim=False):
        return self._apply("mean", **_dimkw(dim, keepdim))

    def var(self, dim=None, keepdim=False, correction=1):
        return self._apply("var", **_dimkw(dim, keepdim), correction=correction)

    def std(self, dim=None, keepdim=False, correction=1):
        return self._apply("std", **_dimkw(dim, keepdim), correction=correction)

    def max(self, dim=None, keepdim=False):
        return self._apply("amax", **_dimkw(dim, keepdim)) if dim is not None else self._apply("amax")

    def min(self, dim=None, keepdim=False):
        return self._apply("amin", **_dimkw(dim, keepdim)) if dim is not None else self._apply("amin")

    def prod(self, dim=None, keepdim=False):
        return self._apply("prod", **_dimkw(dim, keepdim))

    def argmax(self, dim=None, keepdim=False):
        return self._apply("argmax", **_dimkw(dim, keepdim))

    def argmin(self, dim=None, keepdim=False):
        return self._apply("argmin", **_dimkw(dim, keepdim))

    def count_nonzero(self, dim=None):
        return self._apply("count_nonzero", **({"dim": dim} if dim is not None else {}))

    def histc(self, bins=10, min=0.0, max=0.0):
        return self._apply("histc", bins=bins, min=min, max=max)

    def reshape(self, *shape):
        return self._apply("reshape", tuple(shape[0]) if len(shape) == 1 and isinstance(
            shape[0], (tuple, list, torch.Size)) else tuple(shape))

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        return self._apply("flatten", start_dim=start_dim, end_dim=end_dim)

    def transpose(self, d0, d1):
        return self._apply("transpose", d0, d1)

    def t(self):
        return self._apply("t")

    @property
    def T(self):
        return self.t() if self.ndim == 2 else self._apply("permute", *reversed(range(self.ndim)))

    def permute(self, *dims):
        return self._apply("permute", *dims)

    def unsqueeze(self, dim):
        return self._apply("unsqueeze", dim)

    def squeeze(self, *dims):
        return self._apply("squeeze", *dims)

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

    def __getattr__(self, name):
        if name in _UNARY:
            return lambda: self._apply(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ------------------------------------------------------------ running
    def program(self) -> dict:
        """The wire form: nodes in dependency order, the last one is the value."""
        order: list[_Node] = []
        index: dict[int, int] = {}

        def visit(x):
            if isinstance(x, Expr):
                visit_node(x._node)
            elif isinstance(x, (tuple, list)):
                for v in x:
                    visit(v)
            elif isinstance(x, slice):
                visit(x.start), visit(x.stop), visit(x.step)

        def visit_node(n: _Node):
            if id(n) in index:
                return
            for a in n.args:
                visit(a)
            for v in n.kwargs.values():
                visit(v)
            index[id(n)] = len(order)
            order.append(n)

        visit_node(self._node)

        def ref(v):
            return index.get(id(v._node)) if isinstance(v, Expr) else None

        nodes = []
        for n in order:
            if n.op == "leaf":
                nodes.append({"op": "leaf", "obj": n.obj})
            else:
                nodes.append({"op": n.op, "args": [encode_arg(a, ref) for a in n.args],
                              "kwargs": {k: encode_arg(v, ref) for k, v in n.kwargs.items()}})
        return {"nodes": nodes}

    async def get(self, *, epsilon: float | None = None, **dp_options) -> torch.Tensor:
        """Compute on the owner and download the result (PermissionDenied if not allowed).

        With `epsilon`, ask for a differentially private release charged to your
        privacy budget on that dataset (p2pgrid.governance)."""
        if epsilon is not None:
            from .governance import private_get
            return await private_get(self, epsilon=epsilon, **dp_options)
        return await self._net._execute(self._peer, self.program(), fetch=True)

    async def request_release(self, *, reason: str):
        """Ask the owner to approve downloading this exact program's result (when the
        release gate refuses it); returns a request to ``await .wait()``."""
        from .governance import request_release
        return await request_release(self, reason=reason)

    async def store(self, *, tags=(), description: str = "") -> "Pointer":
        """Compute on the owner and keep the result there; returns its pointer."""
        return await self._net._execute(self._peer, self.program(), fetch=False, tags=tags,
                                        description=description)

    def __await__(self):
        return self.store().__await__()


class Pointer(Expr):
    """A tensor stored on a peer, with the metadata its owner published."""

    def __init__(self, net: "Network", peer: str, meta: dict):
        shape, dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
        super().__init__(net, peer, _Node("leaf", obj=meta["id"]),
                         torch.empty(shape, dtype=dtype, device="meta"))
        self.meta = meta

    id = property(lambda self: self.meta["id"])
    tags = property(lambda self: list(self.meta.get("tags", [])))
    description = property(lambda self: self.meta.get("description", ""))
    owner = property(lambda self: self.meta.get("owner", self._peer))

    def __repr__(self) -> str:
        tags = " ".join("#" + t for t in self.tags)
        return (f"<Pointer {self._peer}/{self.id}: {tuple(self.shape)} "
                f"{str(self.dtype).removeprefix('torch.')} {tags} {self.description!r}>")

    async def get(self, *, epsilon: float | None = None, **dp_options) -> torch.Tensor:
        if epsilon is not None:
            return await super().get(epsilon=epsilon, **dp_options)
        return await self._net._get(self._peer, self.id)

    async def delete(self) -> None:
        await self._net._delete(self._peer, self.id)

    async def describe(self) -> dict:
        """Fresh metadata from the owner, rules included (if you may see them)."""
        return await self._net._describe(self._peer, self.id)

    # Capabilities of plugins, reached from the pointer (see p2pgrid/plugins.py).

    async def share(self, *parties: str, dealer: str, **options):
        """Have the owner secret-share this tensor among `parties` (SMPC, p2pgrid.smpc)."""
        from .smpc import share_pointer
        return await share_pointer(self, parties, dealer=dealer, **options)

    async def request_access(self, *, reason: str, epsilon: float | None = None, **options):
        """Ask the owner for access (p2pgrid.governance); returns a request to ``await .wait()``."""
        from .governance import request_access
        return await request_access(self, reason=reason, epsilon=epsilon, **options)


_UNARY = {"exp", "log", "log1p", "sqrt", "square", "sigmoid", "tanh", "relu", "sign", "floor",
          "ceil", "round", "abs", "neg", "isnan", "isfinite", "logical_not", "numel"}


def _dimkw(dim, keepdim) -> dict[str, Any]:
    if dim is None:
        return {}
    return {"dim": tuple(dim) if isinstance(dim, list) else dim, "keepdim": keepdim}

