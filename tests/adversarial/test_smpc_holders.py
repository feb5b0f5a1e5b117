"""Attack 5 (issue 12): the requester picks who holds the shares.

A scientist with only the ``compute`` right asks the owner's peer to secret-share the
data among two peers it runs, with a dealer it runs too (announcing the crypto-provider
role in its own record), then adds the two shares: the raw rows. The owner's peer must
refuse unless its own config trusts every party and the dealer; a user's peer must not
share its input to an encrypted model among parties and a dealer it does not trust.
Real peers over TLS HTTP/2 on loopback.
"""

import pytest
import torch
import trio
from torch import nn

from p2pgrid.config import PeerConfig
from p2pgrid.errors import PermissionDenied
from p2pgrid.serving.policy import Policy
from p2pgrid.testing import open_network
from p2pgrid.protocols.smpc.fixedpoint import FixedPoint

NET = dict(gossip_interval=0.5, ttl=30.0)
TRUST = dict(crypto_providers=("university",))


def _peers(tmp_path):
    def cfg(name, **kw):
        return PeerConfig(name=name, data_dir=tmp_path / name, **kw)

    return [cfg("hospital", smpc_parties=("clinic",), **TRUST),
            cfg("clinic", smpc_parties=("hospital",), **TRUST),
            cfg("university", roles=("crypto-provider",)),
            # the attacker and two peers it runs; it announces itself as a crypto provider
            cfg("mallory", roles=("crypto-provider",)), cfg("m1"), cfg("m2"),
            # a user of encrypted models who trusts the hospital, the clinic and the university
            cfg("bob", smpc_parties=("hospital", "clinic"), **TRUST)]


def _stolen(grid, id_):
    """What mallory gets by adding the shares its own peers hold (None: they hold none)."""
    held = [grid[n].extensions["smpc"].shares.get(id_) for n in ("m1", "m2")]
    if any(e is None for e in held):
        return None
    return FixedPoint(16).decode(held[0].share + held[1].share)


async def _wait_models(grid, owner, names, timeout=20.0):
    with trio.fail_after(timeout):
        while not all(f"{owner}/{n}" in (grid["bob"].record(owner).services.get("smpc-models") or {})
                      for n in names):
            await trio.sleep(0.05)


async def test_requester_cannot_pick_share_holders_or_dealer(tmp_path):
    async with open_network(_peers(tmp_path), tmp_path, **NET) as grid:
        rows = torch.randn(40, 3, dtype=torch.float64)
        await grid.net("hospital").publish(rows, tags=["vitals"], compute=["mallory"], get=[])
        await grid.wait_searchable("#vitals")
        mallory = grid.net("mallory")
        ptr = (await mallory.search("#vitals"))["hospital"][0]

        # two peers of the attacker as parties, the attacker itself as the dealer
        stolen_err = None
        try:
            x = await ptr.share("m1", "m2", dealer="mallory")
        except PermissionDenied as e:
            assert "m1" in e.message and "smpc_parties" in e.message
        else:
            got = _stolen(grid, x.id)
            stolen_err = None if got is None else float((got - rows).abs().max())
        assert stolen_err is None, f"the attacker reconstructed the rows (max error {stolen_err})"
        assert not grid["m1"].extensions["smpc"].shares and not grid["m2"].extensions["smpc"].shares

        # approved parties, but a dealer that only announces the role itself
        with pytest.raises(PermissionDenied, match="crypto_providers"):
            await ptr.share("hospital", "clinic", dealer="mallory")
        # an approved dealer, but one party the owner never approved
        with pytest.raises(PermissionDenied, match="m1"):
            await ptr.share("hospital", "m1", dealer="university")
        assert not grid["hospital"].extensions["smpc"].shares
        assert not grid["m1"].extensions["smpc"].shares

        # what the owner approved works: shares among the hospital and the clinic
        x = await ptr.share("hospital", "clinic", dealer="university")
        assert x.shape == (40, 3)
        owner_view = grid.net("hospital").shared(x.id, x.shape, parties=x.parties,
                                                 dealer="university")
        assert float((await owner_view.reveal() - rows).abs().max()) < 1e-4
        with pytest.raises(PermissionDenied):       # mallory still may not reconstruct
            await x.reveal()


async def test_encrypted_model_cannot_draw_a_users_input_to_untrusted_parties(tmp_path):
    async with open_network(_peers(tmp_path), tmp_path, **NET) as grid:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2)).eval()
        mallory, bob = grid.net("mallory"), grid.net("bob")
        policy = Policy(input_shape=(None, 3), users=["bob"])
        # served encrypted among the attacker's own peers, the attacker dealing
        await mallory.serve_model(model, "spy", mpc=True, parties=["m1", "m2"], dealer="mallory",
                                  policy=policy)
        # and among peers bob trusts
        await mallory.serve_model(model, "fair", mpc=True, parties=["hospital", "clinic"],
                                  dealer="university", policy=policy)
        await _wait_models(grid, "mallory", ["spy", "fair"])
        x = torch.tensor([[1.0, 2.0, -3.0], [0.5, -0.25, 4.0]])
        seen = {n: set(grid[n].extensions["smpc"].shares) for n in ("m1", "m2")}
        with pytest.raises(PermissionDenied, match="hold shares of your input"):
            await bob.run_encrypted_inference("spy", x)        # encrypted serving
        handle = await bob.encrypted_model("mallory", "spy")
        with pytest.raises(PermissionDenied, match="hold shares of your input"):
            await handle.predict(x)                            # p2pgrid.smpc directly
        assert {n: set(grid[n].extensions["smpc"].shares) for n in ("m1", "m2")} == seen

        y = await bob.run_encrypted_inference("fair", x)
        with torch.no_grad():
            assert torch.allclose(y, model(x), atol=1e-2)
