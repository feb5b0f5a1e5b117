"""Active security (MAC-checked shares) over real peers: ops, encrypted inference and a
training step match plaintext; the owner's ``smpc_security = "active"`` is enforced on
its own peer; the cheating party is in tests/adversarial/test_smpc_cheating.py."""

import pytest
import torch
import trio
from torch import nn

from p2pgrid import smpc
from p2pgrid.config import PeerConfig
from p2pgrid.errors import PermissionDenied
from p2pgrid.testing import open_network

DEALER = "university"
NET = dict(gossip_interval=0.5, ttl=30.0)
ACTIVE = dict(security="active")


def peers(tmp_path, *names, **extra):
    """Parties trusting each other and the dealer; `extra` maps a name to config changes."""
    out = [PeerConfig(name=n, data_dir=tmp_path / n, smpc_parties=names,
                      crypto_providers=(DEALER,), **extra.get(n, {})) for n in names]
    return [*out, PeerConfig(name=DEALER, roles=("crypto-provider",), data_dir=tmp_path / DEALER)]


async def encrypted(grid, model: nn.Module, rows: int):
    """The company's net, the model encrypted among hospital and clinic for training, a
    random batch (x, y) of `rows` and its shares (X, Y)."""
    net = grid.net("company")
    x = torch.randn(rows, model[0].in_features, dtype=torch.float64)
    y = torch.randn(rows, model[-1].out_features, dtype=torch.float64)
    kw = dict(parties=("hospital", "clinic"), dealer=DEALER, **ACTIVE)
    enc = await net.encrypt_model(model, requires_grad=True, **kw)
    return net, enc, x, y, await net.share(x, **kw), await net.share(y, **kw)


def close(got, want, tol):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().max().item() <= tol


async def test_active_ops_match_plaintext(tmp_path):
    async with open_network(peers(tmp_path, "hospital", "clinic", "company"), tmp_path,
                            **NET) as grid:
        net = grid.net("company")
        g = torch.Generator().manual_seed(1)
        a = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
        b = torch.randn(4, 3, generator=g, dtype=torch.float64)
        w = torch.randn(3, 2, generator=g, dtype=torch.float64)
        kw = dict(parties=("hospital", "clinic"), dealer=DEALER, **ACTIVE)
        A, B, W = [await net.share(t, **kw) for t in (a, b, w)]
        assert A.group.security == "active"
        cases = [(A + B, a + b, 1e-4), (A - 1.5, a - 1.5, 1e-4), (A * B, a * b, 1e-3),
                 (A * 0.25, a * 0.25, 1e-4), (A @ W, a @ w, 1e-3), (A.relu(), a.relu(), 1e-4),
                 (A >= B, (a >= b).double(), 0), (A.sum(0), a.sum(0), 1e-3),
                 (A.mean(), a.mean(), 1e-3), (A[1:3, ::2], a[1:3, ::2], 1e-4),
                 (A.T, a.T, 1e-4), (smpc.cat([A, B], 0), torch.cat([a, b]), 1e-4),
                 (A.max(), a.max(), 1e-4), (A.max(0), a.max(0).values, 1e-4),
                 (A.argmax(1), nn.functional.one_hot(a.argmax(1), 3).double(), 0),
                 (A.argmax(0, one_hot=False), a.argmax(0).double(), 0)]
        got = await smpc.reveal(*[c[0] for c in cases])
        for (_, want, tol), value in zip(cases, got):
            close(value, want, tol)
        kept = await (A @ W)                      # stays shared, with its MACs
        close(await (kept.relu() + 1).reveal(), (a @ w).relu() + 1, 1e-3)


async def test_active_training_step_and_inference_match_plaintext(tmp_path):
    async with open_network(peers(tmp_path, "hospital", "clinic", "company"), tmp_path,
                            **NET) as grid:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        net, enc, x, y, X, Y = await encrypted(grid, model, 8)
        close(await enc.predict(x), model(x).detach(), 2e-3)           # plaintext input
        close(await enc.predict(X), model(x).detach(), 2e-3)           # shared input
        loss = await enc.fit_batch(X, Y, optimizer=smpc.SGD(enc, lr=0.1))
        want = nn.functional.mse_loss(model(x), y)
        want.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        assert abs(loss - want.item()) < 2e-3
        trained = await enc.decrypt()
        for p, q in zip(trained.parameters(), model.parameters()):
            close(p.detach(), q.detach(), 2e-3)


async def test_owner_requiring_active_refuses_semi_honest(tmp_path):
    cfg = {"hospital": {"smpc_security": "active"}}
    async with open_network(peers(tmp_path, "hospital", "clinic", "public", "company", **cfg),
                            tmp_path, **NET) as grid:
        hospital, company = grid.net("hospital"), grid.net("company")
        t = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
        await hospital.publish(t, tags=["vitals"], compute=["company"], get=["company"])
        await grid.wait_searchable("#vitals")
        remote = (await company.search("#vitals"))["hospital"][0]
        with pytest.raises(PermissionDenied) as err:
            await remote.share("clinic", "public", dealer=DEALER)
        msg = str(err.value)
        assert "smpc_security" in msg and "active" in msg and "\n" not in msg
        shared = await remote.share("clinic", "public", dealer=DEALER, **ACTIVE)
        close(await (shared * 2).reveal(), t * 2, 1e-4)
        # the hospital's own tensors: shared actively by default, semi-honest refused
        own = await hospital.share(t, parties=("clinic", "public"), dealer=DEALER,
                                   reveal=["company"], compute=["company"])
        assert own.group.security == "active"
        with pytest.raises(PermissionDenied, match="smpc_security"):
            await hospital.share(t, parties=("clinic", "public"), dealer=DEALER,
                                 security="semi-honest")
        # a semi-honest session on the active shares: every party refuses
        handle = company.shared(own.id, own.shape, parties=("clinic", "public"), dealer=DEALER)
        with pytest.raises(PermissionDenied) as err:
            await (handle + 1).reveal()
        assert "security" in str(err.value) and "\n" not in str(err.value)


async def test_output_masks_taken_beside_the_session_fail_it_cleanly(tmp_path):
    """Parties take the requester's output masks from the dealer while the session runs
    (only its last opening uses them). A mask that was never dealt, or one dealt for
    another number of outputs, fails the session on every party with one line that says
    why, and nothing changes: the model is the same and the next step runs."""
    from p2pgrid.errors import BadRequest
    from p2pgrid.smpc.messages import TrainStep
    from p2pgrid.smpc.tensor import output_masks, run_on_parties

    async with open_network(peers(tmp_path, "hospital", "clinic", "company"), tmp_path,
                            **NET) as grid:
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double()
        net, enc, x, y, X, Y = await encrypted(grid, model, 4)
        program = X.program([X, Y])

        async def step(mask):
            return await run_on_parties(net, enc.group, lambda s, nxt: TrainStep(
                s, enc.group.to_wire(), enc.id, program, 0.1, "mse", True, nxt, 30.0, mask))

        two, _ = await output_masks(net, enc.group, [[], []])     # dealt for two outputs
        for mask, why in (("0" * 32, "no mask"), (two, "2 output masks for 1")):
            with pytest.raises(BadRequest) as err:
                await step(mask)
            assert why in str(err.value) and "\n" not in str(err.value), str(err.value)
        trained = await enc.decrypt()                       # unchanged by the failed steps
        for p, q in zip(trained.parameters(), model.parameters()):
            close(p.detach(), q.detach(), 1e-4)
        loss = await enc.fit_batch(X, Y, optimizer=smpc.SGD(enc, lr=0.1))
        assert abs(loss - nn.functional.mse_loss(model(x), y).item()) < 2e-3


async def test_training_asks_for_the_next_steps_mask_during_this_one(tmp_path):
    """fit_batch asks the dealer for the next step's loss mask while this step runs, and
    the next step uses it (no round trip to the dealer before it); one kept too long is
    left to expire and a fresh one asked for."""
    from p2pgrid.smpc.tensor import MASK_AHEAD_S

    async with open_network(peers(tmp_path, "hospital", "clinic", "company"), tmp_path,
                            **NET) as grid:
        dealer = grid.net(DEALER)._peer.extensions["smpc"].dealer
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(3, 2)).double()
        _, enc, x, y, X, Y = await encrypted(grid, model, 4)
        opt = smpc.SGD(enc, lr=0.1)
        ahead = enc._masks["fit"]
        losses = [await enc.fit_batch(X, Y, optimizer=opt)]
        with trio.fail_after(10):
            while ahead._ready is None:        # asked beside the step, which did not wait
                await trio.sleep(0.01)
        asked, _, (mid, _) = ahead._ready
        assert mid in dealer.masks                        # dealt, not yet taken
        losses.append(await enc.fit_batch(X, Y, optimizer=opt))
        assert mid not in dealer.masks                    # this step took it
        with trio.fail_after(10):
            while ahead._ready is None:
                await trio.sleep(0.01)
        old = ahead._ready
        ahead._ready = (old[0] - MASK_AHEAD_S - 1, *old[1:])
        losses.append(await enc.fit_batch(X, Y, optimizer=opt))
        assert old[2][0] in dealer.masks                  # the stale one was not used
        want = []
        for _ in range(3):
            loss = nn.functional.mse_loss(model(x), y)
            want.append(loss.item())
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        for got, exp in zip(losses, want):
            assert abs(got - exp) < 2e-3, (losses, want)


def test_network_benchmark_compares_both_modes():
    """scripts/bench_smpc.py --security both at a tiny size (four peer processes, TLS on
    loopback): both modes' figures, and the issue's byte and round targets (at most 2x
    the bytes, at most 2 more rounds), which do not depend on the machine."""
    import json
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_smpc.py"), "--security", "both",
         "--batch", "2", "--mlp", "8-4-4-2", "--reps", "2", "--warmup", "1", "--only", "train"],
        capture_output=True, text=True, timeout=300, cwd=root, check=True).stdout
    result = json.loads(out)
    for mode in ("semi-honest", "active"):
        step = result[mode]["train_step_b2"]
        assert step["s"] > 0 and step["rounds"] > 0 and min(step["bytes_sent_per_party"]) > 0
        assert set(step["cpu_s_per_step"]) == {"alice", "bob", "dealer", "client"}
        assert len(step["dealer_bytes_per_party"]) == 2 and min(step["dealer_bytes_per_party"]) > 0
    ratio = result["active_vs_semi_honest"]
    assert ratio["train_dealer_bytes"] > 1
    assert ratio["train_extra_rounds"] == 2
    assert 1 < ratio["train_bytes"] <= 2
    assert ratio["train_cpu"] > 0 and "--reps 42" in ratio["note"]
