"""The training loop a data owner's peer runs on its own data.

The loop is the peer's own code; a message only configures it, and only from
whitelists: optimizers (:data:`OPTIMIZERS`) and losses (:data:`LOSSES`) by name,
each option checked. It supports FedProx's proximal term and per-example DP-SGD
(Abadi et al. 2016) with Poisson sampling, per-sample gradients from
``torch.func`` (``vmap`` over ``grad``), clipping and Gaussian noise, with the
privacy spent reported by the RDP accountant of :mod:`p2pgrid.protocols.dp`.

>>> import torch
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Linear(2, 2)
>>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
>>> params, n, metrics = train_locally(model, x, y, epochs=20, batch_size=16,
...                                    optimizer={"name": "sgd", "lr": 0.5}, loss="cross_entropy", seed=1)
>>> n, evaluate(model, x, y, "cross_entropy")["accuracy"] > 0.9
(64, True)
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from p2pgrid.errors import BadRequest, ShapeError, UnknownOp

from .dp import RDPAccountant
from .private_random import PrivateRandom

__all__ = ["train_locally", "evaluate", "OPTIMIZERS", "LOSSES", "make_optimizer", "TrainingStopped",
           "dp_steps"]


class TrainingStopped(Exception):
    """``should_stop`` asked the loop to end early (the round it served was abandoned)."""


def _num(lo: float, hi: float, *, lo_open: bool = False):
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not (lo < v if lo_open else lo <= v) or not v <= hi:
            raise BadRequest(f"{where}: expected a number in {'(' if lo_open else '['}{lo}, {hi}]")
        return float(v)
    return check


def _flag(v, where):
    if not isinstance(v, bool):
        raise BadRequest(f"{where}: expected a bool")
    return v


def _betas(v, where):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise BadRequest(f"{where}: expected two numbers")
    return tuple(_num(0.0, 1.0)(b, where) for b in v)


#: name -> (torch optimizer, {option: checker}); "lr" is required.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Callable]]] = {
    "sgd": (torch.optim.SGD, {"lr": _num(0, 100, lo_open=True), "momentum": _num(0, 1),
                              "weight_decay": _num(0, 10), "nesterov": _flag, "dampening": _num(0, 1)}),
    "adam": (torch.optim.Adam, {"lr": _num(0, 100, lo_open=True), "betas": _betas,
                                "eps": _num(0, 1, lo_open=True), "weight_decay": _num(0, 10),
                                "amsgrad": _flag}),
}


def _ce(out, y):
    return F.cross_entropy(out, y)


def _mse(out, y):
    return F.mse_loss(out, y.to(out.dtype).reshape(out.shape))


def _bce(out, y):
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype).reshape(out.shape))


#: name -> loss(output, target), mean over the batch.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _ce, "mse": _mse, "bce_with_logits": _bce}


def _loss_fn(name) -> Callable:
    if not isinstance(name, str) or name not in LOSSES:
        raise UnknownOp(f"loss {name!r} is not one of {sorted(LOSSES)}", op=str(name))
    return LOSSES[name]


def make_optimizer(params, config: dict) -> torch.optim.Optimizer:
    """A whitelisted optimizer from a config such as ``{"name": "sgd", "lr": 0.05}``."""
    if not isinstance(config, dict):
        raise BadRequest("optimizer config must be a map")
    name = config.get("name")
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise UnknownOp(f"optimizer {name!r} is not one of {sorted(OPTIMIZERS)}", op=str(name))
    cls, schema = OPTIMIZERS[name]
    options = {k: v for k, v in config.items() if k != "name"}
    unknown = set(options) - set(schema)
    if unknown:
        raise BadRequest(f"optimizer {name} takes no options {sorted(map(str, unknown))}")
    if "lr" not in options:
        raise BadRequest(f"optimizer {name} needs an lr")
    return cls(params, **{k: schema[k](v, f"optimizer.{k}") for k, v in options.items()})


def _check_data(x, y) -> int:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise BadRequest("x and y must be tensors")
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        raise ShapeError(f"x {list(x.shape)} and y {list(y.shape)} need the same first dimension")
    if len(x) == 0:
        raise ShapeError("no examples to train on")
    return len(x)


def _dp_config(dp: dict, n: int, batch_size: int) -> dict:
    if not isinstance(dp, dict):
        raise BadRequest("dp must be a map")
    schema = {"clip": _num(0, 1e6, lo_open=True), "noise_multiplier": _num(0, 1e6),
              "delta": _num(0, 1, lo_open=True)}
    unknown = set(dp) - set(schema)
    if unknown or "clip" not in dp or "noise_multiplier" not in dp:
        raise BadRequest(f"dp needs clip and noise_multiplier (and optionally delta); "
                         f"unknown {sorted(map(str, unknown))}")
    out = {k: schema[k](v, f"dp.{k}") for k, v in dp.items()}
    out.setdefault("delta", min(1e-5, 1.0 / (10 * n)))
    out["sample_rate"] = min(1.0, batch_size / n)
    return out


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's modules, with the layer a single-layer GraphModel runs (kept out of its tree)."""
    root = getattr(model, "root_layer", None)
    return [*model.modules(), *([root] if isinstance(root, nn.Module) else [])]


def _checked_loss(loss_fn: Callable) -> Callable:
    def loss(out, y):
        if not isinstance(out, torch.Tensor):
            raise ShapeError(f"the model returns a {type(out).__name__} (as nn.LSTM and nn.GRU do), "
                             f"a loss needs one tensor: put the layer in a module that returns one")
        return loss_fn(out, y)
    return loss


def _per_sample_grads(model, params, buffers, loss_fn, xb, yb):
    """Per-example gradients ({name: [batch, *shape]}) and losses ([batch])."""
    if not any(isinstance(m, nn.RNNBase) for m in _layers(model)):
        def one(p, x, y):
            out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))
        return vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(params, xb, yb)
    # torch's RNN kernels have no vmap rule: fall back to one backward per example.
    grads = {k: torch.empty((len(xb), *p.shape), dtype=p.dtype) for k, p in params.items()}
    losses = torch.empty(len(xb))
    for i in range(len(xb)):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        value = loss_fn(functional_call(model, (p, buffers), (xb[i:i + 1],)), yb[i:i + 1])
        g = torch.autograd.grad(value, list(p.values()), allow_unused=True)
        for (k, v), gi in zip(p.items(), g):
            grads[k][i] = 0 if gi is None else gi
        losses[i] = value.detach()
    return grads, losses


def _dp_step(model, opt, loss_fn, xb, yb, dp, expected_batch, rand, prox_mu=0.0, anchor=None,
             clip_grad_norm=None) -> float:
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b for k, b in model.named_buffers()}
    loss = math.nan
    if len(xb):
        grads, losses = _per_sample_grads(model, params, buffers, loss_fn, xb, yb)
        loss = float(losses.mean())
        flat = torch.cat([g.reshape(len(xb), -1) for g in grads.values()], dim=1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        scale = (dp["clip"] / (norms + 1e-12)).clamp(max=1.0)
        summed = {k: torch.einsum("b,b...->...", scale.to(g.dtype), g) for k, g in grads.items()}
    else:
        summed = {k: torch.zeros_like(p) for k, p in params.items()}
    std = dp["noise_multiplier"] * dp["clip"]
    named = dict(model.named_parameters())
    for k, s in summed.items():
        noise = rand.normal(s.shape, std, s.dtype) if std > 0 else 0.0
        g = (s + noise) / expected_batch
        if anchor:  # FedProx's term depends on no example: adding it after the noise costs no privacy
            g = g + prox_mu * (params[k] - anchor[k])
        named[k].grad = g.to(named[k].dtype)
    if clip_grad_norm is not None:  # post-processing of the noisy gradient
        torch.nn.utils.clip_grad_norm_([named[k] for k in summed], clip_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train_locally(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                  optimizer: dict, loss: str, prox_mu: float = 0.0,
                  global_params: dict[str, torch.Tensor] | None = None, dp: dict | None = None,
                  seed: int | None = None, should_stop: Callable[[], bool] | None = None,
                  clip_grad_norm: float | None = None,
                  ) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    """Train `model` in place on (x, y); return (state dict copy, number of examples, metrics).

    `prox_mu` > 0 adds FedProx's (mu / 2) * ||w - w_global||^2, with `global_params`
    (default: the model's weights on entry). With `dp` = {"clip", "noise_multiplier",
    ["delta"]}, each step samples examples independently with rate batch_size / n
    (Poisson sampling, which the accountant assumes), clips each example's gradient
    to `clip` and adds N(0, (noise_multiplier * clip)^2); metrics then carry
    ``epsilon`` at ``delta``. The sampling and the noise come from the OS CSPRNG
    (:class:`p2pgrid.protocols.private_random.PrivateRandom`); `seed` drives only what privacy does not
    depend on (the shuffling of non-DP epochs, dropout masks), so a seeded DP run is
    not reproducible. DP training refuses BatchNorm (it mixes examples).
    `clip_grad_norm` rescales each step's gradient to at most that L2 norm (over all
    trainable parameters, as ``torch.nn.utils.clip_grad_norm_``); under DP it applies to the
    noisy gradient, which costs no privacy. `should_stop`, polled before every step, ends
    the loop with :class:`TrainingStopped` (a peer uses it when the round it trains for
    was abandoned). Metrics carry
    ``train_seconds``, the loop's wall time.
    """
    n = _check_data(x, y)
    loss_fn = _loss_fn(loss)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= 10_000:
        raise BadRequest("epochs must be an int in [0, 10000]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadRequest("batch_size must be a positive int")
    prox_mu = _num(0, 1e6)(prox_mu, "prox_mu")
    if clip_grad_norm is not None:
        clip_grad_norm = _num(0, 1e6, lo_open=True)(clip_grad_norm, "clip_grad_norm")
    loss_fn = _checked_loss(loss_fn)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise BadRequest("the model has no trainable parameters")
    opt = make_optimizer(trainable, optimizer)
    batch_size = min(batch_size, n)
    if dp is not None:
        dp = _dp_config(dp, n, batch_size)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _layers(model)):
            raise BadRequest("DP-SGD cannot train BatchNorm layers (they mix examples); use LayerNorm")
    anchor = None
    if prox_mu > 0:
        source = global_params if global_params is not None else dict(model.named_parameters())
        anchor = {}
        for k, p in model.named_parameters():
            if p.requires_grad:
                if k not in source or source[k].shape != p.shape:
                    raise ShapeError(f"global_params lack a {list(p.shape)} tensor for {k!r}")
                anchor[k] = source[k].detach().clone().to(p.dtype)

    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
    # DP sampling and noise: this peer's OS CSPRNG, never `seed` (which whoever asks for
    # the training may choose, and could then subtract the noise it reproduces)
    private = PrivateRandom() if dp is not None else None
    was_training = model.training
    model.train()
    steps, last_losses = 0, []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=gen)))  # dropout masks
        for _ in range(epochs):
            last_losses = []
            if dp is None:
                order = torch.randperm(n, generator=gen)
                batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            else:  # Poisson sampling: n / batch_size steps of expected size batch_size
                batches = [private.bernoulli(n, dp["sample_rate"]) for _ in range(max(1, n // batch_size))]
            for idx in batches:
                if should_stop is not None and should_stop():
                    model.train(was_training)
                    raise TrainingStopped(f"stopped after {steps} steps")
                xb, yb = x[idx], y[idx]
                if dp is not None:
                    last_losses.append(_dp_step(model, opt, loss_fn, xb, yb, dp, batch_size, private,
                                                prox_mu, anchor, clip_grad_norm))
                else:
                    opt.zero_grad(set_to_none=True)
                    value = loss_fn(model(xb), yb)
                    last_losses.append(float(value.detach()))
                    if anchor:
                        named = dict(model.named_parameters())
                        value = value + prox_mu / 2 * sum(
                            (named[k] - a).pow(2).sum() for k, a in anchor.items())
                    value.backward()
                    if clip_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(trainable, clip_grad_norm)
                    opt.step()
                steps += 1
    model.train(was_training)
    losses = [v for v in last_losses if not math.isnan(v)]
    metrics: dict[str, Any] = {"loss": sum(losses) / len(losses) if losses else math.nan,
                               "steps": steps, "epochs": epochs,
                               "train_seconds": time.perf_counter() - started}
    if dp is not None:
        acc = RDPAccountant()
        acc.step(dp["noise_multiplier"], dp["sample_rate"], steps)
        metrics.update(epsilon=acc.epsilon(dp["delta"]), delta=dp["delta"],
                       noise_multiplier=dp["noise_multiplier"], clip=dp["clip"],
                       sample_rate=dp["sample_rate"])
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return params, n, metrics


def dp_steps(n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, number of steps) DP-SGD takes for `epochs` over `n` examples: what a
    data owner feeds its privacy accountant before agreeing to train."""
    batch_size = max(1, min(batch_size, n))
    return min(1.0, batch_size / n), epochs * max(1, n // batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of `model` on (x, y), in eval mode.

    Accuracy is argmax agreement for cross_entropy, sign agreement (logit > 0)
    for bce_with_logits, and NaN for mse.
    """
    n = _check_data(x, y)
    loss_fn = _loss_fn(loss)
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0.0
    try:
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            out = model(xb)
            total += float(loss_fn(out, yb)) * len(xb)
            if loss == "cross_entropy":
                correct += float((out.argmax(-1) == yb).sum())
            elif loss == "bce_with_logits":
                correct += float(((out > 0) == (yb.reshape(out.shape) > 0.5)).float().mean()) * len(xb)
    finally:
        model.train(was_training)
    return {"loss": total / n, "accuracy": correct / n if loss != "mse" else math.nan}
