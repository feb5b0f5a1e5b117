"""Attack (issue 15 item 1): select one record, then release it as an "aggregate".

A scientist with the ``compute`` and ``aggregate`` rights on a hospital's data may have
results over many records, never one record. It multiplies the shared data by a one-hot
mask of its own (record 3 kept, the others zeroed) and keeps the product shared: the
product still has all the rows, so a "sum over the batch" of it, or a model trained on
it, is record 3 alone. The parties must not let a kept value carry the aggregate right
unless it is still one row per record computed alike for every record
(:mod:`p2pgrid.smpc.aggregate`). Real peers over TLS HTTP/2 on loopback.
"""

import pytest
import torch
from torch import nn

from p2pgrid import smpc
from p2pgrid.config import PeerConfig
from p2pgrid.errors import PermissionDenied
from p2pgrid.testing import open_network

NET = dict(gossip_interval=0.5, ttl=30.0)
DEALER = "university"


async def test_a_masked_copy_is_not_an_aggregate_source(tmp_path):
    owners = ("hospital", "clinic")
    peers = [PeerConfig(name=n, data_dir=tmp_path / n, smpc_parties=owners, crypto_providers=(DEALER,))
             for n in owners]
    peers += [PeerConfig(name="mallory", data_dir=tmp_path / "mallory"),
              PeerConfig(name=DEALER, roles=("crypto-provider",), data_dir=tmp_path / DEALER)]
    async with open_network(peers, tmp_path, **NET) as grid:
        x = torch.randn(32, 4, dtype=torch.float64)
        y = torch.randn(32, 1, dtype=torch.float64)
        hosp = grid.net("hospital")
        await hosp.publish(x, tags=["vitals-x"], compute=["mallory"], aggregate=["mallory"], get=[])
        await hosp.publish(y, tags=["vitals-y"], compute=["mallory"], aggregate=["mallory"], get=[])
        for tag in ("vitals-x", "vitals-y"):
            await grid.wait_searchable("#" + tag)
        net = grid.net("mallory")
        xs = await (await net.search("#vitals-x"))["hospital"][0].share(*owners, dealer=DEALER)
        ys = await (await net.search("#vitals-y"))["hospital"][0].share(*owners, dealer=DEALER)
        mask = torch.zeros(32, 1, dtype=torch.float64)
        mask[3] = 1.0
        m = await net.share(mask, parties=list(owners), dealer=DEALER)
        one_x, one_y = await (xs * m), await (ys * m)        # record 3, the rest zeros
        with pytest.raises(PermissionDenied):
            await one_x.sum(0).reveal()
        # train a linear model on the "batch": its gradient is record 3's alone
        lin = nn.Linear(4, 1).double()
        model = await net.encrypt_model(lin, parties=list(owners), dealer=DEALER, requires_grad=True)
        loss = await model.fit_batch(one_x, one_y, loss="mse", optimizer=smpc.SGD(model, lr=0.5))
        assert loss is None                                   # not revealed either
        with pytest.raises(PermissionDenied):
            await model.decrypt()
        # the honest use still works: training on the data itself, then the model
        honest = await net.encrypt_model(lin, parties=list(owners), dealer=DEALER, requires_grad=True)
        assert await honest.fit_batch(xs, ys, loss="mse", optimizer=smpc.SGD(honest, lr=0.1)) is not None
        assert isinstance(await honest.decrypt(), nn.Sequential)
