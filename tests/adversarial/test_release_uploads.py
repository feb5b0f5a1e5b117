"""Issue 12, attack 2: uploaded tensors turned aggregates into row selectors.

A scientist ``send()``s a one-hot column (or an identity matrix) to the owner's peer;
``(x * e_k).sum(0)`` is then record k, and ``x.T @ I`` the whole table. Uploads are the
uploader's data: they never make another owner's data releasable.
"""

import pytest
import torch

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.testing import open_network

N = 30
BIRTHS = birth_records(N, seed=6)


async def test_uploaded_selectors_release_nothing(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        await grid.net("hospital").publish(BIRTHS, tags=["births"], compute=["bob"],
                                           aggregate=["bob"])
        await grid.wait_searchable("#births")
        net = grid.net("bob")
        rec = (await net.search("#births"))["hospital"][0]
        onehot = torch.zeros(N, 1)
        onehot[7] = 1
        e7 = await net.peer("hospital").send(onehot)
        eye = await net.peer("hospital").send(torch.eye(N))

        with pytest.raises(p2pgrid.PermissionDenied, match="record by record"):
            await (rec * e7).sum(0).get()
        with pytest.raises(p2pgrid.PermissionDenied):
            await (rec.T @ eye).get()
        with pytest.raises(p2pgrid.PermissionDenied):
            await (eye @ rec).get()
        # kept remote, the selection is no aggregate later either
        picked = await (rec * e7)
        with pytest.raises(p2pgrid.PermissionDenied):
            await picked.sum(0).get()

        # bob's own uploads stay his; the granted aggregate still works
        assert torch.equal(await e7.get(), onehot)
        assert torch.allclose(await rec.sum(0).get(), BIRTHS.sum(0), rtol=1e-5)
