"""Attack (issue 14, item 6 continued): one address drains the pool every stranger shares.

Unregistered callers share one privacy budget, one pool of each rate limit and one
count of open requests, whatever names they use (tests/adversarial/test_sybil_budget.py).
But one address making up names could still take the whole pool, and every other
unregistered caller, from anywhere, was refused: 4 fresh names from one address spent the
whole guest budget, 30 names took both names' worth of a ``5/hour`` model, 4 long-polls
took every request slot for strangers. After: the callers of one client address (as the
peer's socket sees it, never a header) take at most ``guest_address_share`` (half) of
each pool together; a stranger at another address is still served.

The attacker's fresh names come from 127.0.0.1, the stranger's from 127.0.0.2 (its client
socket bound there), to real peers over TLS; the peers keep a real peer's default share
(the test harness's own default gives one address the whole pool, as every peer of a
test network dials from loopback).
"""

from __future__ import annotations

import os

import pytest
import torch
import trio
from torch import nn

from p2pgrid import governance
from p2pgrid.client import Transport
from p2pgrid.config import PeerConfig
from p2pgrid.errors import RateLimited
from p2pgrid.governance import Bounds, PrivacyBudgetExceeded
from p2pgrid.governance.messages import PrivateQuery, RequestAccess, WaitRequest
from p2pgrid.identity import Identity
from p2pgrid.messages import Ping
from p2pgrid.serving import Policy
from p2pgrid.serving.messages import Infer
from p2pgrid.testing import open_network

ATTACKER, STRANGER = "127.0.0.1", "127.0.0.2"


async def _as(grid, address: str, name: str, send, peer: str = "hospital"):
    """send(transport, target) as the fresh name `name`, its connection from `address`."""
    target = grid[peer].target(grid[peer].record(peer))
    t = Transport(Identity.generate(), name, timeout=60.0, local_address=address)
    try:
        return await send(t, target)
    finally:
        await t.aclose()


async def test_one_address_spends_only_its_share_of_the_guest_budget(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path, guest_address_share=None) as grid:
        hospital = grid["hospital"]
        meta = await hospital.publish(torch.rand(200, 2) * 60, tags=["births"], compute=["*"])
        gov = governance.of(hospital)
        gov.store.set_dataset(meta.id, Bounds.parse([[0, 60]]), by="test")
        gov.store.set_default_budget(0.5, by="test")   # the guests' pool: 0.5 in all
        await grid.wait_searchable("#births")
        rec = (await grid.net("bob").search("#births"))["hospital"][0]
        program = rec[:, 0].mean().program()

        async def spend(t, target):
            try:
                await t.request(target, PrivateQuery(program, 0.125, os.urandom(16).hex()))
                return 0.125
            except PrivacyBudgetExceeded as e:
                return e.message

        outcomes = [await _as(grid, ATTACKER, f"sybil{i}", spend) for i in range(8)]
        # a stranger elsewhere still has budget: the attacker's address took only its share
        assert await _as(grid, STRANGER, "stranger", spend) == 0.125, outcomes
        spent = sum(o for o in outcomes if isinstance(o, float))
        assert spent == pytest.approx(0.25), outcomes          # half of 0.5, not all of it
        assert all("this address" in o for o in outcomes if isinstance(o, str)), outcomes
        assert gov.store.pooled_spent("127.0.0.1") == pytest.approx(0.25)
        assert gov.store.pooled_spent() == pytest.approx(0.375)


async def test_one_address_gets_only_its_share_of_a_rate_limit(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path, guest_address_share=None) as grid:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2)).eval()
        # pooled: two names' worth (10/hour) for all guests; no refill during the test
        await grid.net("hospital").serve_model(model, "clf", policy=Policy(rate_limit="5/hour"))
        x = torch.rand(1, 3)

        async def call(t, target):
            try:
                await t.request(target, Infer("hospital", "clf", x))
                return True
            except RateLimited as e:
                return e.message

        outcomes = [await _as(grid, ATTACKER, f"sybil{i}", call) for i in range(30)]
        # strangers elsewhere are still served: the attacker's address had only its share
        assert await _as(grid, STRANGER, "stranger1", call) is True, outcomes
        assert await _as(grid, STRANGER, "stranger2", call) is True
        served = outcomes.count(True)
        assert 5 <= served <= 6, outcomes     # one address: half the pool, not all 10
        assert all("from this address" in o for o in outcomes if o is not True), outcomes


async def test_one_address_holds_only_its_share_of_open_requests(tmp_path):
    # 4 requests open at once for all unregistered callers: 2 for one address
    cfg = PeerConfig(name="hospital", requests_unregistered=4)
    async with open_network([cfg], tmp_path, guest_address_share=None) as grid:
        hospital = grid["hospital"]
        meta = await hospital.publish(torch.rand(20, 2), tags=["births"], compute=["*"])
        target = hospital.target(hospital.record("hospital"))
        sybils = [Transport(Identity.generate(), f"sybil{i}", timeout=60.0, local_address=ATTACKER)
                  for i in range(6)]
        # each name files an access request, then long-polls it: open on the peer until
        # decided or 30 s
        ids = [(await t.request(target, RequestAccess(meta.id, "please"))).item["id"]
               for t in sybils]
        refused: list[str] = []

        async def long_poll(t, rid):
            try:
                await t.request(target, WaitRequest(rid, 30.0))
            except RateLimited as e:
                refused.append(e.message)

        async with trio.open_nursery() as nursery:
            for t, rid in zip(sybils, ids):
                nursery.start_soon(long_poll, t, rid)
            with trio.move_on_after(30):
                while len(refused) < 4:       # the address's 2 slots are taken, 4 refused
                    await trio.sleep(0.05)
            # a stranger elsewhere still gets a request in
            with trio.fail_after(30):
                pong = await _as(grid, STRANGER, "stranger", lambda t, target: t.request(
                    target, Ping()))
            assert pong is not None
            assert len(refused) == 4 and all("at this address" in m for m in refused), refused
            nursery.cancel_scope.cancel()
        for t in sybils:
            await t.aclose()
