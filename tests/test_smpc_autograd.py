"""Encrypted training: Linear/ReLU/MSE backward and SGD match plaintext torch autograd."""

import pytest
import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from protocols.smpc import Shared, reveal, run_parties
from protocols.smpc.autograd import Linear, ReLU, Sequential, mse_loss, sgd_step
from protocols.smpc.testing import share_inputs

STEPS, LR = 4, 0.05


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]], dtype=torch.float64)) + 0.3
    w1 = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.5
    b1 = torch.randn(8, generator=g, dtype=torch.float64) * 0.1
    w2 = torch.randn(8, 1, generator=g, dtype=torch.float64) * 0.5
    b2 = torch.zeros(1, dtype=torch.float64)
    return x, y, [w1, b1, w2, b2]


def _plaintext(x, y, params):
    params = [p.clone().requires_grad_(True) for p in params]
    losses = []
    for _ in range(STEPS):
        w1, b1, w2, b2 = params
        pred = torch.relu(x @ w1 + b1) @ w2 + b2
        loss = ((pred - y) ** 2).mean()
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            params = [(p - LR * g).requires_grad_(True) for p, g in zip(params, grads)]
    return [p.detach() for p in params], losses


@pytest.mark.parametrize("n", [2, 3])
def test_mlp_training_matches_plaintext(n):
    x, y, params = _data()
    shares = share_inputs(n, [x, y, *params], seed=1)

    def party(ctx):
        xs, ys, w1, b1, w2, b2 = (ctx.wrap(s[ctx.party]) for s in shares)
        model = Sequential([Linear(w1, b1), ReLU(), Linear(w2, b2)])
        losses = []
        for _ in range(STEPS):
            pred = yield from model.forward(ctx, xs)
            grad, loss = yield from mse_loss(ctx, pred, ys, with_loss=True)
            losses.append((yield from reveal(ctx, loss)).item())
            yield from model.backward(ctx, grad)
            yield from sgd_step(ctx, model, LR)
        final = []
        for _, p in model.parameters():
            final.append((yield from reveal(ctx, p)))
        return final, losses

    res = run_parties(n, party, seed=2)
    (final, losses) = res.outputs[0]
    want, want_losses = _plaintext(x, y, params)
    for got, exp in zip(final, want):
        assert (got - exp).abs().max() < 2e-3
    assert max(abs(a - b) for a, b in zip(losses, want_losses)) < 2e-3
    assert losses[-1] < losses[0]


def test_layer_errors():
    w = Shared(torch.zeros(3, 2, dtype=torch.int64), 0, 2, 16)
    with pytest.raises(ShapeError):
        Linear(Shared(torch.zeros(3, dtype=torch.int64), 0, 2, 16))
    with pytest.raises(ShapeError):
        Linear(w, Shared(torch.zeros(3, dtype=torch.int64), 0, 2, 16))

    def backward_first(ctx):
        layer = Linear(ctx.wrap(torch.zeros(3, 2, dtype=torch.int64)))
        return (yield from layer.backward(ctx, ctx.wrap(torch.zeros(1, 2, dtype=torch.int64))))

    with pytest.raises(ProtocolError):
        run_parties(2, backward_first, seed=0)

    def bad_lr(ctx):
        return (yield from sgd_step(ctx, Linear(ctx.wrap(torch.zeros(3, 2, dtype=torch.int64))), 0.0))

    with pytest.raises(BadRequest):
        run_parties(2, bad_lr, seed=0)

    def wrong_input(ctx):
        layer = Linear(ctx.wrap(torch.zeros(3, 2, dtype=torch.int64)))
        return (yield from layer.forward(ctx, ctx.wrap(torch.zeros(1, 4, dtype=torch.int64))))

    with pytest.raises(ShapeError):
        run_parties(2, wrong_input, seed=0)
