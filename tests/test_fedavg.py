"""Strategies are policy only: they run here with no network, peers simulated in-process."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from p2pgrid import wire
from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from p2pgrid.modelgraph import export_model, import_model
from p2pgrid.protocols.fedavg import (DPFedAvg, FedAdam, FedAvg, FedProx, FitIns, FitRes, Strategy, flatten,
                              unflatten, weighted_metrics)
from p2pgrid.protocols.local_train import evaluate, train_locally

PEERS = ["p1", "p2", "p3", "p4", "p5"]


def params(**values):
    return {k: torch.as_tensor(v) for k, v in values.items()}


def res(peer, n, delta=False, **values):
    return FitRes(peer, params(**values), n, {"loss": float(n)}, delta=delta)


def test_configure_fit_samples_reproducibly_and_writes_config():
    s = FedAvg(min_peers=2, fraction=0.4, local_epochs=3, batch_size=16, seed=1)
    g = params(w=[0.0])
    ins = s.configure_fit(4, g, PEERS)
    assert len(ins) == 2 and set(ins) <= set(PEERS)
    assert ins == s.configure_fit(4, g, list(reversed(PEERS)))  # same round, same choice
    assert any(set(s.configure_fit(r, g, PEERS)) != set(ins) for r in range(5, 15))
    fit = next(iter(ins.values()))
    assert isinstance(fit, FitIns) and fit.round == 4 and fit.params is g
    assert fit.config["local_epochs"] == 3 and fit.config["batch_size"] == 16
    assert fit.config["optimizer"] == {"name": "sgd", "lr": 0.05} and fit.config["round_timeout"] == 60.0
    assert len(FedAvg(min_peers=3, fraction=0.1).configure_fit(1, g, PEERS)) == 3
    with pytest.raises(ProtocolError, match="need 2"):
        s.configure_fit(1, g, ["p1"])


def test_fedavg_weights_by_num_examples():
    g = params(w=[0.0, 0.0], b=[1.0])
    replies = [res("a", 1, w=[1.0, 2.0], b=[0.0]), res("b", 3, w=[5.0, 6.0], b=[4.0])]
    new = FedAvg().aggregate_fit(1, g, replies, [])
    assert torch.allclose(new["w"], torch.tensor([4.0, 5.0])) and torch.allclose(new["b"], torch.tensor([3.0]))
    assert new["w"].dtype == torch.float32 and list(new) == list(g)


def test_deltas_and_full_params_mix():
    g = params(w=[10.0])
    replies = [res("a", 1, w=[12.0]), res("b", 1, delta=True, w=[4.0])]
    assert torch.allclose(FedAvg().aggregate_fit(1, g, replies, [])["w"], torch.tensor([13.0]))


def test_integer_buffers_are_averaged_and_rounded():
    g = {"w": torch.zeros(1), "num_batches_tracked": torch.tensor(10), "mask": torch.tensor([True, False])}
    replies = [FitRes("a", {"w": torch.ones(1), "num_batches_tracked": torch.tensor(14),
                            "mask": torch.tensor([True, True])}, 3),
               FitRes("b", {"w": torch.ones(1), "num_batches_tracked": torch.tensor(20),
                            "mask": torch.tensor([False, False])}, 1)]
    new = FedAvg().aggregate_fit(1, g, replies, [])
    assert new["num_batches_tracked"].dtype == torch.int64 and int(new["num_batches_tracked"]) == 16  # 15.5
    assert new["mask"].tolist() == [True, True]


def test_aggregate_refuses_too_few_or_bad_replies():
    g = params(w=[0.0, 0.0])
    s = FedAvg(min_peers=2)
    with pytest.raises(ProtocolError, match="1 replies"):
        s.aggregate_fit(1, g, [res("a", 1, w=[1.0, 1.0])], ["b", "c"])
    with pytest.raises(ProtocolError, match="two replies"):
        s.aggregate_fit(1, g, [res("a", 1, w=[1.0, 1.0]), res("a", 2, w=[1.0, 1.0])], [])
    with pytest.raises(ShapeError, match="shape"):
        s.aggregate_fit(1, g, [res("a", 1, w=[1.0, 1.0]), res("b", 1, w=[1.0])], [])
    with pytest.raises(ShapeError, match="names"):
        s.aggregate_fit(1, g, [res("a", 1, w=[1.0, 1.0]), res("b", 1, v=[1.0, 1.0])], [])
    with pytest.raises(BadRequest, match="num_examples"):
        s.aggregate_fit(1, g, [res("a", 1, w=[1.0, 1.0]), res("b", 0, w=[1.0, 1.0])], [])
    stale = FitRes("b", params(w=[1.0, 1.0]), 1, round=0)
    with pytest.raises(ProtocolError, match="round 0"):
        s.aggregate_fit(1, g, [res("a", 1, w=[1.0, 1.0]), stale], [])


def test_fedprox_puts_mu_in_the_config():
    ins = FedProx(mu=0.3).configure_fit(1, params(w=[0.0]), PEERS)
    assert all(i.config["prox_mu"] == 0.3 for i in ins.values())


def test_fedadam_follows_reddi_et_al():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = FedAdam(eta=eta, beta1=b1, beta2=b2, tau=tau)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    m = torch.zeros(2, dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    g = {"w": x.clone()}
    for r, target in enumerate([[2.0, -2.0], [0.0, 1.0], [1.5, 3.0]], start=1):
        replies = [FitRes("a", {"w": torch.tensor(target, dtype=torch.float64)}, 1),
                   FitRes("b", {"w": torch.tensor(target, dtype=torch.float64) + 1}, 3)]
        delta = torch.tensor(target, dtype=torch.float64) + 0.75 - x
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta ** 2
        x = x + eta * m / (v.sqrt() + tau)
        g = s.aggregate_fit(r, g, replies, [])
        assert torch.allclose(g["w"], x)
    with pytest.raises(ShapeError, match="changed"):
        s.aggregate_fit(4, {"w": torch.zeros(3)}, [FitRes("a", {"w": torch.zeros(3)}, 1),
                                                    FitRes("b", {"w": torch.zeros(3)}, 1)], [])


def test_messages_travel_on_the_wire():
    ins = FedAvg().configure_fit(2, params(w=[[1.0, 2.0]]), ["a", "b"])["a"]
    back = wire.decode(wire.encode(ins), FitIns)
    assert back.round == 2 and torch.equal(back.params["w"], ins.params["w"]) and back.config == ins.config
    r = FitRes("a", params(w=[1.0]), 5, {"loss": 0.5, "epsilon": 1.2}, delta=True, round=2)
    back = wire.decode(wire.encode(r), FitRes)
    assert back.num_examples == 5 and back.delta and back.metrics == r.metrics and back.round == 2


def test_weighted_metrics():
    replies = [FitRes("a", {}, 1, {"loss": 1.0, "acc": 0.5, "note": "x"}), FitRes("b", {}, 3, {"loss": 3.0})]
    assert weighted_metrics(replies) == {"loss": 2.5, "acc": 0.5}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1000), st.lists(st.floats(-100, 100), min_size=3, max_size=3)),
                min_size=2, max_size=6))
def test_fedavg_equals_the_loop_definition(rows):
    g = {"w": torch.zeros(3, dtype=torch.float64)}
    replies = [FitRes(f"p{i}", {"w": torch.tensor(v, dtype=torch.float64)}, n) for i, (n, v) in enumerate(rows)]
    total = sum(n for n, _ in rows)
    expected = sum(torch.tensor(v, dtype=torch.float64) * n for n, v in rows) / total
    assert torch.allclose(FedAvg().aggregate_fit(1, g, replies, [])["w"], expected, atol=1e-9)


def test_flatten_round_trip():
    p = {"a": torch.randn(2, 3), "b": torch.randn(4).double(), "c": torch.randn(())}
    keys = sorted(p)
    back = unflatten(flatten(p, keys), p, keys)
    assert all(torch.equal(back[k], p[k]) and back[k].dtype == p[k].dtype for k in keys)


def test_dp_fedavg_clips_noises_and_accounts():
    g = {"w": torch.zeros(1000)}
    s = DPFedAvg(clip=1.0, noise_multiplier=0.0, min_peers=2)
    ins = s.configure_fit(1, g, PEERS)
    replies = [FitRes(p, {"w": torch.full((1000,), 10.0)}, 100) for p in ins]
    new = s.aggregate_fit(1, g, replies, [])
    assert float(new["w"].norm()) == pytest.approx(1.0, rel=1e-5)  # each update clipped to norm 1
    s = DPFedAvg(clip=1.0, noise_multiplier=1.0, min_peers=2, fraction=0.4)
    ins = s.configure_fit(1, g, PEERS)
    new = s.aggregate_fit(1, g, [FitRes(p, {"w": torch.zeros(1000)}, 1) for p in ins], [])
    assert float(new["w"].std()) == pytest.approx(1.0 / len(ins), rel=0.1)
    # the peers were picked from a public seed: no amplification by sampling is claimed
    assert s.accountant.history == [(1.0, 1.0, 1)] and s.epsilon(1e-5) > 0


class Strategyless(Strategy):
    pass


def test_strategy_is_abstract():
    with pytest.raises(TypeError):
        Strategyless()


# ------------------------------------------------------------------ end to end, in-process

def federated_data(peers, n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=g) * 2
    data = {}
    for i, p in enumerate(peers):
        y = torch.randint(0, 3, (n + 40 * i,), generator=g)  # unequal sizes
        data[p] = (centers[y] + torch.randn(len(y), 6, generator=g), y)
    return data


def run_rounds(strategy, rounds=4, peers=PEERS, drop=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    spec = wire.loads(wire.dumps(export_model(model)))  # the model travels as data
    g = {k: v.clone() for k, v in spec["state"].items()}
    data = federated_data(peers)
    for r in range(1, rounds + 1):
        ins = strategy.configure_fit(r, g, peers)
        replies, failures = [], []
        for peer, fit in ins.items():
            fit = wire.decode(wire.encode(fit), FitIns)
            if peer in drop:
                failures.append(peer)
                continue
            local = import_model({**spec, "state": fit.params})
            c = fit.config
            new, n, metrics = train_locally(local, *data[peer], epochs=c["local_epochs"],
                                            batch_size=c["batch_size"], optimizer=c["optimizer"],
                                            loss=c["loss"], prox_mu=c.get("prox_mu", 0.0),
                                            global_params=fit.params, seed=r)
            replies.append(wire.decode(wire.encode(FitRes(peer, new, n, metrics, round=r)), FitRes))
        g = strategy.aggregate_fit(r, g, replies, failures)
    final = import_model({**spec, "state": g})
    x = torch.cat([d[0] for d in data.values()])
    y = torch.cat([d[1] for d in data.values()])
    return evaluate(final, x, y, "cross_entropy")


@pytest.mark.parametrize("strategy", [
    FedAvg(min_peers=3, local_epochs=1, optimizer={"name": "sgd", "lr": 0.1}),
    FedProx(mu=0.01, min_peers=3, optimizer={"name": "sgd", "lr": 0.1}),
    FedAdam(eta=0.05, min_peers=3, optimizer={"name": "sgd", "lr": 0.1}),
], ids=["fedavg", "fedprox", "fedadam"])
def test_federated_rounds_learn(strategy):
    assert run_rounds(copy.deepcopy(strategy), drop=["p2"])["accuracy"] > 0.85


def test_a_round_with_too_many_failures_fails():
    with pytest.raises(ProtocolError):
        run_rounds(FedAvg(min_peers=4), rounds=1, drop=["p1", "p2"])


def test_fedadam_state_survives_a_checkpoint():
    params = {"w": torch.zeros(3), "n": torch.tensor(2)}
    one = FedAdam(eta=0.1, min_peers=1)
    reply = [FitRes("a", {"w": torch.ones(3), "n": torch.tensor(2)}, 5)]
    one.aggregate_fit(1, params, reply, [])
    two = FedAdam(eta=0.1, min_peers=1)
    two.load_state_dict(wire.loads(wire.dumps(one.state_dict())))
    assert FedAvg.layout(params) == (["w"], ["n"])
    a, b = one.aggregate_fit(2, params, reply, []), two.aggregate_fit(2, params, reply, [])
    assert torch.equal(a["w"], b["w"]) and two.t == 2
    assert FedAvg(min_peers=1).state_dict() == {}
