"""The whitelist of remote ops, the op-graph format, and its evaluator.

A remote computation is a *program*: a list of nodes, each a whitelisted op name
with arguments that are constants, slices, or references to earlier nodes, and
leaves that name stored objects. The owner evaluates it with a fixed dispatch
table; nothing from the wire is ever looked up with ``getattr`` or executed.

The same evaluator runs on ``meta`` tensors: the client uses that for shapes and
early errors, and the owner for a dry run that bounds sizes before real work.

Each value also carries a :class:`Level` saying how much of the underlying
records it can reveal: ``public`` (constants only), ``aggregate`` (a reduction
that treats every record alike over at least ``min_rows`` records) or ``row``.
It is an explanation only and authorizes nothing: what may leave the owner's
peer is decided by :mod:`p2pgrid.release` from the program's structure.

>>> import torch
>>> prog = {"nodes": [{"op": "leaf", "obj": "a"}, {"op": "sum", "args": [{"$": 0}], "kwargs": {}}]}
>>> value, level = evaluate(prog, lambda oid: (torch.ones(20, 3), Level("row", 0, 20)), min_rows=10)
>>> float(value), level.kind
(60.0, 'aggregate')
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx.experimental._config as _fx_config

from .budget import Meter
from .errors import BadRequest, ComputeLimitExceeded, P2PError, ShapeError, UnknownOp

MAX_NODES = 512
MAX_DEPTH = 16  # nesting of tuples and slices in one argument
MAX_CONST_ELEMENTS = 1 << 20
MAX_RESULT_ELEMENTS = 1 << 28  # 1 GiB of float32; a peer may lower it



class _WorstCaseNonzero:
    """While a meta dry run is in progress, torch sizes a boolean-mask selection (and
    nonzero) as if every element were picked: the largest it can be, which is what a
    budget needs (torch refuses otherwise). Scoped, so a user's own meta tensors in the
    same process keep torch's behaviour; counted, because dry runs overlap in threads
    and torch's own ``patch`` would restore the flag under a run still going."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = False

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._saved = _fx_config.meta_nonzero_assume_all_nonzero
                _fx_config.meta_nonzero_assume_all_nonzero = True
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                _fx_config.meta_nonzero_assume_all_nonzero = self._saved


worst_case_nonzero = _WorstCaseNonzero()

DTYPES = {name: getattr(torch, name) for name in (
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")}


@dataclass(frozen=True)
class Level:
    kind: str                  # "public" | "aggregate" | "row"
    row_dim: int | None = None  # which dim indexes records (row-level values only)
    rows: int = 0              # how many records the value still spans

    @property
    def rank(self) -> int:
        return {"public": 0, "aggregate": 1, "row": 2}[self.kind]


PUBLIC = Level("public")
AGGREGATE = Level("aggregate")
OPAQUE = Level("row", None, 0)  # row-level with its record axis lost: never an aggregate


# ----------------------------------------------------------------- level rules

def _is_row(lv: Level) -> bool:
    return lv.kind == "row"


def _joined(levels: list[Level]) -> Level:
    return max(levels, key=lambda lv: lv.rank) if levels else PUBLIC


def _elementwise(levels, values, out, kwargs) -> Level:
    rows = [(lv, v) for lv, v in zip(levels, values) if isinstance(lv, Level) and _is_row(lv)]
    if not rows:
        return _joined([lv for lv in levels if isinstance(lv, Level)])
    ref_lv, ref_v = rows[0]
    if ref_lv.row_dim is None or not isinstance(out, torch.Tensor):
        return OPAQUE
    out_dim = ref_lv.row_dim + (out.dim() - ref_v.dim())
    for lv, v in zip(levels, values):
        if not isinstance(lv, Level) or not isinstance(v, torch.Tensor):
            continue
        d = out_dim - (out.dim() - v.dim())
        if _is_row(lv):
            if lv.row_dim is None or d != lv.row_dim or v.shape[d] != out.shape[out_dim]:
                return OPAQUE
        elif d >= 0 and v.shape[d] != 1:
            # a constant that varies record by record (a one-hot mask, say) can
            # single records out, so the result is no longer record-uniform
            return OPAQUE
    return Level("row", out_dim, min(lv.rows for lv, _ in rows))


def _dims(kwargs, args, ndim) -> tuple[int, ...] | None:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return tuple(d % max(ndim, 1) for d in dims)


def _make_reduction(uniform: bool):
    def rule(levels, values, out, kwargs, args=()):
        lv, v = levels[0], values[0]
        if not _is_row(lv):
            return lv
        if not uniform or lv.row_dim is None:
            return OPAQUE
        dims = _dims(kwargs, values, v.dim())
        if dims is None or lv.row_dim in dims:
            return Level("aggregate") if lv.rows >= kwargs.get("__min_rows", 1) else OPAQUE
        keep = kwargs.get("keepdim", False)
        shift = 0 if keep else sum(1 for d in dims if d < lv.row_dim)
        return Level("row", lv.row_dim - shift, lv.rows)
    return rule


def _opaque_if_row(levels, values, out, kwargs) -> Level:
    j = _joined([lv for lv in levels if isinstance(lv, Level)])
    return OPAQUE if _is_row(j) else j


def _matmul_rule(levels, values, out, kwargs) -> Level:
    (la, lb), (a, b) = levels, values
    if not _is_row(la) and not _is_row(lb):
        return _joined([la, lb])
    if _is_row(la) and not _is_row(lb) and la.row_dim == 0 and a.dim() >= 2 and b.dim() <= 2:
        return Level("row", 0, la.rows)  # one linear map applied to every record
    if (_is_row(la) and _is_row(lb) and a.dim() == 2 and la.row_dim == 1
            and lb.row_dim == 0 and a.shape[1] == b.shape[0]):
        # X^T Y sums over records with no per-record weights: an aggregate
        return Level("aggregate") if min(la.rows, lb.rows) >= kwargs.get("__min_rows", 1) else OPAQUE
    return OPAQUE


def _perm_rule(levels, values, out, kwargs, perm_of) -> Level:
    lv = levels[0]
    if not _is_row(lv) or lv.row_dim is None:
        return lv
    perm = perm_of(values)
    return Level("row", perm.index(lv.row_dim), lv.rows)


def _transpose_perm(values):
    n = values[0].dim()
    d0, d1 = values[1] % n, values[2] % n
    perm = list(range(n))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _t_perm(values):
    n = values[0].dim()
    return list(range(n))[::-1] if n == 2 else list(range(n))


def _reshape_rule(levels, values, out, kwargs) -> Level:
    lv, v = levels[0], values[0]
    if not _is_row(lv) or lv.row_dim is None:
        return lv
    if lv.row_dim == 0 and out.dim() >= 1 and out.shape[0] == v.shape[0]:
        return lv
    return OPAQUE


def _unsqueeze_rule(levels, values, out, kwargs) -> Level:
    lv = levels[0]
    if not _is_row(lv) or lv.row_dim is None:
        return lv
    d = values[1] % out.dim()
    return Level("row", lv.row_dim + (1 if d <= lv.row_dim else 0), lv.rows)


def _getitem_rule(levels, values, out, kwargs) -> Level:
    lv, v, index = levels[0], values[0], values[1]
    if not _is_row(lv):
        return _joined([lv] + [x for x in levels[1:] if isinstance(x, Level)])
    if lv.row_dim != 0:
        return OPAQUE
    first = index[0] if isinstance(index, tuple) and index else index
    if isinstance(index, tuple) and not index:
        return lv
    if first is Ellipsis:
        # x[..., k]: the record axis stays first only if the ellipsis covers it
        return lv if isinstance(index, tuple) and v.dim() > len(index) - 1 else OPAQUE
    if isinstance(first, slice):
        return Level("row", 0, int(out.shape[0]))
    if isinstance(first, torch.Tensor) and first.dtype == torch.bool:
        return Level("row", 0, int(out.shape[0]))
    return OPAQUE  # an integer picks one record; an index tensor can repeat one


def _shape_only(levels, values, out, kwargs) -> Level:
    return PUBLIC


# ----------------------------------------------------------------- the table

@dataclass(frozen=True)
class Op:
    fn: Callable
    rule: Callable
    kwargs: frozenset = frozenset()


def _div(a, b):
    return torch.true_divide(a, b)


def _astype(x, dtype):
    return x.to(dtype)


def _histc(x, bins=10, min=0.0, max=0.0):
    return torch.histc(x.float(), bins=bins, min=min, max=max)


def _count(x, dim=None):
    return torch.count_nonzero(x, dim=dim)


def _var(x, dim=None, keepdim=False, correction=1):
    return torch.var(x, dim=dim, keepdim=keepdim, correction=correction)


def _std(x, dim=None, keepdim=False, correction=1):
    return torch.std(x, dim=dim, keepdim=keepdim, correction=correction)


def _sum(x, dim=None, keepdim=False):
    return torch.sum(x, dim=dim, keepdim=keepdim) if dim is not None else torch.sum(x)


def _mean(x, dim=None, keepdim=False):
    x = x if x.is_floating_point() else x.float()
    return torch.mean(x, dim=dim, keepdim=keepdim) if dim is not None else torch.mean(x)


def _getitem(x, index):
    return x[index]


def _cat(tensors, dim=0):
    return torch.cat(list(tensors), dim=dim)


def _stack(tensors, dim=0):
    return torch.stack(list(tensors), dim=dim)


_ew = _elementwise
_RED = frozenset({"dim", "keepdim"})
OPS: dict[str, Op] = {
    # arithmetic and comparisons: elementwise with broadcasting
    **{name: Op(fn, _ew) for name, fn in {
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": _div,
        "floordiv": torch.floor_divide, "remainder": torch.remainder, "pow": torch.pow,
        "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
        "maximum": torch.maximum, "minimum": torch.minimum,
        "logical_and": torch.logical_and, "logical_or": torch.logical_or, "where": torch.where,
        "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "log1p": torch.log1p,
        "sqrt": torch.sqrt, "square": torch.square, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "relu": torch.relu, "sign": torch.sign, "floor": torch.floor, "ceil": torch.ceil,
        "round": torch.round, "logical_not": torch.logical_not, "isnan": torch.isnan,
        "isfinite": torch.isfinite,
    }.items()},
    "clamp": Op(torch.clamp, _ew, frozenset({"min", "max"})),
    "astype": Op(_astype, _ew),
    # reductions that treat every record alike
    "sum": Op(_sum, _make_reduction(True), _RED),
    "mean": Op(_mean, _make_reduction(True), _RED),
    "var": Op(_var, _make_reduction(True), _RED | {"correction"}),
    "std": Op(_std, _make_reduction(True), _RED | {"correction"}),
    "count_nonzero": Op(_count, _make_reduction(True), frozenset({"dim"})),
    "histc": Op(_histc, _make_reduction(True), frozenset({"bins", "min", "max"})),
    # reductions whose answer is one record's value (or position)
    **{name: Op(fn, _make_reduction(False), _RED) for name, fn in {
        "amax": torch.amax, "amin": torch.amin, "prod": torch.prod,
    }.items()},
    "argmax": Op(torch.argmax, _opaque_if_row, _RED),
    "argmin": Op(torch.argmin, _opaque_if_row, _RED),
    "softmax": Op(torch.softmax, _opaque_if_row, frozenset({"dim"})),
    "cumsum": Op(torch.cumsum, _opaque_if_row, frozenset({"dim"})),
    # structure
    "getitem": Op(_getitem, _getitem_rule),
    "reshape": Op(torch.reshape, _reshape_rule),
    "flatten": Op(torch.flatten, _reshape_rule, frozenset({"start_dim", "end_dim"})),
    "transpose": Op(torch.transpose, lambda l, v, o, k: _perm_rule(l, v, o, k, _transpose_perm)),
    "t": Op(torch.t, lambda l, v, o, k: _perm_rule(l, v, o, k, _t_perm)),
    "permute": Op(lambda x, *dims: x.permute(*dims),
                  lambda l, v, o, k: _perm_rule(l, v, o, k, lambda vals: [d % vals[0].dim() for d in vals[1:]])),
    "unsqueeze": Op(torch.unsqueeze, _unsqueeze_rule),
    "squeeze": Op(lambda x, *dims: x.squeeze(*dims) if dims else x.squeeze(), _opaque_if_row),
    "matmul": Op(torch.matmul, _matmul_rule),
    "cat": Op(_cat, _opaque_if_row, frozenset({"dim"})),
    "stack": Op(_stack, _opaque_if_row, frozenset({"dim"})),
    "numel": Op(lambda x: torch.tensor(x.numel()), _shape_only),
}



# ----------------------------------------------------------------- encoding of arguments

def encode_arg(value, node_index: Callable[[Any], int | None]):
    """Turn a Python argument into its wire form (see module docstring)."""
    idx = node_index(value)
    if idx is not None:
        return {"$": idx}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, slice):
        return {"slice": [encode_arg(value.start, node_index), encode_arg(value.stop, node_index),
                          encode_arg(value.step, node_index)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, (tuple, list, torch.Size)):
        return {"tuple": [encode_arg(v, node_index) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        if value.numel() > MAX_CONST_ELEMENTS:
            raise BadRequest("constant tensor too large; send() it and use the pointer")
        return {"tensor": value.detach().cpu()}
    raise BadRequest(f"cannot use {type(value).__name__} in a remote computation")


def _decode_arg(arg, values: list, levels: list, device: str, deps: list[int], depth: int = 0):
    if depth > MAX_DEPTH:
        raise BadRequest(f"argument nested more than {MAX_DEPTH} deep")
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, dict) and len(arg) == 1:
        (key, v), = arg.items()
        if key == "$":
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(values):
                raise BadRequest(f"node reference {v!r} does not point to an earlier node")
            deps.append(v)
            return values[v]
        if key == "slice" and isinstance(v, list) and len(v) == 3:
            parts = [_decode_arg(x, values, levels, device, deps, depth + 1) for x in v]
            if not all(p is None or isinstance(p, int) and not isinstance(p, bool) for p in parts):
                raise BadRequest("slice bounds must be integers or null")
            return slice(*parts)
        if key == "ellipsis":
            return Ellipsis
        if key == "tuple" and isinstance(v, list):
            return tuple(_decode_arg(x, values, levels, device, deps, depth + 1) for x in v)
        if key == "dtype" and v in DTYPES:
            return DTYPES[v]
        if key == "tensor" and isinstance(v, torch.Tensor):
            if v.numel() > MAX_CONST_ELEMENTS:
                raise BadRequest("constant tensor too large")
            return v.to(device) if device == "meta" else v
    raise BadRequest(f"unrecognised argument {_describe(arg)}")


def _describe(arg) -> str:
    if isinstance(arg, dict):
        return f"map with keys {sorted(map(str, arg))[:5]}"
    return type(arg).__name__


# ----------------------------------------------------------------- evaluation

def evaluate(program: dict, resolve: Callable[[str], tuple[torch.Tensor, Level]], *,
             min_rows: int = 10, device: str = "cpu",
             max_elements: int = MAX_RESULT_ELEMENTS, meter: Meter | None = None) -> tuple[Any, Level]:
    """Run `program`; `resolve(obj_id)` gives a leaf's tensor and level.

    Each intermediate is dropped after its last use, so a program holds at once only
    what later nodes still need; `meter` (see :mod:`p2pgrid.budget`) is charged node by
    node with that memory and each op's work, and refuses the program once over its
    limits. Raises UnknownOp for ops outside the whitelist, ShapeError when torch
    rejects the operands, BadRequest for malformed programs or oversize results, and
    no other exception: whatever a program makes torch or the rules raise is the
    program's fault, so it is answered as such.
    """
    with worst_case_nonzero if device == "meta" else contextlib.nullcontext():
        return _evaluate(program, resolve, min_rows, device, max_elements, meter)


def _evaluate(program, resolve, min_rows, device, max_elements, meter):
    nodes = program.get("nodes") if isinstance(program, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise BadRequest("program must be a map with a non-empty list of nodes")
    if len(nodes) > MAX_NODES:
        raise BadRequest(f"program has {len(nodes)} nodes; the limit is {MAX_NODES}")
    last = _last_uses(nodes)
    held = _Held()
    if meter is not None:
        meter.base(_constant_bytes(nodes))
    values: list[Any] = []
    levels: list[Level] = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("op"), str):
            raise BadRequest(f"node {i} is not a map with an 'op'")
        name = node["op"]
        if name == "leaf":
            if not isinstance(node.get("obj"), str):
                raise BadRequest(f"leaf node {i} needs an object id")
            value, level = resolve(node["obj"])
            live = held.add(i, value, [], [])
            if meter is not None:
                meter.node(i, "leaf", [], value, live=live)
            values.append(value)
            levels.append(level)
            continue
        op = OPS.get(name)
        if op is None:
            raise UnknownOp(f"op {name!r} is not in the whitelist", op=name)
        raw_args, raw_kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
            raise BadRequest(f"node {i} ({name}): args must be a list and kwargs a map")
        bad = set(raw_kwargs) - op.kwargs
        if bad:
            raise BadRequest(f"op {name!r} takes no keyword {sorted(map(str, bad))[0]!r}")
        deps: list[int] = []
        args = [_decode_arg(a, values, levels, device, deps) for a in raw_args]
        kwargs = {k: _decode_arg(v, values, levels, device, deps) for k, v in raw_kwargs.items()}
        out = _apply(i, name, op, args, kwargs)
        if out.numel() > max_elements:
            raise BadRequest(f"node {i} ({name}) would make {out.numel()} elements; "
                             f"the limit is {max_elements}")
        live = held.add(i, out, deps, values)
        if meter is not None:
            meter.node(i, name, args + list(kwargs.values()), out, live=live)
        level = _level(i, name, op, raw_args, args, kwargs, out, deps, levels, min_rows)
        values.append(out)
        levels.append(level)
        del args, kwargs
        for d in set(deps):
            if last[d] == i:
                values[d] = None
                held.drop(d)
    return values[-1], levels[-1]


def _apply(i: int, name: str, op: Op, args: list, kwargs: dict) -> torch.Tensor:
    try:
        out = op.fn(*args, **kwargs)
    except MemoryError:
        raise ComputeLimitExceeded(f"node {i} ({name}) ran out of memory",
                                   limit="program_memory") from None
    except (RuntimeError, TypeError, ValueError, IndexError, OverflowError, ArithmeticError,
            NotImplementedError, AttributeError, KeyError) as e:
        if "can't allocate memory" in str(e):   # torch's allocator under an address-space cap
            raise ComputeLimitExceeded(f"node {i} ({name}) ran out of memory",
                                       limit="program_memory") from None
        raise ShapeError(f"node {i} ({name}): {_torch_message(e)}", op=name) from None
    except RecursionError:
        raise BadRequest(f"node {i} ({name}): arguments nested too deep") from None
    except Exception as e:  # noqa: BLE001 - anything else torch raises on odd operands
        raise ShapeError(f"node {i} ({name}): {type(e).__name__}", op=name) from None
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"node {i} ({name}) gives a {type(out).__name__}, not a tensor", op=name)
    return out


def _level(i, name, op, raw_args, args, kwargs, out, deps, levels, min_rows) -> Level:
    try:
        rule_levels = _levels_for(raw_args, levels)
        level = op.rule(rule_levels, args, out, dict(kwargs, __min_rows=min_rows))
    except P2PError:
        raise
    except Exception:  # noqa: BLE001 - operands torch took but the guard cannot follow
        raise BadRequest(f"node {i} ({name}): the record guard cannot follow these "
                         f"arguments") from None
    index_levels = [levels[d] for d in deps[1:]] if name == "getitem" else []
    if any(_is_row(lv) for lv in index_levels) and not _is_row(level):
        level = OPAQUE  # an index computed from records says something about them
    elif index_levels and _joined(index_levels).rank > level.rank:
        level = _joined(index_levels)
    return level


def _refs(arg, out: list[int], depth: int = 0) -> None:
    if depth > 4 * MAX_DEPTH:   # deeper than _decode_arg goes (a tuple is a map and a list)
        return
    if isinstance(arg, dict):
        ref = arg.get("$")
        if isinstance(ref, int) and not isinstance(ref, bool):
            out.append(ref)
        for v in arg.values():
            _refs(v, out, depth + 1)
    elif isinstance(arg, (list, tuple)):
        for v in arg:
            _refs(v, out, depth + 1)


def _last_uses(nodes: list) -> list[int]:
    """For each node, the last node that reads it (itself if none; the result is kept)."""
    last = list(range(len(nodes)))
    if nodes:
        last[-1] = len(nodes)
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            continue
        refs: list[int] = []
        _refs(node.get("args"), refs)
        _refs(node.get("kwargs"), refs)
        for r in refs:
            if 0 <= r < i:
                last[r] = max(last[r], i)
    return last


def _constant_bytes(nodes: list) -> int:
    total = 0

    def walk(arg, depth=0):
        nonlocal total
        if depth > MAX_DEPTH:
            return
        if isinstance(arg, torch.Tensor):
            total += arg.numel() * arg.element_size()
        elif isinstance(arg, dict):
            for v in arg.values():
                walk(v, depth + 1)
        elif isinstance(arg, (list, tuple)):
            for v in arg:
                walk(v, depth + 1)
    for node in nodes:
        if isinstance(node, dict):
            walk(node.get("args"))
            walk(node.get("kwargs"))
    return total


class _Held:
    """Bytes the values still referenced hold. A view (a slice, a reshape, a transpose)
    holds its base's storage, so it costs nothing of its own but keeps its base's bytes
    held until both are dropped."""

    def __init__(self):
        self.live = 0
        self._owner: dict[int, int] = {}     # node -> node whose storage it uses
        self._users: dict[int, int] = {}     # owner node -> nodes using its storage
        self._bytes: dict[int, int] = {}     # owner node -> bytes

    def add(self, i: int, out, deps: list[int], values: list) -> int:
        base = out._base if isinstance(out, torch.Tensor) and out._is_view() else out
        for d in deps:
            v = values[d]
            if isinstance(v, torch.Tensor) and (v is base or v._is_view() and v._base is base):
                owner = self._owner[d]
                self._owner[i] = owner
                self._users[owner] += 1
                return self.live
        self._owner[i] = i
        self._users[i] = 1
        # a view of a constant uses the program's memory, counted with the constants
        own = 0 if base is not out else out.numel() * out.element_size()
        self._bytes[i] = own
        self.live += own
        return self.live

    def drop(self, i: int) -> None:
        owner = self._owner.pop(i, None)
        if owner is None:
            return
        self._users[owner] -= 1
        if not self._users[owner]:
            del self._users[owner]
            self.live -= self._bytes.pop(owner)


def _levels_for(raw_args, levels) -> list:
    """Level of each positional argument: a node's level, or PUBLIC for a constant."""
    out = []
    for a in raw_args:
        if isinstance(a, dict) and "$" in a and isinstance(a["$"], int):
            out.append(levels[a["$"]])
        elif isinstance(a, dict) and "tuple" in a:
            inner = _levels_for(a["tuple"], levels)
            out.append(_joined(inner) if inner else PUBLIC)
        else:
            out.append(PUBLIC)
    return out


def _torch_message(e: Exception) -> str:
    # torch's messages name shapes and dtypes, never values; keep the first line only
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
