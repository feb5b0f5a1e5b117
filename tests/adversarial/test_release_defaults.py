"""Issue 12, attack 7: exact answers were free by default.

``aggregate`` defaulted to ``compute``, so a name with only ``compute`` got exact means
while the DP budget and bounds the owner declared were never charged. Now a name with
only ``compute`` gets DP releases under a default budget; exact aggregates need an
explicit ``aggregate`` grant; publishing such data without bounds warns the owner.
"""

import logging

import pytest

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.governance import Bounds, PrivacyBudgetExceeded, of
from p2pgrid.testing import open_network

BIRTHS = birth_records(100, seed=4)
BOUNDS = [[0, 6], [30, 60], [25, 45]]


async def test_compute_only_gets_dp_not_exact(tmp_path, caplog):
    async with open_network(["hospital", "bob", "ana"], tmp_path) as grid:
        owner = grid.net("hospital")
        ptr = await owner.publish(BIRTHS, tags=["births"], compute=["bob"])  # rules by default
        of(grid["hospital"]).store.set_dataset(ptr.id, Bounds.parse(BOUNDS), None, by="test")
        await grid.wait_searchable("#births")

        bob = (await grid.net("bob").search("#births"))["hospital"][0]
        with pytest.raises(p2pgrid.PermissionDenied):
            await bob[:, 0].mean().get()                   # no exact answer by default
        default = (await grid.net("bob").privacy_budget("hospital", bob.id))["remaining"]
        assert default >= 0.5                              # a default budget, owner set none
        noisy, info = await bob[:, 0].mean().get(epsilon=0.5, details=True)
        assert info["epsilon"] == 0.5 and info["remaining"] == pytest.approx(default - 0.5)
        assert abs(float(noisy) - float(BIRTHS[:, 0].mean())) < 6.0
        with pytest.raises(PrivacyBudgetExceeded):
            await bob[:, 0].mean().get(epsilon=default)    # what is left is less

        # an explicit grant gives exact aggregates
        granted = await owner.publish(BIRTHS, tags=["granted"], compute=["ana"], aggregate=["ana"])
        ana = p2pgrid.Pointer(grid.net("ana"), "hospital", granted.meta)
        assert float(await ana[:, 0].mean().get()) == pytest.approx(float(BIRTHS[:, 0].mean()),
                                                                     rel=1e-5)

        # the owner hears of compute-only users left without bounds
        with caplog.at_level(logging.WARNING, logger="p2pgrid.release"):
            await owner.publish(BIRTHS, tags=["unbounded"], compute=["bob"])
        assert any("bob may compute" in r.getMessage() and "no bounds" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="p2pgrid.release"):
            await owner.publish(BIRTHS, tags=["bounded"], compute=["bob"], bounds=BOUNDS)
        assert not caplog.records  # bounds declared with the data: the DP path is open
