"""Encrypted training: fused Linear/ReLU/MSE backward and SGD match plaintext torch autograd."""

import pytest
import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from p2pgrid.protocols.smpc import Shared, SmpcConfig, reveal, run_parties
from p2pgrid.protocols.smpc.autograd import Flatten, Linear, ReLU, Sequential, predict, train_step
from p2pgrid.protocols.smpc.testing import share_inputs

STEPS, LR = 4, 0.05
DEALER = SmpcConfig(truncation="dealer")


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
            loss = yield from train_step(ctx, model, xs, ys, LR)
            losses.append((yield from reveal(ctx, loss)).item())
        final = []
        for _, p in model.parameters():
            final.append((yield from reveal(ctx, p)))
        pred = yield from predict(ctx, model, xs)
        return final, losses, (yield from reveal(ctx, pred))

    res = run_parties(n, party, seed=2, config=DEALER)
    final, losses, pred = res.outputs[0]
    want, want_losses = _plaintext(x, y, params)
    for got, exp in zip(final, want):
        assert (got - exp).abs().max() < 2e-3
    assert max(abs(a - b) for a, b in zip(losses, want_losses)) < 2e-3
    assert losses[-1] < losses[0]
    w1, b1, w2, b2 = want
    assert (pred - (torch.relu(x @ w1 + b1) @ w2 + b2)).abs().max() < 2e-3


def test_step_rounds_and_bytes():
    """MNIST-shaped step: 1+4+1+4+1+1 forward, 5 backward rounds; masks reused, and the
    first layer updated without a truncation (its weight kept at 2f bits)."""
    g = torch.Generator().manual_seed(0)
    sizes = [784, 128, 64, 10]
    ws = [torch.randn(a, b, generator=g, dtype=torch.float64) * 0.05 for a, b in zip(sizes, sizes[1:])]
    bs = [torch.zeros(b, dtype=torch.float64) for b in sizes[1:]]
    x = torch.randn(64, 784, generator=g, dtype=torch.float64)
    y = torch.zeros(64, 10, dtype=torch.float64)
    shares = share_inputs(2, [x, y, *ws, *bs], seed=1)

    def party(ctx):
        xs, ys, w1, w2, w3, b1, b2, b3 = (ctx.wrap(s[ctx.party]) for s in shares)
        model = Sequential([Linear(w1, b1), ReLU(), Linear(w2, b2), ReLU(), Linear(w3, b3)])
        return (yield from train_step(ctx, model, xs, ys, 0.1, with_loss=False))

    stats = run_parties(2, party, seed=0, config=DEALER).stats
    assert stats.rounds == 12 + 5
    beaver_bound = 8 * sum(64 * a + a * b + 64 * b for a, b in zip(sizes, sizes[1:]))
    assert stats.bytes_sent[0] < 1.25 * beaver_bound


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
        model = Sequential([Linear(ctx.wrap(torch.zeros(3, 2, dtype=torch.int64)))])
        x = ctx.wrap(torch.zeros(4, 3, dtype=torch.int64))
        return (yield from train_step(ctx, model, x, ctx.wrap(torch.zeros(4, 2, dtype=torch.int64)), 0.0))

    with pytest.raises(BadRequest):
        run_parties(2, bad_lr, seed=0)

    def wrong_input(ctx):
        model = Sequential([Flatten(), Linear(ctx.wrap(torch.zeros(3, 2, dtype=torch.int64)))])
        return (yield from predict(ctx, model, ctx.wrap(torch.zeros(1, 2, 2, dtype=torch.int64))))

    with pytest.raises(ShapeError):
        run_parties(2, wrong_input, seed=0)
