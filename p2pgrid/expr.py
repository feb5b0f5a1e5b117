"""One lazy expression graph, evaluated in two places.

A :class:`LazyTensor` is a node of a graph of whitelisted ops over tensors that
live elsewhere. Building it touches no network: every op is checked right away
by running the evaluator's own plaintext semantics on ``meta`` tensors (shapes
and dtypes, no data), so a shape mistake fails where it is written and reads
the same (``ShapeError("op: ...")``) whoever evaluates it. :meth:`LazyTensor._wire`
turns the graph into the program format both evaluators read: nodes in dependency
order, ``{"$": i}`` for a reference, constants as :func:`p2pgrid.ops.encode_arg`
writes them.

The two subclasses differ only in where the program runs:

* :class:`p2pgrid.pointer.Expr`: one peer runs it on plaintext it holds
  (:data:`p2pgrid.ops.OPS`; leaves are ``{"op": "leaf", "obj": id}``);
* :class:`p2pgrid.smpc.tensor.SharedTensor`: the SMPC parties run it on their
  shares (:data:`protocols.smpc.program.OPS`; leaves are ``{"op": "leaf", "id": id}``).

A subclass names its op table (``_OPS``: op name -> meta function) and how it
treats operands; an op both tables have needs a method here only. An operator
whose op the evaluator lacks returns ``NotImplemented`` (Python's own TypeError,
and ``==`` keeps identity), a method raises :class:`p2pgrid.errors.UnknownOp`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .display import table
from .errors import BadRequest, ShapeError, UnknownOp
from .ops import encode_arg

__all__ = ["Node", "LazyTensor", "dim_kwargs"]


class Node:
    """One op of a graph: `op` over `args`/`kwargs` (constants or LazyTensors), or a
    leaf naming a stored tensor (`leaf`: its id where the evaluator holds it)."""

    __slots__ = ("op", "args", "kwargs", "leaf")

    def __init__(self, op: str, args: tuple = (), kwargs: dict | None = None, leaf: str | None = None):
        self.op, self.args, self.kwargs, self.leaf = op, args, kwargs or {}, leaf


def _walk(value) -> Iterator[Any]:
    """Every operand inside an argument (through tuples, lists and slices)."""
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _walk(v)
    elif isinstance(value, slice):
        yield from _walk((value.start, value.stop, value.step))
    else:
        yield value


def dim_kwargs(dim, keepdim) -> dict[str, Any]:
    """A reduction's keywords: none for "all dims", else dim (a tuple for several) and keepdim."""
    if dim is None:
        return {}
    return {"dim": tuple(dim) if isinstance(dim, list) else dim, "keepdim": keepdim}


class LazyTensor:
    """A lazy tensor expression: a graph node plus its result's meta tensor.

    Subclasses set ``_OPS`` (op name -> function on meta tensors), ``_UNARY`` (ops
    reachable as ``x.name()``), ``_LEAF_KEY`` (how a leaf names its tensor on the
    wire), ``_KIND``/``_HINT`` (for mixing errors) and implement :meth:`_elsewhere`,
    :meth:`_place` and :meth:`store`; their constructor takes ``(net, where, node, meta)``."""

    __hash__ = object.__hash__   # == builds an expression; identity still hashes

    _OPS: Mapping[str, Callable[..., Any]] = {}
    _UNARY: frozenset[str] = frozenset()
    _LEAF_KEY = "id"
    _KIND = "lazy value"
    _HINT = ""
    # Reflected ops (``2 + x``) whose program puts the expression first, as this
    # evaluator's programs always have; others keep the operands as written.
    _SELF_FIRST: frozenset[str] = frozenset()

    def __init__(self, net, where, node: Node, meta: torch.Tensor):
        # `net`: the user's Network; `where`: what evaluates it (a peer's name, an SMPC group)
        self._net, self._where, self._node, self._meta = net, where, node, meta

    def _derive(self, node: Node, meta: torch.Tensor) -> "LazyTensor":
        """A new expression evaluated where this one is."""
        return self._family()(self._net, self._where, node, meta)

    def _same_place(self, other: "LazyTensor", op: str) -> None:
        if other._where != self._where:
            raise BadRequest(self._elsewhere(other, op))
        if other._net is not self._net and other._net._peer is not self._net._peer:
            raise BadRequest(f"{op}: operands come from different connections")

    # ------------------------------------------------------------ what a subclass provides
    def _elsewhere(self, other: "LazyTensor", op: str) -> str:
        """Why `other`, evaluated elsewhere, cannot be an operand of `op` here."""
        raise NotImplementedError

    def _place(self) -> str:
        """Where the value lives, for messages ("on hospital")."""
        raise NotImplementedError

    def _check_constant(self, value, op: str) -> None:
        """Raise BadRequest if the evaluator takes no such constant (default: any)."""

    def _constant(self, op: str, value, reflected: bool):
        """A binary operator's other operand, as the program carries it (or NotImplemented)."""
        return value

    def _const_meta(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("meta")

    async def store(self, **options) -> "LazyTensor":
        """Run the expression; the result stays where it was computed."""
        raise NotImplementedError

    def __await__(self):
        return self.store().__await__()

    # ------------------------------------------------------------ introspection
    @property
    def shape(self) -> torch.Size:
        return self._meta.shape

    @property
    def ndim(self) -> int:
        return self._meta.dim()

    def dim(self) -> int:
        return self._meta.dim()

    def size(self, dim: int | None = None):
        return self._meta.size() if dim is None else self._meta.size(dim)

    def __len__(self) -> int:
        return self._meta.shape[0]

    def _describe(self) -> tuple[str, list[str], list[Any]]:
        """(caption, headers, row) of the notebook table."""
        return self._KIND, ["where", "op", "shape"], [self._place(), self._node.op, tuple(self.shape)]

    def _repr_html_(self) -> str:
        caption, headers, row = self._describe()
        return table(headers, [row], caption=caption)

    # ------------------------------------------------------------ building
    def _check_operand(self, value, op: str) -> None:
        for v in _walk(value):
            if isinstance(v, LazyTensor):
                if not isinstance(v, self._family()):
                    raise BadRequest(f"{op}: {v!r} is a {v._KIND} {v._place()}, not a {self._KIND}"
                                     + (f"; {self._HINT}" if self._HINT else ""))
                self._same_place(v, op)
            else:
                self._check_constant(v, op)

    @classmethod
    def _family(cls) -> type:
        """The class whose instances may be mixed with this one (the evaluator's root class)."""
        for base in cls.__mro__:
            if LazyTensor in base.__bases__:
                return base
        return cls

    def _meta_of(self, value):
        if isinstance(value, LazyTensor):
            return value._meta
        if isinstance(value, (tuple, list)):
            return type(value)(self._meta_of(v) for v in value)
        if isinstance(value, torch.Tensor):
            return self._const_meta(value)
        if isinstance(value, slice):
            return slice(self._meta_of(value.start), self._meta_of(value.stop), self._meta_of(value.step))
        return value

    def _op(self, op: str, args: tuple, kwargs: dict | None = None) -> "LazyTensor":
        """The node `op(*args, **kwargs)`, its result's shape inferred on meta tensors."""
        kwargs = kwargs or {}
        fn = self._OPS.get(op)
        if fn is None:
            raise UnknownOp(f"{op} is not an operation on a {self._KIND}", op=op)
        self._check_operand((args, list(kwargs.values())), op)
        try:
            meta = fn(*[self._meta_of(a) for a in args], **{k: self._meta_of(v) for k, v in kwargs.items()})
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ShapeError(f"{op}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return self._derive(Node(op, args, kwargs), meta)

    def _apply(self, op: str, *args, **kwargs) -> "LazyTensor":
        return self._op(op, (self, *args), kwargs)

    def _binary(self, op: str, other, reflected: bool = False):
        if op not in self._OPS:
            return NotImplemented
        other = self._constant(op, other, reflected)
        if other is NotImplemented:
            return NotImplemented
        first = not reflected or op in self._SELF_FIRST
        return self._op(op, (self, other) if first else (other, self), {})

    __add__ = lambda s, o: s._binary("add", o)
    __radd__ = lambda s, o: s._binary("add", o, True)
    __sub__ = lambda s, o: s._binary("sub", o)
    __rsub__ = lambda s, o: s._binary("sub", o, True)
    __mul__ = lambda s, o: s._binary("mul", o)
    __rmul__ = lambda s, o: s._binary("mul", o, True)
    __truediv__ = lambda s, o: s._binary("div", o)
    __rtruediv__ = lambda s, o: s._binary("div", o, True)
    __floordiv__ = lambda s, o: s._binary("floordiv", o)
    __mod__ = lambda s, o: s._binary("remainder", o)
    __pow__ = lambda s, o: s._binary("pow", o)
    __matmul__ = lambda s, o: s._binary("matmul", o)
    __rmatmul__ = lambda s, o: s._binary("matmul", o, True)
    __and__ = lambda s, o: s._binary("logical_and", o)
    __or__ = lambda s, o: s._binary("logical_or", o)
    __lt__ = lambda s, o: s._binary("lt", o)
    __le__ = lambda s, o: s._binary("le", o)
    __gt__ = lambda s, o: s._binary("gt", o)
    __ge__ = lambda s, o: s._binary("ge", o)
    __eq__ = lambda s, o: s._binary("eq", o)
    __ne__ = lambda s, o: s._binary("ne", o)

    def __neg__(self):
        return self._apply("neg")

    def __abs__(self):
        return self._apply("abs")

    def __invert__(self):
        return self._apply("logical_not")

    def __getattr__(self, name):
        if name in type(self)._UNARY:
            return lambda: self._apply(name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    def __getitem__(self, index) -> "LazyTensor":
        return self._apply("getitem", index)

    def sum(self, dim=None, keepdim: bool = False) -> "LazyTensor":
        return self._apply("sum", **dim_kwargs(dim, keepdim))

    def mean(self, dim=None, keepdim: bool = False) -> "LazyTensor":
        return self._apply("mean", **dim_kwargs(dim, keepdim))

    def reshape(self, *shape) -> "LazyTensor":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return self._apply("reshape", tuple(int(d) for d in shape))

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "LazyTensor":
        return self._apply("flatten", start_dim=start_dim, end_dim=end_dim)

    def transpose(self, d0: int, d1: int) -> "LazyTensor":
        return self._apply("transpose", d0, d1)

    def t(self) -> "LazyTensor":
        return self._apply("t") if "t" in self._OPS else self.transpose(0, 1)

    @property
    def T(self) -> "LazyTensor":
        return self.t() if self.ndim == 2 else self.permute(*reversed(range(self.ndim)))

    def permute(self, *dims) -> "LazyTensor":
        return self._apply("permute", *dims)

    def unsqueeze(self, dim: int) -> "LazyTensor":
        return self._apply("unsqueeze", dim)

    def squeeze(self, *dims) -> "LazyTensor":
        return self._apply("squeeze", *dims)

    # ------------------------------------------------------------ the wire form
    def _wire(self, outputs: Sequence["LazyTensor"]) -> tuple[list[dict], list[int]]:
        """The nodes `outputs` need, in dependency order, and the outputs' indices."""
        order: list[Node] = []
        index: dict[int, int] = {}

        def visit(x):
            if isinstance(x, LazyTensor):
                visit_node(x._node)
            elif isinstance(x, (tuple, list)):
                for v in x:
                    visit(v)
            elif isinstance(x, slice):
                visit((x.start, x.stop, x.step))

        def visit_node(n: Node):
            if id(n) in index:
                return
            for a in n.args:
                visit(a)
            for v in n.kwargs.values():
                visit(v)
            index[id(n)] = len(order)
            order.append(n)

        for o in outputs:
            visit_node(o._node)

        def ref(v):
            return index.get(id(v._node)) if isinstance(v, LazyTensor) else None

        nodes = []
        for n in order:
            if n.leaf is not None:
                nodes.append({"op": "leaf", self._LEAF_KEY: n.leaf})
            else:
                nodes.append({"op": n.op, "args": [encode_arg(a, ref) for a in n.args],
                              "kwargs": {k: encode_arg(v, ref) for k, v in n.kwargs.items()}})
        return nodes, [index[id(o._node)] for o in outputs]

    _NO_TRUTH = "a lazy value has no truth value here"

    def __bool__(self):
        raise TypeError(self._NO_TRUTH)
