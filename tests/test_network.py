"""The runtime end to end: real peers on 127.0.0.1, HTTP/2 over pinned TLS, gossip."""

import pytest
import torch
import trio

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.testing import open_network

BIRTHS = birth_records(200, seed=3)


async def _publish_births(grid, **rules):
    # aggregate is an explicit grant (it used to default to compute: issue 12, attack 7)
    rules = rules or dict(compute=["bob", "ana"], get=["ana"], aggregate=["bob", "ana"])
    ptr = await grid.net("hospital").publish(BIRTHS, tags=["birth-records", "february"],
                                             description="synthetic births", **rules)
    await grid.wait_searchable("#birth-records")
    return ptr


async def test_search_compute_and_denied_get(tmp_path):
    async with open_network(["hospital", "clinic", "bob", "ana"], tmp_path) as grid:
        await _publish_births(grid)
        net = grid.net("bob")
        hits = await net.search("#february #birth-records")
        assert list(hits) == ["hospital"]
        rec = hits["hospital"][0]
        assert rec.shape == (200, 3) and rec.description == "synthetic births"
        assert set(rec.tags) == {"birth-records", "february"}
        assert await net.search("#february #march") == {}

        avg = await (rec[:, 0].sum() / rec.shape[0]).get()
        assert torch.allclose(avg, BIRTHS[:, 0].mean(), atol=1e-5)
        assert torch.allclose(await rec.std(dim=0).get(), BIRTHS.std(dim=0), atol=1e-4)

        with pytest.raises(p2pgrid.PermissionDenied, match="may compute .* but not download"):
            await rec.get()
        with pytest.raises(p2pgrid.PermissionDenied):
            await (rec * 1).get()
        # ana may download rows
        ana_rec = (await grid.net("ana").search("#birth-records"))["hospital"][0]
        assert torch.equal(await ana_rec.get(), BIRTHS)


async def test_results_stay_remote_and_inherit_rules(tmp_path):
    async with open_network(["hospital", "bob", "eve"], tmp_path) as grid:
        await _publish_births(grid)
        rec = (await grid.net("bob").search("#birth-records"))["hospital"][0]
        doubled = await (rec[:, 1] * 2)
        assert isinstance(doubled, p2pgrid.Pointer) and doubled.shape == (200,)
        assert doubled.peer == "hospital"
        with pytest.raises(p2pgrid.PermissionDenied):
            await doubled.get()  # row-level result of data bob may not get
        assert torch.allclose(await doubled.mean().get(), BIRTHS[:, 1].mean() * 2, rtol=1e-5)
        meta = await doubled.describe()
        assert meta["rules"]["get"] == ["ana"] and meta["level"] == "row"
        # eve is on no list: no compute on the data, none on the result either
        eve_rec = (await grid.net("eve").search("#birth-records"))["hospital"][0]
        with pytest.raises(p2pgrid.PermissionDenied, match="no compute right"):
            await eve_rec.mean().get()
        await doubled.delete()
        with pytest.raises(p2pgrid.NotFound):
            await doubled.mean().get()


async def test_send_get_delete_and_ownership(tmp_path):
    async with open_network(["clinic", "bob", "eve"], tmp_path) as grid:
        bob = grid.net("bob")
        x = torch.tensor([1.0, 2.0])
        ptr = await bob.peer("clinic").send(x, tags=["scratch"])
        assert ptr.owner == "bob" and ptr.peer == "clinic"
        assert torch.equal(await ptr.get(), x)
        assert torch.equal(await (ptr @ torch.tensor([3.0, 4.0])).get(), torch.tensor(11.0))
        eve_view = p2pgrid.Pointer(grid.net("eve"), "clinic", ptr.meta)
        with pytest.raises(p2pgrid.PermissionDenied):
            await eve_view.get()
        with pytest.raises(p2pgrid.PermissionDenied):
            await eve_view.delete()
        await ptr.delete()
        with pytest.raises(p2pgrid.NotFound):
            await ptr.get()


async def test_expression_errors_are_local_and_clear(tmp_path):
    async with open_network(["hospital", "clinic", "bob"], tmp_path) as grid:
        await _publish_births(grid)
        net = grid.net("bob")
        rec = (await net.search("#birth-records"))["hospital"][0]
        other = await net.peer("clinic").send(torch.ones(3))
        with pytest.raises(p2pgrid.BadRequest, match="different peers"):
            rec[:, 0] + other
        with pytest.raises(p2pgrid.ShapeError):
            rec @ torch.ones(7)


async def test_killed_peer_expires_and_search_still_answers(tmp_path):
    async with open_network(["hospital", "clinic", "bob"], tmp_path, ttl=1.5) as grid:
        await _publish_births(grid)
        await grid.net("clinic").publish(birth_records(50, 5), tags=["birth-records"],
                                          compute=["*"])
        await grid.wait_searchable("#birth-records")
        with trio.fail_after(10):
            while len(await grid.net("bob").search("#birth-records")) < 2:
                await trio.sleep(0.05)
        await grid.stop("clinic")
        net = grid.net("bob")
        hits = await net.search("#birth-records")
        assert "hospital" in hits
        with trio.fail_after(15):
            while "clinic" in net.peers():
                await trio.sleep(0.1)
        hits = await net.search("#birth-records")
        assert list(hits) == ["hospital"]
        assert await hits["hospital"][0][:, 0].mean().get() > 0


async def test_restart_keeps_identity_and_data(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr = await _publish_births(grid, compute=["bob"], aggregate=["bob"])
        key = grid["hospital"].key_id
        await grid.restart("hospital")
        assert grid["hospital"].key_id == key
        await grid.wait_converged()
        hits = await grid.net("bob").search("#birth-records", wait=10)
        assert hits["hospital"][0].id == ptr.id
        assert torch.allclose(await hits["hospital"][0][:, 0].mean().get(), BIRTHS[:, 0].mean())


async def test_mdns_discovery_on_loopback(tmp_path):
    # no --join seeds: peers find each other by mDNS bound to 127.0.0.1 alone
    async with open_network(["a", "b", "c"], tmp_path, mdns=True, join=False) as grid:
        await grid.net("a").publish(torch.ones(12, 2), tags=["found-by-mdns"], compute=["c"],
                                      aggregate=["c"])
        await grid.wait_searchable("#found-by-mdns")
        ptr = (await grid.net("c").search("#found-by-mdns"))["a"][0]
        assert float(await ptr.sum().get()) == 24.0


async def test_connect_api(tmp_path):
    async with open_network(["hospital"], tmp_path) as grid:
        await grid.net("hospital").publish(BIRTHS, tags=["birth-records"], compute=["bob"],
                                           aggregate=["bob"])
        seed = f"{grid['hospital'].key_id}@{grid['hospital'].address}"
        async with p2pgrid.connect("bob", join=[seed], mdns=False, data_dir=tmp_path / "bob") as net:
            hits = await net.search("#birth-records", wait=10)
            assert torch.allclose(await hits["hospital"][0][:, 0].mean().get(), BIRTHS[:, 0].mean())
            assert await net.peer("hospital").ping() < 5


async def test_unfetched_results_expire(tmp_path):
    from p2pgrid.config import PeerConfig

    async with open_network([PeerConfig(name="hospital", result_ttl=0.3), "bob"], tmp_path) as grid:
        await _publish_births(grid)
        rec = (await grid.net("bob").search("#birth-records"))["hospital"][0]
        kept = await (rec[:, 0] + 1)
        assert await kept.describe()
        with trio.fail_after(10):
            while True:
                try:
                    await kept.describe()
                except p2pgrid.NotFound:
                    break
                await trio.sleep(0.2)
        # the published data itself never expires
        assert await rec[:, 0].mean().get() > 0


async def test_cleartext_h2c_only_when_asked(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path, insecure=True) as grid:
        await _publish_births(grid)
        rec = (await grid.net("bob").search("#birth-records"))["hospital"][0]
        assert torch.allclose(await rec[:, 0].mean().get(), BIRTHS[:, 0].mean())
        assert grid["hospital"].transport.insecure
