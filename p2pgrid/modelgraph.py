"""Models that travel as data: whitelisted modules, an op program and tensors.

A peer never unpickles, imports or evals anything it receives. :func:`export_model`
traces a model with ``torch.fx`` and writes it as

* ``modules``: the module tree; leaves are whitelisted ``torch.nn`` layers with their
  constructor kwargs, inner nodes are plain containers (with their own parameters
  and buffers declared by shape);
* ``forward``: the FX graph as a list of ``{"op", "args", "kwargs", "out"}`` steps
  whose ops name entries of a fixed table (:data:`OPS`), never Python objects;
* ``state``: every parameter and buffer, by qualified name.

:func:`import_model` checks all of it against the tables, builds the layers on the
meta device to check the state's shapes before allocating anything, and returns a
:class:`GraphModel` whose ``forward`` interprets the program.

Limits. ``forward`` must be traceable by FX: no data-dependent control flow, no
``*args``; Python values read while tracing are frozen into the program (so
``F.dropout(x, training=self.training)`` keeps the mode it was exported in: use
``nn.Dropout``). A program can still ask for large intermediate tensors (tensor
factories are capped at 2^28 elements, matmuls of large inputs are not): run
imported models under the peer's memory and time limits.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> spec = export_model(net)
>>> [step["op"] for step in spec["forward"]]
['input', 'module', 'module', 'output']
>>> back = import_model(spec)
>>> x = torch.randn(2, 4)
>>> torch.equal(back(x), net(x))
True
"""

from __future__ import annotations

import builtins
import hashlib
import math
import operator
import re
from typing import Any, Callable

import cbor2
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadRequest, ShapeError, UnknownOp, register_error

__all__ = ["FORMAT", "export_model", "import_model", "model_hash", "GraphModel", "Untraceable",
           "LAYERS", "OPS"]

FORMAT = "p2pgrid.model/1"
_MAX_DEPTH = 32
_MAX_STEPS = 100_000
_NAME = re.compile(r"[A-Za-z0-9_]{1,128}")


@register_error
class Untraceable(UnknownOp):
    """The model's forward cannot be written as a static program (e.g. data-dependent control flow)."""
    code = "untraceable_model"


def _bad(where: str, what: str) -> BadRequest:
    return BadRequest(f"model spec: {where}: {what}")


# ------------------------------------------------------------- kwarg checkers
# Each checker takes (value, where) and returns the value as the constructor wants it.

def _int(lo=-(1 << 31), hi=1 << 31):
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _bad(where, f"expected an int in [{lo}, {hi}]")
        return v
    return check


def _float(lo=-math.inf, hi=math.inf):
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise _bad(where, f"expected a number in [{lo}, {hi}]")
        return float(v)
    return check


def _bool(v, where):
    if not isinstance(v, bool):
        raise _bad(where, "expected a bool")
    return v


def _opt(check):
    return lambda v, where: None if v is None else check(v, where)


def _choice(*values):
    def check(v, where):
        if v not in values or not isinstance(v, str):
            raise _bad(where, f"expected one of {values}")
        return v
    return check


def _ints(n: int | None, item):
    """An int, or a list of `n` (any number if None) items, as a tuple."""
    def check(v, where):
        if isinstance(v, (list, tuple)):
            if (n is not None and len(v) != n) or not 1 <= len(v) <= 8:
                raise _bad(where, f"expected {n or 'some'} items")
            return tuple(item(x, where) for x in v)
        return item(v, where)
    return check


def _either(*checks):
    def check(v, where):
        for c in checks:
            try:
                return c(v, where)
            except BadRequest:
                pass
        raise _bad(where, "value of an unexpected kind")
    return check


_DIM = _int(1, 1 << 30)
_SIZE = _int(0, 1 << 30)
_AXIS = _int(-64, 64)
_PROB = _float(0.0, 1.0)
_POS = _float(0.0, math.inf)


def _conv(n):
    return {"in_channels": _DIM, "out_channels": _DIM, "kernel_size": _ints(n, _DIM),
            "stride": _ints(n, _DIM), "padding": _either(_choice("same", "valid"), _ints(n, _SIZE)),
            "dilation": _ints(n, _DIM), "groups": _DIM, "bias": _bool,
            "padding_mode": _choice("zeros", "reflect", "replicate", "circular")}


def _maxpool(n):
    return {"kernel_size": _ints(n, _DIM), "stride": _opt(_ints(n, _DIM)), "padding": _ints(n, _SIZE),
            "dilation": _ints(n, _DIM), "return_indices": _bool, "ceil_mode": _bool}


def _avgpool(n):
    spec = {"kernel_size": _ints(n, _DIM), "stride": _opt(_ints(n, _DIM)), "padding": _ints(n, _SIZE),
            "ceil_mode": _bool, "count_include_pad": _bool}
    if n == 2:
        spec["divisor_override"] = _opt(_DIM)
    return spec


def _rnn(extra=None):
    spec = {"input_size": _DIM, "hidden_size": _DIM, "num_layers": _int(1, 64), "bias": _bool,
            "batch_first": _bool, "dropout": _PROB, "bidirectional": _bool}
    spec.update(extra or {})
    return spec


# name -> (class, {constructor kwarg: checker}). Export reads each kwarg from the
# module attribute of the same name, except where _GETTERS says otherwise.
LAYERS: dict[str, tuple[type[nn.Module], dict[str, Callable]]] = {
    "Linear": (nn.Linear, {"in_features": _SIZE, "out_features": _SIZE, "bias": _bool}),
    "Conv1d": (nn.Conv1d, _conv(1)),
    "Conv2d": (nn.Conv2d, _conv(2)),
    "MaxPool1d": (nn.MaxPool1d, _maxpool(1)),
    "MaxPool2d": (nn.MaxPool2d, _maxpool(2)),
    "AvgPool1d": (nn.AvgPool1d, _avgpool(1)),
    "AvgPool2d": (nn.AvgPool2d, _avgpool(2)),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, {"output_size": _ints(1, _opt(_DIM))}),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, {"output_size": _ints(2, _opt(_DIM))}),
    "ReLU": (nn.ReLU, {"inplace": _bool}),
    "LeakyReLU": (nn.LeakyReLU, {"negative_slope": _float(), "inplace": _bool}),
    "ELU": (nn.ELU, {"alpha": _float(), "inplace": _bool}),
    "SiLU": (nn.SiLU, {"inplace": _bool}),
    "GELU": (nn.GELU, {"approximate": _choice("none", "tanh")}),
    "Tanh": (nn.Tanh, {}),
    "Sigmoid": (nn.Sigmoid, {}),
    "Softmax": (nn.Softmax, {"dim": _opt(_AXIS)}),
    "LogSoftmax": (nn.LogSoftmax, {"dim": _opt(_AXIS)}),
    "Dropout": (nn.Dropout, {"p": _PROB, "inplace": _bool}),
    "Dropout2d": (nn.Dropout2d, {"p": _PROB, "inplace": _bool}),
    "Embedding": (nn.Embedding, {"num_embeddings": _DIM, "embedding_dim": _DIM,
                                 "padding_idx": _opt(_int(0, 1 << 30)), "max_norm": _opt(_POS),
                                 "norm_type": _POS, "scale_grad_by_freq": _bool, "sparse": _bool}),
    "LayerNorm": (nn.LayerNorm, {"normalized_shape": _ints(None, _DIM), "eps": _POS,
                                 "elementwise_affine": _bool, "bias": _bool}),
    "BatchNorm1d": (nn.BatchNorm1d, {"num_features": _DIM, "eps": _POS, "momentum": _opt(_PROB),
                                     "affine": _bool, "track_running_stats": _bool}),
    "BatchNorm2d": (nn.BatchNorm2d, {"num_features": _DIM, "eps": _POS, "momentum": _opt(_PROB),
                                     "affine": _bool, "track_running_stats": _bool}),
    "GRU": (nn.GRU, _rnn()),
    "LSTM": (nn.LSTM, _rnn({"proj_size": _int(0, 1 << 30)})),
    "Flatten": (nn.Flatten, {"start_dim": _AXIS, "end_dim": _AXIS}),
    "Unflatten": (nn.Unflatten, {"dim": _AXIS, "unflattened_size": _ints(None, _DIM)}),
    "Identity": (nn.Identity, {}),
}
_LAYER_NAMES = {cls: name for name, (cls, _) in LAYERS.items()}
_GETTERS = {"bias": lambda m: m.bias is not None if isinstance(m.bias, (torch.Tensor, type(None))) else m.bias}
_CONTAINER_TYPES = {"Module": nn.Module, "Sequential": nn.Sequential, "ModuleList": nn.ModuleList,
                    "ModuleDict": nn.ModuleDict}


def _is_torch_layer(m: nn.Module) -> bool:
    mod = type(m).__module__
    return ((mod.startswith("torch.nn") or mod.startswith("torch.ao.nn"))
            and type(m) not in _CONTAINER_TYPES.values())


# ------------------------------------------------------------------ the op table

def _getattr_op(obj, name):
    if not isinstance(name, str) or name not in _ATTRS:
        raise UnknownOp(f"attribute {name!r} is not whitelisted")
    return _ATTRS[name](obj)


_ATTRS = {"shape": lambda t: t.shape, "dtype": lambda t: t.dtype, "device": lambda t: t.device,
          "T": lambda t: t.T, "mT": lambda t: t.mT, "ndim": lambda t: t.ndim}

_MAX_NUMEL = 1 << 28  # the most elements one creation op of a program may ask for


def _no_sequences(fn):
    """Python's * and % also repeat and format sequences: a program may only use them on numbers."""
    def op(a, b):
        if isinstance(a, (str, bytes, list, tuple)) or isinstance(b, (str, bytes, list, tuple)):
            raise UnknownOp(f"{fn.__name__} on a sequence is not allowed")
        return fn(a, b)
    return op


def _pow(a, b):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and abs(b) > 64:
        raise UnknownOp("power of two numbers with an exponent above 64 is not allowed")
    return operator.pow(a, b)


def _capped(fn, size_args: Callable):
    """A tensor factory that refuses to allocate more than _MAX_NUMEL elements."""
    def op(*args, **kwargs):
        n = size_args(*args, **kwargs)
        if n > _MAX_NUMEL:
            raise ShapeError(f"{fn.__name__} would create {n} elements (limit {_MAX_NUMEL})")
        return fn(*args, **kwargs)
    return op


def _numel_of_size(*args, **kwargs):
    size = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    size = kwargs.get("size", size)
    return math.prod(int(d) for d in size)


def _numel_of_full(size, *args, **kwargs):
    return math.prod(int(d) for d in size)


def _numel_of_arange(*args, **kwargs):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (tuple(args) + (1,))[:3]
    return math.ceil(abs((float(end) - float(start)) / float(step or 1)))


def _numel_of_repeat(t, *sizes):
    sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
    return t.numel() * math.prod(int(d) for d in sizes)


# Functions FX records as call_function, by the name they travel under.
_FUNCTIONS: dict[str, Callable] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "truediv", "floordiv", "matmul", "neg", "getitem",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "invert")},
    "operator.mul": _no_sequences(operator.mul),
    "operator.mod": _no_sequences(operator.mod),
    "operator.pow": _pow,
    "getattr": _getattr_op,
    **{f"torch.{n}": getattr(torch, n) for n in (
        "add", "sub", "mul", "div", "matmul", "bmm", "einsum", "cat", "stack", "flatten", "reshape",
        "transpose", "permute", "unsqueeze", "squeeze", "chunk", "split", "softmax", "log_softmax",
        "relu", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "pow", "erf", "clamp",
        "mean", "sum", "max", "min", "amax", "argmax", "cumsum", "tril", "triu", "where",
        "masked_fill", "ones", "zeros", "full", "arange", "ones_like", "zeros_like", "full_like",
        "select", "narrow", "t", "baddbmm", "addmm", "layer_norm")},
    **{f"F.{n}": getattr(F, n) for n in (
        "relu", "gelu", "silu", "elu", "leaky_relu", "tanh", "sigmoid", "softmax", "log_softmax",
        "dropout", "layer_norm", "linear", "embedding", "scaled_dot_product_attention", "pad",
        "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "normalize", "conv1d", "conv2d")},
}
_FUNCTION_NAMES = {id(f): n for n, f in _FUNCTIONS.items()}
_FUNCTION_NAMES.update({id(builtins.getattr): "getattr", id(operator.mul): "operator.mul",
                        id(operator.mod): "operator.mod", id(operator.pow): "operator.pow"})
for _name in ("ones", "zeros"):
    _FUNCTIONS[f"torch.{_name}"] = _capped(getattr(torch, _name), _numel_of_size)
_FUNCTIONS["torch.full"] = _capped(torch.full, _numel_of_full)
_FUNCTIONS["torch.arange"] = _capped(torch.arange, _numel_of_arange)

# Tensor methods FX records as call_method, by method name.
_METHOD_LIST = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "transpose", "permute", "contiguous",
    "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "size", "dim", "numel", "chunk", "split",
    "mean", "sum", "max", "min", "amax", "argmax", "std", "var", "norm", "softmax", "log_softmax",
    "masked_fill", "matmul", "bmm", "add", "sub", "mul", "div", "pow", "sqrt", "rsqrt", "exp", "log",
    "tanh", "sigmoid", "relu", "neg", "abs", "clamp", "t", "tril", "triu", "float", "double", "half",
    "long", "int", "bool", "to", "type_as", "detach", "clone", "select", "narrow", "cumsum", "eq",
    "ne", "lt", "gt", "le", "ge")
_METHODS: dict[str, Callable] = {f"tensor.{n}": getattr(torch.Tensor, n) for n in _METHOD_LIST}
_METHODS["tensor.repeat"] = _capped(torch.Tensor.repeat, _numel_of_repeat)

#: Every op a program may name, besides the structural input/output/module/attr.
OPS: dict[str, Callable] = {**_FUNCTIONS, **_METHODS}
_BANNED_KWARGS = {"out"}

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}
_DTYPE_NAMES = {d: n for n, d in _DTYPES.items()}


# ------------------------------------------------------------------------ export

class _Tracer(torch.fx.Tracer):
    """Whitelisted layers are leaves; everything else is traced through."""

    def __init__(self):
        super().__init__()
        self.proxy_buffer_attributes = True  # so `self.mask[:, :T]` traces with a symbolic T
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _LAYER_NAMES

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"{self.path_of_module(m) or '<root>'} ({type(m).__name__})"
            raise


def _where(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the root module"
    path, cls = list(stack.values())[-1]
    return f"module {path!r} ({getattr(cls, '__name__', cls)})"


def _export_tree(m: nn.Module, path: str, depth: int = 0) -> dict:
    if depth > _MAX_DEPTH:
        raise UnknownOp(f"module tree deeper than {_MAX_DEPTH} at {path!r}")
    layer = _LAYER_NAMES.get(type(m))
    if layer is not None:
        _, kwargs = LAYERS[layer]
        values = {}
        for k in kwargs:
            v = _GETTERS[k](m) if k in _GETTERS else getattr(m, k)
            values[k] = list(v) if isinstance(v, tuple) else v
        return {"type": layer, "kwargs": values}
    if _is_torch_layer(m):
        raise UnknownOp(f"module {path or '<root>'!r} is a {type(m).__name__}, which is not whitelisted",
                        module=type(m).__name__, path=path)
    kind = next((k for k, cls in _CONTAINER_TYPES.items() if type(m) is cls), "Module")
    node = {"type": kind, "children": {},
            "params": {n: {"shape": list(p.shape)} for n, p in m._parameters.items() if p is not None},
            "buffers": {n: {"shape": list(b.shape), "persistent": n not in m._non_persistent_buffers_set}
                        for n, b in m._buffers.items() if b is not None}}
    for name, child in m.named_children():
        node["children"][name] = _export_tree(child, f"{path}.{name}" if path else name, depth + 1)
    return node


def _export_value(v, where: str):
    if isinstance(v, torch.fx.Node):
        return {"ref": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_export_value(x, where) for x in v]
    if isinstance(v, tuple):  # torch.Size included
        return {"tuple": [_export_value(x, where) for x in v]}
    if isinstance(v, slice):
        return {"slice": [_export_value(x, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype) and v in _DTYPE_NAMES:
        return {"dtype": _DTYPE_NAMES[v]}
    if isinstance(v, torch.device) and v.type == "cpu":
        return {"device": "cpu"}
    raise UnknownOp(f"{where}: a constant of type {type(v).__name__} cannot travel in a model")


def _export_program(gm: torch.fx.GraphModule, tensor_names: set[str]) -> tuple[list, dict]:
    program, constants = [], {}
    for node in gm.graph.nodes:
        where = f"node {node.name!r} in {_where(node)}"
        step: dict[str, Any] = {"op": None, "args": [], "kwargs": {}, "out": node.name}
        if node.op == "placeholder":
            if str(node.target).startswith("*"):
                raise UnknownOp(f"forward(*args/**kwargs) is not supported ({node.target})")
            step["op"] = "input"
            step["args"] = [_export_value(a, where) for a in node.args]  # a default, if any
        elif node.op == "output":
            step["op"] = "output"
            step["args"] = [_export_value(node.args[0], where)]
        elif node.op == "call_module":
            step["op"], step["target"] = "module", node.target
        elif node.op == "get_attr":
            step["op"], step["target"] = "attr", node.target
            if node.target not in tensor_names:
                value = getattr(gm, node.target)
                if not isinstance(value, torch.Tensor) or "." in node.target:
                    raise UnknownOp(f"{where}: attribute {node.target!r} is not a parameter or buffer")
                constants[node.target] = value.detach().clone()
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                fn = getattr(node.target, "__qualname__", None) or repr(node.target)
                mod = getattr(node.target, "__module__", None) or ""
                raise UnknownOp(f"function {mod + '.' if mod else ''}{fn} in {_where(node)} is not "
                                f"whitelisted", op=f"{mod}.{fn}")
            if name == "getattr" and node.args[1] not in _ATTRS:
                raise UnknownOp(f"attribute .{node.args[1]} in {_where(node)} is not whitelisted",
                                op=f"getattr.{node.args[1]}")
            step["op"] = name
        elif node.op == "call_method":
            name = f"tensor.{node.target}"
            if name not in _METHODS:
                raise UnknownOp(f"method .{node.target}() in {_where(node)} is not whitelisted",
                                op=name)
            step["op"] = name
        else:  # pragma: no cover - FX has no other node kinds today
            raise UnknownOp(f"FX node kind {node.op!r} is not supported")
        if node.op not in ("placeholder", "output"):
            step["args"] = [_export_value(a, where) for a in node.args]
            step["kwargs"] = {k: _export_value(v, where) for k, v in node.kwargs.items()}
            if _BANNED_KWARGS & set(step["kwargs"]):
                raise UnknownOp(f"{where}: out= arguments are not allowed")
        program.append(step)
    return program, constants


def _export_state(model: nn.Module) -> tuple[dict, dict, list]:
    state, tied, frozen, seen = {}, {}, [], {}
    tensors = [(n, p, True) for n, p in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, b, False) for n, b in model.named_buffers(remove_duplicate=False)]
    for name, t, is_param in tensors:
        if id(t) in seen:
            tied[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        state[name] = t.detach().clone()
        if is_param and not t.requires_grad:
            frozen.append(name)
    return state, tied, frozen


def _layer_program(cls: type[nn.Module]) -> list[dict]:
    """The program of a model that is one whitelisted layer: its inputs, one call, the output.

    Tracing the layer's own forward would freeze Python values such as ``self.training``
    (Dropout, BatchNorm) and fail on RNNs; a call of the layer keeps its real behaviour.
    """
    import inspect
    program, refs = [], []
    for name, p in list(inspect.signature(cls.forward).parameters.items())[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        step = {"op": "input", "args": [], "kwargs": {}, "out": name}
        if p.default is not p.empty:
            if p.default is not None and not isinstance(p.default, (bool, int, float)):
                break
            step["args"] = [p.default]
        program.append(step)
        refs.append({"ref": name})
    program.append({"op": "module", "target": "", "args": refs, "kwargs": {}, "out": "layer"})
    program.append({"op": "output", "args": [{"ref": "layer"}], "kwargs": {}, "out": "output"})
    return program


def export_model(model: nn.Module) -> dict:
    """Write `model` as a CBOR-able spec; UnknownOp names anything outside the whitelist."""
    if isinstance(model, GraphModel):
        return model.export()
    if isinstance(model, torch.jit.ScriptModule):   # read as data, never run: p2pgrid.torchscript
        from .torchscript import from_torchscript
        return export_model(from_torchscript(model))
    modules = _export_tree(model, "")
    if type(model) in _LAYER_NAMES:
        state, tied, frozen = _export_state(model)
        return {"format": FORMAT, "modules": modules, "forward": _layer_program(type(model)),
                "state": state, "constants": {}, "tied": tied, "frozen": frozen}
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except UnknownOp:
        raise
    except Exception as e:
        inside = f" in {tracer.failed_in}" if tracer.failed_in else ""
        raise Untraceable(f"cannot trace {type(model).__name__}{inside}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''} (data-dependent control flow "
                          f"and non-tensor Python are not supported)", model=type(model).__name__) from None
    gm = torch.fx.GraphModule(tracer.root, graph)
    state, tied, frozen = _export_state(model)
    program, constants = _export_program(gm, set(state) | set(tied))
    return {"format": FORMAT, "modules": modules, "forward": program, "state": state,
            "constants": constants, "tied": tied, "frozen": frozen}


# ------------------------------------------------------------------------ import

def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(where, "names must be 1-128 characters of [A-Za-z0-9_]")
    return name


def _dict(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise _bad(where, f"expected a map, got {type(v).__name__}")
    return v


def _shape(v, where: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > 32 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in v):
        raise _bad(where, "a shape must be a list of at most 32 non-negative ints")
    return tuple(v)


def _build_tree(spec, path: str, depth: int = 0) -> nn.Module:
    where = path or "<root>"
    spec = _dict(spec, f"module {where}")
    if depth > _MAX_DEPTH:
        raise _bad(where, f"module tree deeper than {_MAX_DEPTH}")
    kind = spec.get("type")
    if isinstance(kind, str) and kind in LAYERS:
        cls, schema = LAYERS[kind]
        kwargs = _dict(spec.get("kwargs", {}), f"{where}.kwargs")
        unknown = set(kwargs) - set(schema)
        if unknown:
            raise _bad(where, f"{kind} takes no arguments {sorted(map(str, unknown))}")
        args = {k: schema[k](v, f"{where}.{k}") for k, v in kwargs.items()}
        try:
            with torch.device("meta"):
                return cls(**args)
        except Exception as e:  # a whitelisted layer refusing checked arguments
            raise _bad(where, f"cannot build {kind}: {type(e).__name__}: {e}") from None
    if not isinstance(kind, str) or kind not in _CONTAINER_TYPES:
        raise UnknownOp(f"module {where!r} has type {kind!r}, which is not whitelisted", module=str(kind))
    container = _CONTAINER_TYPES[kind]()

    def fresh(n):
        if hasattr(container, _check_name(n, where)):
            raise _bad(where, f"name {n!r} is used twice or names a Module attribute")
        return n

    for n, t in _dict(spec.get("params", {}), f"{where}.params").items():
        shape = _shape(_dict(t, f"{where}.params").get("shape"), f"{where}.{n}")
        container.register_parameter(fresh(n), nn.Parameter(torch.empty(shape, device="meta")))
    for n, t in _dict(spec.get("buffers", {}), f"{where}.buffers").items():
        t = _dict(t, f"{where}.buffers")
        shape = _shape(t.get("shape"), f"{where}.{n}")
        persistent = _bool(t.get("persistent", True), f"{where}.{n}.persistent")
        container.register_buffer(fresh(n), torch.empty(shape, device="meta"), persistent)
    for n, child in _dict(spec.get("children", {}), f"{where}.children").items():
        container.add_module(fresh(n), _build_tree(child, f"{path}.{n}" if path else n, depth + 1))
    return container


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def _load_state(root: nn.Module, spec: dict) -> None:
    state = _dict(spec.get("state"), "state")
    tied = _dict(spec.get("tied", {}), "tied")
    frozen = spec.get("frozen", [])
    if not isinstance(frozen, list):
        raise _bad("frozen", "expected a list")
    params = dict(root.named_parameters(remove_duplicate=False))
    buffers = dict(root.named_buffers(remove_duplicate=False))
    expected = {**params, **buffers}
    for alias, canon in tied.items():
        if alias not in params or canon not in params or alias == canon or canon in tied:
            raise _bad("tied", f"{alias!r} -> {canon!r} does not name two parameters")
        if params[alias].shape != params[canon].shape:
            raise ShapeError(f"tied parameters {alias!r} {list(params[alias].shape)} and {canon!r} "
                             f"{list(params[canon].shape)} differ in shape")
    missing = set(expected) - set(state) - set(tied)
    extra = set(state) - set(expected)
    if missing or extra or set(state) & set(tied):
        raise ShapeError(f"state does not fit the modules: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(map(str, extra))[:5]}")
    for name, t in state.items():
        want = expected[name]
        if not isinstance(t, torch.Tensor):
            raise _bad(f"state {name!r}", f"expected a tensor, got {type(t).__name__}")
        if t.shape != want.shape:
            raise ShapeError(f"state {name!r} has shape {list(t.shape)}, the module needs "
                             f"{list(want.shape)}")
        if want.dtype.is_floating_point != t.dtype.is_floating_point or (
                not want.dtype.is_floating_point and t.dtype != want.dtype):
            raise ShapeError(f"state {name!r} has dtype {t.dtype}, the module needs {want.dtype}")
    for name, t in state.items():
        owner, leaf = _owner(root, name)
        if name in params:
            setattr(owner, leaf, nn.Parameter(t.clone(), requires_grad=name not in frozen))
        else:
            setattr(owner, leaf, t.clone())
    for alias, canon in tied.items():
        owner, leaf = _owner(root, alias)
        setattr(owner, leaf, root.get_parameter(canon))
    left = [n for n, t in [*root.named_parameters(), *root.named_buffers()] if t.is_meta]
    if left:
        raise ShapeError(f"state leaves {left[:5]} without values")


def _decode_value(v, names: set[str], where: str, depth: int = 0):
    if depth > 16:
        raise _bad(where, "arguments nested too deeply")
    if v is None or isinstance(v, (bool, float)):
        return v
    if isinstance(v, int):
        if not -(1 << 63) <= v < 1 << 63:
            raise _bad(where, "integer constant out of the int64 range")
        return v
    if isinstance(v, str):
        if len(v) > 256:
            raise _bad(where, "string constant longer than 256 characters")
        return v
    if isinstance(v, (list, tuple)):
        if len(v) > 1024:
            raise _bad(where, "list constant longer than 1024 items")
        return [_decode_value(x, names, where, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (key, inner), = v.items()
        if key == "ref":
            if not isinstance(inner, str) or inner not in names:
                raise _bad(where, f"refers to {inner!r} before it is computed")
            return _Ref(inner)
        if key == "tuple" and isinstance(inner, (list, tuple)) and len(inner) <= 1024:
            return tuple(_decode_value(x, names, where, depth + 1) for x in inner)
        if key == "slice" and isinstance(inner, (list, tuple)) and len(inner) == 3:
            return _Slice(*(_decode_value(x, names, where, depth + 1) for x in inner))
        if key == "ellipsis":
            return Ellipsis
        if key == "dtype" and isinstance(inner, str) and inner in _DTYPES:
            return _DTYPES[inner]
        if key == "device" and inner == "cpu":
            return torch.device("cpu")
    raise _bad(where, "argument is not a constant, a reference, a tuple, a slice, a dtype or a device")


class _Ref:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Slice:
    __slots__ = ("parts",)

    def __init__(self, *parts):
        self.parts = parts


def _resolve(v, env: dict):
    if isinstance(v, _Ref):
        return env[v.name]
    if isinstance(v, _Slice):
        return slice(*(_resolve(x, env) for x in v.parts))
    if isinstance(v, tuple):
        return tuple(_resolve(x, env) for x in v)
    if isinstance(v, list):
        return [_resolve(x, env) for x in v]
    return v


def _compile(program, modules: dict[str, nn.Module], tensors: dict[str, str]) -> list[tuple]:
    """Check a wire program; return steps (kind, callable or name, args, kwargs, out, op)."""
    if not isinstance(program, list) or not program or len(program) > _MAX_STEPS:
        raise _bad("forward", f"expected a list of 1..{_MAX_STEPS} steps")
    names: set[str] = set()
    steps = []
    for i, step in enumerate(program):
        step = _dict(step, f"forward[{i}]")
        op, out = step.get("op"), step.get("out")
        where = f"forward[{i}] ({op!r})"
        if not isinstance(out, str) or not 0 < len(out) <= 256 or out in names:
            raise _bad(where, "each step needs a fresh output name")
        args = step.get("args", [])
        kwargs = _dict(step.get("kwargs", {}), where)
        if not isinstance(args, list) or not all(isinstance(k, str) for k in kwargs):
            raise _bad(where, "args must be a list and kwargs a map with string keys")
        if _BANNED_KWARGS & set(kwargs):
            raise UnknownOp(f"{where}: out= arguments are not allowed")
        args = [_decode_value(a, names, where) for a in args]
        kwargs = {k: _decode_value(v, names, where) for k, v in kwargs.items()}
        if op == "input":
            if steps and steps[-1][0] != "input" or len(args) > 1:
                raise _bad(where, "inputs come first and have at most one default")
            steps.append(("input", None, args, {}, out, op))
        elif op == "output":
            if i != len(program) - 1 or len(args) != 1:
                raise _bad(where, "output is the last step and has one argument")
            steps.append(("output", None, args, {}, out, op))
        elif op == "module":
            target = step.get("target")
            if not isinstance(target, str) or target not in modules:
                raise _bad(where, f"no whitelisted layer at {target!r}")
            steps.append(("module", modules[target], args, kwargs, out, op))
        elif op == "attr":
            target = step.get("target")
            if not isinstance(target, str) or target not in tensors:
                raise _bad(where, f"no parameter, buffer or constant {target!r}")
            steps.append((tensors[target], target, [], {}, out, op))
        elif isinstance(op, str) and op in OPS:
            steps.append(("call", OPS[op], args, kwargs, out, op))
        else:
            raise UnknownOp(f"{where}: op {op!r} is not whitelisted", op=str(op))
        names.add(out)
    if steps[-1][0] != "output":
        raise _bad("forward", "the program has no output step")
    return steps


class GraphModel(nn.Module):
    """An nn.Module whose forward interprets a checked op program over whitelisted layers."""

    def __init__(self, tree: nn.Module, spec: dict):
        super().__init__()
        for name, child in tree.named_children():
            self.add_module(name, child)
        for name, p in tree._parameters.items():
            self.register_parameter(name, p)
        for name, b in tree._buffers.items():
            self.register_buffer(name, b, persistent=name not in tree._non_persistent_buffers_set)
        constants = _dict(spec.get("constants", {}), "constants")
        for name, value in constants.items():
            _check_name(name, "constants")
            if not isinstance(value, torch.Tensor) or hasattr(self, name):
                raise _bad("constants", f"{name!r} must be a fresh name holding a tensor")
            self.register_buffer(name, value.clone(), persistent=False)
        self._constant_names = frozenset(constants)
        self._root_type = spec["modules"]["type"]
        layers: dict[str, Callable] = {n: m for n, m in self.named_modules()
                                       if n and type(m) in _LAYER_NAMES}
        # A model that is one layer: the layer itself stays out of the module tree (its
        # tensors are this model's, under the same names) and runs on this model's tensors.
        self._root_layer: nn.Module | None = None
        if type(tree) in _LAYER_NAMES:
            object.__setattr__(self, "_root_layer", tree)
            self._root_kwargs = dict(spec["modules"].get("kwargs", {}))
            layers[""] = self._call_root_layer
        tensors = {n: "buffer" for n, _ in self.named_buffers(remove_duplicate=False)}
        tensors.update((n, "param") for n, _ in self.named_parameters(remove_duplicate=False))
        self._steps = _compile(spec.get("forward"), layers, tensors)
        self._program = spec["forward"]
        self._inputs = [s[4] for s in self._steps if s[0] == "input"]

    @property
    def root_layer(self) -> nn.Module | None:
        """The whitelisted layer this model is, when it is a single layer (else None)."""
        return self._root_layer

    def _call_root_layer(self, *args, **kwargs):
        layer = self._root_layer
        layer.train(self.training)
        tensors = {n: getattr(self, n) for n in (*layer._parameters, *layer._buffers)
                   if getattr(layer, n, None) is not None}
        return torch.func.functional_call(layer, tensors, args, kwargs)

    @property
    def program(self) -> list[dict]:
        return list(self._program)

    def export(self) -> dict:
        """The spec of this model with its current tensors (no tracing needed)."""
        state, tied, frozen = _export_state(self)
        constants = {n: state.pop(n) for n in self._constant_names}
        if self._root_layer is not None:
            tree = {"type": self._root_type, "kwargs": dict(self._root_kwargs)}
        else:
            tree = _export_tree(self, "")
            tree["type"] = self._root_type
            for n in self._constant_names:
                tree["buffers"].pop(n)
        return {"format": FORMAT, "modules": tree, "forward": self.program, "state": state,
                "constants": constants, "tied": tied, "frozen": frozen}

    def forward(self, *args, **kwargs):
        if len(args) > len(self._inputs) or set(kwargs) - set(self._inputs):
            raise BadRequest(f"model takes inputs {self._inputs}")
        env: dict[str, Any] = {}
        for kind, fn, a, kw, out, op in self._steps:
            if kind == "input":
                i = len(env)
                if i < len(args):
                    env[out] = args[i]
                elif out in kwargs:
                    env[out] = kwargs[out]
                elif a:
                    env[out] = _resolve(a[0], env)
                else:
                    raise BadRequest(f"missing model input {out!r}")
                continue
            if kind == "output":
                return _resolve(a[0], env)
            try:
                if kind in ("param", "buffer"):
                    # attribute lookup, not get_parameter: under torch.func.functional_call
                    # (DP-SGD's per-example gradients) a parameter is a plain tensor
                    owner, leaf = _owner(self, fn)
                    env[out] = getattr(owner, leaf)
                else:
                    env[out] = fn(*_resolve(a, env), **{k: _resolve(v, env) for k, v in kw.items()})
            except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, KeyError,
                    ArithmeticError, NotImplementedError) as e:
                raise ShapeError(f"step {out!r} ({op}) failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        raise BadRequest("program ended without an output")  # pragma: no cover - _compile checks


def import_model(spec: dict) -> GraphModel:
    """Rebuild a model from a spec, checking every layer, op and tensor against the whitelist."""
    spec = _dict(spec, "spec")
    if spec.get("format") != FORMAT:
        raise _bad("format", f"expected {FORMAT!r}")
    tree = _build_tree(spec.get("modules"), "")
    _load_state(tree, spec)
    return GraphModel(tree, spec)


# ------------------------------------------------------------------------ hashing

def _canonical(v):
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return ["tensor", str(t.dtype).removeprefix("torch."), list(t.shape), raw.numpy().tobytes()]
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    return v


def model_hash(spec: dict | nn.Module) -> str:
    """SHA-256 (hex) over the canonical CBOR of a spec (or of a model's export)."""
    if isinstance(spec, nn.Module):
        spec = export_model(spec)
    return hashlib.sha256(cbor2.dumps(_canonical(spec), canonical=True)).hexdigest()
