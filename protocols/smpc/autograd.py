"""Encrypted training pieces: Linear, ReLU, MSE and SGD on shared tensors.

Small explicit layers, not a tape: each layer's ``forward`` keeps what its
``backward`` needs (this party's shares only), ``backward`` returns the gradient
for the layer below and stores parameter gradients. Everything is a protocol
generator, so a training step runs in the harness or over the network unchanged.
Learning rate and batch size are public.

Rounds per step (2 parties, local truncation): Linear forward 1, backward 1 (two
matmuls in parallel); ReLU forward 9, backward 1; MSE gradient 0; SGD 0
(3+ parties add one truncation round to each fixed-point product).

    model = Sequential([Linear(w1, b1), ReLU(), Linear(w2, b2)])
    pred = yield from model.forward(ctx, x)
    grad, loss = yield from mse_loss(ctx, pred, y, with_loss=True)
    yield from model.backward(ctx, grad)
    yield from sgd_step(ctx, model, lr=0.1)
"""

from __future__ import annotations

from typing import Sequence

import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError

from .beaver import beaver_product, div_public, matmul, mul, scale_public
from .compare import relu
from .runtime import PartyContext, Protocol, parallel
from .sharing import Shared

__all__ = ["Linear", "ReLU", "Sequential", "mse_loss", "sgd_step"]


class Linear:
    """y = x @ weight + bias; weight (in, out), bias (out,) or None, both Shared."""

    def __init__(self, weight: Shared, bias: Shared | None = None):
        if not isinstance(weight, Shared) or weight.dim() != 2:
            raise ShapeError("Linear weight must be a 2-d Shared (in_features, out_features)")
        if bias is not None and (not isinstance(bias, Shared) or tuple(bias.shape) != (weight.shape[1],)):
            raise ShapeError("Linear bias must be a Shared of shape (out_features,)")
        self.weight, self.bias = weight, bias
        self.grad_weight: Shared | None = None
        self.grad_bias: Shared | None = None
        self._x: Shared | None = None

    def parameters(self) -> list[tuple[str, Shared]]:
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def forward(self, ctx: PartyContext, x: Shared) -> Protocol[Shared]:
        ctx.check_shared(x, "Linear.forward")
        if x.dim() != 2 or x.shape[1] != self.weight.shape[0]:
            raise ShapeError(f"Linear expects (batch, {self.weight.shape[0]}), got {list(x.shape)}")
        self._x = x
        y = yield from matmul(ctx, x, self.weight)
        return y + self.bias if self.bias is not None else y

    def backward(self, ctx: PartyContext, grad: Shared) -> Protocol[Shared]:
        if self._x is None:
            raise ProtocolError("Linear.backward before forward")
        grad_x, grad_w = yield from parallel(matmul(ctx, grad, self.weight.T),
                                             matmul(ctx, self._x.T, grad))
        self.grad_weight = grad_w
        self.grad_bias = grad.sum(0) if self.bias is not None else None
        self._x = None
        return grad_x


class ReLU:
    def __init__(self):
        self._mask: Shared | None = None

    def parameters(self) -> list[tuple[str, Shared]]:
        return []

    def forward(self, ctx: PartyContext, x: Shared) -> Protocol[Shared]:
        y, self._mask = yield from relu(ctx, x, return_mask=True)
        return y

    def backward(self, ctx: PartyContext, grad: Shared) -> Protocol[Shared]:
        if self._mask is None:
            raise ProtocolError("ReLU.backward before forward")
        raw = yield from beaver_product(ctx, grad.share, self._mask.share, "triple",
                                        "relu/backward", torch.mul)
        self._mask = None
        return grad.like(raw)


class Sequential:
    def __init__(self, layers: Sequence):
        self.layers = list(layers)

    def parameters(self) -> list[tuple[str, Shared]]:
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers)
                for name, p in layer.parameters()]

    def forward(self, ctx: PartyContext, x: Shared) -> Protocol[Shared]:
        for layer in self.layers:
            x = yield from layer.forward(ctx, x)
        return x

    def backward(self, ctx: PartyContext, grad: Shared) -> Protocol[Shared]:
        for layer in reversed(self.layers):
            grad = yield from layer.backward(ctx, grad)
        return grad


def mse_loss(ctx: PartyContext, pred: Shared, target: Shared, *, with_loss: bool = False
             ) -> Protocol:
    """Gradient of mean((pred - target)^2) w.r.t. pred: 2 (pred - target) / N.

    With `with_loss`, also the shared loss value (one extra Beaver round).
    """
    ctx.check_shared(pred, "mse_loss", "pred")
    ctx.check_shared(target, "mse_loss", "target")
    if pred.shape != target.shape:
        raise ShapeError(f"mse_loss: pred {list(pred.shape)} vs target {list(target.shape)}")
    diff = pred - target
    grad = yield from div_public(ctx, diff * 2, pred.numel())
    if not with_loss:
        return grad
    sq = yield from mul(ctx, diff, diff)
    loss = yield from div_public(ctx, sq.sum(), pred.numel())
    return grad, loss


def sgd_step(ctx: PartyContext, model, lr: float) -> Protocol[None]:
    """param -= lr * grad for every Linear layer of `model` (public lr)."""
    if not lr > 0:
        raise BadRequest("learning rate must be positive")
    layers = [layer for layer in (model.layers if isinstance(model, Sequential) else [model])
              if isinstance(layer, Linear)]
    jobs, slots = [], []
    for layer in layers:
        if layer.grad_weight is None:
            raise ProtocolError("sgd_step before backward")
        jobs.append(scale_public(ctx, layer.grad_weight, lr))
        slots.append((layer, "weight"))
        if layer.bias is not None:
            jobs.append(scale_public(ctx, layer.grad_bias, lr))
            slots.append((layer, "bias"))
    steps = yield from parallel(*jobs)        # all truncations share one round (3+ parties)
    for (layer, name), step in zip(slots, steps):
        setattr(layer, name, getattr(layer, name) - step)
    for layer in layers:
        layer.grad_weight = layer.grad_bias = None
    return None
