"""Differentially private releases of simple queries over one dataset (sans-IO).

A query is an op program (see :mod:`p2pgrid.ops`) over a single dataset whose
columns the owner has bounded. :func:`plan` reads the program without running it
and works out the query's L1 sensitivity by interval arithmetic: every record's
values lie within the declared bounds, each op maps those intervals forward, and
the reduction at the end turns them into how far one record can move the answer.
Neighbouring datasets differ in one record, replaced by any other in-bounds record
("bounded" DP), so the dataset size ``n`` is public and a mean's sensitivity is
``(hi - lo) / n``. The owner evaluates the query on the data *clamped* to the
bounds (:func:`clamp`), which is what makes the declared bounds a guarantee, and
adds Laplace noise of scale ``sensitivity / epsilon`` to every output element.

Supported: selections of columns and of public row ranges (``x[:, 0]``,
``x[100:, 1:3]``), elementwise maps with constants (``+ - * /``, ``clamp``,
comparisons, ``abs``, ``square``, monotone functions...), and then one of
``sum``, ``mean``, ``count_nonzero`` or ``histc`` over the records (all of them,
or ``dim=0``), optionally followed by affine post-processing with constants.

>>> import torch
>>> prog = {"nodes": [{"op": "leaf", "obj": "d"},
...     {"op": "getitem", "args": [{"$": 0}, {"tuple": [{"slice": [None, None, None]}, 0]}]},
...     {"op": "mean", "args": [{"$": 1}], "kwargs": {}}]}
>>> p = plan(prog, {"d": ((100, 2), Bounds.parse([[0, 10], [0, 1]]))})
>>> p.kind, p.rows, p.sensitivity
('mean', 100, 0.1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from p2pgrid.protocols.private_random import PrivateRandom

from ..errors import BadRequest
from ..ops import Level, evaluate

__all__ = ["Bounds", "Plan", "plan", "clamp", "run", "laplace", "MAX_EPSILON", "check_epsilon"]

MAX_EPSILON = 100.0  # one release may cost at most this much
SUPPORTED = ("sum", "mean", "count_nonzero", "histc")
_INT = (int,)


def check_epsilon(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) \
            or not math.isfinite(epsilon) or not 0 < epsilon <= MAX_EPSILON:
        raise BadRequest(f"epsilon must be a number in (0, {MAX_EPSILON:g}], got {epsilon!r}")
    return float(epsilon)


@dataclass(frozen=True)
class Bounds:
    """Per-column [lo, hi] of a dataset: one pair per index of its second dimension
    (the columns), or a single pair for every value."""
    pairs: tuple[tuple[float, float], ...]

    @classmethod
    def parse(cls, pairs) -> "Bounds":
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise BadRequest("bounds must be a non-empty list of [lo, hi] pairs")
        out = []
        for p in pairs:
            ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            if not ok or p[0] > p[1]:
                raise BadRequest(f"each bound must be [lo, hi] with finite lo <= hi, got {p!r}")
            out.append((float(p[0]), float(p[1])))
        return cls(tuple(out))

    def to_list(self) -> list[list[float]]:
        return [list(p) for p in self.pairs]

    def check(self, shape: tuple[int, ...]) -> None:
        if not shape:
            raise BadRequest("a private dataset needs at least one dimension (its records)")
        if len(self.pairs) != 1 and (len(shape) < 2 or shape[1] != len(self.pairs)):
            cols = shape[1] if len(shape) > 1 else 1
            raise BadRequest(f"{len(self.pairs)} bounds given for a dataset of shape {list(shape)}: "
                             f"give one pair, or one per column ({cols})")

    def tensors(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """lo, hi of one record (shape ``shape[1:]``), float64."""
        self.check(shape)
        row = tuple(shape[1:])
        lo = torch.tensor([p[0] for p in self.pairs], dtype=torch.float64)
        hi = torch.tensor([p[1] for p in self.pairs], dtype=torch.float64)
        if len(self.pairs) == 1:
            return lo[0].expand(row).clone(), hi[0].expand(row).clone()
        extra = (1,) * (len(row) - 1)
        return lo.reshape(-1, *extra).expand(row).clone(), hi.reshape(-1, *extra).expand(row).clone()


@dataclass(frozen=True)
class Plan:
    """What a private release of a program will be: the dataset it reads, the kind of
    reduction, its L1 sensitivity, how many records it spans and its output shape."""
    object_id: str
    kind: str
    sensitivity: float
    rows: int
    shape: tuple[int, ...]

    def scale(self, epsilon: float) -> float:
        return self.sensitivity / epsilon

    def describe(self) -> dict:
        return {"object": self.object_id, "kind": self.kind, "sensitivity": self.sensitivity,
                "rows": self.rows, "shape": list(self.shape)}


# ------------------------------------------------------------------ abstract values

@dataclass
class _Rows:
    """A value with one entry per record: every record's entries lie in [lo, hi]."""
    lo: torch.Tensor
    hi: torch.Tensor
    rows: range          # which records of the dataset, in order
    obj: str

    @property
    def ndim(self) -> int:
        return self.lo.dim() + 1

    @property
    def per_record(self) -> int:
        return int(self.lo.numel())

    def width(self) -> float:
        return float((self.hi - self.lo).sum())


@dataclass
class _Released:
    """A reduction over records: one record moves it by at most `sens` in L1."""
    sens: float
    shape: tuple[int, ...]
    kind: str
    rows: int
    obj: str


class _Const:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


def _unsupported(what: str) -> BadRequest:
    return BadRequest(f"{what} is not supported in a private release; supported: column and row-range "
                      f"selections, elementwise maps with constants, then one of "
                      f"{', '.join(SUPPORTED)} over the records, then affine maps with constants")


def _decode(arg, values: list):
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return _Const(arg)
    if isinstance(arg, dict) and len(arg) == 1:
        (key, v), = arg.items()
        if key == "$" and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(values):
            return values[v]
        if key == "slice" and isinstance(v, list) and len(v) == 3:
            parts = [_decode(x, values) for x in v]
            if all(isinstance(p, _Const) and (p.v is None or type(p.v) is int) for p in parts):
                return _Const(slice(*(p.v for p in parts)))
            raise BadRequest("slice bounds must be integer constants")
        if key == "ellipsis":
            return _Const(Ellipsis)
        if key == "tuple" and isinstance(v, list):
            items = [_decode(x, values) for x in v]
            if not all(isinstance(i, _Const) for i in items):
                raise _unsupported("indexing or shaping with values computed from the data")
            return _Const(tuple(i.v for i in items))
        if key == "dtype" and isinstance(v, str) and hasattr(torch, v) and v in _DTYPES:
            return _Const(getattr(torch, v))
        if key == "tensor" and isinstance(v, torch.Tensor):
            return _Const(v)
    raise BadRequest("unrecognised argument in the program")


_DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
           "bool"}


def _const_tensor(c: _Const, like: _Rows | None = None) -> torch.Tensor:
    v = c.v
    if isinstance(v, bool) or isinstance(v, (int, float)):
        return torch.tensor(float(v), dtype=torch.float64)
    if isinstance(v, torch.Tensor):
        t = v.detach().to(torch.float64)
        if like is not None:
            if t.dim() > like.ndim:
                raise _unsupported("a constant with more dimensions than the records")
            if t.dim() == like.ndim:
                if t.shape[0] != 1:
                    raise _unsupported("a constant that varies record by record")
                t = t[0]
        if not torch.isfinite(t).all():
            raise BadRequest("constants in a private query must be finite")
        return t
    raise BadRequest(f"cannot use a {type(v).__name__} as an operand here")


# ------------------------------------------------------------------ interval rules

def _interval(x, like: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, _Rows):
        if x.obj != like.obj or x.rows != like.rows or x.ndim != like.ndim:
            raise _unsupported("combining different selections of records")
        return x.lo, x.hi
    t = _const_tensor(x, like)
    return t, t


def _binary(op: str, a, b):
    if isinstance(a, _Released) or isinstance(b, _Released):
        return _post(op, a, b)
    like = a if isinstance(a, _Rows) else b if isinstance(b, _Rows) else None
    if like is None:
        raise _unsupported("an expression without the dataset")
    (alo, ahi), (blo, bhi) = _interval(a, like), _interval(b, like)
    if op == "add":
        lo, hi = alo + blo, ahi + bhi
    elif op == "sub":
        lo, hi = alo - bhi, ahi - blo
    elif op in ("mul", "div"):
        if op == "div":
            if not bool(((blo > 0) | (bhi < 0)).all()):
                raise _unsupported("division by something that can be zero")
            cands = [alo / blo, alo / bhi, ahi / blo, ahi / bhi]
        else:
            cands = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
        stacked = torch.stack(torch.broadcast_tensors(*cands))
        lo, hi = stacked.amin(0), stacked.amax(0)
    elif op == "maximum":
        lo, hi = torch.maximum(alo, blo), torch.maximum(ahi, bhi)
    elif op == "minimum":
        lo, hi = torch.minimum(alo, blo), torch.minimum(ahi, bhi)
    elif op in _PREDICATES:
        lo, hi = torch.broadcast_tensors(torch.zeros_like(alo + blo), torch.ones_like(alo + blo))
    else:
        raise _unsupported(f"the op {op!r}")
    return _Rows(lo.clone(), hi.clone(), like.rows, like.obj)


_PREDICATES = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"}
_MONOTONE = {"exp": torch.exp, "log": torch.log, "log1p": torch.log1p, "sqrt": torch.sqrt,
             "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "sign": torch.sign,
             "floor": torch.floor, "ceil": torch.ceil, "round": torch.round}
_DOMAIN = {"log": (0.0, False), "sqrt": (0.0, True), "log1p": (-1.0, False)}


def _unary(op: str, x):
    if isinstance(x, _Released):
        if op == "neg":
            return x
        raise _unsupported(f"{op} after the reduction (post-process the released value yourself)")
    if not isinstance(x, _Rows):
        raise _unsupported("an expression without the dataset")
    lo, hi = x.lo, x.hi
    if op == "neg":
        lo, hi = -hi, -lo
    elif op in ("abs", "square"):
        mag_lo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
        mag_hi = torch.maximum(lo.abs(), hi.abs())
        lo, hi = (mag_lo, mag_hi) if op == "abs" else (mag_lo ** 2, mag_hi ** 2)
    elif op in _MONOTONE:
        if op in _DOMAIN:
            floor, inclusive = _DOMAIN[op]
            ok = (lo >= floor) if inclusive else (lo > floor)
            if not bool(ok.all()):
                raise BadRequest(f"{op} of values that the bounds allow below its domain "
                                 f"({floor:g}); clamp first")
        lo, hi = _MONOTONE[op](lo), _MONOTONE[op](hi)
    elif op in ("logical_not", "isnan", "isfinite"):
        lo, hi = torch.zeros_like(lo), torch.ones_like(hi)
    else:
        raise _unsupported(f"the op {op!r}")
    return _Rows(lo.clone(), hi.clone(), x.rows, x.obj)


def _post(op: str, a, b):
    """Affine post-processing of a released value with constants (or of two releases)."""
    if isinstance(a, _Released) and isinstance(b, _Released):
        if op not in ("add", "sub") or a.shape != b.shape or a.obj != b.obj:
            raise _unsupported(f"{op} of two reductions")
        return _Released(a.sens + b.sens, a.shape, a.kind, min(a.rows, b.rows), a.obj)
    rel, other = (a, b) if isinstance(a, _Released) else (b, a)
    if isinstance(other, _Rows):
        raise _unsupported("combining a reduction with per-record values")
    c = _const_tensor(other)
    try:
        shape = tuple(torch.broadcast_shapes(tuple(c.shape), rel.shape))
    except RuntimeError:
        raise BadRequest("a constant that does not fit the reduction's shape") from None
    if shape != rel.shape:
        raise _unsupported("a constant that enlarges the reduction's shape")
    if op in ("add", "sub"):
        return rel
    if op == "mul":
        return _Released(rel.sens * float(c.abs().max()) if c.numel() else 0.0, rel.shape, rel.kind,
                         rel.rows, rel.obj)
    if op == "div" and rel is a:
        if bool((c == 0).any()):
            raise BadRequest("division of a reduction by zero")
        return _Released(rel.sens / float(c.abs().min()), rel.shape, rel.kind, rel.rows, rel.obj)
    raise _unsupported(f"{op} of a reduction")


def _clamp(x, lo_c, hi_c):
    if not isinstance(x, _Rows):
        raise _unsupported("clamp after the reduction")
    lo, hi = x.lo, x.hi
    if lo_c is not None:
        c = _const_tensor(lo_c, x)
        lo, hi = torch.maximum(lo, c), torch.maximum(hi, c)
    if hi_c is not None:
        c = _const_tensor(hi_c, x)
        lo, hi = torch.minimum(lo, c), torch.minimum(hi, c)
    return _Rows(lo.clone(), hi.clone(), x.rows, x.obj)


def _astype(x, dtype):
    if not isinstance(x, _Rows) or not isinstance(dtype, _Const) or not isinstance(dtype.v, torch.dtype):
        raise _unsupported("this conversion")
    if dtype.v == torch.bool:
        return _Rows(torch.zeros_like(x.lo), torch.ones_like(x.hi), x.rows, x.obj)
    if dtype.v.is_floating_point:
        return x
    return _Rows(torch.trunc(x.lo), torch.trunc(x.hi), x.rows, x.obj)


def _getitem(x, index):
    if not isinstance(x, _Rows) or not isinstance(index, _Const):
        raise _unsupported("indexing anything but the records with constants")
    idx = index.v if isinstance(index.v, tuple) else (index.v,)
    if not idx:
        return x
    first, rest = idx[0], idx[1:]
    adv = [i for i in rest if isinstance(i, (torch.Tensor, list, tuple))]
    if len(adv) > 1:
        raise _unsupported("more than one index array")
    for i in rest:
        if not (i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int
                or isinstance(i, torch.Tensor) and i.dtype in (torch.int64, torch.int32, torch.bool)):
            raise _unsupported("this index")
    if first is Ellipsis:
        if x.lo.dim() < len(rest):
            raise _unsupported("an index that reaches into the record axis")
        rows, sub = x.rows, idx
    elif isinstance(first, slice):
        rows, sub = x.rows[first], rest
    else:
        raise _unsupported("picking single records (an integer or index array on the record axis)")
    try:
        lo, hi = x.lo[sub], x.hi[sub]
        probe = torch.empty((len(x.rows), *x.lo.shape), device="meta")[idx]
    except (IndexError, RuntimeError, TypeError, ValueError) as e:
        raise BadRequest(f"getitem: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tuple(probe.shape) != (len(rows), *lo.shape):
        raise _unsupported("an index that moves the record axis")
    return _Rows(lo.clone(), hi.clone(), rows, x.obj)


def _dims(kwargs, ndim) -> tuple[int, ...] | None:
    dim = kwargs.get("dim")
    if dim is None:
        return None
    v = dim.v
    dims = v if isinstance(v, tuple) else (v,)
    if not all(type(d) is int for d in dims):
        raise BadRequest("dim must be an integer or a tuple of integers")
    return tuple(sorted({d % ndim for d in dims}))


def _reduce(op: str, x, kwargs: dict):
    if not isinstance(x, _Rows):
        raise _unsupported(f"{op} of something that is not per-record values")
    n, k = len(x.rows), x.per_record
    if n == 0:
        raise BadRequest("the query selects no records")
    dims = _dims(kwargs, x.ndim)
    keep = bool(kwargs["keepdim"].v) if "keepdim" in kwargs else False
    if op == "histc":
        lo_e, hi_e = (kwargs.get("min", _Const(0.0)).v, kwargs.get("max", _Const(0.0)).v)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo_e, hi_e)) \
                or not lo_e < hi_e:
            raise BadRequest("a private histogram needs explicit min < max (data-dependent "
                             "edges would leak the range)")
        bins = kwargs.get("bins", _Const(10)).v
        if type(bins) is not int or not 0 < bins <= 100_000:
            raise BadRequest("bins must be an integer in 1..100000")
        return _Released(2.0 * k, (bins,), "histogram", n, x.obj)
    if dims is not None and 0 not in dims:  # a per-record reduction: still per record
        if op not in ("sum", "mean"):
            raise _unsupported(f"{op} within each record")
        inner = tuple(d - 1 for d in dims)
        fn = torch.sum if op == "sum" else torch.mean
        return _Rows(fn(x.lo, dim=inner, keepdim=keep), fn(x.hi, dim=inner, keepdim=keep),
                     x.rows, x.obj)
    shape_full = (n, *x.lo.shape)
    reduced = range(len(shape_full)) if dims is None else dims
    if dims is None:
        out_shape: tuple[int, ...] = ()
    else:
        out_shape = tuple(1 if d in dims else s for d, s in enumerate(shape_full)
                          if keep or d not in dims)
    width = x.width()
    if op == "sum":
        return _Released(width, out_shape, "sum", n, x.obj)
    if op == "mean":
        count = math.prod(shape_full[d] for d in reduced)
        return _Released(width / count, out_shape, "mean", n, x.obj)
    if op == "count_nonzero":
        if keep:
            raise BadRequest("count_nonzero takes no keepdim")
        return _Released(float(k), out_shape, "count", n, x.obj)
    raise _unsupported(f"the reduction {op!r}")


_BINARY = {"add", "sub", "mul", "div", "maximum", "minimum", *_PREDICATES}
_UNARY = {"neg", "abs", "square", "logical_not", "isnan", "isfinite", *_MONOTONE}


def plan(program: dict, datasets: Mapping[str, tuple[tuple[int, ...], Bounds]]) -> Plan:
    """Check that `program` is a supported query over one of `datasets` (id -> (shape,
    bounds)) and return its plan; BadRequest says why not."""
    nodes = program.get("nodes") if isinstance(program, dict) else None
    if not isinstance(nodes, list) or not nodes or len(nodes) > 512:
        raise BadRequest("program must be a map with a list of 1 to 512 nodes")
    values: list[Any] = []
    obj = None
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("op"), str):
            raise BadRequest(f"node {i} is not a map with an 'op'")
        op = node["op"]
        if op == "leaf":
            oid = node.get("obj")
            if not isinstance(oid, str) or oid not in datasets:
                raise BadRequest(f"object {oid!r} has no declared bounds for private queries")
            if obj is not None and oid != obj:
                raise _unsupported("a query over more than one dataset")
            obj = oid
            shape, bounds = datasets[oid]
            lo, hi = bounds.tensors(tuple(shape))
            values.append(_Rows(lo, hi, range(shape[0]), oid))
            continue
        raw_args, raw_kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
            raise BadRequest(f"node {i} ({op}): args must be a list and kwargs a map")
        args = [_decode(a, values) for a in raw_args]
        kwargs = {k: _decode(v, values) for k, v in raw_kwargs.items()}
        if any(not isinstance(v, _Const) for v in kwargs.values()):
            raise _unsupported("keyword arguments computed from the data")
        values.append(_step(op, args, kwargs))
    out = values[-1]
    if not isinstance(out, _Released):
        raise _unsupported("a query that does not end in a reduction over the records")
    return Plan(out.obj, out.kind, float(out.sens), out.rows, out.shape)


def _step(op: str, args: list, kwargs: dict):
    allowed = {"getitem": set(), "clamp": {"min", "max"}, "astype": set(),
               "sum": {"dim", "keepdim"}, "mean": {"dim", "keepdim"}, "count_nonzero": {"dim"},
               "histc": {"bins", "min", "max"}}
    if op not in allowed and op not in _BINARY and op not in _UNARY:
        raise _unsupported(f"the op {op!r}")
    extra = set(kwargs) - allowed.get(op, set())
    if extra:
        raise BadRequest(f"op {op!r} takes no keyword {sorted(extra)[0]!r} here")
    if op in _BINARY and len(args) == 2:
        return _binary(op, *args)
    if op in _UNARY and len(args) == 1:
        return _unary(op, args[0])
    if op == "getitem" and len(args) == 2:
        return _getitem(*args)
    if op == "clamp" and len(args) == 1:
        return _clamp(args[0], kwargs.get("min"), kwargs.get("max"))
    if op == "astype" and len(args) == 2:
        return _astype(*args)
    if op in SUPPORTED and len(args) == 1:
        return _reduce(op, args[0], kwargs)
    raise _unsupported(f"the op {op!r} with these arguments")


# ------------------------------------------------------------------ running and noise

def clamp(tensor: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """The dataset as the query sees it: float64, NaNs at the lower bound, every value
    clamped to its column's bounds."""
    lo, hi = bounds.tensors(tuple(tensor.shape))
    t = tensor.detach().to(torch.float64)
    t = torch.where(torch.isnan(t), lo.expand_as(t), t)
    return torch.maximum(torch.minimum(t, hi), lo)


#: the share of a column's values that its bounds may clip before the owner is warned
CLIP_WARNING = 0.01


def clipped_columns(tensor: torch.Tensor, bounds: Bounds,
                    threshold: float = CLIP_WARNING) -> list[tuple[int, float, list[float]]]:
    """(column, share of its values outside the bounds or NaN, [lo, hi]) for each column
    (index along dim 1; the whole dataset if it has one dimension) whose share passes
    `threshold`. For the owner's eyes only: it is computed from the raw data."""
    lo, hi = bounds.tensors(tuple(tensor.shape))
    t = tensor.detach().to(torch.float64)
    outside = (t < lo) | (t > hi) | torch.isnan(t)
    if t.dim() < 2 or t.shape[0] == 0:
        shares = [outside.double().mean()] if outside.numel() else []
    else:
        per = outside.transpose(0, 1).reshape(t.shape[1], -1).double()
        shares = list(per.mean(dim=1)) if per.shape[1] else []
    out = []
    for j, share in enumerate(shares):
        if float(share) > threshold:
            pair = bounds.pairs[j] if len(bounds.pairs) > 1 else bounds.pairs[0]
            out.append((j, float(share), [float(pair[0]), float(pair[1])]))
    return out


def run(program: dict, p: Plan, clamped: torch.Tensor) -> torch.Tensor:
    """The exact answer of the planned program on the clamped data (never released as is)."""
    value, _ = evaluate(program, lambda oid: (clamped, Level("row", 0, p.rows)), min_rows=0)
    value = torch.as_tensor(value).to(torch.float64)
    if tuple(value.shape) != p.shape:
        raise BadRequest(f"query result has shape {list(value.shape)}, planned {list(p.shape)}")
    return value


def laplace(value: torch.Tensor, sensitivity: float, epsilon: float) -> torch.Tensor:
    """`value` plus Laplace(0, sensitivity / epsilon) noise on every element.

    Drawn from a fresh OS-keyed AES-CTR stream (:class:`p2pgrid.protocols.private_random.PrivateRandom`): no seed anyone sets reproduces it (see
    docs/SECURITY.md). Floating-point
    Laplace sampling has known side channels (Mironov 2012); adequate for research
    and statistics releases, not for a high-stakes adversary with many queries."""
    epsilon = check_epsilon(epsilon)
    scale = float(sensitivity) / epsilon
    if scale == 0:
        return value.to(torch.float64).clone()
    return value.to(torch.float64) + PrivateRandom().laplace(tuple(value.shape), scale)
