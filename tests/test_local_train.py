"""The data owner's training loop: whitelisted configs, FedProx, per-example DP-SGD."""

import copy

import pytest
import torch
from torch import nn

from p2pgrid.errors import BadRequest, ShapeError, UnknownOp
from p2pgrid.modelgraph import export_model, import_model
from p2pgrid.protocols.local_train import _per_sample_grads, evaluate, train_locally

SGD = {"name": "sgd", "lr": 0.1}


def blobs(n=256, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def mlp(d=8, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, classes))


def test_training_learns_and_reports():
    x, y = blobs()
    model = mlp()
    before = evaluate(model, x, y, "cross_entropy")
    params, n, metrics = train_locally(model, x, y, epochs=5, batch_size=32, optimizer=SGD,
                                       loss="cross_entropy", seed=0)
    after = evaluate(model, x, y, "cross_entropy")
    assert n == 256 and metrics["steps"] == 5 * 8 and metrics["epochs"] == 5
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9
    assert set(params) == set(model.state_dict())
    assert torch.equal(params["0.weight"], model[0].weight)
    assert params["0.weight"] is not model[0].weight  # a copy
    assert model.training  # mode restored


def test_same_seed_same_result_including_dropout():
    x, y = blobs()
    runs = [train_locally(mlp(), x, y, epochs=2, batch_size=16, optimizer={"name": "adam", "lr": 1e-2},
                          loss="cross_entropy", seed=7)[0] for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = train_locally(mlp(), x, y, epochs=2, batch_size=16, optimizer={"name": "adam", "lr": 1e-2},
                          loss="cross_entropy", seed=8)[0]
    assert not torch.equal(runs[0]["0.weight"], other["0.weight"])


def test_other_losses():
    x = torch.randn(128, 4)
    w = torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    model = nn.Linear(4, 1)
    train_locally(model, x, x @ w, epochs=30, batch_size=32, optimizer=SGD, loss="mse", seed=0)
    res = evaluate(model, x, x @ w, "mse")
    assert res["loss"] < 0.01 and res["accuracy"] != res["accuracy"]  # NaN for regression
    yb = (x @ w > 0).float().squeeze(1)
    model = nn.Linear(4, 1)
    train_locally(model, x, yb, epochs=30, batch_size=32, optimizer=SGD, loss="bce_with_logits", seed=0)
    assert evaluate(model, x, yb, "bce_with_logits")["accuracy"] > 0.9


def test_configs_are_whitelisted_and_checked():
    x, y = blobs(32)
    model = mlp()
    kw = dict(epochs=1, batch_size=8, seed=0)
    with pytest.raises(UnknownOp, match="lbfgs"):
        train_locally(model, x, y, optimizer={"name": "lbfgs", "lr": 1}, loss="cross_entropy", **kw)
    with pytest.raises(UnknownOp, match="nll"):
        train_locally(model, x, y, optimizer=SGD, loss="nll", **kw)
    with pytest.raises(BadRequest, match="foreach"):
        train_locally(model, x, y, optimizer={"name": "sgd", "lr": 0.1, "foreach": True},
                      loss="cross_entropy", **kw)
    with pytest.raises(BadRequest, match="lr"):
        train_locally(model, x, y, optimizer={"name": "sgd", "lr": -1}, loss="cross_entropy", **kw)
    with pytest.raises(BadRequest, match="lr"):
        train_locally(model, x, y, optimizer={"name": "adam"}, loss="cross_entropy", **kw)
    with pytest.raises(ShapeError):
        train_locally(model, x, y[:5], optimizer=SGD, loss="cross_entropy", **kw)
    with pytest.raises(BadRequest, match="epochs"):
        train_locally(model, x, y, optimizer=SGD, loss="cross_entropy", epochs=-1, batch_size=8)
    with pytest.raises(BadRequest, match="dp"):
        train_locally(model, x, y, optimizer=SGD, loss="cross_entropy", dp={"clip": 1.0}, **kw)


def test_fedprox_term_pulls_towards_the_global_model():
    x, y = blobs()
    start = mlp()
    global_params = {k: v.detach().clone() for k, v in start.named_parameters()}

    def drift(mu):
        model = copy.deepcopy(start)
        train_locally(model, x, y, epochs=3, batch_size=32, optimizer=SGD, loss="cross_entropy",
                      prox_mu=mu, global_params=global_params, seed=0)
        return sum(float((p.detach() - global_params[k]).pow(2).sum()) for k, p in model.named_parameters())

    assert drift(10.0) < 0.5 * drift(0.0)
    assert drift(1e-9) == pytest.approx(drift(0.0), rel=1e-3)
    with pytest.raises(ShapeError):
        train_locally(mlp(), x, y, epochs=1, batch_size=8, optimizer=SGD, loss="cross_entropy",
                      prox_mu=1.0, global_params={"0.weight": torch.zeros(1)}, seed=0)


def test_per_sample_gradients_match_one_backward_per_example():
    x, y = blobs(12)
    model = mlp().eval()  # no dropout, so the two ways agree exactly
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss = nn.functional.cross_entropy
    grads, losses = _per_sample_grads(model, params, {}, loss, x, y)
    for i in range(len(x)):
        model.zero_grad()
        value = loss(model(x[i:i + 1]), y[i:i + 1])
        value.backward()
        assert float(losses[i]) == pytest.approx(float(value.detach()), rel=1e-5)
        for k, p in model.named_parameters():
            assert torch.allclose(grads[k][i], p.grad, atol=1e-6)


def test_dp_sgd_clips_adds_noise_and_accounts():
    x, y = blobs(512)
    model = mlp()
    dp = {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    _, n, metrics = train_locally(model, x, y, epochs=4, batch_size=64, optimizer={"name": "sgd", "lr": 0.5},
                                  loss="cross_entropy", dp=dp, seed=3)
    assert n == 512 and metrics["steps"] == 4 * 8
    assert metrics["sample_rate"] == 64 / 512 and 0 < metrics["epsilon"] < 10
    assert evaluate(model, x, y, "cross_entropy")["accuracy"] > 0.8  # still learns


def test_dp_sgd_update_is_bounded_by_clip_when_noise_is_zero():
    """With z=0 and lr=1, one step moves the weights by at most clip * (batch / expected batch)."""
    x, y = blobs(64)
    x = x * 100  # huge gradients, all clipped
    model = mlp().eval()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    train_locally(model, x, y, epochs=1, batch_size=64, optimizer={"name": "sgd", "lr": 1.0},
                  loss="cross_entropy", dp={"clip": 0.5, "noise_multiplier": 0.0}, seed=0)
    moved = sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in model.named_parameters()) ** 0.5
    assert 0 < moved <= 0.5 + 1e-5


def test_dp_sgd_noise_dominates_when_the_multiplier_is_large():
    x, y = blobs(64)
    moves = []
    for z in (0.0, 50.0):
        model = mlp().eval()
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_locally(model, x, y, epochs=1, batch_size=64, optimizer={"name": "sgd", "lr": 1.0},
                      loss="cross_entropy", dp={"clip": 0.1, "noise_multiplier": z}, seed=0)
        moves.append(sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in model.named_parameters()) ** 0.5)
    assert moves[1] > 20 * moves[0]


def test_dp_refuses_batchnorm_and_handles_rnns():
    x, y = blobs(16)
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(BadRequest, match="BatchNorm"):
        train_locally(bn, x, y, epochs=1, batch_size=8, optimizer=SGD, loss="cross_entropy",
                      dp={"clip": 1.0, "noise_multiplier": 1.0}, seed=0)

    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.out = nn.Embedding(10, 4), nn.GRU(4, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, t):
            return self.out(self.rnn(self.emb(t))[0][:, -1])

    tokens, labels = torch.randint(0, 10, (24, 6)), torch.randint(0, 2, (24,))
    model = GRUNet()
    _, _, metrics = train_locally(model, tokens, labels, epochs=1, batch_size=8, optimizer=SGD,
                                  loss="cross_entropy", prox_mu=0.1,
                                  dp={"clip": 1.0, "noise_multiplier": 1.0}, seed=0)  # DP + FedProx
    assert metrics["epsilon"] > 0
    model = import_model(export_model(GRUNet()))  # the imported (graph) model trains too
    _, n, metrics = train_locally(model, tokens, labels, epochs=1, batch_size=8, optimizer=SGD,
                                  loss="cross_entropy", dp={"clip": 1.0, "noise_multiplier": 1.0}, seed=0)
    assert n == 24 and metrics["epsilon"] > 0


def test_imported_cnn_trains_with_batchnorm_without_dp():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    back = import_model(export_model(model))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 2, (32,))
    params, _, _ = train_locally(back, x, y, epochs=1, batch_size=8, optimizer=SGD, loss="cross_entropy",
                                 seed=0)
    assert int(params["1.num_batches_tracked"]) == 4


def test_training_can_be_stopped_and_reports_its_time():
    from p2pgrid.protocols.local_train import TrainingStopped, dp_steps
    x, y = blobs(64)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingStopped):
        train_locally(mlp(), x, y, epochs=5, batch_size=8, optimizer={"name": "sgd", "lr": 0.1},
                      loss="cross_entropy", seed=0, should_stop=stop)
    assert len(calls) == 4
    _, _, metrics = train_locally(mlp(), x, y, epochs=1, batch_size=8, optimizer={"name": "sgd", "lr": 0.1},
                                  loss="cross_entropy", seed=0)
    assert metrics["train_seconds"] > 0
    assert dp_steps(64, 8, 3) == (0.125, 24) and dp_steps(5, 8, 1) == (1.0, 1)


# ---- issue 15 item 3: DP-SGD on a model that is one whitelisted layer, as federated training imports it

_ALONE = {"Linear": dict(in_features=4, out_features=3),
          "Conv1d": dict(in_channels=2, out_channels=3, kernel_size=3),
          "Conv2d": dict(in_channels=2, out_channels=3, kernel_size=3),
          "MaxPool1d": dict(kernel_size=2), "MaxPool2d": dict(kernel_size=2),
          "AvgPool1d": dict(kernel_size=2), "AvgPool2d": dict(kernel_size=2),
          "AdaptiveAvgPool1d": dict(output_size=2), "AdaptiveAvgPool2d": dict(output_size=2),
          "Softmax": dict(dim=1), "LogSoftmax": dict(dim=1),
          "Embedding": dict(num_embeddings=10, embedding_dim=3), "LayerNorm": dict(normalized_shape=[4]),
          "BatchNorm1d": dict(num_features=4), "BatchNorm2d": dict(num_features=2),
          "GRU": dict(input_size=4, hidden_size=3, batch_first=True),
          "LSTM": dict(input_size=4, hidden_size=3, batch_first=True),
          "Unflatten": dict(dim=1, unflattened_size=[2, 2])}


def _alone_input(name):
    if name.endswith("2d"):
        return torch.randn(16, 2, 6, 6)
    if name.endswith("1d") and name != "BatchNorm1d":
        return torch.randn(16, 2, 6)
    if name == "Embedding":
        return torch.randint(0, 10, (16, 5))
    if name in ("GRU", "LSTM"):
        return torch.randn(16, 5, 4)
    return torch.randn(16, 4)


@pytest.mark.parametrize("name", sorted(__import__("p2pgrid.modelgraph", fromlist=["LAYERS"]).LAYERS))
def test_dp_sgd_on_every_whitelisted_layer_alone(name):
    from p2pgrid.modelgraph import LAYERS
    cls, _ = LAYERS[name]
    torch.manual_seed(0)
    model = import_model(export_model(cls(**_ALONE.get(name, {}))))
    x = _alone_input(name)
    out = model(x)
    y = torch.randn_like((out[0] if isinstance(out, tuple) else out).float())
    dp = {"clip": 1.0, "noise_multiplier": 1.0}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def train():
        return train_locally(model, x, y, epochs=1, batch_size=4, optimizer=SGD, loss="mse", dp=dp)

    if not any(p.requires_grad for p in model.parameters()):
        with pytest.raises(BadRequest, match="no trainable parameters"):
            train()
    elif name.startswith("BatchNorm"):
        with pytest.raises(BadRequest, match="BatchNorm"):
            train()
    elif name in ("GRU", "LSTM"):  # a bare RNN returns (output, state): no loss applies to it
        with pytest.raises(ShapeError, match="returns a tuple"):
            train()
    else:
        params, n, metrics = train()
        assert n == 16 and metrics["epsilon"] > 0
        assert any(not torch.equal(before[k], params[k]) for k in before)


def test_single_layer_model_keeps_train_and_eval_behaviour():
    model = import_model(export_model(nn.Dropout(0.5)))
    x = torch.ones(4, 1000)
    model.eval()
    assert torch.equal(model(x), x)
    model.train()
    assert (model(x) == 0).any()
    again = import_model(model.export())  # a single-layer model re-exports as the layer
    assert again.export()["modules"] == {"type": "Dropout", "kwargs": {"p": 0.5, "inplace": False}}


def test_dp_sgd_on_a_bare_rnn_inside_a_module_uses_its_own_loop():
    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 3, batch_first=True), nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    model = import_model(export_model(Last()))
    x, y = torch.randn(16, 5, 4), torch.randn(16, 1)
    params, n, metrics = train_locally(model, x, y, epochs=1, batch_size=4, optimizer=SGD, loss="mse",
                                       dp={"clip": 1.0, "noise_multiplier": 1.0})
    assert metrics["epsilon"] > 0


# ---- issue 15 item 6: gradient clipping, as the SMS-spam tutorial's CLIP = 5

def test_clip_grad_norm_clips_each_step_as_torch_does():
    x, y = blobs(n=64)
    model, twin = mlp(), mlp()
    twin.load_state_dict(model.state_dict())
    twin.eval()  # no dropout in either: compare the updates alone
    model[2].p = twin[2].p = 0.0
    train_locally(model, x, y, epochs=1, batch_size=64, optimizer={"name": "sgd", "lr": 1.0},
                  loss="cross_entropy", seed=0, clip_grad_norm=0.01)
    opt = torch.optim.SGD(twin.parameters(), lr=1.0)
    value = nn.functional.cross_entropy(twin(x), y)
    value.backward()
    assert torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01) > 0.01   # it did clip
    opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(BadRequest, match="clip_grad_norm"):
        train_locally(model, x, y, epochs=1, batch_size=8, optimizer=SGD, loss="cross_entropy",
                      clip_grad_norm=0)
    # with DP-SGD it bounds the noisy step too
    _, _, m = train_locally(model, x, y, epochs=1, batch_size=8, optimizer=SGD, loss="cross_entropy",
                            dp={"clip": 1.0, "noise_multiplier": 1.0}, clip_grad_norm=5.0)
    assert m["epsilon"] > 0
