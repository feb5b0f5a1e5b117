"""Attack 6 (issue 14): budgets and limits that Sybils multiply.

Privacy budgets and rate limits were per name, and names are free: 12 fresh names
spent epsilon 6.0 against a default budget of 0.5 each, and 30 names got 30x a
``5/min`` serving limit. After: callers the owner has not registered (nor given a
budget of their own) share one privacy budget (the default) and one pool of each rate
limit (``guest_pool`` = 2 names' worth), whatever names they come under; registered
users keep their own. The owner may also require registration for any release.

Each fresh name is a fresh key signing real requests to the hospital over TLS, from one of
four loopback addresses (one address alone is held to its share of each pool: see
test_sybil_address.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import trio
from torch import nn

from p2pgrid import governance
from p2pgrid.client import Transport
from p2pgrid.errors import PermissionDenied, RateLimited
from p2pgrid.governance import Bounds, PrivacyBudgetExceeded
from p2pgrid.governance.messages import PrivateQuery
from p2pgrid.identity import Identity
from p2pgrid.serving import Policy
from p2pgrid.serving.messages import Infer
from p2pgrid.testing import open_network


ADDRESSES = 4


async def _as_fresh_names(grid, n: int, prefix: str, send):
    """Run send(transport, target, i) as `n` fresh names (fresh keys), spread over
    ADDRESSES source addresses; return outcomes."""
    target = grid["bob"].target(grid["bob"].record("hospital"))
    outcomes = []
    for i in range(n):
        t = Transport(Identity.generate(), f"{prefix}{i}", timeout=30.0,
                      local_address=f"127.0.0.{i % ADDRESSES + 1}")
        try:
            outcomes.append(await send(t, target, i))
        finally:
            await t.aclose()
    return outcomes


async def _publish(grid):
    hospital = grid["hospital"]
    meta = await hospital.publish(torch.rand(200, 2) * 60, tags=["births"], compute=["*"])
    gov = governance.of(hospital)
    gov.store.set_dataset(meta.id, Bounds.parse([[0, 60]]), by="test")
    gov.store.set_default_budget(0.5, by="test")
    await grid.wait_searchable("#births")
    rec = (await grid.net("bob").search("#births"))["hospital"][0]
    return rec[:, 0].mean().program()


async def test_fresh_names_share_one_privacy_budget(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path, guest_address_share=None) as grid:
        program = await _publish(grid)

        async def spend(t, target, i):
            try:
                await t.request(target, PrivateQuery(program, 0.125, os.urandom(16).hex()))
                return 0.125
            except PrivacyBudgetExceeded as e:
                assert "unregistered" in e.message
                return 0.0

        spent = await _as_fresh_names(grid, 12, "sybil", spend)
        assert sum(spent) == pytest.approx(0.5), spent  # the shared default, not 12 x 0.125
        gov = governance.of(grid["hospital"])
        assert gov.store.pooled_spent() == pytest.approx(sum(spent))
        # a user the owner vouched for keeps a budget of its own
        gov.store.set_budget("bob", 0.5, by="test")
        rec = (await grid.net("bob").search("#births"))["hospital"][0]
        assert await rec[:, 0].mean().get(epsilon=0.5) is not None

        # and the owner may require registration for any release
        gov.store.set_setting("releases_registered_only", True, by="test")
        gov.store.set_guest_budget(10.0, by="test")

        async def refused(t, target, i):
            with pytest.raises(PermissionDenied, match="requires registration"):
                await t.request(target, PrivateQuery(program, 0.1, os.urandom(16).hex()))
            return True

        assert await _as_fresh_names(grid, 2, "guest", refused) == [True, True]


async def test_fresh_names_share_one_rate_limit(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path, guest_address_share=None) as grid:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2)).eval()
        await grid.net("hospital").serve_model(model, "clf", policy=Policy(rate_limit="5/min"))
        x = torch.rand(1, 3)

        async def call_twice(t, target, i):
            ok = 0
            for _ in range(2):
                try:
                    await t.request(target, Infer("hospital", "clf", x))
                    ok += 1
                except RateLimited as e:
                    assert "unregistered callers together" in e.message or "5/min" in e.message
            return ok

        served = await _as_fresh_names(grid, 30, "sybil", call_twice)
        assert 5 <= sum(served) <= 2 * 5, served  # two names' worth, not 30 x 5
        # a registered user keeps a limit of its own
        gov = governance.of(grid["hospital"])
        gov.store.add_user("bob", "scientist", grid["bob"].identity.public_bytes, by="test")
        with trio.fail_after(10):
            y = await grid["bob"].request("hospital", Infer("hospital", "clf", x))
        assert torch.allclose(y.y, model(x), atol=1e-6)
