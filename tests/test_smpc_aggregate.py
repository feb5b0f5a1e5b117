"""SMPC reconstruction follows the plaintext rules (issue 15 item 1): a reduction over whole
records goes to holders of the aggregate right, approvals reach shared copies, and
row-level results of someone else's data stay refused. Real peers on loopback."""

import pytest
import torch
import trio
from torch import nn

from p2pgrid.config import PeerConfig
from p2pgrid.errors import PermissionDenied
from p2pgrid.smpc.aggregate import record_aggregate, record_wise
from p2pgrid.testing import open_network

DEALER = "university"
NET = dict(gossip_interval=0.5, ttl=30.0)


def _peers(tmp_path, owners, others):
    # the owners' peers let each other hold shares and the university deal (smpcdp's rule)
    return ([PeerConfig(name=n, data_dir=tmp_path / n, smpc_parties=tuple(owners),
                        crypto_providers=(DEALER,)) for n in owners]
            + [PeerConfig(name=n, data_dir=tmp_path / n) for n in others]
            + [PeerConfig(name=DEALER, roles=("crypto-provider",), data_dir=tmp_path / DEALER)])


async def _pointer(net, tag):
    (ptr,) = [p for hits in (await net.search("#" + tag)).values() for p in hits]
    return ptr


async def test_encrypted_evaluation_reveals_aggregates_only(tmp_path):
    async with open_network(_peers(tmp_path, ["hospital", "clinic"], ["company"]), tmp_path,
                            **NET) as grid:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(24, 4, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (24,), generator=g)
        y = nn.functional.one_hot(labels, 3).double()
        hosp = grid.net("hospital")
        # the company may compute and have aggregates over >= 10 records, never rows
        await hosp.publish(x, tags=["test-x"], compute=["company"], aggregate=["company"], get=[])
        await hosp.publish(y, tags=["test-y"], compute=["company"], aggregate=["company"], get=[])
        await hosp.publish(x[:6], tags=["few"], compute=["company"], aggregate=["company"], get=[])
        for tag in ("test-x", "test-y", "few"):
            await grid.wait_searchable("#" + tag)
        company = grid.net("company")
        xs = await (await _pointer(company, "test-x")).share("hospital", "clinic", dealer=DEALER)
        ys = await (await _pointer(company, "test-y")).share("hospital", "clinic", dealer=DEALER)
        torch.manual_seed(2)
        plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        # the model as the encrypted-training tutorial might hand it over: traced (issue 15 item 2)
        traced = torch.jit.trace(plain, x[:1])
        model = await company.encrypt_model(traced, parties=["hospital", "clinic"], dealer=DEALER)

        # the tutorial's test(): the number of correct predictions, and the mean loss
        pred = await model.forward(xs)
        with torch.no_grad():
            out = plain(x)
        correct = await (pred.argmax(1) * ys).sum().reveal()
        assert round(float(correct)) == int((out.argmax(1) == labels).sum())
        mse = await ((pred - ys).square()).mean().reveal()
        assert abs(float(mse) - float(((out - y) ** 2).mean())) < 1e-2
        per_class = await (pred.argmax(1) * ys).sum(0).reveal()       # a reduction over records
        assert per_class.shape == (3,) and round(float(per_class.sum())) == round(float(correct))

        # row-level results of the hospital's data stay refused
        for row_level in (pred, pred.argmax(1), (pred.argmax(1) * ys).sum(1), xs[3],
                          (pred - ys).square().mean(1)):
            with pytest.raises(PermissionDenied, match="aggregate right"):
                await row_level.reveal()
        with pytest.raises(PermissionDenied):
            await model.predict(xs)
        # a reduction that does not treat every record alike is refused too
        mask = torch.zeros(24, 1, dtype=torch.float64)
        mask[3] = 1.0
        mine = await company.share(mask, parties=["hospital", "clinic"], dealer=DEALER)
        for selective in ((xs * mine).sum(0), (xs * mask).sum(0), xs[:12].sum(0),
                          (xs.sum(0) * 1.0), smpc_cat_with(xs, mine)):
            with pytest.raises(PermissionDenied):
                await selective.reveal()
        masked = await (xs * mine)                    # kept shared: no aggregate right left
        with pytest.raises(PermissionDenied):
            await masked.sum(0).reveal()
        kept = await xs.relu()                        # row by row: still an aggregate source
        total = await kept.sum().reveal()
        assert abs(float(total) - float(x.relu().sum())) < 1e-2
        # fewer records than min_rows (10): refused
        few = await (await _pointer(company, "few")).share("hospital", "clinic", dealer=DEALER)
        with pytest.raises(PermissionDenied):
            await few.sum(0).reveal()


def smpc_cat_with(xs, mine):
    """Records the caller chose, concatenated to the owner's: not an aggregate of the data."""
    from p2pgrid import smpc
    return smpc.cat([xs[:, :1], mine], dim=1).sum(0)


async def test_an_approved_request_reaches_shared_copies(tmp_path):
    async with open_network(_peers(tmp_path, ["hospital", "clinic"], ["bob"]), tmp_path, **NET) as grid:
        data = torch.randn(30, 3, dtype=torch.float64)
        await grid.net("hospital").publish(data, tags=["births"], compute=["bob"], aggregate=[],
                                           get=[])
        await grid.wait_searchable("#births")
        bob = grid.net("bob")
        rec = await _pointer(bob, "births")
        with pytest.raises(PermissionDenied):   # no aggregate right, no approval: refused
            await (await rec.share("hospital", "clinic", dealer=DEALER)).mean(0).reveal()
        req = await rec.request_access(reason="monthly means")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(req.wait, 10)
            await trio.sleep(0.2)
            await grid.net("hospital").decide_request("hospital", req.id, approve=True)
        assert req.approved
        plain = await rec.mean(0).get()
        shared = await (await rec.share("hospital", "clinic", dealer=DEALER)).mean(0).reveal()
        assert torch.allclose(shared, plain, atol=1e-3)


def test_the_structure_rule_on_programs():
    leaf = lambda i: {"op": "leaf", "id": i}  # noqa: E731
    ref = lambda j: {"$": j}  # noqa: E731

    def prog(*nodes):
        return {"nodes": list(nodes), "outputs": [len(nodes) - 1]}
    shapes = {"x": (20, 3), "w": (3, 2), "m": (20, 1)}
    rec = {"x"}
    assert record_aggregate(prog(leaf("x"), {"op": "mean", "args": [ref(0)], "kwargs": {"dim": 0}}),
                            0, shapes, rec) == {"x": 20}
    assert record_aggregate(prog(leaf("x"), leaf("w"), {"op": "matmul", "args": [ref(0), ref(1)]},
                                 {"op": "relu", "args": [ref(2)]}, {"op": "sum", "args": [ref(3)]}),
                            0, shapes, rec) == {"x": 20}
    refused = [
        prog(leaf("x"), leaf("m"), {"op": "mul", "args": [ref(0), ref(1)]},
             {"op": "sum", "args": [ref(2)], "kwargs": {"dim": 0}}),                  # a record mask
        prog(leaf("x"), {"op": "transpose", "args": [ref(0), 0, 1]}, {"op": "sum", "args": [ref(1)]}),
        prog(leaf("x"), {"op": "getitem", "args": [ref(0), {"slice": [0, 12, None]}]},
             {"op": "sum", "args": [ref(1)]}),                                        # some records
        prog(leaf("x"), {"op": "sum", "args": [ref(0)], "kwargs": {"dim": 0}},
             {"op": "mul", "args": [ref(1), 2.0]}),                                   # not the last op
        prog(leaf("x"), {"op": "sum", "args": [ref(0)], "kwargs": {"dim": 1}}),     # per record
        prog(leaf("x"), {"op": "getitem", "args": [ref(0), {"tuple": [{"ellipsis": True}, 0]}]},
             {"op": "sum", "args": [ref(1)]}),
    ]
    for p in refused:
        assert record_aggregate(p, 0, shapes, rec) is None
    assert record_wise(prog(leaf("x"), {"op": "relu", "args": [ref(0)]}), 0, shapes, rec) == {"x": 20}
    assert record_wise(prog(leaf("x"), {"op": "cat", "args": [{"tuple": [ref(0), ref(0)]}],
                                         "kwargs": {"dim": 0}}), 0, shapes, rec) is None  # repeats
