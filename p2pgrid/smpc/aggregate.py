"""When an SMPC result is an aggregate over records, read from the program's structure.

The plaintext rule (docs/SECURITY.md) is that a reduction treating every record alike,
over at least ``min_rows`` records, may go to whoever holds the ``aggregate`` right on
the data. In SMPC the parties never see values, so the rule is checked on the program
alone, strictly:

* a *record* leaf is a shared tensor the caller may not reconstruct; its dim 0 is its
  records. Every other leaf, and every public constant, is *fixed*: the same for every
  record, so it may never carry the record axis (that would let the caller weight or
  select records, e.g. with a one-hot mask);
* record values flow only through row-wise ops: elementwise ops between record values
  with the same records, or with fixed operands that broadcast across the records;
  ``x @ W`` with a fixed ``W``; per-record reductions, argmax, reshapes and index
  selections that keep dim 0 whole and in place; concatenation of record values along
  dim 0 (more records) or along a later dim (same records);
* the program's output is one reduction over the record axis (``sum`` or ``mean`` with
  ``dim=None`` or 0), the last op, of such a value.

Then the output is sum_i f(record_i) (or its mean) for one function f, and each record
leaf contributes all of its rows. :func:`record_aggregate` says which leaves contribute
and how many rows each; :func:`record_wise` does the same for a value kept shared, which
keeps its inputs' ``aggregate`` right only when it is still one row per record (so a
later reduction of it is judged by the same rule). The caller of these functions checks
the rights and ``min_rows`` (see :func:`p2pgrid.smpc.handlers.run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from p2pgrid.errors import P2PError
from p2pgrid.protocols.smpc.program import OPS, _args, _nodes, _to_meta

__all__ = ["record_aggregate", "record_wise", "may_reveal_aggregate", "kept_aggregate"]

_ELEMENTWISE = {"add", "sub", "mul", "ge", "gt", "le", "lt"}
_UNARY = {"neg", "square", "relu"}


@dataclass(frozen=True)
class _Rec:
    """A value whose dim 0 is the records: `rows` of them, from these leaves (id -> rows)."""
    rows: int
    leaves: tuple[tuple[str, int], ...]
    repeats: bool = False   # some record appears on two rows (a leaf concatenated with itself)


@dataclass(frozen=True)
class _Agg:
    """A reduction over the records of a record value."""
    leaves: tuple[tuple[str, int], ...]


class _Ref:
    """A node reference among decoded arguments (never confused with a constant)."""
    __slots__ = ("j",)

    def __init__(self, j: int):
        self.j = j


_FIXED = "fixed"      # the same for every record
_BAD = None           # anything else: not an aggregate, not row-wise


def _dim(d, ndim: int) -> int | None:
    if isinstance(d, bool) or not isinstance(d, int) or ndim == 0 or not -ndim <= d < ndim:
        return None
    return d % ndim


def _shape(v) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _fixed_broadcasts(shape: tuple[int, ...] | None, out_ndim: int) -> bool:
    """A fixed operand of this shape is applied alike to every record."""
    if shape is None:
        return True  # a number
    return len(shape) < out_ndim or (len(shape) == out_ndim and shape[0] == 1)


def _merge(recs: list[_Rec]) -> tuple[tuple[str, int], ...]:
    out: dict[str, int] = {}
    for r in recs:
        out.update(r.leaves)
    return tuple(sorted(out.items()))


def _refs(values) -> set[int]:
    out: set[int] = set()
    for v in values:
        if isinstance(v, _Ref):
            out.add(v.j)
        elif isinstance(v, (list, tuple)):
            out |= _refs(v)
        elif isinstance(v, slice):
            out |= _refs([v.start, v.stop, v.step])
    return out


def _full_slice(v) -> bool:
    return isinstance(v, slice) and v.start is None and v.stop is None and v.step is None


def _classify(program, leaf_shapes: Mapping[str, tuple], record_leaves: set[str]) -> tuple[list, list]:
    nodes, outputs = _nodes(program)
    metas: list[Any] = []
    kinds: list[Any] = []
    for i, n in enumerate(nodes):
        if n["op"] == "leaf":
            shape = tuple(leaf_shapes[n["id"]])
            metas.append(torch.empty(shape, dtype=torch.float64, device="meta"))
            if n["id"] in record_leaves:
                kinds.append(_Rec(shape[0], ((n["id"], shape[0]),)) if shape else _BAD)
            else:
                kinds.append(_FIXED)
            continue
        args, kwargs = _args(n, i, _Ref)
        kind_of = {j: kinds[j] for j in _refs(args) | _refs(list(kwargs.values()))}
        real_args, real_kwargs = _args(n, i, lambda j: metas[j])
        out = OPS[n["op"]].meta(*[_to_meta(a) for a in real_args],
                                **{k: _to_meta(v) for k, v in real_kwargs.items()})
        metas.append(out)
        kinds.append(_step(n["op"], args, kwargs, real_args, real_kwargs, kind_of, out))
    return kinds, outputs


def _step(op: str, args: list, kwargs: dict, real_args: list, real_kwargs: dict,
          kind_of: dict, out) -> Any:
    """The kind of one node's value from its operands' kinds."""
    if any(k is _BAD or isinstance(k, _Agg) for k in kind_of.values()):
        return _BAD

    def kind(v):
        return kind_of[v.j] if isinstance(v, _Ref) else _FIXED

    recs = [k for k in kind_of.values() if isinstance(k, _Rec)]   # nested ones (cat) included
    if not recs:
        return _FIXED
    first = args[0] if args else None
    a = real_args[0] if real_args else None
    rows = recs[0].rows
    if op not in _ELEMENTWISE | {"matmul", "cat", "stack"} and (
            _refs(args[1:]) or _refs(list(kwargs.values()))):
        return _BAD   # shapes, dims and indices are constants: a computed one could pick records
    if op in ("sum", "mean"):
        if not isinstance(kind(first), _Rec) or len(args) != 1 or len(recs) != 1:
            return _BAD
        dim = real_kwargs.get("dim")
        if dim is None:
            return _Agg(recs[0].leaves)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        norm = [_dim(d, a.dim()) for d in dims]
        if any(d is None for d in norm):
            return _BAD
        if 0 in norm:
            return _Agg(recs[0].leaves)
        return recs[0] if out.dim() and out.shape[0] == rows else _BAD
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return _BAD
    if op in _ELEMENTWISE:
        if len(args) != 2 or kwargs or out.shape[0] != rows:
            return _BAD
        for v, real in zip(args, real_args):
            k = kind(v)
            if isinstance(k, _Rec):
                if k.rows != rows or real.dim() != out.dim():
                    return _BAD
            elif not _fixed_broadcasts(_shape(real), out.dim()):
                return _BAD
        return _Rec(rows, _merge(recs), any(k.repeats for k in recs))
    if op in _UNARY or op == "div":
        return recs[0] if isinstance(kind(first), _Rec) and len(recs) == 1 else _BAD
    if op == "matmul":
        b = real_args[1] if len(real_args) == 2 else None
        if (len(recs) != 1 or not isinstance(kind(first), _Rec) or a.dim() < 2
                or not isinstance(b, torch.Tensor) or b.dim() > 2 or out.shape[0] != rows):
            return _BAD
        return recs[0]
    if op in ("max", "argmax"):
        dim = real_kwargs.get("dim", -1 if op == "argmax" else None)
        if len(args) != 1 or dim is None or _dim(dim, a.dim()) in (None, 0) or out.shape[0] != rows:
            return _BAD
        return recs[0]
    if op == "reshape":
        shape = real_args[1] if len(real_args) == 2 else None
        if not isinstance(shape, (tuple, list)) or not shape or shape[0] != rows:
            return _BAD
        return recs[0]
    if op == "getitem":
        index = real_args[1] if len(real_args) == 2 else None
        head = index[0] if isinstance(index, tuple) and index else index
        if not _full_slice(head) or out.shape[0] != rows:
            return _BAD
        return recs[0]
    if op == "transpose":
        dims = list(real_args[1:]) + [real_kwargs.get(k) for k in ("dim0", "dim1") if k in real_kwargs]
        if len(dims) != 2 or any(_dim(d, a.dim()) in (None, 0) for d in dims):
            return _BAD
        return recs[0]
    if op == "permute":
        dims = real_args[1] if len(real_args) == 2 else None
        if not isinstance(dims, (tuple, list)) or not dims or _dim(dims[0], a.dim()) != 0:
            return _BAD
        return recs[0]
    if op == "flatten":
        start = real_args[1] if len(real_args) > 1 else real_kwargs.get("start_dim", 0)
        if _dim(start, a.dim()) in (None, 0) or out.shape[0] != rows:
            return _BAD
        return recs[0]
    if op in ("unsqueeze", "squeeze"):
        dim = real_args[1] if len(real_args) > 1 else real_kwargs.get("dim")
        ndim = out.dim() if op == "unsqueeze" else a.dim()
        if dim is None or _dim(dim, ndim) in (None, 0) or out.shape[0] != rows:
            return _BAD
        return recs[0]
    if op in ("cat", "stack"):
        xs = args[0] if args else None
        if not isinstance(xs, (list, tuple)) or len(args) + len(kwargs) > 2:
            return _BAD
        dim = real_args[1] if len(real_args) > 1 else real_kwargs.get("dim", 0)
        kinds = [kind(x) for x in xs]
        if not all(isinstance(k, _Rec) for k in kinds):
            return _BAD  # a fixed part would be records the caller chose
        d = _dim(dim, out.dim())
        if d is None or (op == "stack" and d == 0):
            return _BAD
        if d == 0:
            seen: set[str] = set()
            repeats = any(k.repeats for k in kinds)
            for k in kinds:
                names = {leaf for leaf, _ in k.leaves}
                repeats |= bool(seen & names)
                seen |= names
            return _Rec(sum(k.rows for k in kinds), _merge(kinds), repeats)
        if any(k.rows != rows for k in kinds) or out.shape[0] != rows:
            return _BAD
        return _Rec(rows, _merge(kinds), any(k.repeats for k in kinds))
    return _BAD


def _analyse(program, output: int, leaf_shapes, record_leaves):
    try:
        kinds, outputs = _classify(program, leaf_shapes, set(record_leaves))
        return kinds[outputs[output]]
    except (P2PError, RuntimeError, TypeError, ValueError, IndexError, KeyError):
        return _BAD


def record_aggregate(program, output: int, leaf_shapes: Mapping[str, tuple],
                     record_leaves: set[str]) -> dict[str, int] | None:
    """{record leaf: rows it contributes} when program output `output` is a reduction
    over the records that treats every record alike (see the module docstring), else
    None. `record_leaves` are the leaves the caller may not reconstruct."""
    kind = _analyse(program, output, leaf_shapes, record_leaves)
    return dict(kind.leaves) if isinstance(kind, _Agg) and kind.leaves else None


def record_wise(program, output: int, leaf_shapes: Mapping[str, tuple],
                record_leaves: set[str]) -> dict[str, int] | None:
    """{record leaf: rows} when output `output` still holds one row per record, computed
    alike for every record (so a later reduction of it may be an aggregate), else None."""
    kind = _analyse(program, output, leaf_shapes, record_leaves)
    return dict(kind.leaves) if isinstance(kind, _Rec) and not kind.repeats else None


def may_reveal_aggregate(program, output: int, leaves: Mapping[str, Any], caller: str) -> bool:
    """Whether `caller` may reconstruct output `output` of `program` over these leaves
    ({id: Entry}) as an aggregate: a record reduction (:func:`record_aggregate`) in which
    every record leaf grants `caller` its ``aggregate`` right and gives at least its
    ``min_rows`` rows."""
    shapes = {i: tuple(e.share.shape) for i, e in leaves.items()}
    record = {i for i, e in leaves.items() if not e.rules.allows("reveal", caller)}
    contributes = record_aggregate(program, output, shapes, record)
    if not contributes:
        return False
    return all(leaves[i].rules.allows("aggregate", caller) and rows >= leaves[i].rules.min_rows
               for i, rows in contributes.items())


def kept_aggregate(program, output: int, leaves: Mapping[str, Any], deps: set[str],
                   caller: str) -> tuple[str, ...]:
    """The ``aggregate`` names a kept output may carry: those every input it derives from
    grants (``aggregate`` or ``reveal``), when the output is still one row per record and
    each record leaf gave its ``min_rows`` rows; else none (a later reduction of it would
    not be a reduction over records alike)."""
    shapes = {i: tuple(e.share.shape) for i, e in leaves.items()}
    record = {i for i, e in leaves.items() if not e.rules.allows("reveal", caller)}
    contributes = record_wise(program, output, shapes, record)
    if contributes is None or any(rows < leaves[i].rules.min_rows for i, rows in contributes.items()):
        return ()
    acc: set[str] | None = None
    for i in deps:
        r = leaves[i].rules
        names = set(r.grants("aggregate")) | set(r.grants("reveal"))
        if "*" in names:
            continue
        acc = names if acc is None else acc & names
    return ("*",) if acc is None else tuple(sorted(acc))


