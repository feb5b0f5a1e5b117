"""Encrypted training: Linear, ReLU, Flatten layers, MSE and SGD on shared tensors.

Small explicit layers, not a tape: each layer's ``forward`` keeps what its
``backward`` needs (this party's shares only). Everything is a protocol generator,
so a training step runs in the harness or over the network unchanged. Learning rate
and batch size are public.

What makes a step cheap:

* **Masks reused between passes.** A Linear layer takes one dealt item (``linear``):
  masks A (for x), B (for W), G (for the output gradient) and C = A B, D = A^T G,
  E = G B^T. Forward opens x - A and W - B; backward opens only g - G and gets both
  x^T g and g W^T from the openings it already has. The first layer skips g W^T.
* **Truncation fused into ReLU.** A product comes out with 2f fractional bits. The
  ReLU after it opens c = z + 2^62 + 2^(f-1) + r once, which serves both the
  dealer-assisted truncation (r >> f and msb(r) dealt) and the sign test (r's chunk
  tables dealt): ReLU of a raw product costs the 4 rounds of a comparison and is
  exactly truncated. Its backward (the gradient times the 0/1 mask) likewise takes
  one opening that truncates the incoming raw gradient too.
* **SGD fused with the gradient's truncation**: W -= lr * dW is one truncation of
  lr * (x^T g) by 2f + e bits, run side by side with the next layer's backward round.
* **MSE scaled**: (pred - y) is backpropagated and 2/N folded into the learning rate,
  which is encoded with e extra bits (same update in exact arithmetic; gradients stay
  far above the resolution 2^-f). Needs |lr dW| < 2^(62 - 3f - e).

Rounds per step for Linear-ReLU-Linear-ReLU-Linear: forward 1+4+1+4+1 plus 1 to
truncate the output; backward 2 per Linear (the last of them merged with the SGD
truncations). The loss is computed side by side with the backward pass.

    model = Sequential([Linear(w1, b1), ReLU(), Linear(w2, b2)])
    loss = yield from train_step(ctx, model, x, y, lr=0.1)
    pred = yield from predict(ctx, model, x)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError

from .beaver import div_public, mul
from .compare import open_bit, sign_rounds
from .dealer import linear_param, relu_param
from .messages import Request
from .ring import RING_BITS, logical_rshift, msb, ring_matmul
from .runtime import PartyContext, Protocol, open_ring, parallel
from .sharing import Shared
from .truncation import TRUNC_RANGE_BITS, truncate

__all__ = ["Linear", "ReLU", "Flatten", "Sequential", "train_step", "predict", "mse_loss",
           "build", "parameters", "check_layers", "check_shapes"]


class Linear:
    """y = x @ weight + bias; weight (in, out), bias (out,) or None, both Shared."""

    def __init__(self, weight: Shared, bias: Shared | None = None):
        if not isinstance(weight, Shared) or weight.dim() != 2:
            raise ShapeError("Linear weight must be a 2-d Shared (in_features, out_features)")
        if bias is not None and (not isinstance(bias, Shared) or tuple(bias.shape) != (weight.shape[1],)):
            raise ShapeError("Linear bias must be a Shared of shape (out_features,)")
        self.weight, self.bias = weight, bias
        self._saved: dict | None = None

    def parameters(self) -> list[tuple[str, Shared]]:
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def forward(self, ctx: PartyContext, x: Shared, *, train: bool = False,
                grad_x: bool = True) -> Protocol[Shared]:
        """The raw product x W (+ b), with x's and W's scales added (truncate it after)."""
        ctx.check_shared(x, "Linear.forward")
        w = self.weight
        if x.dim() != 2 or x.shape[1] != w.shape[0]:
            raise ShapeError(f"Linear expects (batch, {w.shape[0]}), got {list(x.shape)}")
        param = linear_param(train, grad_x)
        m = ctx.pre.take(Request("linear", (tuple(x.shape), tuple(w.shape)), param))
        opened = yield from open_ring(ctx, "linear/open", {"eps": x.share - m["A"],
                                                           "delta": w.share - m["B"]})
        eps, delta = opened["eps"], opened["delta"]
        a_eps = m["A"] + eps if ctx.party == 0 else m["A"]
        z = m["C"] + _matmul_pair(eps, m["B"], a_eps, delta)
        if self.bias is not None:                          # bias at the product's scale
            z = z + (self.bias.share << (x.scale + w.scale - self.bias.scale))
        if train:
            self._saved = {"eps": eps, "delta": delta, "A": m["A"], "B": m["B"], "G": m["G"],
                           "D": m["D"], "E": m.get("E"), "x_scale": x.scale}
        return x.like(z, x.scale + w.scale)

    def backward(self, ctx: PartyContext, grad: Shared, need_input_grad: bool = True
                 ) -> Protocol[tuple[Shared, Shared | None, Shared | None]]:
        """(raw dW, raw dx or None, db) for the output gradient `grad` (scale f); one round."""
        s = self._saved
        if s is None:
            raise ProtocolError("Linear.backward before a training forward")
        ctx.check_shared(grad, "Linear.backward")
        gamma = (yield from open_ring(ctx, "linear/grad", {"gamma": grad.share - s["G"]}))["gamma"]
        p0 = ctx.party == 0
        eps, delta = s["eps"], s["delta"]
        a_eps = s["A"] + eps if p0 else s["A"]
        dw = s["D"] + _matmul_pair(eps.T, s["G"], a_eps.T, gamma)
        dx = None
        if need_input_grad:
            if s["E"] is None:
                raise ProtocolError("this layer was run without input gradients")
            g_gam = s["G"] + gamma if p0 else s["G"]
            dx = grad.like(s["E"] + _matmul_pair(gamma, s["B"].T, g_gam, delta.T),
                           grad.scale + self.weight.scale)
        self._saved = None
        db = grad.sum(0) if self.bias is not None else None
        return grad.like(dw, grad.scale + s["x_scale"]), dx, db


def _matmul_pair(a1, b1, a2, b2) -> torch.Tensor:
    """a1 @ b1 + a2 @ b2 in the ring, as one matmul over the joined inner dimension."""
    return ring_matmul(torch.cat([a1, a2], 1), torch.cat([b1, b2], 0))


class ReLU:
    """max(x, 0). After a Linear (a raw product), the truncation is fused in."""

    def __init__(self):
        self._state: dict | None = None

    def parameters(self) -> list[tuple[str, Shared]]:
        return []

    def forward(self, ctx: PartyContext, x: Shared, *, trunc_bits: int = 0, train: bool = False,
                bwd_bits: int = 0, bwd_factor: int = 1, bwd_factor_scale: int = 0) -> Protocol[Shared]:
        """`bwd_bits`: how far backward truncates the incoming gradient after multiplying it
        by the public `bwd_factor` (a learning rate with `bwd_factor_scale` fractional bits)."""
        ctx.check_shared(x, "ReLU")
        m = ctx.pre.take(Request("relu", (tuple(x.shape),), relu_param(trunc_bits, bwd_bits, train)))
        p0 = ctx.party == 0
        offset = ((1 << TRUNC_RANGE_BITS) + (1 << (trunc_bits - 1))) if trunc_bits else 0
        masked = x.share + m["r"] + offset if p0 else x.share + m["r"]
        c = (yield from open_ring(ctx, "relu/open", {"c": masked}))["c"]
        bit = yield from sign_rounds(ctx, c - offset, m, "relu")        # msb(x)
        e = yield from open_bit(ctx, ~bit if p0 else bit, m, "relu", x.shape)   # [x >= 0] ^ tb
        t = m["t"]
        value, value_t = _unmask(ctx, c, m, trunc_bits, "r", "rt")
        y = x.like(e * value + (1 - 2 * e) * value_t, x.scale - trunc_bits)
        if train:
            self._state = {"e": e, "t": t, "m": m, "bwd_bits": bwd_bits, "factor": bwd_factor,
                           "factor_scale": bwd_factor_scale}
        return y

    def backward(self, ctx: PartyContext, grad: Shared) -> Protocol[Shared]:
        """grad * [x >= 0]; a raw grad (bwd_bits more fractional bits) is truncated too. 1 round."""
        st = self._state
        if st is None:
            raise ProtocolError("ReLU.backward before a training forward")
        ctx.check_shared(grad, "ReLU.backward")
        bits, m = st["bwd_bits"], st["m"]
        scaled = grad.share * st["factor"]
        offset = ((1 << TRUNC_RANGE_BITS) + (1 << (bits - 1))) if bits else 0
        masked = scaled + m["q"] + offset if ctx.party == 0 else scaled + m["q"]
        c = (yield from open_ring(ctx, "relu/grad", {"c": masked}))["c"]
        value, value_t = _unmask(ctx, c, m, bits, "q", "qt")
        e = st["e"]
        self._state = None
        return grad.like(e * value + (1 - 2 * e) * value_t, grad.scale + st["factor_scale"] - bits)


def _unmask(ctx: PartyContext, c: torch.Tensor, m: dict, bits: int, mask: str, prod: str):
    """Shares of v and v * t for the opened c = v (+ offset) + mask, truncating v by `bits`."""
    t = m["t"]
    if not bits:
        v = (c - m[mask]) if ctx.party == 0 else -m[mask]
        return v, c * t - m[prod]
    public = logical_rshift(c, bits) - (1 << (TRUNC_RANGE_BITS - bits))
    wrap = (1 - msb(c)) << (RING_BITS - bits)
    v = wrap * m[f"{mask}_msb"] - m[f"{mask}_hi"]
    vt = public * t + wrap * m[f"{prod}_msb"] - m[f"{prod}_hi"]
    return (v + public if ctx.party == 0 else v), vt


class Flatten:
    """(batch, ...) -> (batch, features); no parameters, no rounds."""

    def __init__(self):
        self._shape = None

    def parameters(self) -> list[tuple[str, Shared]]:
        return []

    def forward(self, ctx: PartyContext, x: Shared) -> Shared:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, ctx: PartyContext, grad: Shared) -> Shared:
        return grad.reshape(*self._shape)


class Sequential:
    def __init__(self, layers: Sequence):
        self.layers = list(layers)
        self._wide = False   # this training step updates the first Linear without truncation

    def wide_first(self) -> int | None:
        """Index of the first Linear if it has no parameters below and a ReLU above: its
        weight can be kept at f + (input scale) fractional bits and updated exactly."""
        for i, layer in enumerate(self.layers):
            if layer.parameters():
                ok = isinstance(layer, Linear) and i + 1 < len(self.layers) and \
                    isinstance(self.layers[i + 1], ReLU)
                return i if ok else None
        return None

    def parameters(self) -> list[tuple[str, Shared]]:
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers)
                for name, p in layer.parameters()]

    def _has_params_below(self, i: int) -> bool:
        return any(layer.parameters() for layer in self.layers[:i])

    def forward(self, ctx: PartyContext, x: Shared, *, train: bool = False,
                lr: float | None = None, truncate_output: bool = True) -> Protocol[Shared]:
        """With `train` and `lr`, the ReLU above a wide first Linear (see train_step)
        folds the learning rate into its backward truncation."""
        f = ctx.config.frac_bits
        ctx.check_shared(x, "model input")
        wide = self.wide_first() if train and lr is not None else None
        self._wide = wide is not None
        h = x
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if isinstance(layer, ReLU):
                bwd_bits = f if isinstance(nxt, Linear) else 0
                factor, factor_scale = 1, 0
                keep = 0   # extra fractional bits the backward output keeps
                if wide is not None and i == wide + 1:
                    factor_scale = f + _lr_bits(lr)
                    factor = _lr_ring(lr, factor_scale)
                    keep = WIDE_BITS
                h = yield from layer.forward(ctx, h, trunc_bits=h.scale - f, train=train,
                                             bwd_bits=bwd_bits + factor_scale - keep,
                                             bwd_factor=factor, bwd_factor_scale=factor_scale)
                continue
            if h.scale > f:
                h = yield from truncate(ctx, h, h.scale - f)
            if isinstance(layer, Linear):
                h = yield from layer.forward(ctx, h, train=train, grad_x=self._has_params_below(i))
            else:
                h = layer.forward(ctx, h)
        if h.scale > f and truncate_output:
            h = yield from truncate(ctx, h, h.scale - f)
        return h

    def backward_sgd(self, ctx: PartyContext, grad: Shared, lr: float) -> Protocol[None]:
        """Backpropagate `grad` (scale f) and apply SGD to every parameter, in MPC."""
        f = ctx.config.frac_bits
        i = len(self.layers) - 1
        while i >= 0:
            layer = self.layers[i]
            if isinstance(layer, Linear):
                below = self._has_params_below(i)
                dw, dx, db = yield from layer.backward(ctx, grad, need_input_grad=below)
                if not below and self._wide:
                    # grad came as lr * g at scale f, so x^T (lr g) is the exact update of
                    # a weight kept at f + (input scale) bits: no truncation, no round
                    if dw.scale != layer.weight.scale:
                        raise ProtocolError(f"first layer: update scale {dw.scale}, weight "
                                            f"scale {layer.weight.scale}")
                    layer.weight = layer.weight - dw
                    if db is not None:
                        if db.scale != layer.bias.scale:
                            raise ProtocolError(f"first layer: bias update scale {db.scale}, "
                                                f"bias scale {layer.bias.scale}")
                        layer.bias = layer.bias - db
                    return None
                jobs = [_sgd_update(ctx, layer, "weight", dw, lr)]
                if db is not None:
                    jobs.append(_sgd_update(ctx, layer, "bias", db, lr))
                if not below:
                    yield from parallel(*jobs)
                    return None
                prev = self.layers[i - 1] if i > 0 else None
                if isinstance(prev, ReLU):
                    first = prev.backward(ctx, dx)
                    i -= 1
                else:
                    first = truncate(ctx, dx, dx.scale - f)
                grad, *_ = yield from parallel(first, *jobs)
            elif isinstance(layer, ReLU):
                grad = yield from layer.backward(ctx, grad)
            else:
                grad = layer.backward(ctx, grad)
            i -= 1
        return None


def _lr_bits(lr: float) -> int:
    """Extra fractional bits for the learning rate: ~16 significant bits, at most 12 more."""
    return max(0, min(12, math.ceil(-math.log2(lr)))) if lr < 1 else 0


# The first Linear's weight is kept at f + WIDE_BITS + (input scale) fractional bits
# during training, so that lr * x^T g, with lr * g computed at f + WIDE_BITS bits by the
# ReLU's backward truncation, is its exact update. More bits are more precise updates and
# a smaller range for that layer's outputs: |x W1| < 2^(62 - 2f - WIDE_BITS - input scale),
# 256 for f = 16 and inputs at 16 bits.
WIDE_BITS = 6


def _lr_ring(lr: float, bits: int) -> int:
    lr_ring = int(round(lr * (1 << bits)))
    if lr_ring <= 0:
        raise BadRequest("the learning rate is below the fixed-point resolution")
    return lr_ring


def _sgd_update(ctx: PartyContext, layer: Linear, name: str, grad: Shared, lr: float
                ) -> Protocol[None]:
    """param -= lr * grad with one truncation (grad may be raw, with more fractional bits)."""
    param = getattr(layer, name)
    bits = ctx.config.frac_bits + _lr_bits(lr)
    step = grad.like(grad.share * _lr_ring(lr, bits), grad.scale + bits)
    step = yield from truncate(ctx, step, step.scale - param.scale)
    setattr(layer, name, param - step)
    return None


def mse_loss(ctx: PartyContext, pred: Shared, target: Shared) -> Protocol[Shared]:
    """mean((pred - target)^2), shared: one product and one public division."""
    ctx.check_shared(pred, "mse_loss", "pred")
    ctx.check_shared(target, "mse_loss", "target")
    if pred.shape != target.shape:
        raise ShapeError(f"mse_loss: pred {list(pred.shape)} vs target {list(target.shape)}")
    diff = pred - target
    sq = yield from mul(ctx, diff, diff)
    return (yield from div_public(ctx, sq.sum(), pred.numel()))


# ---------------------------------------------------------------- whole models

LAYER_KINDS = ("linear", "relu", "flatten")


def check_layers(layers) -> list[dict]:
    """Validate a model layout from the wire: [{"kind": "linear", "weight": id, "bias": id|None},
    {"kind": "relu"}, {"kind": "flatten"}]."""
    if not isinstance(layers, (list, tuple)) or not 1 <= len(layers) <= 64:
        raise BadRequest("a model has 1 to 64 layers")
    out = []
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("kind") not in LAYER_KINDS:
            raise BadRequest(f"layers are maps with a kind in {LAYER_KINDS}")
        if layer["kind"] == "linear":
            if not isinstance(layer.get("weight"), str) or not (
                    layer.get("bias") is None or isinstance(layer.get("bias"), str)):
                raise BadRequest("a linear layer names its weight (and bias) by share id")
            out.append({"kind": "linear", "weight": layer["weight"], "bias": layer.get("bias")})
        else:
            out.append({"kind": layer["kind"]})
    return out


def check_shapes(layers: list[dict], params: dict, x_shape: tuple, y_shape: tuple | None) -> None:
    """Shapes of a model run on a batch (ShapeError if they do not fit)."""
    if len(x_shape) < 2:
        raise ShapeError(f"a batch has shape (batch, features...), got {list(x_shape)}")
    shape = tuple(x_shape)
    for i, layer in enumerate(layers):
        if layer["kind"] == "flatten":
            n = 1
            for d in shape[1:]:
                n *= d
            shape = (shape[0], n)
        elif layer["kind"] == "linear":
            w = params[layer["weight"]]
            if len(w) != 2 or len(shape) != 2 or shape[1] != w[0]:
                raise ShapeError(f"layer {i} (linear {w[0]}->{w[1] if len(w) > 1 else '?'}) "
                                 f"cannot take input of shape {list(shape)}")
            if layer.get("bias") and tuple(params[layer["bias"]]) != (w[1],):
                raise ShapeError(f"layer {i}: bias shape does not match")
            shape = (shape[0], w[1])
    if y_shape is not None and tuple(y_shape) != shape:
        raise ShapeError(f"targets have shape {list(y_shape)}, the model outputs {list(shape)}")


def build(layers: list[dict], params: dict[str, Shared]) -> Sequential:
    out = []
    for layer in layers:
        if layer["kind"] == "linear":
            out.append(Linear(params[layer["weight"]],
                              params[layer["bias"]] if layer.get("bias") else None))
        elif layer["kind"] == "relu":
            out.append(ReLU())
        else:
            out.append(Flatten())
    return Sequential(out)


def parameters(model: Sequential) -> list[Shared]:
    """Parameters in layout order (weight, then bias, per linear layer)."""
    return [p for _, p in model.parameters()]


def predict(ctx: PartyContext, model: Sequential, x: Shared, *, raw_output: bool = False
            ) -> Protocol[Shared]:
    """The model's output on x. With `raw_output` the last product is not truncated (it keeps
    up to 2f fractional bits): one round fewer, for an output that is only reconstructed."""
    return (yield from model.forward(ctx, x, truncate_output=not raw_output))


def _rescale(ctx: PartyContext, p: Shared, scale: int) -> Protocol[Shared]:
    """`p` at `scale` fractional bits: a local shift up, or a truncation down."""
    if p.scale < scale:
        return p.like(p.share << (scale - p.scale), scale)
    if p.scale > scale:
        return (yield from truncate(ctx, p, p.scale - scale))
    return p


def train_step(ctx: PartyContext, model: Sequential, x: Shared, y: Shared, lr: float, *,
               with_loss: bool = True) -> Protocol[Shared | None]:
    """Forward, MSE, backward and SGD; returns the shared loss (or None).

    The gradient of mean((pred - y)^2) is 2 (pred - y) / N. Backpropagating pred - y
    and folding 2 / N into the learning rate is the same update in exact arithmetic,
    and keeps the fixed-point gradients N/2 times further above the resolution."""
    if not lr > 0:
        raise BadRequest("learning rate must be positive")
    ctx.check_shared(y, "train_step", "targets")
    ctx.check_shared(x, "train_step", "inputs")
    step_lr = lr * 2.0 / y.numel()
    wide = model.wide_first()
    if wide is not None:   # keep the first weight at f + (input scale) bits (see backward_sgd)
        layer = model.layers[wide]
        f = ctx.config.frac_bits
        layer.weight = yield from _rescale(ctx, layer.weight, f + WIDE_BITS + x.scale)
        if layer.bias is not None:
            layer.bias = yield from _rescale(ctx, layer.bias, f + WIDE_BITS)
    pred = yield from model.forward(ctx, x, train=True, lr=step_lr)
    if pred.shape != y.shape:
        raise ShapeError(f"mse: pred {list(pred.shape)} vs target {list(y.shape)}")
    diff = pred - y
    if with_loss:
        _, loss = yield from parallel(model.backward_sgd(ctx, diff, step_lr),
                                      mse_loss(ctx, pred, y))
        return loss
    yield from model.backward_sgd(ctx, diff, step_lr)
    return None
