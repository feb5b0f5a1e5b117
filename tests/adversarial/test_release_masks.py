"""Issue 12, attack 3: masks computed from the data passed as record-uniform.

Bin edges compared against a column give a per-record one-hot mask M; ``X^T M`` then
sums each record's other columns into the bin of its first column: with one record per
bin, every record comes back exactly. Only one per-record operand is allowed in an
exact aggregate, and the only product of records is the Gram matrix of raw columns.
"""

import pytest
import torch

import p2pgrid
from p2pgrid.testing import open_network

N = 20
# distinct first column: one record per bin
DATA = torch.stack([torch.arange(N, dtype=torch.float32),
                    torch.rand(N) * 100, torch.rand(N) * 50], dim=1)


async def test_data_derived_masks_select_nothing(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        await grid.net("hospital").publish(DATA, tags=["table"], compute=["bob"],
                                           aggregate=["bob"])
        await grid.wait_searchable("#table")
        rec = (await grid.net("bob").search("#table"))["hospital"][0]
        edges = torch.arange(N, dtype=torch.float32)
        mask = (rec[:, 0:1] == edges).float()            # (N, N): record i -> bin i

        with pytest.raises(p2pgrid.PermissionDenied):
            await (rec.T @ mask).get()                    # X^T M: every record, one query
        with pytest.raises(p2pgrid.PermissionDenied, match="two per-record"):
            await (rec[:, 1] * (rec[:, 0] == 3)).sum().get()   # one record's value
        with pytest.raises(p2pgrid.PermissionDenied):
            await (rec[:, 1:2] * mask).sum(0).get()
        kept = await mask
        with pytest.raises(p2pgrid.PermissionDenied):
            await (rec.T @ kept).get()

        # what the form allows: counts per bin (a histogram) and the raw Gram matrix
        counts = await mask.sum(0).get()
        assert torch.equal(counts, torch.ones(N))
        assert torch.allclose(await (rec.T @ rec).get(), DATA.T @ DATA, rtol=1e-5)
