"""A client nobody can dial is a full client: every reply rides the connections it opened.

Real peers over TLS HTTP/2 on loopback (p2pgrid.testing). The scientist bob either does
not listen at all (``listen=False``, the default of ``p2pgrid.connect``) or listens where
nobody can reach what it advertises (127.0.0.1, advertising 127.0.0.2, where nothing
listens). Either way it runs the README walk-through (search, a remote mean, a refused
get), coordinates a federated fit, runs encrypted inference (SMPC) and downloads a model.
The network-namespace version of this test (a laptop in its own namespace) is the lab's.
"""

import pytest
import torch
import trio
from torch import nn

import p2pgrid
from p2pgrid.config import PeerConfig
from p2pgrid.datasets import digits
from p2pgrid.federated import SGD, FedAvg
from p2pgrid.modelgraph import model_hash
from p2pgrid.serving.gpt import GPT
from p2pgrid.testing import open_network

DEALER = "university"
NET = dict(gossip_interval=0.3, ttl=30.0)   # records must not expire on a busy machine
BIRTHS = torch.tensor([[3.1 + 0.01 * i, 50.0 + 0.1 * i, 38.0 + (i % 4)] for i in range(40)])
X, Y = digits()


def _trusting(tmp_path, name: str, **kw) -> PeerConfig:
    # each owner's own SMPC trust (docs/SECURITY.md): these parties, this dealer
    return PeerConfig(name=name, data_dir=tmp_path / name, smpc_parties=("hospital", "clinic"),
                      crypto_providers=(DEALER,), **kw)


def _peers(tmp_path, bob: PeerConfig):
    return [*(_trusting(tmp_path, n) for n in ("hospital", "clinic", "company")),
            PeerConfig(name=DEALER, roles=("crypto-provider",), data_dir=tmp_path / DEALER), bob]


async def _readme_walkthrough(grid, net):
    await grid.net("hospital").publish(BIRTHS, tags=["birth-records", "february"],
                                       compute=["bob"], aggregate=["bob"], get=[])
    await grid.wait_searchable("#birth-records")
    hits = await net.search("#february #birth-records")
    rec = hits["hospital"][0]
    with trio.fail_after(60):   # fails at a 60 s timeout where replies cannot reach bob
        avg = await (rec[:, 0].sum() / rec.shape[0]).get()
    assert torch.allclose(avg, BIRTHS[:, 0].mean())
    with pytest.raises(p2pgrid.PermissionDenied):
        await rec.get()
    assert await net.peer("clinic").ping() < 10


async def test_a_client_that_does_not_listen_is_a_full_client(tmp_path):
    bob_cfg = _trusting(tmp_path, "bob", listen=False)
    async with open_network(_peers(tmp_path, bob_cfg), tmp_path, **NET) as grid:
        bob_peer = grid["bob"]
        assert bob_peer.address is None and bob_peer.directory.own.addresses == []
        for name in ("hospital", "clinic"):     # the others know bob: by gossip it dialled
            assert grid[name].record("bob").addresses == []
        net = grid.net("bob")
        await _readme_walkthrough(grid, net)

        # a federated fit bob coordinates
        for i, name in enumerate(("hospital", "clinic")):
            sl = slice(i * 300, (i + 1) * 300)
            await grid.net(name).federated_publish(X[sl], Y[sl], tags=["digits", "train"],
                                                   compute=["bob"])
        await grid.wait_searchable("#digits #train")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        res = await net.federated_fit(model, "#digits #train", rounds=2, local_epochs=1,
                                      batch_size=32, optimizer=SGD(lr=0.1, momentum=0.9),
                                      strategy=FedAvg(min_peers=2, round_timeout=30),
                                      progress=False)
        assert [h.round for h in res.history] == [1, 2]
        assert all(sorted(h.peers) == ["clinic", "hospital"] for h in res.history)

        # encrypted inference: the company's model secret-shared on hospital and clinic
        torch.manual_seed(0)
        lin = nn.Linear(3, 2)
        company = grid.net("company")
        await company.encrypt_model(lin, parties=["hospital", "clinic"], dealer=DEALER,
                                    users=["bob"], name="linear", publish=True)
        with trio.fail_after(30):
            while "company/linear" not in (bob_peer.record("company").services
                                           .get("smpc-models") or {}):
                await trio.sleep(0.05)
        handle = await net.encrypted_model("company", "linear")
        x = torch.tensor([[1.0, 2.0, -3.0], [0.5, -0.25, 4.0]])
        out = await handle.predict(x)
        with torch.no_grad():
            assert (out.double() - lin(x).double()).abs().max() < 1e-3
        xs = await net.share(x, parties=handle.parties, dealer=handle.dealer)
        out = await handle.predict(xs)
        with torch.no_grad():
            assert (out.double() - lin(x).double()).abs().max() < 1e-3

        # a model download
        torch.manual_seed(0)
        lm = GPT(vocab=50, context=16, width=16, depth=1, heads=2).eval()
        await company.serve_model(lm, "tiny-gpt", allow_download=True,
                                  allow_remote_inference=False)
        with trio.fail_after(30):
            while not any(i.name == "tiny-gpt" and i.hosts for i in net.models()):
                await trio.sleep(0.05)
        got = await net.download_model("tiny-gpt")
        assert model_hash(got) == model_hash(lm)

        # bob never listened, and nobody ever had an address to dial it at
        assert bob_peer.address is None


async def test_a_client_at_an_address_nobody_can_reach_gets_its_replies(tmp_path):
    # bob listens on 127.0.0.1 but advertises 127.0.0.2, where nothing listens: the
    # hospital cannot dial it, as a laptop behind NAT cannot be dialled
    bob_cfg = PeerConfig(name="bob", host="127.0.0.1", advertise="127.0.0.2",
                         data_dir=tmp_path / "bob")
    async with open_network(["hospital", "clinic", bob_cfg], tmp_path, **NET) as grid:
        assert grid["bob"].address.startswith("127.0.0.2:")
        await _readme_walkthrough(grid, grid.net("bob"))


async def test_connect_listens_nowhere_by_default(tmp_path):
    async with open_network(["hospital"], tmp_path, **NET) as grid:
        await grid.net("hospital").publish(BIRTHS, tags=["birth-records"], compute=["bob"],
                                           aggregate=["bob"])
        seed = f"{grid['hospital'].key_id}@{grid['hospital'].address}"
        async with p2pgrid.connect("bob", join=[seed], mdns=False, data_dir=tmp_path / "bob",
                                   **NET) as net:
            assert net.me.address is None and not net.me.config.listen
            hits = await net.search("#birth-records", wait=10)
            assert torch.allclose(await hits["hospital"][0][:, 0].mean().get(),
                                  BIRTHS[:, 0].mean())
