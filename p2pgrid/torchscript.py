"""TorchScript modules (``torch.jit.trace`` / ``torch.jit.script``) as whitelisted models.

A ScriptModule carries compiled code. p2pgrid never runs it: :func:`from_torchscript`
reads the module as data (its hierarchy, each submodule's ``original_name``, parameters
and buffers, and the nodes of its TorchScript graph) and rebuilds a model from the
whitelists of :mod:`p2pgrid.modelgraph`:

* a whitelisted layer (``nn.Linear`` ...) is rebuilt from its attributes (scripted) or
  from the constants of its graph and its parameters' shapes (traced);
* an ``nn.Sequential`` of such layers is rebuilt as an ``nn.Sequential`` (so encrypted
  models, which need one, accept it);
* any other module's ``forward`` graph is translated node by node into a model program:
  ``prim::CallMethod`` of a whitelisted submodule becomes a module call, ``aten::`` ops
  come from a fixed table (:data:`ATEN`) and anything else is refused with the op's
  name. Graph-level Python (``prim::CallFunction``, ``prim::If``, loops) cannot be
  translated: that is what ``torch.jit.script`` of a custom module produces, so such a
  module is refused with a message saying to pass the plain module or a traced one.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> back = from_torchscript(torch.jit.trace(net, torch.randn(1, 4)))
>>> type(back).__name__, torch.equal(back(torch.ones(2, 4)), net(torch.ones(2, 4)))
('Sequential', True)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import P2PError, UnknownOp
from .modelgraph import FORMAT, LAYERS, Untraceable, import_model

__all__ = ["is_torchscript", "from_torchscript", "ATEN"]

_INT_MAX = 9223372036854775807
_HOW = ("pass the plain nn.Module instead (the Python object before torch.jit), or "
        "torch.jit.trace(model, example) of it")


def is_torchscript(model) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


class _Unsupported(Untraceable):
    pass


def _refuse(what: str) -> Untraceable:
    return Untraceable(f"cannot convert this TorchScript module: {what}; {_HOW}")


# ------------------------------------------------------------------ graph reading

def _constant(node) -> Any:
    value = node.output().toIValue()
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value):
        return list(value)
    if isinstance(value, torch.device) or isinstance(value, torch.dtype):
        return value
    raise _refuse(f"a constant of type {type(value).__name__} ({node.kind()})")


def _graph_ops(module) -> list:
    """The nodes of a submodule's graph that are not attribute reads or constants."""
    return [n for n in module.graph.nodes()
            if n.kind() not in ("prim::GetAttr", "prim::Constant", "prim::ListConstruct")]


def _values(module) -> dict:
    """Debug name -> Python value of every constant and constant list of `module`'s graph."""
    out: dict[str, Any] = {}
    for n in module.graph.nodes():
        if n.kind() == "prim::Constant":
            out[n.output().debugName()] = _constant(n)
        elif n.kind() == "prim::ListConstruct":
            items = [out.get(i.debugName(), _Missing) for i in n.inputs()]
            if all(i is not _Missing for i in items):
                out[n.output().debugName()] = list(items)
    return out


class _Missing:
    pass


def _op_args(module, kind: str) -> list:
    """Constant arguments of the one `kind` node of `module`'s graph (None where not constant)."""
    nodes = [n for n in module.graph.nodes() if n.kind() == kind]
    if len(nodes) != 1:
        raise _refuse(f"its {module.original_name} layer does not compute with one {kind}")
    values = _values(module)
    return [values.get(i.debugName()) for i in nodes[0].inputs()]


def _param(module, name):
    t = dict(module.named_parameters(recurse=False)).get(name)
    return t if t is not None else dict(module.named_buffers(recurse=False)).get(name)


def _traced_kwargs(layer: str, m) -> dict:
    """A traced whitelisted layer's constructor arguments, read from its graph and tensors."""
    w, b = _param(m, "weight"), _param(m, "bias")
    if layer == "Linear":
        return {"in_features": w.shape[1], "out_features": w.shape[0], "bias": b is not None}
    if layer in ("Conv1d", "Conv2d"):
        if any(n.kind() in ("aten::pad", "aten::constant_pad_nd") for n in m.graph.nodes()):
            raise _refuse(f"its {layer} pads with a padding_mode other than zeros")
        a = _op_args(m, "aten::_convolution")
        stride, padding, dilation, transposed, groups = a[3], a[4], a[5], a[6], a[8]
        if transposed:
            raise _refuse(f"a transposed convolution in {layer}")
        return {"in_channels": w.shape[1] * groups, "out_channels": w.shape[0],
                "kernel_size": list(w.shape[2:]), "stride": stride, "padding": padding,
                "dilation": dilation, "groups": groups, "bias": b is not None}
    if layer in ("Dropout", "Dropout2d"):
        kind = "aten::dropout" if layer == "Dropout" else "aten::feature_dropout"
        nodes = [n for n in m.graph.nodes() if n.kind() == kind]
        return {"p": _op_args(m, kind)[1]} if nodes else {}   # traced in eval: no node, p unused
    if layer == "MaxPool2d":
        a = _op_args(m, "aten::max_pool2d")
        return {"kernel_size": a[1], "stride": a[2], "padding": a[3], "dilation": a[4], "ceil_mode": a[5]}
    if layer == "AvgPool2d":
        a = _op_args(m, "aten::avg_pool2d")
        return {"kernel_size": a[1], "stride": a[2], "padding": a[3], "ceil_mode": a[4],
                "count_include_pad": a[5], "divisor_override": a[6]}
    if layer in ("Softmax", "LogSoftmax"):
        return {"dim": _op_args(m, "aten::softmax" if layer == "Softmax" else "aten::log_softmax")[1]}
    if layer == "Flatten":
        a = _op_args(m, "aten::flatten")
        return {"start_dim": a[1], "end_dim": a[2]}
    if layer == "LayerNorm":
        a = _op_args(m, "aten::layer_norm")
        return {"normalized_shape": a[1], "eps": a[4], "elementwise_affine": w is not None,
                **({"bias": b is not None} if w is not None else {})}
    if layer == "Embedding":
        a = _op_args(m, "aten::embedding")
        return {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1],
                "padding_idx": None if a[2] is None or a[2] < 0 else a[2]}
    if layer == "LeakyReLU":
        return {"negative_slope": _op_args(m, "aten::leaky_relu")[1]}
    if layer == "GELU":
        return {"approximate": _op_args(m, "aten::gelu")[1]}
    if layer == "ELU":
        return {"alpha": _op_args(m, "aten::elu")[1]}
    if layer in ("ReLU", "Tanh", "Sigmoid", "SiLU", "Identity"):
        return {}
    raise _refuse(f"a traced {layer} layer's settings cannot be read from its graph")


def _layer(m) -> nn.Module:
    """Rebuild a whitelisted layer from a ScriptModule submodule, with its tensors."""
    name = m.original_name
    cls, schema = LAYERS[name]
    if isinstance(m, torch.jit._trace.TracedModule):   # traced: no attributes but tensors
        kwargs = _traced_kwargs(name, m)
    else:                                              # scripted: attributes are kept
        kwargs = {k: getattr(m, k) for k in schema if k != "bias" and hasattr(m, k)}
        if "bias" in schema:
            kwargs["bias"] = _param(m, "bias") is not None
    try:
        kwargs = {k: schema[k](list(v) if isinstance(v, tuple) else v, f"{name}.{k}")
                  for k, v in kwargs.items()}
    except P2PError as e:
        raise _refuse(f"{name}: {e.message}") from None
    try:
        layer = cls(**kwargs)
    except Exception as e:  # a whitelisted layer refusing what was read
        raise _refuse(f"cannot rebuild {name}({kwargs}): {type(e).__name__}: {e}") from None
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise _refuse(f"the tensors of {name} do not fit it (missing {missing}, unexpected {unexpected})")
    layer.train(m.training)
    return layer


def _chain_of_children(m) -> list[str] | None:
    """The children a Sequential's graph calls, in order, if it only chains them."""
    graph = m.graph
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        return None
    names, current = {}, inputs[1]
    order = []
    for n in graph.nodes():
        if n.kind() == "prim::GetAttr":
            names[n.output().debugName()] = n.s("name")
        elif n.kind() == "prim::CallMethod" and n.s("name") == "forward":
            ins = list(n.inputs())
            if len(ins) != 2 or ins[1] is not current and ins[1].debugName() != current.debugName():
                return None
            order.append(names.get(ins[0].debugName()))
            current = n.output()
        elif n.kind() != "prim::Constant":
            return None
    out = list(graph.outputs())
    if len(out) != 1 or out[0].debugName() != current.debugName() or None in order:
        return None
    return order


def _module(m, path: str) -> nn.Module:
    name = m.original_name
    if name in LAYERS:
        return _layer(m)
    if name == "Sequential":
        children = dict(m.named_children())
        order = _chain_of_children(m)
        if order is None or sorted(order) != sorted(children):
            raise _refuse(f"Sequential {path or '<root>'!r} does more than call its layers in order")
        seq = nn.Sequential()
        for child in order:
            seq.add_module(child, _module(children[child], f"{path}.{child}" if path else child))
        return seq
    raise _Unsupported(f"module {path or '<root>'!r} ({name})")


# ------------------------------------------------------------------ forward graphs

def _slice_index(dim: int, start, end, step):
    end = None if end is None or end >= _INT_MAX else end
    return {"tuple": [{"slice": [None, None, None]}] * dim + [{"slice": [start, end, step]}]}


#: aten op -> (program op, argument mapper); the mapper takes the node's arguments as
#: program values and returns (args, kwargs).
ATEN: dict[str, tuple[str, Callable]] = {
    **{f"aten::{n}": (f"torch.{n}", lambda a: (a[:1], {})) for n in (
        "relu", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "erf", "t")},
    "aten::max_pool2d": ("F.max_pool2d", lambda a: (a[:6], {})),
    "aten::avg_pool2d": ("F.avg_pool2d", lambda a: (a[:7], {})),
    "aten::adaptive_avg_pool2d": ("F.adaptive_avg_pool2d", lambda a: (a[:2], {})),
    "aten::view": ("tensor.view", lambda a: (a[:2], {})),
    "aten::reshape": ("torch.reshape", lambda a: (a[:2], {})),
    "aten::flatten": ("torch.flatten", lambda a: (a[:3], {})),
    "aten::log_softmax": ("torch.log_softmax", lambda a: (a[:2], {})),
    "aten::softmax": ("torch.softmax", lambda a: (a[:2], {})),
    "aten::linear": ("F.linear", lambda a: (a[:3], {})),
    "aten::matmul": ("torch.matmul", lambda a: (a[:2], {})),
    "aten::mm": ("torch.matmul", lambda a: (a[:2], {})),
    "aten::bmm": ("torch.bmm", lambda a: (a[:2], {})),
    "aten::add": ("torch.add", lambda a: (a[:2], {} if len(a) < 3 or a[2] == 1 else {"alpha": a[2]})),
    "aten::sub": ("torch.sub", lambda a: (a[:2], {} if len(a) < 3 or a[2] == 1 else {"alpha": a[2]})),
    "aten::mul": ("torch.mul", lambda a: (a[:2], {})),
    "aten::div": ("torch.div", lambda a: (a[:2], {})),
    "aten::transpose": ("torch.transpose", lambda a: (a[:3], {})),
    "aten::permute": ("torch.permute", lambda a: (a[:2], {})),
    "aten::unsqueeze": ("torch.unsqueeze", lambda a: (a[:2], {})),
    "aten::squeeze": ("torch.squeeze", lambda a: (a[:2], {})),
    "aten::contiguous": ("tensor.contiguous", lambda a: (a[:1], {})),
    "aten::cat": ("torch.cat", lambda a: (a[:2], {})),
    "aten::stack": ("torch.stack", lambda a: (a[:2], {})),
    "aten::mean": ("torch.mean", lambda a: (a[:3] if len(a) > 2 else a[:1], {})),
    "aten::sum": ("torch.sum", lambda a: (a[:3] if len(a) > 2 else a[:1], {})),
    "aten::size": ("tensor.size", lambda a: (a[:2], {})),
    "aten::select": ("torch.select", lambda a: (a[:3], {})),
    "aten::dropout": ("F.dropout", lambda a: (a[:3], {})),
    "aten::layer_norm": ("F.layer_norm", lambda a: (a[:5], {})),
    "aten::embedding": ("F.embedding", lambda a: ([a[1], a[0]], {} if a[2] is None or
                                                  (isinstance(a[2], int) and a[2] < 0)
                                                  else {"padding_idx": a[2]})),
    "aten::gelu": ("F.gelu", lambda a: (a[:1], {"approximate": a[1]} if len(a) > 1 else {})),
    "aten::slice": ("operator.getitem", lambda a: ([a[0], _slice_index(a[1], a[2], a[3], a[4])], {})),
}
_IDENTITY = {"prim::NumToTensor", "aten::Int", "aten::ScalarImplicit", "aten::Float"}


class _Translator:
    def __init__(self, root):
        self.root = root
        self.children = dict(root.named_children())
        self.steps: list[dict] = []
        self.env: dict[str, Any] = {}       # debug name -> program value or ("module", path)
        self.constants: dict[str, torch.Tensor] = {}
        self.layers: dict[str, nn.Module] = {}
        self.count = 0

    def fresh(self) -> str:
        self.count += 1
        return f"v{self.count}"

    def emit(self, op: str, args, kwargs=None, **extra) -> dict:
        out = self.fresh()
        self.steps.append({"op": op, "args": list(args), "kwargs": dict(kwargs or {}), "out": out, **extra})
        return {"ref": out}

    def value(self, v):
        key = v.debugName()
        if key not in self.env:
            raise _refuse(f"the graph reads {key!r} before computing it")
        got = self.env[key]
        if isinstance(got, tuple) and got and got[0] == "module":
            raise _refuse(f"submodule {got[1]!r} is used as a value")
        return got

    def call_module(self, path: str, module, args: list):
        if module.original_name in LAYERS:
            if path not in self.layers:
                self.layers[path] = _layer(module)
            return self.emit("module", args, target=path)
        if module.original_name == "Sequential":
            order = _chain_of_children(module)
            if order is None or len(args) != 1:
                raise _refuse(f"Sequential {path!r} does more than call its layers in order")
            out = args[0]
            children = dict(module.named_children())
            for child in order:
                out = self.call_module(f"{path}.{child}", children[child], [out])
            return out
        raise _refuse(f"submodule {path!r} is a custom {module.original_name}: only whitelisted layers "
                      f"and Sequentials of them can be called from a converted forward")

    def run(self) -> list[dict]:
        graph = self.root.graph
        inputs = list(graph.inputs())
        self.env[inputs[0].debugName()] = ("module", "")
        for i, v in enumerate(inputs[1:]):
            name = f"input_{i}"
            self.steps.append({"op": "input", "args": [], "kwargs": {}, "out": name})
            self.env[v.debugName()] = {"ref": name}
        for node in graph.nodes():
            self.node(node)
        outs = [self.value(v) for v in graph.outputs()]
        self.steps.append({"op": "output", "args": [outs[0] if len(outs) == 1 else {"tuple": outs}],
                           "kwargs": {}, "out": "output"})
        return self.steps

    def node(self, node) -> None:
        kind = node.kind()
        outs = list(node.outputs())
        if kind == "prim::Constant":
            value = _constant(node)
            if isinstance(value, torch.Tensor):
                name = f"c{len(self.constants)}"
                self.constants[name] = value.detach().clone()
                value = self.emit("attr", [], target=name)
            elif isinstance(value, (torch.dtype, torch.device)):
                raise _refuse(f"a {type(value).__name__} constant")
            self.env[outs[0].debugName()] = value
            return
        if kind == "prim::GetAttr":
            owner = self.env.get(next(node.inputs()).debugName())
            if not (isinstance(owner, tuple) and owner[0] == "module"):
                raise _refuse("an attribute of something other than a module")
            path = f"{owner[1]}.{node.s('name')}" if owner[1] else node.s("name")
            sub = self._submodule(path)
            if sub is not None:
                self.env[outs[0].debugName()] = ("module", path)
            elif path in dict(self.root.named_parameters()) or path in dict(self.root.named_buffers()):
                self.env[outs[0].debugName()] = self.emit("attr", [], target=path)
            else:
                raise _refuse(f"attribute {path!r} is not a parameter, buffer or submodule")
            return
        if kind == "prim::CallMethod":
            if node.s("name") != "forward":
                raise _refuse(f"a call of method {node.s('name')!r}")
            ins = list(node.inputs())
            target = self.env.get(ins[0].debugName())
            if not (isinstance(target, tuple) and target[0] == "module"):
                raise _refuse("a method call on something other than a submodule")
            self.env[outs[0].debugName()] = self.call_module(
                target[1], self._submodule(target[1]), [self.value(v) for v in ins[1:]])
            return
        if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            items = [self.value(v) for v in node.inputs()]
            self.env[outs[0].debugName()] = items if kind == "prim::ListConstruct" else {"tuple": items}
            return
        if kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            src = self.value(next(node.inputs()))
            items = src["tuple"] if isinstance(src, dict) and "tuple" in src else src
            for i, v in enumerate(outs):
                self.env[v.debugName()] = (items[i] if isinstance(items, list)
                                           else self.emit("operator.getitem", [src, i]))
            return
        if kind in _IDENTITY:
            self.env[outs[0].debugName()] = self.value(next(node.inputs()))
            return
        if kind in ("aten::_convolution", "aten::conv1d", "aten::conv2d"):
            a = [self.value(v) for v in node.inputs()]
            if kind == "aten::_convolution" and a[6]:
                raise _refuse("a transposed convolution")
            groups = a[8] if kind == "aten::_convolution" else a[6]
            weight = a[1]
            dims = self._tensor_dim(weight)
            fn = {3: "F.conv1d", 4: "F.conv2d"}.get(dims)
            if fn is None:
                raise UnknownOp(f"TorchScript op {kind} on a {dims}-d weight is not whitelisted", op=kind)
            self.env[outs[0].debugName()] = self.emit(fn, [a[0], a[1], a[2], a[3], a[4], a[5], groups])
            return
        if kind in ATEN:
            op, mapper = ATEN[kind]
            args, kwargs = mapper([self.value(v) for v in node.inputs()])
            if len(outs) != 1:
                raise _refuse(f"{kind} with {len(outs)} outputs")
            self.env[outs[0].debugName()] = self.emit(op, args, kwargs)
            return
        if kind.startswith("aten::") and kind.endswith("_"):
            raise UnknownOp(f"TorchScript op {kind} (in place) is not whitelisted: use its "
                            f"out-of-place form ({kind[:-1]})", op=kind)
        if kind in ("prim::CallFunction", "prim::If", "prim::Loop", "prim::PythonOp"):
            raise _refuse(f"its graph has {kind} (compiled Python: control flow or a function "
                          f"call), which cannot be read as a static model program")
        raise UnknownOp(f"TorchScript op {kind} is not whitelisted", op=kind)

    def _submodule(self, path: str):
        m = self.root
        for part in path.split("."):
            m = dict(m.named_children()).get(part)
            if m is None:
                return None
        return m

    def _tensor_dim(self, value) -> int | None:
        if isinstance(value, dict) and "ref" in value:
            step = next((s for s in self.steps if s["out"] == value["ref"]), None)
            if step is not None and step["op"] == "attr":
                t = self.constants.get(step["target"])
                if t is None:
                    t = dict(self.root.named_parameters()).get(step["target"])
                if t is None:
                    t = dict(self.root.named_buffers()).get(step["target"])
                return None if t is None else t.dim()
        return None


def _tree_of(translator: _Translator, root) -> dict:
    """The module tree spec: the layers the program calls, at their paths."""
    tree: dict = {"type": "Module", "children": {}, "params": {}, "buffers": {}}
    for n, p in root.named_parameters(recurse=False):
        tree["params"][n] = {"shape": list(p.shape)}
    for n, b in root.named_buffers(recurse=False):
        tree["buffers"][n] = {"shape": list(b.shape), "persistent": True}

    def place(path: str, layer: nn.Module):
        node = tree
        parts = path.split(".")
        for part in parts[:-1]:
            node = node["children"].setdefault(part, {"type": "Module", "children": {}, "params": {},
                                                      "buffers": {}})
        from .modelgraph import export_model
        node["children"][parts[-1]] = export_model(layer)["modules"]
    for path, layer in translator.layers.items():
        place(path, layer)
    return tree


def from_torchscript(model) -> nn.Module:
    """A plain, whitelisted module equivalent to a traced or scripted one (see the module
    docstring); Untraceable says exactly what cannot be converted and what to pass instead."""
    if not is_torchscript(model):
        return model
    try:
        return _module(model, "")
    except _Unsupported:
        pass
    translator = _Translator(model)
    program = translator.run()
    state: dict[str, torch.Tensor] = {}
    for n, t in model.named_parameters(recurse=False):
        state[n] = t.detach().clone()
    for n, t in model.named_buffers(recurse=False):
        state[n] = t.detach().clone()
    for path, layer in translator.layers.items():
        for n, t in layer.state_dict().items():
            state[f"{path}.{n}"] = t.detach().clone()
    spec = {"format": FORMAT, "modules": _tree_of(translator, model), "forward": program,
            "state": state, "constants": translator.constants, "tied": {}, "frozen": []}
    converted = import_model(spec)
    converted.train(model.training)
    return converted
