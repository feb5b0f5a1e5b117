"""Programs over shared tensors: a whitelisted op table, shape inference, a dataflow runner.

A *program* is what a client sends to every party of a computation:

    {"nodes": [{"op": "leaf", "id": "x1"},
               {"op": "matmul", "args": [{"$": 0}, {"$": 2}], "kwargs": {}}, ...],
     "outputs": [3]}

Nodes refer to earlier nodes with ``{"$": i}``; leaves name shared tensors the
party holds. Other arguments are constants: numbers, ``None``, ``{"slice": [a, b, c]}``,
``{"tuple": [...]}``, ``{"ellipsis": True}`` and public tensors ``{"tensor": t}``.
Ops come from the fixed table :data:`OPS` (never ``getattr`` on a wire string).

:func:`infer` checks a program on ``meta`` tensors (shapes only, no data), which the
client does while building it and every party does before any round.
:func:`run_program` is the party's protocol generator. It runs independent nodes side
by side: every running node's round goes into the same message, so ``(x @ w1).relu()``
and ``(x @ w2).relu()`` together take the rounds of one of them. All parties start and
resume nodes in index order, so their dealer requests stay in the same order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Mapping

import torch

from p2pgrid.errors import BadRequest, ShapeError, UnknownOp

from . import beaver, compare
from .messages import Round
from .runtime import PartyContext, Protocol
from .sharing import Shared, cat, stack

__all__ = ["OPS", "infer", "run_program", "signature", "plan_signature", "MAX_NODES", "decode_arg"]

MAX_NODES = 1024
MAX_CONST_ELEMENTS = 1 << 20
MAX_ELEMENTS = 1 << 26          # any value of a program (a party refuses bigger ones up front)


@dataclass(frozen=True)
class OpSpec:
    meta: Callable[..., torch.Tensor]   # plaintext semantics on meta tensors (shape check)
    run: Callable[..., Any]             # (ctx, *args, **kwargs) -> Shared or a protocol generator
    protocol: bool = False              # needs rounds (for docs and planning only)


def _is_shared(v) -> bool:
    return isinstance(v, Shared)


def _need_shared(op: str, *vals) -> None:
    if not any(_is_shared(v) for v in vals):
        raise BadRequest(f"{op}: no shared operand; compute on public values locally")


def _add(ctx, a, b):
    _need_shared("add", a, b)
    return a + b if _is_shared(a) else b + a


def _sub(ctx, a, b):
    _need_shared("sub", a, b)
    return a - b if _is_shared(a) else (-b) + a


def _div(ctx, a, d):
    if not _is_shared(a) or _is_shared(d) or not isinstance(d, Real) or isinstance(d, bool):
        raise BadRequest("div: only a shared tensor divided by a public number")
    return beaver.div_public(ctx, a, float(d))


def _mul(ctx, a, b):
    _need_shared("mul", a, b)
    return beaver.mul(ctx, a, b)


def _matmul(ctx, a, b):
    _need_shared("matmul", a, b)
    return beaver.matmul(ctx, a, b)


def _cmp(fn):
    def run(ctx, a, b):
        _need_shared("comparison", a, b)
        return fn(ctx, a, b)
    return run


def _local(method: Callable[..., Shared]):
    def run(ctx, a, *args, **kwargs):
        if not _is_shared(a):
            raise BadRequest("expected a shared tensor as the first operand")
        return method(a, *args, **kwargs)
    return run


def _cat_run(ctx, xs, dim=0):
    return cat(list(xs), dim)


def _stack_run(ctx, xs, dim=0):
    return stack(list(xs), dim)


def _max_run(ctx, a, dim=None):
    return compare.max(ctx, a, dim)


def _argmax_run(ctx, a, dim=-1, one_hot=True):
    return compare.argmax(ctx, a, dim, one_hot=one_hot)


def _meta_max(a, dim=None):
    return a.amax() if dim is None else a.amax(dim)


def _meta_argmax(a, dim=-1, one_hot=True):
    return a.clone() if one_hot else a.argmax(dim).to(a.dtype)


def _meta_div(a, d):
    if not isinstance(d, Real) or isinstance(d, bool):
        raise TypeError("the divisor must be a public number")
    return a / d


OPS: dict[str, OpSpec] = {
    "add": OpSpec(torch.add, _add),
    "sub": OpSpec(torch.sub, _sub),
    "neg": OpSpec(torch.neg, _local(Shared.__neg__)),
    "mul": OpSpec(torch.mul, _mul, True),
    "matmul": OpSpec(torch.matmul, _matmul, True),
    "div": OpSpec(_meta_div, _div, True),
    "square": OpSpec(torch.square, lambda ctx, a: beaver.mul(ctx, a, a), True),
    "relu": OpSpec(torch.relu, lambda ctx, a: compare.relu(ctx, a), True),
    "ge": OpSpec(torch.ge, _cmp(compare.ge), True),
    "gt": OpSpec(torch.gt, _cmp(compare.gt), True),
    "le": OpSpec(torch.le, _cmp(compare.le), True),
    "lt": OpSpec(torch.lt, _cmp(compare.lt), True),
    "max": OpSpec(_meta_max, _max_run, True),
    "argmax": OpSpec(_meta_argmax, _argmax_run, True),
    "sum": OpSpec(lambda a, dim=None, keepdim=False: a.sum() if dim is None else a.sum(dim, keepdim),
                  _local(Shared.sum)),
    "mean": OpSpec(lambda a, dim=None, keepdim=False: a.mean() if dim is None else a.mean(dim, keepdim),
                   lambda ctx, a, dim=None, keepdim=False: beaver.mean(ctx, a, dim, keepdim), True),
    "reshape": OpSpec(lambda a, shape: a.reshape(shape),
                      _local(lambda a, shape: a.reshape(*shape))),
    "getitem": OpSpec(lambda a, index: a[index], _local(Shared.__getitem__)),
    "transpose": OpSpec(torch.transpose, _local(Shared.transpose)),
    "permute": OpSpec(lambda a, dims: a.permute(*dims), _local(lambda a, dims: a.permute(*dims))),
    "flatten": OpSpec(torch.flatten, _local(Shared.flatten)),
    "unsqueeze": OpSpec(torch.unsqueeze, _local(Shared.unsqueeze)),
    "squeeze": OpSpec(lambda a, dim=None: a.squeeze() if dim is None else a.squeeze(dim),
                      _local(Shared.squeeze)),
    "cat": OpSpec(lambda xs, dim=0: torch.cat(list(xs), dim), _cat_run),
    "stack": OpSpec(lambda xs, dim=0: torch.stack(list(xs), dim), _stack_run),
}


# ---------------------------------------------------------------- decoding

def decode_arg(arg, ref: Callable[[int], Any]):
    """Wire form -> Python value; ``{"$": i}`` becomes ``ref(i)``."""
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, torch.Tensor):
        return arg
    if isinstance(arg, dict) and len(arg) == 1:
        (key, v), = arg.items()
        if key == "$":
            if not isinstance(v, int) or isinstance(v, bool):
                raise BadRequest("a node reference must be an integer")
            return ref(v)
        if key == "slice" and isinstance(v, (list, tuple)) and len(v) == 3:
            parts = [decode_arg(x, ref) for x in v]
            if not all(p is None or isinstance(p, int) and not isinstance(p, bool) for p in parts):
                raise BadRequest("slice bounds must be integers or null")
            return slice(*parts)
        if key == "ellipsis":
            return Ellipsis
        if key == "tuple" and isinstance(v, (list, tuple)):
            return tuple(decode_arg(x, ref) for x in v)
        if key == "tensor" and isinstance(v, torch.Tensor):
            if v.numel() > MAX_CONST_ELEMENTS:
                raise BadRequest("constant tensor too large")
            if v.dtype == torch.bool:
                raise BadRequest("boolean constants are not numbers here")
            return v
    raise BadRequest(f"cannot decode program argument of type {type(arg).__name__}")


def _nodes(program) -> tuple[list[dict], list[int]]:
    if not isinstance(program, Mapping) or not isinstance(program.get("nodes"), (list, tuple)):
        raise BadRequest("a program is a map with a list of nodes")
    nodes = list(program["nodes"])
    if not nodes or len(nodes) > MAX_NODES:
        raise BadRequest(f"a program has 1 to {MAX_NODES} nodes")
    outputs = program.get("outputs", [len(nodes) - 1])
    if not isinstance(outputs, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(nodes) for i in outputs):
        raise BadRequest("program outputs must index its nodes")
    for n in nodes:
        if not isinstance(n, Mapping) or not isinstance(n.get("op"), str):
            raise BadRequest("every program node is a map with an op name")
        if n["op"] != "leaf" and n["op"] not in OPS:
            raise UnknownOp(f"unknown SMPC op {n['op']!r}")
    return nodes, list(outputs)


def _args(node: Mapping, index: int, ref: Callable[[int], Any]) -> tuple[list, dict]:
    def checked(i: int):
        if not 0 <= i < index:
            raise BadRequest(f"node {index} refers to node {i}, which is not an earlier node")
        return ref(i)
    args = node.get("args", [])
    kwargs = node.get("kwargs", {})
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping):
        raise BadRequest("node args must be a list and kwargs a map")
    return ([decode_arg(a, checked) for a in args],
            {str(k): decode_arg(v, checked) for k, v in kwargs.items()})


def leaf_ids(program) -> list[str]:
    nodes, _ = _nodes(program)
    out = []
    for n in nodes:
        if n["op"] == "leaf":
            if not isinstance(n.get("id"), str):
                raise BadRequest("a leaf names a shared tensor by id")
            out.append(n["id"])
    return list(dict.fromkeys(out))


_INFERRED: dict[str, list[torch.Size]] = {}   # signature -> output shapes (bounded below)


def infer(program, leaf_shapes: Mapping[str, tuple]) -> list[torch.Size]:
    """Output shapes of `program` given its leaves' shapes; ShapeError/BadRequest if it does not fit.

    Shapes follow from what :func:`signature` hashes (structure, shapes, non-tensor
    arguments; tensor constants only by shape, as meta tensors carry no values), so a
    program met again is answered from a cache: a session repeats its program often."""
    try:
        key = signature(program, leaf_shapes)
    except Exception:  # noqa: BLE001 - malformed: _infer says what is wrong, typed
        return _infer(program, leaf_shapes)
    hit = _INFERRED.get(key)
    if hit is None:
        hit = _infer(program, leaf_shapes)
        if len(_INFERRED) >= 512:
            _INFERRED.clear()
        _INFERRED[key] = hit
    return list(hit)


def _infer(program, leaf_shapes: Mapping[str, tuple]) -> list[torch.Size]:
    metas, outputs = _metas(program, leaf_shapes)
    for i in outputs:
        if not isinstance(metas[i], torch.Tensor):
            raise BadRequest(f"program output {i} is not a tensor")
    return [metas[i].shape for i in outputs]


def _metas(program, leaf_shapes: Mapping[str, tuple]) -> tuple[list[Any], list[int]]:
    """Every node's value on meta tensors (shapes only) and the output indices."""
    nodes, outputs = _nodes(program)
    metas: list[Any] = []
    for i, n in enumerate(nodes):
        if n["op"] == "leaf":
            shape = leaf_shapes.get(n.get("id"))
            if shape is None:
                raise BadRequest(f"node {i}: unknown shared tensor {n.get('id')!r}")
            metas.append(torch.empty(tuple(shape), dtype=torch.float64, device="meta"))
            continue
        args, kwargs = _args(n, i, lambda j: metas[j])
        args = [_to_meta(a) for a in args]
        kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
        try:
            metas.append(OPS[n["op"]].meta(*args, **kwargs))
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ShapeError(f"{n['op']}: {first}") from None
        if isinstance(metas[-1], torch.Tensor) and metas[-1].numel() > MAX_ELEMENTS:
            raise BadRequest(f"node {i} ({n['op']}) would have {metas[-1].numel()} elements; "
                             f"at most {MAX_ELEMENTS}")
    return metas, outputs


def _to_meta(v):
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return v.to(device="meta", dtype=torch.float64) if v.is_floating_point() else v.to("meta")
    if isinstance(v, tuple):
        return tuple(_to_meta(x) for x in v)
    return v


def signature(program, leaf_shapes: Mapping[str, tuple], extra=()) -> str:
    """A hash of the program's structure and shapes (not its tensor constants' values, not
    leaf ids): programs with equal signatures consume the same dealer material."""
    return _signature(program, leaf_shapes, extra, None)


def plan_signature(program, leaves: Mapping[str, tuple], extra=()) -> str:
    """:func:`signature` with slice bounds left out and every node's shape put in:
    the key of a session's plan (its dealer requests). `leaves` maps leaf ids to
    (shape, scale). Which rows a slice takes moves no material, only how many it takes
    (its node's shape) does, so the batches x[0:8], x[8:16], ... of a training loop share
    one plan: an active plan is a full dry run of the session, as costly as the session."""
    metas, _ = _metas(program, {i: s for i, (s, _) in leaves.items()})
    shapes = [list(m.shape) if isinstance(m, torch.Tensor) else None for m in metas]
    return _signature(program, leaves, (list(extra), shapes), "slice")


def _signature(program, leaf_shapes: Mapping[str, tuple], extra, blank: str | None) -> str:
    nodes, outputs = _nodes(program)
    ids: dict[str, int] = {}

    def norm(v):
        if isinstance(v, torch.Tensor):
            return ["T", list(v.shape), str(v.dtype)]
        if blank is not None and isinstance(v, Mapping) and set(v) == {blank}:
            return blank
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    parts = []
    for n in nodes:
        if n["op"] == "leaf":
            k = ids.setdefault(n["id"], len(ids))
            parts.append(["leaf", k, list(leaf_shapes[n["id"]])])
        else:
            parts.append([n["op"], norm(n.get("args", [])), norm(n.get("kwargs", {}))])
    blob = repr((parts, outputs, list(extra))).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ---------------------------------------------------------------- running

def run_program(ctx: PartyContext, program, leaves: Mapping[str, Shared], *,
                ops: Mapping[str, OpSpec] | None = None, shared: type = Shared
                ) -> Protocol[list[Shared]]:
    """This party's protocol for `program`; returns its shares of the outputs, in order.
    `ops`: the op table (default :data:`OPS`; actively secure programs pass theirs, and
    their `shared` type)."""
    ops = OPS if ops is None else ops
    nodes, outputs = _nodes(program)
    n = len(nodes)
    values: list[Any] = [None] * n
    done = [False] * n
    deps: list[set[int]] = []
    for i, node in enumerate(nodes):
        d: set[int] = set()
        if node["op"] != "leaf":
            _args(node, i, lambda j, d=d: d.add(j))
        deps.append(d)
    running: dict[int, tuple[Any, Round]] = {}
    started = [False] * n

    def start_ready() -> None:
        progress = True
        while progress:
            progress = False
            for i in range(n):
                if started[i] or not all(done[j] for j in deps[i]):
                    continue
                started[i] = progress = True
                node = nodes[i]
                if node["op"] == "leaf":
                    x = leaves.get(node["id"])
                    if x is None:
                        raise BadRequest(f"no shared tensor {node['id']!r} on this party")
                    values[i], done[i] = ctx.check_shared(x, "program"), True
                    continue
                args, kwargs = _args(node, i, lambda j: values[j])
                out = ops[node["op"]].run(ctx, *args, **kwargs)
                if hasattr(out, "send") and hasattr(out, "throw"):   # a protocol generator
                    try:
                        running[i] = (out, next(out))
                    except StopIteration as fin:
                        values[i], done[i] = fin.value, True
                else:
                    values[i], done[i] = out, True

    start_ready()
    while running:
        broadcast: dict[str, torch.Tensor] = {}
        direct: dict[int, dict[str, torch.Tensor]] = {}
        for i, (_, rnd) in sorted(running.items()):
            for k, v in rnd.broadcast.items():
                broadcast[f"{i}/{k}"] = v
            for to, payload in rnd.direct.items():
                box = direct.setdefault(to, {})
                for k, v in payload.items():
                    box[f"{i}/{k}"] = v
        tag = "df(" + ",".join(f"{i}:{r.tag}" for i, (_, r) in sorted(running.items())) + ")"
        if len(tag) > 120:
            tag = "df#" + hashlib.sha1(tag.encode()).hexdigest()[:16]
        inbox = yield Round(tag, broadcast, direct)
        for i in sorted(running):
            gen, _ = running[i]
            prefix = f"{i}/"
            sub = {}
            for sender, payload in inbox.items():
                part = {k[len(prefix):]: v for k, v in payload.items() if k.startswith(prefix)}
                if part:
                    sub[sender] = part
            try:
                running[i] = (gen, gen.send(sub))
            except StopIteration as fin:
                del running[i]
                values[i], done[i] = fin.value, True
        start_ready()
    result = []
    for i in outputs:
        if not isinstance(values[i], shared):
            raise BadRequest(f"program output {i} is not a shared tensor")
        result.append(values[i])
    return result
