"""The release gate: whether a computed value may leave the data owner's peer.

Decided on the owner's peer from the *program's structure* and stored metadata, never
from what the requester says and never from the evaluator's per-op ``Level`` (that stays
an explanation). A value leaves (``fetch=True``, ``get`` of a stored result, or a stored
result someone else finds by its tags) only if one of these holds for the caller C:

(a) **C may get every input** the value depends on: every object named anywhere in the
    program (each argument position, positional or keyword, nested in tuples), and,
    for a stored result, every object its own derivation named. Objects C stored here
    (``send``) are C's: C may get them, and they never make anyone else's data
    releasable.
(b) **A charged DP mechanism** produced it: ``gov.dp.query`` (governance/mechanism.py),
    charged atomically to C's and the dataset's budgets. That path has its own handler;
    nothing in this module releases noisy values.
(c) **An exact aggregate of a documented form** (:func:`classify`) over one dataset D on
    which C holds ``aggregate``, spanning at least D's ``min_rows`` records:

    - a *record map* of D is D itself, a column selection ``D[:, j...]`` (first index the
      full slice, the others integer/slice constants), or an elementwise op applied to one
      record map and otherwise only to *known* operands (constants, objects C may get,
      values computed from those) that do not vary along the record axis. Two per-record
      operands in one op (``x * mask``, ``x[:, 0] / x[:, 1]``, an uploaded tensor with one
      entry per record, a data-derived mask) are not a record map; nor is any op that mixes
      entries across a record (reshape, matmul by a constant, a reduction within a record).
      So every entry of a record map is ``g(one entry of one record)`` for a fixed ``g``.
    - an *aggregate* is ``sum``, ``mean``, ``var``, ``std`` or ``count_nonzero`` of a record
      map over a set of dims that includes the record axis (keyword parameters constant),
      ``histc`` of a record map (constant parameters), or the Gram product ``A.T @ B`` of
      two *raw* column selections A, B of D (no elementwise op on them);
    - then any ops over aggregates and known operands (post-processing).

    What such a value can tell: per column (per entry position), sums of a fixed function
    of that column's values: its distribution, not which values sit together in one record;
    plus the Gram matrix of raw columns (second moments). No weight, mask or selector
    chosen per record can enter, since no second per-record operand is ever accepted.
(d) **The owner approved this exact program for C** (its hash over ops, constants'
    digests and object ids, with stored results expanded) through the request queue
    (``await expr.request_release(reason=...)``, ``p2pgrid requests approve``).

Anything else is row-level and stays. Results kept remote carry their *derivation* (the
expanded program in canonical form: constants replaced by dtype, shape and digest) in
their metadata, so the same gate decides when someone fetches them later.

Errors: a program whose output C could not receive is refused before it runs on real
data when C asked for the value; when the result is kept remote, a failure on the real
data (a value-dependent torch error) is not reported at all: the result is stored as a
*failed* placeholder of the dry run's shape, and whoever may later receive something
derived from it gets one generic error. So failing or not tells nothing to a caller who
may not see the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import trio

from .errors import BadRequest, register_error
from .ops import DTYPES, OPS

__all__ = ["Decision", "Derivation", "Leaf", "classify", "canonical", "expand", "decide",
           "DATA", "KNOWN", "OPAQUE", "AGGREGATE", "ROW", "MAX_EXPANDED"]

log = logging.getLogger("p2pgrid.release")

MAX_EXPANDED = 4096  # nodes in a derivation with stored results inlined

# leaf categories, as the caller stands towards each object
KNOWN = "known"      # the caller may get it
DATA = "data"        # the caller may compute exact aggregates over it (holds `aggregate`)
OPAQUE = "opaque"    # neither

# kinds of a value in the classification
AGGREGATE, ROW = "aggregate", "row"

_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "floordiv", "remainder", "pow", "eq", "ne", "lt", "le", "gt", "ge",
    "maximum", "minimum", "logical_and", "logical_or", "where", "neg", "abs", "exp", "log",
    "log1p", "sqrt", "square", "sigmoid", "tanh", "relu", "sign", "floor", "ceil", "round",
    "logical_not", "isnan", "isfinite", "clamp", "astype"})
_RECORD_REDUCTIONS = frozenset({"sum", "mean", "var", "std", "count_nonzero"})
_SHAPE_ONLY = frozenset({"numel"})


# ------------------------------------------------------------------ canonical programs

def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    raw = t.to(torch.uint8) if t.dtype == torch.bool else t.view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _canon_arg(arg, remap: list[int]):
    """An argument in canonical form: node references renumbered, tensors replaced by
    [dtype, shape, digest]. Anything unrecognised raises BadRequest (the dry run has
    already refused such programs, so this is a backstop)."""
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, dict) and len(arg) == 1:
        (key, v), = arg.items()
        if key == "$" and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(remap):
            return {"$": remap[v]}
        if key in ("slice", "tuple") and isinstance(v, list):
            return {key: [_canon_arg(x, remap) for x in v]}
        if key == "ellipsis":
            return {"ellipsis": True}
        if key == "dtype" and isinstance(v, str):
            return {"dtype": v}
        if key == "tensor" and isinstance(v, torch.Tensor):
            return {"tensor": [str(v.dtype).removeprefix("torch."), list(v.shape), _digest(v)]}
        if key == "tensor" and isinstance(v, list) and len(v) == 3:  # already canonical
            return {"tensor": v}
    raise BadRequest("unrecognised argument in the program")


@dataclass
class Derivation:
    """A value's derivation: canonical nodes over stored base objects (no results), and
    whether a value it depends on failed on the real data."""
    nodes: list[dict]
    failed: bool = False

    @property
    def leaves(self) -> list[str]:
        return list(dict.fromkeys(n["obj"] for n in self.nodes if n.get("op") == "leaf"))

    def hash(self) -> str:
        """The program's identity for approvals (d): ops, constants' digests, objects."""
        blob = json.dumps(self.nodes, sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"nodes": self.nodes, "failed": self.failed}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Derivation":
        d = json.loads(text)
        return cls(list(d["nodes"]), bool(d.get("failed")))


def canonical(program: dict) -> Derivation:
    """`program` in canonical form (its leaves as they are: see :func:`expand`)."""
    return expand(program, lambda oid: None)


def expand(program: dict, derivation_of: Callable[[str], "Derivation | None"]) -> Derivation:
    """Canonical `program` with every leaf that is a stored result replaced by that
    result's own derivation (`derivation_of(id)`, None for a base object)."""
    nodes = program.get("nodes") if isinstance(program, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise BadRequest("program must be a map with a non-empty list of nodes")
    out: list[dict] = []
    remap: list[int] = []
    failed = False
    for node in nodes:
        if not isinstance(node, dict) or not isinstance(node.get("op"), str):
            raise BadRequest("each node must be a map with an 'op'")
        if node["op"] == "leaf":
            oid = node.get("obj")
            if not isinstance(oid, str):
                raise BadRequest("a leaf needs an object id")
            sub = derivation_of(oid)
            if sub is None:
                out.append({"op": "leaf", "obj": oid})
            else:
                base = len(out)
                for n in sub.nodes:
                    out.append(n if n["op"] == "leaf" else _shift(n, base))
                failed = failed or sub.failed
            remap.append(len(out) - 1)
        else:
            args, kwargs = node.get("args", []), node.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise BadRequest("args must be a list and kwargs a map")
            out.append({"op": node["op"], "args": [_canon_arg(a, remap) for a in args],
                        "kwargs": {str(k): _canon_arg(v, remap) for k, v in kwargs.items()}})
            remap.append(len(out) - 1)
        if len(out) > MAX_EXPANDED:
            raise BadRequest(f"this program with the results it uses has over {MAX_EXPANDED} "
                             f"steps; fetch what you may, or start from the data again")
    return Derivation(out, failed)


def _shift(node: dict, base: int) -> dict:
    def sh(a):
        if isinstance(a, dict) and len(a) == 1:
            (k, v), = a.items()
            if k == "$":
                return {"$": v + base}
            if k in ("slice", "tuple"):
                return {k: [sh(x) for x in v]}
        return a
    return {"op": node["op"], "args": [sh(a) for a in node["args"]],
            "kwargs": {k: sh(v) for k, v in node["kwargs"].items()}}


# ------------------------------------------------------------------ classification

@dataclass(frozen=True)
class Leaf:
    """How the caller stands towards one object: KNOWN, DATA or OPAQUE; its shape and
    dtype; the records an aggregate over it must span."""
    category: str
    shape: tuple[int, ...]
    dtype: str
    min_rows: int = 10


@dataclass(frozen=True)
class _V:
    kind: str                        # KNOWN | "rec" | AGGREGATE | ROW
    obj: str | None = None           # the dataset of a record map
    axis: int = 0                    # its record axis
    raw: bool = False                # a plain column selection (for Gram products)
    objs: frozenset = frozenset()    # datasets an aggregate reduces
    why: str = ""                    # for ROW: the first reason


@dataclass(frozen=True)
class Verdict:
    kind: str                        # KNOWN | AGGREGATE | ROW
    datasets: frozenset = frozenset()
    why: str = ""


def _meta_arg(arg, values: list, refs: list, path: str):
    """Decode a canonical argument with meta tensors; record every node reference and
    where it sits ("0", "1", "kw:min", "1.0" for nested)."""
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    (key, v), = arg.items()
    if key == "$":
        refs.append((v, path))
        return values[v]
    if key == "slice":
        return slice(*[_meta_arg(x, values, refs, f"{path}.{i}") for i, x in enumerate(v)])
    if key == "ellipsis":
        return Ellipsis
    if key == "tuple":
        return tuple(_meta_arg(x, values, refs, f"{path}.{i}") for i, x in enumerate(v))
    if key == "dtype":
        if v not in DTYPES:
            raise BadRequest(f"unknown dtype {v!r}")
        return DTYPES[v]
    if key == "tensor":
        dtype, shape, _ = v
        return torch.empty(tuple(shape), dtype=DTYPES.get(dtype, torch.float32), device="meta")
    raise BadRequest("unrecognised argument in the program")


def _row(why: str) -> _V:
    return _V(ROW, why=why)


def classify(derivation: Derivation, leaves: dict[str, Leaf]) -> Verdict:
    """Classify a derivation for one caller (`leaves`: every object it names). Sans-IO.

    KNOWN: depends only on constants and objects the caller may get (a); AGGREGATE: of
    the documented form (c) over ``datasets``; ROW: anything else, with the first reason.
    """
    values: list[Any] = []
    kinds: list[_V] = []
    for i, node in enumerate(derivation.nodes):
        op = node["op"]
        if op == "leaf":
            leaf = leaves.get(node["obj"])
            if leaf is None:
                values.append(torch.empty((), device="meta"))
                kinds.append(_row(f"object {node['obj']} is gone"))
                continue
            values.append(torch.empty(leaf.shape, dtype=DTYPES.get(leaf.dtype, torch.float32),
                                      device="meta"))
            if leaf.category == KNOWN:
                kinds.append(_V(KNOWN))
            elif leaf.category == DATA and leaf.shape:
                kinds.append(_V("rec", obj=node["obj"], axis=0, raw=True))
            else:
                kinds.append(_row(f"you may neither download object {node['obj']} nor take "
                                  f"exact aggregates of it"))
            continue
        refs: list[tuple[int, str]] = []
        try:
            args = [_meta_arg(a, values, refs, str(j)) for j, a in enumerate(node["args"])]
            kwargs = {k: _meta_arg(v, values, refs, f"kw:{k}") for k, v in node["kwargs"].items()}
            spec = OPS.get(op)
            if spec is None:
                raise BadRequest(f"op {op!r} is not in the whitelist")
            out = spec.fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the dry run already reported real errors
            values.append(torch.empty((), device="meta"))
            kinds.append(_row(f"node {i} ({op}) cannot be analysed"))
            continue
        values.append(out)
        kinds.append(_rule(i, op, args, kwargs, out, refs, kinds, values, leaves))
    last = kinds[-1]
    if last.kind == KNOWN:
        return Verdict(KNOWN)
    if last.kind == AGGREGATE:
        return Verdict(AGGREGATE, last.objs)
    if last.kind == "rec":
        return Verdict(ROW, why=f"the result has one entry per record of {last.obj}: reduce it "
                                f"over the records (sum, mean, var, std, count_nonzero, histc)")
    return Verdict(ROW, why=last.why)


def _rule(i, op, args, kwargs, out, refs, kinds, values, leaves) -> _V:
    what = f"node {i} ({op})"
    ks = [(kinds[r], r, path) for r, path in refs]
    rows = [k for k, _, _ in ks if k.kind == ROW]
    if rows:
        return rows[0]
    if op in _SHAPE_ONLY:
        return _V(KNOWN)  # shapes are metadata the caller already has
    recs = [(k, r, path) for k, r, path in ks if k.kind == "rec"]
    aggs = [k for k, _, _ in ks if k.kind == AGGREGATE]
    if not recs:
        if aggs:  # post-processing of aggregates with known operands
            return _V(AGGREGATE, objs=frozenset().union(*(a.objs for a in aggs)))
        return _V(KNOWN)
    if op == "matmul":
        return _gram(what, recs, ks, out, leaves)
    if len(recs) > 1:
        return _row(f"{what} combines two per-record values (a mask, weight or second column "
                    f"computed from the data); exact aggregates allow one")
    rec, ref, path = recs[0]
    if path.startswith("kw:") or "." in path:
        where = path.removeprefix("kw:")
        return _row(f"{what} takes data in a keyword or nested argument ({where})")
    if aggs:
        return _row(f"{what} combines per-record values with an aggregate of the data")
    v = values[ref]
    if op in _ELEMENTWISE:
        return _elementwise(what, rec, v, args, kwargs, out)
    if path != "0":  # an index, a dim or a second operand taken from the data
        return _row(f"{what} takes data as argument {path}, where only constants may go")
    if op == "getitem":
        return _select(what, rec, v, args, out, len(ks))
    if op in ("t", "transpose"):
        ndim = max(v.dim(), 1)
        if op == "transpose" and len(args) == 3 and {args[1] % ndim, args[2] % ndim} != {0, 1}:
            return _row(f"{what} of other axes than the records'")
        if v.dim() != 2 or rec.axis != 0:
            return _row(f"{what} of something that is not a table of records")
        return _V("rec", obj=rec.obj, axis=1, raw=rec.raw)
    if op in _RECORD_REDUCTIONS or op == "histc":
        return _reduce(what, op, rec, v, args, kwargs, leaves)
    return _row(f"{what} is not allowed on per-record values in an exact aggregate")


def _elementwise(what, rec: _V, v, args, kwargs, out) -> _V:
    if not isinstance(out, torch.Tensor):
        return _row(f"{what} gives no tensor")
    axis = rec.axis + (out.dim() - v.dim())
    if out.shape[axis] != v.shape[rec.axis]:
        return _row(f"{what} changes the number of records")
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor) and a is not v:
            d = axis - (out.dim() - a.dim())
            if d >= 0 and a.shape[d] != 1:
                return _row(f"{what} uses an operand that varies record by record "
                            f"(an uploaded tensor or constant with one entry per record)")
    return _V("rec", obj=rec.obj, axis=axis, raw=rec.raw and what.endswith("(astype)"))


def _select(what, rec: _V, v, args, out, nrefs: int) -> _V:
    if nrefs != 1:
        return _row(f"{what} indexes with values computed from data")
    index = args[1] if len(args) == 2 else None
    idx = index if isinstance(index, tuple) else (index,)
    if rec.axis != 0 or not idx or idx[0] != slice(None):
        return _row(f"{what} picks records: exact aggregates span all of them "
                    f"(start the index with ':')")
    if not all(isinstance(j, slice) or type(j) is int for j in idx[1:]) or not all(
            isinstance(j, int) or j is None for s in idx[1:] if isinstance(s, slice)
            for j in (s.start, s.stop, s.step)):
        return _row(f"{what} indexes columns with something else than integers and slices")
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != v.shape[0]:
        return _row(f"{what} moves the record axis")
    return _V("rec", obj=rec.obj, axis=0, raw=rec.raw)


def _reduce(what, op, rec: _V, v, args, kwargs, leaves) -> _V:
    n = v.shape[rec.axis]
    need = leaves[rec.obj].min_rows
    if n < need:
        return _row(f"{what} spans {n} records; at least {need} are needed")
    if op == "histc":
        return _V(AGGREGATE, objs=frozenset({rec.obj}))
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is not None:
        dims = dim if isinstance(dim, tuple) else (dim,)
        if not all(type(d) is int for d in dims):
            return _row(f"{what}: dim must be integer constants")
        if rec.axis not in {d % max(v.dim(), 1) for d in dims}:
            return _row(f"{what} reduces within records, not over them")
    return _V(AGGREGATE, objs=frozenset({rec.obj}))


def _gram(what, recs, ks, out, leaves) -> _V:
    if len(ks) != 2 or len(recs) != 2 or not all(p in ("0", "1") for _, _, p in recs):
        return _row(f"{what} of per-record values with anything but a second selection of the "
                    f"same records (a weight per record can single one out)")
    (a, _, _), (b, _, _) = sorted(recs, key=lambda x: x[2])
    if not (a.raw and b.raw and a.obj == b.obj and a.axis == 1 and b.axis == 0):
        return _row(f"{what}: the only exact product is A.T @ B of plain column selections of "
                    f"one dataset (no elementwise maps on them)")
    # torch checked the shapes: A is (k, n) and B is (n, ...), the same n records
    need = leaves[a.obj].min_rows
    rows = leaves[a.obj].shape[0]
    if rows < need:
        return _row(f"{what} spans {rows} records; at least {need} are needed")
    return _V(AGGREGATE, objs=frozenset({a.obj}))


# ------------------------------------------------------------------ decisions

@dataclass(frozen=True)
class Decision:
    """Whether a value may leave to the caller, on which basis ("owner", "get",
    "aggregate", "approved"), and otherwise why not (one line)."""
    allowed: bool
    basis: str = ""
    why: str = ""
    kind: str = ROW
    program_hash: str = ""
    datasets: frozenset = field(default_factory=frozenset)


def decide(derivation: Derivation, leaves: dict[str, Leaf], *, approved: Callable[[str], bool]
           ) -> Decision:
    """The gate for one caller, given its standing towards each object (`leaves`) and
    `approved(program_hash)` from the owner's request queue. Sans-IO."""
    verdict = classify(derivation, leaves)
    h = derivation.hash()
    if verdict.kind == KNOWN:
        return Decision(True, "get", kind=KNOWN, program_hash=h)
    if verdict.kind == AGGREGATE:
        return Decision(True, "aggregate", kind=AGGREGATE, program_hash=h,
                        datasets=verdict.datasets)
    if approved(h):
        return Decision(True, "approved", kind=ROW, program_hash=h)
    return Decision(False, why=verdict.why, kind=ROW, program_hash=h)


# ------------------------------------------------------------------ on the owner's peer

@register_error
class ComputeFailed(BadRequest):
    """A computation failed on the real data. Says nothing more: the failure may depend
    on values the caller may not see."""
    code = "compute_failed"


GENERIC_FAILURE = "the computation failed on the data (details are withheld: they depend on values)"


def standing(peer, caller, meta) -> str:
    """KNOWN, DATA or OPAQUE: what `caller` may take from the object `meta` (its rules,
    governance grants and roles, ownership: ``handlers.may``)."""
    from . import handlers as core  # handlers imports this module

    if core.may(peer, caller, meta, "get"):
        return KNOWN
    if core.may(peer, caller, meta, "aggregate"):
        return DATA
    return OPAQUE


def stored_derivation(peer, meta) -> Derivation | None:
    """The derivation of a result this peer computed and stored; None for base objects."""
    if meta.derivation and meta.owner == peer.name:
        return Derivation.from_json(meta.derivation)
    return None


async def _leaves(peer, caller, deriv: Derivation, metas: dict) -> dict[str, Leaf]:
    from .errors import NotFound

    out = {}
    for oid in deriv.leaves:
        meta = metas.get(oid)
        if meta is None:
            try:
                meta = await peer.meta(oid)
            except NotFound:
                continue  # classified as row-level: the object is gone
        out[oid] = Leaf(standing(peer, caller, meta), tuple(meta.shape), meta.dtype,
                        meta.rules.min_rows)
    return out


def _approved(peer, caller) -> Callable[[str], bool]:
    from .governance import policy as governance

    store = governance.of(peer).store
    return lambda h: store.has_grant(caller.name, approval_id(h), "release")


def approval_id(program_hash: str) -> str:
    """How an approved program is named in the governance grants table."""
    return f"program:{program_hash}"


async def gate(peer, caller, program: dict, metas: dict) -> tuple[Decision, Derivation]:
    """The release decision for running `program` (its direct leaves' metas in `metas`)
    as `caller`, and the program's derivation with stored results expanded."""
    deriv = expand(program, lambda oid: stored_derivation(peer, metas[oid]) if oid in metas
                   else None)
    leaves = await _leaves(peer, caller, deriv, metas)
    approved = _approved(peer, caller)
    return await _decide(deriv, leaves, approved), deriv


INLINE_NODES = 64   # derivations up to this size are decided on the event loop


async def _decide(deriv: Derivation, leaves: dict, approved) -> Decision:
    # up to MAX_EXPANDED meta ops: off the event loop, unless the derivation is small
    # (the thread's round trip then costs more than the decision)
    if len(deriv.nodes) <= INLINE_NODES:
        return decide(deriv, leaves, approved=approved)
    return await trio.to_thread.run_sync(lambda: decide(deriv, leaves, approved=approved))


async def gate_stored(peer, caller, meta) -> Decision | None:
    """The release decision for downloading a stored result (None: not a result; the
    object's own rules decide)."""
    deriv = stored_derivation(peer, meta)
    if deriv is None:
        return None
    leaves = await _leaves(peer, caller, deriv, {})
    approved = _approved(peer, caller)
    decision = await _decide(deriv, leaves, approved)
    if decision.allowed and deriv.failed:
        raise ComputeFailed(GENERIC_FAILURE)
    return decision


def refusal(peer, caller, decision: Decision) -> str:
    """One line: why `decision` keeps a value on the peer, and the ways out."""
    return (f"{caller.name} may not download this result: {decision.why}. It stays on "
            f"{peer.name}: keep it remote, take an aggregate you are granted, ask for a DP "
            f"release (epsilon=...), or ask the owner to approve this program")


def warn_unbounded(peer, meta, bounded: bool) -> None:
    """Log a WARNING when names that may compute on `meta` have neither ``get`` nor
    ``aggregate`` and no bounds are declared: they can get nothing out but what the
    owner approves (DP releases need bounds)."""
    r = meta.rules
    only = [n for n in r.compute if not (r.allows("get", n) or r.allows("aggregate", n))]
    if only and not bounded:
        log.warning("%s: %s may compute on %s but hold neither get nor aggregate, and no "
                    "bounds are declared for private queries: they get DP releases only once "
                    "you declare bounds (p2pgrid budget bounds %s ...), exact aggregates only "
                    "with an aggregate grant", peer.name, ", ".join(only), meta.id, meta.id)


def render(deriv: Derivation, limit: int = 700) -> str:
    """The derivation as one line an owner can read: ``#i=op(args)``, constants shown by
    dtype and shape."""
    def arg(a):
        if isinstance(a, dict) and len(a) == 1:
            (k, v), = a.items()
            if k == "$":
                return f"#{v}"
            if k == "tensor":
                return f"tensor<{v[0]}{v[1]}>"
            if k == "slice":
                return ":".join("" if x is None else arg(x) for x in v)
            if k == "tuple":
                return "(" + ", ".join(arg(x) for x in v) + ")"
            if k == "ellipsis":
                return "..."
            return str(v)
        return repr(a)
    parts = []
    for i, n in enumerate(deriv.nodes):
        if n["op"] == "leaf":
            parts.append(f"#{i}={n['obj']}")
        else:
            inner = [arg(a) for a in n["args"]] + [f"{k}={arg(v)}" for k, v in n["kwargs"].items()]
            parts.append(f"#{i}={n['op']}({', '.join(inner)})")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[:limit - 1] + "…"
