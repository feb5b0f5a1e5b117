"""Governance end to end: real peers, roles, requests, private releases, the audit trail."""

import math

import pytest
import torch
import trio

import p2pgrid
from p2pgrid.datasets import birth_records
from p2pgrid.governance import Bounds, PrivacyBudgetExceeded, of
from p2pgrid.governance.messages import DecideRequest
from p2pgrid.testing import open_network

BIRTHS = birth_records(200, seed=3)
BOUNDS = Bounds.parse([[0, 60], [0, 6000], [0, 1]])


def _clip(t: torch.Tensor) -> torch.Tensor:
    lo, hi = BOUNDS.tensors(tuple(t.shape))
    return torch.maximum(torch.minimum(t.double(), hi), lo)


async def _setup(grid, *, users=(("bob", "scientist"), ("gail", "guest"), ("olga", "owner")),
                 registered_only=False):
    hospital = grid["hospital"]
    # exact aggregates are an explicit grant (no longer implied by compute: issue 12)
    ptr = await grid.net("hospital").publish(BIRTHS, tags=["births"], description="synthetic births",
                                             compute=["*"], get=[], aggregate=["*"])
    gov = of(hospital)
    for name, role in users:
        gov.store.add_user(name, role, grid[name].identity.public_bytes, by="test")
    if registered_only:
        gov.store.set_setting("registered_only", True, by="test")
    await grid.wait_searchable("#births")
    return ptr, gov


async def _rec(grid, name):
    return (await grid.net(name).search("#births"))["hospital"][0]


async def test_role_boundaries(tmp_path):
    async with open_network(["hospital", "bob", "gail", "olga", "carl"], tmp_path) as grid:
        _, gov = await _setup(grid)
        bob, gail, olga, carl = [await _rec(grid, n) for n in ("bob", "gail", "olga", "carl")]

        # a guest may search but not compute, not even what the rules open to anyone
        assert [p.id for p in await grid.net("gail").peer("hospital").objects(["births"])] == [gail.id]
        with pytest.raises(p2pgrid.PermissionDenied, match="gail"):
            await gail[:, 0].mean().get()
        with pytest.raises(p2pgrid.PermissionDenied):
            await gail[:, 0].mean().get(epsilon=0.1)
        with pytest.raises(p2pgrid.PermissionDenied, match="may not compute"):
            await grid.net("gail").peer("hospital").send(torch.ones(3))

        # a scientist may compute aggregates, not download rows, not decide requests
        assert torch.allclose(await bob[:, 0].mean().get(), BIRTHS[:, 0].mean(), atol=1e-4)
        with pytest.raises(p2pgrid.PermissionDenied):
            await bob.get()
        req = await bob.request_access(reason="monthly statistics")
        with pytest.raises(p2pgrid.PermissionDenied, match="only its owner"):
            await grid.net("bob").decide_request("hospital", req.id, approve=True)
        assert [r["id"] for r in await grid.net("bob").access_requests("hospital")] == [req.id]
        # a guest may not even file one
        with pytest.raises(p2pgrid.PermissionDenied):
            await gail.request_access(reason="curious")

        # nobody reads another user's raw results: carl (unregistered, open mode) may
        # compute on the data, but not on bob's result; bob's own result is his alone
        doubled = await (bob[:, 1] * 2)
        stolen = p2pgrid.Pointer(grid.net("carl"), "hospital", doubled.meta)
        with pytest.raises(p2pgrid.PermissionDenied):
            await stolen.mean().get()
        with pytest.raises(p2pgrid.PermissionDenied):
            await stolen.get()
        assert torch.allclose(await doubled.mean().get(), BIRTHS[:, 1].mean() * 2, rtol=1e-5)
        assert torch.allclose(await carl[:, 0].sum().get(), BIRTHS[:, 0].sum(), rtol=1e-5)

        # the owner role may do anything: read rows, read bob's result, decide
        assert torch.equal(await olga.get(), BIRTHS)
        olga_view = p2pgrid.Pointer(grid.net("olga"), "hospital", doubled.meta)
        assert torch.allclose(await olga_view.get(), BIRTHS[:, 1] * 2)
        decided = await grid.net("olga").decide_request("hospital", req.id, approve=False,
                                                        why="too broad")
        assert decided["status"] == "denied"
        await req.wait(timeout=10)
        assert not req.approved and req.why == "too broad"

        # model calls: a scientist may call a served model, a guest may not
        model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        await grid.net("hospital").serve_model(model, "risk")
        x = torch.rand(4, 3)
        with trio.fail_after(10):
            while True:
                try:
                    y = await grid.net("bob").run_inference("risk", x)
                    break
                except p2pgrid.NotFound:  # not announced to bob yet
                    await trio.sleep(0.05)
        assert torch.allclose(y, model(x), atol=1e-6)
        with trio.fail_after(10), pytest.raises(p2pgrid.PermissionDenied, match="gail"):
            while True:
                try:
                    await grid.net("gail").run_inference("risk", x)
                except p2pgrid.NotFound:  # not announced to gail yet
                    await trio.sleep(0.05)

        # every one of these is in the audit trail, chained, each once
        tail = gov.store.audit_tail(300)
        actions = {(e["action"], e.get("caller")) for e in tail}
        for expected in [("search", "gail"), ("compute", "bob"), ("denied", "bob"),
                         ("get", "olga"), ("request", "bob"),
                         ("decision", "olga"), ("user.add", "test"), ("model_call", "bob"),
                         ("denied", "gail")]:
            assert expected in actions, expected
        assert any(e["action"] == "compute" and e["caller"] == "bob" and e.get("fetch")
                   for e in tail)  # an aggregate fetched in the same call
        calls = [e for e in tail if e["action"] == "model_call"]
        assert [(e["caller"], e["outcome"]) for e in calls] == [("bob", "ok")]
        assert any(e["action"] == "denied" and e.get("message") == "serving.infer"
                   and e["caller"] == "gail" for e in tail)
        assert gov.store.verify(grid["hospital"].identity.public_bytes).ok


async def test_registered_names_and_registered_only_mode(tmp_path):
    async with open_network(["hospital", "bob", "mallory", "carl"], tmp_path) as grid:
        _, gov = await _setup(grid, users=(("bob", "scientist"),))
        # mallory's peer claims bob's name: the registered key decides
        mallory = grid["mallory"]
        from p2pgrid.auth import Caller
        with pytest.raises(p2pgrid.Unauthenticated, match="registered"):
            grid["hospital"].authorize(Caller("bob", mallory.identity.public_bytes))
        # open mode: carl, unregistered, follows the object rules as before
        carl = await _rec(grid, "carl")
        assert float(await carl[:, 0].mean().get()) > 0
        gov.store.set_setting("registered_only", True, by="test")
        with pytest.raises(p2pgrid.PermissionDenied, match="not registered"):
            await carl[:, 0].mean().get()
        with pytest.raises(p2pgrid.PermissionDenied, match="not registered"):
            await grid.net("carl").peer("hospital").objects()
        # gossip and ping still flow
        assert await grid.net("carl").peer("hospital").ping() < 5
        bob = await _rec(grid, "bob")
        assert float(await bob[:, 0].mean().get()) > 0


async def test_request_approval_grants_get_and_budget(tmp_path):
    async with open_network(["hospital", "bob", "ana"], tmp_path) as grid:
        ptr, gov = await _setup(grid, users=(("bob", "scientist"), ("ana", "scientist")))
        gov.store.set_dataset(ptr.id, BOUNDS, None, by="test")
        gov.store.set_default_budget(0.0, by="test")  # no default budget: requests grow it
        bob = await _rec(grid, "bob")
        with pytest.raises(p2pgrid.PermissionDenied):
            await bob.get()
        req = await bob.request_access(reason="monthly statistics")
        assert req.status == "pending"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(req.wait, 10)
            await trio.sleep(0.2)
            await grid.net("hospital").decide_request("hospital", req.id, approve=True, why="ok")
        assert req.approved and req.why == "ok"
        assert torch.equal(await bob.get(), BIRTHS)
        assert torch.equal(await (bob[:, 0] + 0).get(), BIRTHS[:, 0])  # derived rows too
        ana = await _rec(grid, "ana")
        with pytest.raises(p2pgrid.PermissionDenied):
            await ana.get()  # the grant was bob's

        # a budget request grows the budget when approved
        with pytest.raises(PrivacyBudgetExceeded) as e:
            await bob[:, 0].mean().get(epsilon=0.5)
        assert e.value.remaining == 0.0 and e.value.status == 403
        breq = await bob.request_access(reason="a few means", epsilon=1.0)
        await grid.net("hospital").decide_request("hospital", breq.id, approve=True)
        await breq.wait(timeout=10)
        noisy = await bob[:, 0].mean().get(epsilon=0.5)
        assert abs(float(noisy) - float(_clip(BIRTHS)[:, 0].mean())) < 60 * 40 / 200
        assert (await grid.net("bob").privacy_budget("hospital", ptr.id))["remaining"] == \
            pytest.approx(0.5)
        # deciding twice is refused
        with pytest.raises(p2pgrid.Conflict):
            await grid.net("hospital").decide_request("hospital", breq.id, approve=False)


async def test_budget_exhaustion_and_concurrent_charges(tmp_path):
    async with open_network(["hospital", "bob", "ana"], tmp_path) as grid:
        ptr, gov = await _setup(grid, users=(("bob", "scientist"), ("ana", "scientist")))
        gov.store.set_dataset(ptr.id, BOUNDS, 2.0, by="test")   # dataset total 2.0
        gov.store.set_budget("bob", 1.0, by="test")
        gov.store.set_budget("ana", 5.0, by="test")
        gov.store.set_budget("ana", 1.5, ptr.id, by="test")     # ana's cap on this dataset
        bob, ana = await _rec(grid, "bob"), await _rec(grid, "ana")

        value, info = await p2pgrid.governance.private_get(
            bob[:, 0].mean(), epsilon=0.25, details=True)
        assert info["sensitivity"] == pytest.approx(60 / 200) and info["kind"] == "mean"
        assert info["scale"] == pytest.approx(60 / 200 / 0.25)
        assert info["remaining"] == pytest.approx(0.75)

        # 12 releases of 0.1 race for bob's 0.75 left: exactly 7 pass
        outcomes = []

        async def one():
            try:
                await bob[:, 1].sum().get(epsilon=0.1)
                outcomes.append("ok")
            except PrivacyBudgetExceeded as e:
                outcomes.append(e)

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(one)
        assert outcomes.count("ok") == 7
        denied = [o for o in outcomes if o != "ok"]
        assert all(0 <= d.remaining < 0.1 for d in denied)
        assert "bob's total" in str(denied[0])
        assert gov.store.spent("bob") == pytest.approx(0.95)
        assert gov.store.spent("bob") <= 1.0 + 1e-9

        # ana hits her cap on this dataset, then the dataset's total would stop her
        await ana[:, 2].count_nonzero().get(epsilon=1.0)
        with pytest.raises(PrivacyBudgetExceeded, match="ana's budget on") as e:
            await ana[:, 2].count_nonzero().get(epsilon=1.0)
        assert e.value.remaining == pytest.approx(0.05)   # dataset total: 2.0 - 0.95 - 1.0
        assert e.value.details["user_dataset"]["left"] == pytest.approx(0.5)
        # histograms are released too, one noisy count per bin
        hist = await ana[:, 0].histc(bins=6, min=0, max=60).get(epsilon=0.05)
        assert hist.shape == (6,)
        with pytest.raises(PrivacyBudgetExceeded, match="the total of dataset"):
            await ana[:, 0].sum().get(epsilon=0.01)
        # no release without a charge: the ledger holds exactly what was released
        assert len(gov.store.ledger(100)) == 1 + 7 + 1 + 1
        releases = [e for e in gov.store.audit_tail(500) if e["action"] == "release"]
        assert len(releases) == 10
        # unsupported queries are refused before any charge
        with pytest.raises(p2pgrid.BadRequest, match="not supported"):
            await ana[:, 0].max().get(epsilon=0.01)
        assert len(gov.store.ledger(100)) == 10


async def test_released_noise_has_the_promised_scale(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr, gov = await _setup(grid, users=(("bob", "scientist"),))
        gov.store.set_dataset(ptr.id, BOUNDS, None, by="test")
        gov.store.set_budget("bob", 1000.0, by="test")
        bob = await _rec(grid, "bob")
        exact = float(_clip(BIRTHS)[:, 0].mean())
        epsilon, n = 0.5, 300
        scale = 60 / 200 / epsilon           # sensitivity (hi - lo) / n over epsilon
        values = []
        limiter = trio.CapacityLimiter(8)

        async def one():
            async with limiter:
                values.append(float(await bob[:, 0].mean().get(epsilon=epsilon)))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        errs = torch.tensor(values, dtype=torch.float64) - exact
        var = float(errs.var())
        # Laplace(b): variance 2 b^2; the sample variance's sd is sqrt(5/n) of it (kurtosis 6)
        assert abs(var / (2 * scale ** 2) - 1) < 4 * math.sqrt(5 / n), var
        assert abs(float(errs.mean())) < 4 * math.sqrt(2) * scale / math.sqrt(n)
        assert gov.store.spent("bob") == pytest.approx(n * epsilon)


async def test_restart_keeps_pending_requests_and_the_ledger(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr, gov = await _setup(grid, users=(("bob", "scientist"),))
        gov.store.set_dataset(ptr.id, BOUNDS, None, by="test")
        gov.store.set_budget("bob", 1.0, by="test")
        bob = await _rec(grid, "bob")
        await bob[:, 0].mean().get(epsilon=0.4)
        first = await bob.request_access(reason="rows for a audit")
        second = await bob.request_access(reason="more budget", epsilon=0.5)
        head_before = gov.store.verify().head

        waited = []

        async def wait_across_restart():
            waited.append(await first.wait(timeout=30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_across_restart)
            await trio.sleep(0.2)
            await grid.restart("hospital")
            await grid.wait_converged()
            gov2 = of(grid["hospital"])
            assert gov2 is not gov
            pending = {r["id"]: r for r in gov2.store.requests("pending")}
            assert set(pending) == {first.id, second.id}
            assert pending[second.id]["epsilon"] == 0.5 and pending[first.id]["reason"] == \
                "rows for a audit"
            assert gov2.store.spent("bob") == pytest.approx(0.4)
            verdict = gov2.store.verify(grid["hospital"].identity.public_bytes)
            assert verdict.ok and verdict.entries >= 4 and verdict.checkpoints >= 1
            assert head_before in {e["hash"] for e in gov2.store.audit_tail(500)}
            # the owner approves from the command line, another connection to the database
            from p2pgrid.cli import main
            data = str(grid.configs["hospital"].data_dir)
            code = await trio.to_thread.run_sync(main, ["requests", "approve", first.id,
                                                        "--data-dir", data])
            assert code == 0
        assert waited[0].approved and waited[0].item["decided_by"] == "owner (cli)"
        assert torch.equal(await bob.get(), BIRTHS)
        with pytest.raises(PrivacyBudgetExceeded):
            await bob[:, 0].mean().get(epsilon=0.7)


async def test_open_peer_without_users_is_unchanged(tmp_path):
    async with open_network(["hospital", "bob", "eve"], tmp_path) as grid:
        await grid.net("hospital").publish(BIRTHS, tags=["births"], compute=["bob"], get=[],
                                           aggregate=["bob"])
        await grid.wait_searchable("#births")
        gov = of(grid["hospital"])
        assert not gov.active
        bob = await _rec(grid, "bob")
        r = await (bob[:, 0] * 2)
        # results stay shared by the object rules, as before governance
        assert float(await r.mean().get()) > 0
        eve = await _rec(grid, "eve")
        with pytest.raises(p2pgrid.PermissionDenied, match="no compute right"):
            await eve.mean().get()
        # open mode: anyone may ask, nobody but the peer may decide
        req = await bob.request_access(reason="rows please")
        with pytest.raises(p2pgrid.PermissionDenied):
            await grid["bob"].request("hospital", DecideRequest(req.id, True, ""))


async def test_program_approval_releases_exactly_that_program(tmp_path):
    async with open_network(["hospital", "bob", "ana"], tmp_path) as grid:
        await grid.net("hospital").publish(BIRTHS, tags=["births"], compute=["bob", "ana"])
        await grid.wait_searchable("#births")
        bob = await _rec(grid, "bob")
        expr = (bob[:, 1] * (bob[:, 0] > 3)).sum()  # a masked sum: no exact aggregate form
        with pytest.raises(p2pgrid.PermissionDenied, match="approve this program"):
            await expr.get()
        req = await expr.request_release(reason="length of the heavier births")
        listed = await grid.net("hospital").access_requests("hospital")
        mine = next(r for r in listed if r["id"] == req.id)
        assert mine["right"] == "program" and "gt(" in mine["reason"] and bob.id in mine["reason"]
        await grid.net("hospital").decide_request("hospital", req.id, approve=True)
        await req.wait(timeout=10)
        want = (BIRTHS[:, 1] * (BIRTHS[:, 0] > 3)).sum()
        assert torch.allclose(await expr.get(), want, rtol=1e-5)
        kept = await expr                       # the same program kept remote, fetched later
        assert torch.allclose(await kept.get(), want, rtol=1e-5)
        with pytest.raises(p2pgrid.PermissionDenied):
            await (bob[:, 1] * (bob[:, 0] > 2)).sum().get()   # another constant: another program
        ana = await _rec(grid, "ana")
        with pytest.raises(p2pgrid.PermissionDenied):
            await (ana[:, 1] * (ana[:, 0] > 3)).sum().get()   # approved for bob only


# ---- issue 15 item 8: bounds that clip the data warn the owner, never the scientist

def _docs_bounds():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "GOVERNANCE.md").read_text()
    line = re.search(r"p2pgrid budget bounds births-2024-02 ((?:\S+:\S+ ?)+)", text).group(1)
    return Bounds.parse([[float(v) for v in pair.split(":")] for pair in line.split()])


def test_the_documented_bounds_fit_the_demo_births():
    from p2pgrid.governance.mechanism import clipped_columns
    # the hospital's demo dataset (peers/hospital.toml), and a few others from the generator
    for data in (birth_records(1000, seed=7, month=2), *(birth_records(1000, seed=s) for s in range(3))):
        assert clipped_columns(data, _docs_bounds(), threshold=0.0) == []


async def test_bounds_that_clip_warn_the_owner_only(tmp_path, caplog):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr, gov = await _setup(grid, users=(("bob", "scientist"),))
        gov.store.set_dataset(ptr.id, Bounds.parse([[0, 60], [1000, 5000], [0, 1]]), None, by="test")
        gov.store.set_budget("bob", 10.0, by="test")
        bob = await _rec(grid, "bob")
        with caplog.at_level("WARNING", logger="p2pgrid.governance"):
            # epsilon 5: the noise's scale is a few units, far below the margin checked below
            value, info = await p2pgrid.governance.private_get(bob[:, 1].mean(), epsilon=5.0, details=True)
            await p2pgrid.governance.private_get(bob[:, 2].mean(), epsilon=0.1)   # warned once only
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                    and "clip" in r.getMessage()]
        assert len(warnings) == 2, warnings
        assert all(w.startswith("hospital: ") and ptr.id in w for w in warnings)
        assert "column 1" in warnings[0] and "100.0%" in warnings[0] and "column 2" in warnings[1]
        assert "clip" not in repr(info) and float(value) > 900   # bob sees the clamped mean, no hint
        caplog.clear()
        gov.store.set_dataset(ptr.id, _docs_bounds(), None, by="test")
        with caplog.at_level("WARNING", logger="p2pgrid.governance"):
            await p2pgrid.governance.private_get(bob[:, 1].mean(), epsilon=0.1)
        assert not [r for r in caplog.records if "clip" in r.getMessage()]
