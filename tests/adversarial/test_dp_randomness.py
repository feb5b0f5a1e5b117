"""Attack 6 (issue 12): DP noise the coordinator can subtract, and sampling it overstates.

The coordinator chose the seed each peer's DP-SGD drew its Poisson sample and its noise
from, so it could recompute the "noisy" update and subtract the noise; and the
client-level accountant claimed amplification by a sampling that was a public,
fixed-size choice. Now privacy randomness comes from each peer's OS CSPRNG (the same
seed twice gives two different releases) and client-level DP is accounted at the
sampling that really happens: none secret, so q = 1, on the coordinator and on each
owner's ledger. Real peers over TLS HTTP/2 on loopback.
"""

import pytest
import torch
import trio
from torch import nn

from p2pgrid.datasets import digits
from p2pgrid.federated import SGD, ClientDP, FedAvg, LocalDP
from p2pgrid.federated.data import find_shards
from p2pgrid.federated.ledger import round_cost
from p2pgrid.testing import open_network
import p2pgrid.protocols.local_train as local_train
from p2pgrid.protocols.dp import RDPAccountant, rdp_curve

X, Y = digits()
TRAIN = "#digits #train"
OWNERS = ["h1", "h2", "h3"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


async def _publish(grid):
    for i, name in enumerate(OWNERS):
        rows = slice(i * 200, (i + 1) * 200)
        await grid.net(name).federated_publish(X[rows], Y[rows], tags=["digits", "train"],
                                               compute=["ai"])
    with trio.fail_after(20):
        while not all(set(OWNERS) <= set(find_shards(p.directory, TRAIN))
                      for p in grid.peers.values()):
            await trio.sleep(0.02)


def _fit(net, job, **kw):
    return net.federated_fit(mlp(), TRAIN, rounds=1, local_epochs=1, batch_size=32,
                             optimizer=SGD(lr=0.1), seed=0, job=job, progress=False, **kw)


def test_dp_sgd_samples_privately_at_the_rate_it_accounts(monkeypatch):
    """Each step's batch is a fresh Poisson sample at rate batch_size / n (the q the peer's
    accountant uses), drawn from the OS CSPRNG: the same seed gives other batches."""
    batches: list[list[int]] = []
    real = local_train._dp_step

    def spy(model, opt, loss_fn, xb, yb, *rest):
        batches[-1].append(len(xb))
        return real(model, opt, loss_fn, xb, yb, *rest)

    monkeypatch.setattr(local_train, "_dp_step", spy)
    x, y = torch.randn(400, 4), torch.randint(0, 2, (400,))
    for _ in range(2):
        batches.append([])
        _, _, metrics = local_train.train_locally(
            nn.Linear(4, 2), x, y, epochs=10, batch_size=40, optimizer={"name": "sgd", "lr": 0.1},
            loss="cross_entropy", dp={"clip": 1.0, "noise_multiplier": 1.0}, seed=0)
    q = metrics["sample_rate"]
    assert q == 0.1 and len(batches[0]) == metrics["steps"] == 100
    sizes = torch.tensor(batches[0] + batches[1], dtype=torch.float64)
    # Binomial(400, 0.1) per step: mean 40, variance 36 (not a fixed-size batch)
    assert abs(float(sizes.mean()) - 400 * q) < 5 * (400 * q * (1 - q) / len(sizes)) ** 0.5
    assert 18 < float(sizes.var()) < 60
    assert batches[0] != batches[1], "the same seed drew the same DP samples"


def test_an_owner_charges_client_dp_at_rate_one_whatever_the_coordinator_claims():
    claimed = round_cost({"client": {"noise_multiplier": 1.0, "sample_rate": 0.01}})
    assert claimed == rdp_curve(1.0, 1.0)


async def test_coordinator_seed_neither_reproduces_dp_noise_nor_buys_amplification(tmp_path):
    async with open_network(["ai", *OWNERS], tmp_path) as grid:
        await _publish(grid)
        ai = grid.net("ai")

        # client-level DP with 2 of 3 peers picked by the coordinator's public seed: the
        # selection is no secret, so epsilon is that of rate 1, not of rate 2/3
        res = await _fit(ai, "client", dp=ClientDP(clip=1.0, noise_multiplier=1.0, delta=1e-5),
                         strategy=FedAvg(min_peers=2, fraction=0.5, round_timeout=60))
        used = res.history[0].peers
        assert len(used) == 2
        honest = RDPAccountant()
        honest.step(1.0, 1.0)
        assert res.epsilon == pytest.approx(honest.epsilon(1e-5))
        for name in used:      # and each owner charged its ledger the same
            spent = [v for v in grid.net(name).federated_privacy_spent().values()
                     if v["releases"]["private"]]
            assert spent and all(v["spent"] == pytest.approx(honest.epsilon(1e-5)) for v in spent)

        # the same plan, seed, model and data twice: per-example DP-SGD on the peers must
        # release two different models (the noise is the peers' own, never the seed's)
        runs = [await _fit(ai, f"local-{i}", dp=LocalDP(clip=1.0, noise_multiplier=1.0),
                           strategy=FedAvg(min_peers=3, round_timeout=60)) for i in range(2)]
        assert runs[0].history[0].peers == runs[1].history[0].peers == OWNERS
        diff = max(float((runs[0].params[k] - runs[1].params[k]).abs().max()) for k in runs[0].params)
        assert diff > 1e-4, "two DP runs with the same coordinator seed released the same model"
