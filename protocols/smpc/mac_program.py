"""Programs, inference and training on authenticated shares (``security="active"``).

The same program wire form as :mod:`.program` (the same dataflow runner, which takes an
op table), with :data:`ACTIVE_OPS`: each op on :class:`.mac.AuthShared` values, every
product truncated with dealt authenticated pairs (never locally), comparisons and ReLU
with dealt authenticated chunk tables. Local ops (reshape, slicing, sums...) apply the
same linear map to value and MAC shares, which keeps the MAC relation.

Layers (Linear, ReLU, Flatten), MSE and SGD follow :mod:`.autograd`'s maths: forward
``z = trunc(x W) + b``, ``h = z [z >= 0]`` (the truncation, the sign test and the
product on one opening: :func:`.mac_compare.relu`); backward ``dW = x^T g``,
``g <- trunc(g W^T) [z >= 0]`` (one opening: :func:`.mac_layers.truncmul`); the update
``W -= trunc(lr' dW)`` with lr' = 2 lr / N encoded with extra bits, except for a first
Linear below a ReLU, kept wide and updated exactly as in semi-honest training
(:func:`_wide_first`). Results leave a session only through :func:`.mac.open_masked` (a
mask only the requester knows, then one MAC check).
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError

from . import mac, mac_compare, mac_layers
from . import ring128 as R
from .autograd import WIDE_BITS
from .mac import AuthShared, MOD
from .program import OpSpec, OPS
from .runtime import parallel

__all__ = ["ACTIVE_OPS", "build", "forward", "train_step", "parameters"]


def _linear_below(net: list[list], i: int) -> bool:
    """Whether a Linear lies below layer i: then layer i's backward pass needs its input's
    gradient (and its dealt item E = G B^T)."""
    return any(layer[0] == "linear" for layer in net[:i])


def _is(v) -> bool:
    return isinstance(v, AuthShared)


def _public(v, scale: int) -> np.ndarray:
    if isinstance(v, bool) or not isinstance(v, (Real, torch.Tensor)):
        raise BadRequest(f"cannot combine an authenticated share with {type(v).__name__}")
    return mac.encode(torch.as_tensor(v, dtype=torch.float64), scale)


def _align(ctx, a: AuthShared, b: AuthShared):
    """Equal scales: the one with fewer fractional bits shifted up (exact)."""
    if a.scale < b.scale:
        a = ctx.mul_public(a, 1 << (b.scale - a.scale))
        a.scale = b.scale
    elif b.scale < a.scale:
        b = ctx.mul_public(b, 1 << (a.scale - b.scale))
        b.scale = a.scale
    return a, b


def _add(ctx, a, b):
    if _is(a) and _is(b):
        a, b = _align(ctx, a, b)
        return ctx.add(a, b)
    x, c = (a, b) if _is(a) else (b, a)
    if not _is(x):
        raise BadRequest("add: no shared operand")
    return ctx.add_public(x, _public(c, x.scale))


def _neg(ctx, a):
    out = ctx.mul_public(a, (-1) % MOD)
    out.scale = a.scale
    return out


def _sub(ctx, a, b):
    if _is(b):
        return _add(ctx, a, _neg(ctx, b))
    return _add(ctx, a, -torch.as_tensor(b, dtype=torch.float64) if isinstance(b, torch.Tensor)
                else -b)


def _trunc_to(ctx, z: AuthShared, scale: int):
    if z.scale > scale:
        return (yield from mac.truncate(ctx, z, z.scale - scale))
    return z


def _mul(ctx, a, b):
    f = ctx.frac_bits
    if _is(a) and _is(b):
        if a.shape != b.shape:
            shape = torch.broadcast_shapes(a.shape, b.shape)
            a = a.moved(lambda v: np.broadcast_to(v, shape).copy())
            b = b.moved(lambda v: np.broadcast_to(v, shape).copy())
        z = yield from mac.mul(ctx, a, b)
        return (yield from _trunc_to(ctx, z, max(a.scale, b.scale)))
    x, c = (a, b) if _is(a) else (b, a)
    if isinstance(c, int) and not isinstance(c, bool):
        out = ctx.mul_public(x, c % MOD)
        out.scale = x.scale
        return out
    enc = _public(c, f)
    out = ctx.mul_public(x, enc)
    out.scale = x.scale + f
    return (yield from _trunc_to(ctx, out, x.scale))


def _div(ctx, a, d):
    if not _is(a) or not isinstance(d, Real) or isinstance(d, bool):
        raise BadRequest("div: only a shared tensor divided by a public number")
    return (yield from _mul(ctx, a, 1.0 / float(d)))


def _matmul(ctx, a, b):
    f = ctx.frac_bits
    if _is(a) and _is(b):
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise BadRequest("matmul with security='active' takes 2-d operands")
        z = yield from mac.matmul(ctx, a, b)
        return (yield from _trunc_to(ctx, z, max(a.scale, b.scale)))
    left = not _is(a)
    x, c = (b, a) if left else (a, b)
    enc = _public(c, f)
    out = ctx.matmul_public(x, enc, left=left)
    out.scale = x.scale + f
    return (yield from _trunc_to(ctx, out, x.scale))


def _ge0(ctx, d):
    return (yield from mac_compare.ge_zero(ctx, d))


def _relu(ctx, a):
    out, _ = yield from mac_compare.relu(ctx, a)
    return out


def _one_minus(ctx, bit):
    out = ctx.add_public(_neg(ctx, bit), 1)
    out.scale = 0
    return out


def _cmp(kind):
    def run(ctx, a, b):
        if kind in ("ge", "lt"):
            bit = yield from _ge0(ctx, _sub(ctx, a, b))
        else:
            bit = yield from _ge0(ctx, _sub(ctx, b, a))
        return bit if kind in ("ge", "le") else _one_minus(ctx, bit)
    return run


def _sum(ctx, a, dim=None, keepdim=False):
    axis = tuple(dim) if isinstance(dim, (tuple, list)) else dim
    return AuthShared(R.sum_(a.value, axis, keepdim), R.sum_(a.mac, axis, keepdim), a.scale)


def _mean(ctx, a, dim=None, keepdim=False):
    s = _sum(ctx, a, dim, keepdim)
    count = R.numel(a.value) // max(R.numel(s.value), 1)
    return (yield from _mul(ctx, s, 1.0 / count))


def _index(index):
    if isinstance(index, torch.Tensor):
        return index.numpy()
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    return index


def _flatten(a, start=0, end=-1):
    shape = a.shape
    nd = len(shape)
    start, end = start % max(nd, 1), end % max(nd, 1)
    new = shape[:start] + (int(np.prod(shape[start:end + 1], dtype=np.int64)),) + shape[end + 1:]
    return a.reshape(new) if nd else a.reshape(1)


def _squeeze(a, dim=None):
    if dim is None:
        return np.squeeze(a)
    return np.squeeze(a, dim) if a.shape[dim] == 1 else a


def _local(fn):
    def run(ctx, a, *args, **kwargs):
        if not _is(a):
            raise BadRequest("expected a shared tensor as the first operand")
        return a.moved(lambda v: fn(v, *args, **kwargs))
    return run


def _join(fn):
    def run(ctx, xs, dim=0):
        xs = list(xs)
        if not xs or not all(_is(x) for x in xs) or len({x.scale for x in xs}) != 1:
            raise BadRequest("cat/stack: shared operands of one scale")
        def both(attr):
            return np.stack([fn([getattr(x, attr)[limb] for x in xs], dim) for limb in (0, 1)])
        return AuthShared(both("value"), both("mac"), xs[0].scale)
    return run


def _max(ctx, a, dim=None):   # the op's defaults, as program.py's
    return mac_compare.max(ctx, a, dim)


def _argmax(ctx, a, dim=-1, one_hot=True):
    return mac_compare.argmax(ctx, a, dim, one_hot=one_hot)


ACTIVE_OPS: dict[str, OpSpec] = {
    "add": OpSpec(OPS["add"].meta, _add),
    "sub": OpSpec(OPS["sub"].meta, _sub),
    "neg": OpSpec(OPS["neg"].meta, _neg),
    "mul": OpSpec(OPS["mul"].meta, _mul, True),
    "matmul": OpSpec(OPS["matmul"].meta, _matmul, True),
    "div": OpSpec(OPS["div"].meta, _div, True),
    "square": OpSpec(OPS["square"].meta, lambda ctx, a: _mul(ctx, a, a), True),
    "relu": OpSpec(OPS["relu"].meta, lambda ctx, a: _relu(ctx, a), True),
    "ge": OpSpec(OPS["ge"].meta, _cmp("ge"), True),
    "gt": OpSpec(OPS["gt"].meta, _cmp("gt"), True),
    "le": OpSpec(OPS["le"].meta, _cmp("le"), True),
    "lt": OpSpec(OPS["lt"].meta, _cmp("lt"), True),
    "max": OpSpec(OPS["max"].meta, _max, True),
    "argmax": OpSpec(OPS["argmax"].meta, _argmax, True),
    "sum": OpSpec(OPS["sum"].meta, _sum),
    "mean": OpSpec(OPS["mean"].meta, _mean, True),
    "reshape": OpSpec(OPS["reshape"].meta, _local(lambda v, shape: v.reshape(tuple(shape)))),
    "getitem": OpSpec(OPS["getitem"].meta, _local(lambda v, index: v[_index(index)])),
    "transpose": OpSpec(OPS["transpose"].meta, _local(lambda v, d0, d1: np.swapaxes(v, d0, d1))),
    "permute": OpSpec(OPS["permute"].meta, _local(lambda v, dims: np.transpose(v, dims))),
    "flatten": OpSpec(OPS["flatten"].meta, _local(_flatten)),
    "unsqueeze": OpSpec(OPS["unsqueeze"].meta, _local(lambda v, dim: np.expand_dims(
        v, dim if dim >= 0 else dim + v.ndim + 1))),
    "squeeze": OpSpec(OPS["squeeze"].meta, _local(_squeeze)),
    "cat": OpSpec(OPS["cat"].meta, _join(lambda vs, dim: np.concatenate(vs, dim))),
    "stack": OpSpec(OPS["stack"].meta, _join(lambda vs, dim: np.stack(vs, dim))),
}


# ---------------------------------------------------------------- layers

LR_BITS = 12     # extra fractional bits of the encoded learning rate


def build(layers: list[dict], params: dict[str, AuthShared]) -> list[list]:
    """[kind, params...] per layer (mutable: training replaces parameters)."""
    out = []
    for layer in layers:
        if layer["kind"] == "linear":
            out.append(["linear", params[layer["weight"]],
                        params[layer["bias"]] if layer.get("bias") else None])
        else:
            out.append([layer["kind"]])
    return out


def parameters(net: list[list]) -> list[AuthShared]:
    return [p for layer in net if layer[0] == "linear" for p in layer[1:] if p is not None]


def forward(ctx, net: list[list], x: AuthShared, *, keep: list | None = None,
            raw_output: bool = False, bwd: dict[int, int] | None = None):
    """The model's output; `keep` (a list, training) receives what the backward pass needs,
    one entry per layer. A product followed by a ReLU is not truncated first: the sign
    test runs on the raw product side by side with its truncation (one round saved per
    ReLU). With `raw_output`, the last product keeps 2f fractional bits. `bwd` (training):
    ReLU index -> the truncation its backward pass will apply, dealt with its forward
    item (:func:`.mac_compare.relu_train`)."""
    f = ctx.frac_bits
    h = x
    last = max((i for i, layer in enumerate(net) if layer[0] == "linear"), default=-1)
    for i, layer in enumerate(net):
        kind = layer[0]
        if kind == "flatten":
            before = h.shape
            h = h.moved(lambda v: v.reshape(v.shape[0], -1))
            if keep is not None:
                keep.append(("flatten", before))
        elif kind == "linear":
            w, b = layer[1], layer[2]
            if keep is not None:
                z, saved = yield from mac_layers.linear_forward(
                    ctx, h, w, train=True, grad_x=_linear_below(net, i))
                keep.append(("linear", saved))
            else:
                z = yield from mac.matmul(ctx, h, w)
            relu_next = i + 1 < len(net) and net[i + 1][0] == "relu"
            if not (relu_next or (raw_output and i == last)):
                z = yield from _trunc_to(ctx, z, f)
            if b is not None:
                bb = b.moved(lambda v: np.broadcast_to(v, z.shape).copy())
                if z.scale > bb.scale:
                    bb = ctx.mul_public(bb, 1 << (z.scale - bb.scale))
                z = ctx.add(z, bb)
            h = z
        else:
            # a raw product (scale > f) is truncated, sign-tested and multiplied by its
            # bit on one opening (mac_compare.relu: 3 rounds)
            back_bits = (bwd or {}).get(i, 0) if keep is not None else 0
            if back_bits:
                h, bit, back = yield from mac_compare.relu_train(ctx, h, max(h.scale - f, 0),
                                                                 back_bits)
            else:
                (h, bit), back = (yield from mac_compare.relu(ctx, h, max(h.scale - f, 0))), None
            if keep is not None:
                keep.append(("relu", (bit, back)))
    return h


def _lr(lr: float) -> int:
    enc = round(lr * (1 << LR_BITS))
    if not 0 < enc < 1 << 40:
        raise BadRequest("the learning rate is out of the fixed-point range")
    return enc


def _mse(ctx, g: AuthShared, n: int):
    """mean(g^2) at f fractional bits: one product, one truncation."""
    f = ctx.frac_bits
    sq = yield from mac.mul(ctx, g, g)
    total = _sum(ctx, sq)
    scaled = ctx.mul_public(total, max(1, round((1 << f) / n)))
    scaled.scale = sq.scale + f
    return (yield from _trunc_to(ctx, scaled, f))


def _wide_first(net: list[list]) -> int | None:
    """Index of the first Linear if a ReLU follows it: as in semi-honest training
    (:data:`.autograd.WIDE_BITS`), its weight is kept at f + WIDE_BITS + (input scale)
    fractional bits, so that x^T (lr g) is its exact update: no truncation (no opening
    of the largest weight matrix, no round), the learning rate folded into the ReLU's
    backward truncation. Its outputs must then stay below 2^(62 - 2f - WIDE_BITS -
    input scale), 256 for f = 16."""
    for i, layer in enumerate(net):
        if layer[0] == "linear":
            return i if i + 1 < len(net) and net[i + 1][0] == "relu" else None
    return None


def _rescale(ctx, p: AuthShared, scale: int):
    """`p` at `scale` fractional bits: a local shift up (exact), or a truncation down."""
    if p.scale < scale:
        out = ctx.mul_public(p, 1 << (scale - p.scale))
        out.scale = scale
        return out
    return (yield from _trunc_to(ctx, p, scale))


def _relu_back(ctx, g: AuthShared, item, bits: int):
    """trunc(g, bits) times a training ReLU's bit in one round: one opening per element
    with the backward pair dealt in its forward item (when it was dealt for these bits),
    else two (:func:`.mac_layers.truncmul`)."""
    bit, back = item
    if back is not None and back.bits == bits and back.bit.shape == g.shape:
        return (yield from mac_compare.relu_backward(ctx, g, back))
    return (yield from mac_layers.truncmul(ctx, g, bit, bits))


def _backward_bits(net: list[list], f: int, wide: int | None) -> dict[int, int]:
    """ReLU index -> the truncation :func:`_down` will apply to the gradient reaching it
    (the first ReLU below a Linear with a Linear further below; its gradient comes in at
    f + that weight's scale fractional bits), as :func:`_down` computes it."""
    out = {}
    for i, layer in enumerate(net):
        if layer[0] != "linear" or not _linear_below(net, i):
            continue
        j = i - 1
        while j >= 0 and net[j][0] not in ("relu", "linear"):
            j -= 1
        if j < 0 or net[j][0] != "relu":
            continue
        raw = f + layer[1].scale
        bits = raw + LR_BITS - f - WIDE_BITS if j - 1 == wide else raw - f
        if 0 < bits < mac_compare.CMP_BITS:
            out[j] = bits
    return out


def _down(ctx, net, saved, g: AuthShared, i: int, step: int, wide: int | None):
    """The gradient `g` (raw) through the layers below linear layer i, down to the next
    linear layer: ReLU masks (products with the saved 0/1; the first one fused with the
    truncation: one round), reshapes, then the truncation if not done yet. Above the
    wide first layer the ReLU's truncation also applies the learning rate `step` and
    keeps f + WIDE_BITS fractional bits."""
    f = ctx.frac_bits
    j = i - 1
    while j >= 0 and net[j][0] != "linear":
        kind, item = saved[j]
        if kind == "relu" and j - 1 == wide:
            scaled = ctx.mul_public(g, step)
            scaled.scale = g.scale + LR_BITS
            g = yield from _relu_back(ctx, scaled, item, scaled.scale - f - WIDE_BITS)
        elif kind == "relu" and g.scale > f:
            g = yield from _relu_back(ctx, g, item, g.scale - f)
        elif kind == "relu":
            scale = g.scale
            g = yield from mac.mul(ctx, g, item[0], "a/relu/back")
            g.scale = scale
        else:
            g = g.moved(lambda v, s=item: v.reshape(s))
        j -= 1
    return (yield from _trunc_to(ctx, g, f + WIDE_BITS if j == wide else f))


def _backward(ctx, net, saved, g: AuthShared, step: int, wide: int | None = None):
    """Backpropagate `g` and apply SGD to every linear layer, in place on `net`."""
    f = ctx.frac_bits
    i = len(net) - 1
    while i >= 0 and net[i][0] != "linear":    # layers after the last linear one
        kind, item = saved[i]
        if kind == "relu":
            g = yield from mac.mul(ctx, g, item[0], "a/relu/back")
            g.scale = f
        else:
            g = g.moved(lambda v, s=item: v.reshape(s))
        i -= 1
    while i >= 0:
        w, b = net[i][1], net[i][2]
        below = _linear_below(net, i)
        dw, gx = yield from mac_layers.linear_backward(ctx, g, saved[i][1], grad_x=below)
        if i == wide:        # g is lr g at f + WIDE_BITS: the exact update, no truncation
            if dw.scale != w.scale or (b is not None and g.scale != b.scale):
                raise ProtocolError(f"first layer: update scale {dw.scale}, weight scale "
                                    f"{w.scale}")
            net[i][1] = ctx.sub(w, dw)
            if b is not None:
                net[i][2] = ctx.sub(b, _sum(ctx, g, 0))
            break
        upd = ctx.mul_public(dw, step)
        upd.scale = dw.scale + LR_BITS
        steps = [_trunc_to(ctx, upd, f)]
        if b is not None:
            ub = ctx.mul_public(_sum(ctx, g, 0), step)
            ub.scale = g.scale + LR_BITS
            steps.append(_trunc_to(ctx, ub, f))
        if below:
            steps.append(_down(ctx, net, saved, gx, i, step, wide))
        done = yield from parallel(*steps)
        net[i][1] = ctx.sub(w, done[0])
        net[i][1].scale = f
        if b is not None:
            net[i][2] = ctx.sub(b, done[1])
            net[i][2].scale = f
        if not below:
            break
        g = done[-1]
        i -= 1
        while net[i][0] != "linear":
            i -= 1


def train_step(ctx, net: list[list], x: AuthShared, y: AuthShared, lr: float, *,
               with_loss: bool = True):
    """Forward, MSE, backward, SGD in place on `net`; returns the shared loss (or None).

    The gradient of mean((pred - y)^2) is 2 (pred - y) / N: (pred - y) is backpropagated
    and 2 / N folded into the learning rate (as :func:`.autograd.train_step` does). The
    loss is computed side by side with the backward pass."""
    if not lr > 0:
        raise BadRequest("learning rate must be positive")
    wide = _wide_first(net)
    if wide is not None:    # keep the first weight at f + WIDE_BITS + (input scale) bits
        f = ctx.frac_bits
        net[wide][1] = yield from _rescale(ctx, net[wide][1], f + WIDE_BITS + x.scale)
        if net[wide][2] is not None:
            net[wide][2] = yield from _rescale(ctx, net[wide][2], f + WIDE_BITS)
    saved: list = []
    pred = yield from forward(ctx, net, x, keep=saved,
                              bwd=_backward_bits(net, ctx.frac_bits, wide))
    if pred.shape != y.shape:
        raise ShapeError(f"mse: pred {list(pred.shape)} vs target {list(y.shape)}")
    g = ctx.sub(pred, y)                         # scale f
    step = _lr(lr * 2.0 / max(R.numel(y.value), 1))
    if with_loss:
        _, loss = yield from parallel(_backward(ctx, net, saved, g, step, wide),
                                      _mse(ctx, g, R.numel(y.value)))
        return loss
    yield from _backward(ctx, net, saved, g, step, wide)
    return None
