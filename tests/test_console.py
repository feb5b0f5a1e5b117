"""The owner's console forms, against real peers over HTTP: each change takes effect for
a remote caller at once, is audited as the console's, and the pages stay readable."""

import re

import httpx
import pytest
import torch

import p2pgrid
from p2pgrid.console.views import bar, num, trained_here
from p2pgrid.datasets import birth_records
from p2pgrid.errors import BadRequest
from p2pgrid.governance import Bounds, of
from p2pgrid.testing import open_network

BIRTHS = birth_records(200, seed=5)
BY = "hospital (console)"


async def _publish(grid, **rules):
    ptr = await grid.net("hospital").publish(BIRTHS, tags=["births"], description="births",
                                             **{"compute": ["bob"], "get": [], **rules})
    await grid.wait_searchable("#births")
    rec = (await grid.net("bob").search("#births"))["hospital"][0]
    return ptr, rec


async def _login(client, gov) -> str:
    r = await client.get("/login", params={"token": gov.token})
    assert r.status_code == 303
    page = (await client.get("/")).text
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


async def _post(client, path, csrf, **form):
    r = await client.post(path, data={"csrf": csrf, **form})
    return r


def _console_entries(gov, action):
    return [e for e in gov.store.audit_tail(500) if e["action"] == action and e["caller"] == BY]


async def test_rules_form_takes_effect_for_a_remote_caller(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr, rec = await _publish(grid)
        gov = of(grid["hospital"])
        with pytest.raises(p2pgrid.PermissionDenied):
            await rec.get()
        async with httpx.AsyncClient(base_url=gov.console_url, timeout=30) as client:
            csrf = await _login(client, gov)
            r = await _post(client, f"/data/{ptr.id}/rules", csrf, compute="bob", get="bob, ana",
                            aggregate="", min_rows="12")
            assert r.status_code == 303 and r.headers["location"] == f"/#data-{ptr.id}"
            assert torch.equal(await rec.get(), BIRTHS)  # at once, no restart
            page = (await client.get("/")).text
            assert "get: bob, ana" in page and "≥ 12 rows" in page and 'id="flash"' in page
            # +name/-name edits, as `p2pgrid data rules` takes them
            r = await _post(client, f"/data/{ptr.id}/rules", csrf, get="-bob")
            assert r.status_code == 303
            with pytest.raises(p2pgrid.PermissionDenied):
                await rec.get()
            # a bad value: one line, 4xx, nothing changed, the console keeps serving
            r = await _post(client, f"/data/{ptr.id}/rules", csrf, min_rows="many")
            assert r.status_code == 400 and "min rows must be a whole number" in r.text
            r = await _post(client, "/data/no-such-object/rules", csrf, get="bob")
            assert r.status_code == 404
            assert (await client.get("/")).status_code == 200
        changes = _console_entries(gov, "rules")
        assert [c["new"]["get"] for c in changes] == [["bob", "ana"], ["ana"]]
        assert changes[0]["old"]["get"] == [] and changes[0]["new"]["min_rows"] == 12


async def test_users_budget_and_bounds_forms(tmp_path):
    async with open_network(["hospital", "bob", "eve"], tmp_path) as grid:
        ptr, rec = await _publish(grid, compute=["bob", "eve"])
        gov = of(grid["hospital"])
        eve_rec = (await grid.net("eve").search("#births"))["hospital"][0]
        from p2pgrid.governance.roles import format_key
        bob_key = format_key(grid["bob"].identity.public_bytes)
        async with httpx.AsyncClient(base_url=gov.console_url, timeout=30) as client:
            csrf = await _login(client, gov)
            # no bounds yet: no private releases
            with pytest.raises(BadRequest, match="declared no bounds"):
                await rec[:, 0].mean().get(epsilon=0.1)
            r = await _post(client, f"/data/{ptr.id}/bounds", csrf, bounds="0:60 0:6000 0:1",
                            total="")
            assert r.status_code == 303
            assert gov.store.dataset(ptr.id)[0].to_list() == Bounds.parse(
                [[0, 60], [0, 6000], [0, 1]]).to_list()
            # users: bob registered with his key, then registered users only
            r = await _post(client, "/users", csrf, name="bob", role="scientist", key=bob_key)
            assert r.status_code == 303 and gov.store.user("bob").role == "scientist"
            r = await _post(client, "/users/mode", csrf, mode="registered")
            assert r.status_code == 303 and gov.store.registered_only
            with pytest.raises(p2pgrid.PermissionDenied):
                await eve_rec[:, 0].mean().get(epsilon=0.1)
            # budget: bob's total first 0.1 + 0.2, spent in two releases; then nothing left
            r = await _post(client, "/budget/user", csrf, user="bob", epsilon="0.3", dataset="")
            assert r.status_code == 303
            await rec[:, 0].mean().get(epsilon=0.1)
            await rec[:, 0].mean().get(epsilon=0.2)
            with pytest.raises(p2pgrid.governance.PrivacyBudgetExceeded):
                await rec[:, 0].mean().get(epsilon=0.1)
            page = (await client.get("/")).text
            assert "0.3 / 0.3" in page and "0.30000000000000004" not in page  # rounded for people
            r = await _post(client, "/budget/user", csrf, user="bob", epsilon="1", dataset="")
            assert r.status_code == 303
            await rec[:, 0].mean().get(epsilon=0.1)  # raised: allowed again
            # a refused value: one line, 400, nothing changed
            r = await _post(client, "/budget/user", csrf, user="bob", epsilon="lots", dataset="")
            assert r.status_code == 400 and "epsilon must be a number" in r.text
            r = await _post(client, "/budget/default", csrf, epsilon="-1")
            assert r.status_code == 400
            # remove bob: registered-only mode now refuses him too
            r = await _post(client, "/users/bob/remove", csrf)
            assert r.status_code == 303 and gov.store.user("bob") is None
            with pytest.raises(p2pgrid.PermissionDenied):
                await rec[:, 0].mean().get(epsilon=0.1)
            r = await _post(client, "/users/mode", csrf, mode="open")
            assert r.status_code == 303 and not gov.store.registered_only
            r = await _post(client, "/budget/guests", csrf, epsilon="0")
            assert r.status_code == 303 and gov.store.setting("guest_epsilon") == 0
        actions = [e["action"] for e in gov.store.audit_tail(500) if e.get("caller") == BY]
        for action in ("dataset", "user.add", "budget", "user.remove", "setting"):
            assert action in actions, action


async def test_revoke_grant_form(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        ptr, rec = await _publish(grid)
        gov = of(grid["hospital"])
        req = await rec.request_access(reason="the monthly report")
        async with httpx.AsyncClient(base_url=gov.console_url, timeout=30) as client:
            csrf = await _login(client, gov)
            r = await _post(client, f"/requests/{req.id}", csrf, decision="approve", why="ok")
            assert r.status_code == 303
            await req.wait(timeout=10)
            assert torch.equal(await rec.get(), BIRTHS)
            page = (await client.get("/")).text
            assert 'id="revoke-bob-get"' in page
            r = await _post(client, "/grants/revoke", csrf, user="bob", object=ptr.id, right="get")
            assert r.status_code == 303 and r.headers["location"] == "/#grants"
            with pytest.raises(p2pgrid.PermissionDenied):
                await rec.get()
            r = await _post(client, "/grants/revoke", csrf, user="bob", object=ptr.id, right="get")
            assert r.status_code == 404 and "holds no get grant" in r.text
        assert _console_entries(gov, "grant.revoke")[0]["object"] == ptr.id


async def test_owner_pages_need_a_session(tmp_path):
    async with open_network(["hospital"], tmp_path) as grid:
        gov = of(grid["hospital"])
        forms = ["/data/x/rules", "/data/x/bounds", "/users", "/users/bob/remove", "/users/mode",
                 "/budget/user", "/budget/default", "/budget/guests", "/grants/revoke"]
        async with httpx.AsyncClient(base_url=gov.console_url, timeout=30) as client:
            for path in forms:
                r = await client.post(path, data={"csrf": "x", "mode": "registered",
                                                  "name": "mallory", "role": "owner"})
                assert r.status_code == 401, path
            assert (await client.get("/audit")).status_code == 401
            r = await client.post("/login", data={"token": "x" * 100_000})
            assert r.status_code == 413
        assert not gov.store.registered_only and gov.store.user("mallory") is None


async def test_names_and_tags_are_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    async with open_network(["hospital"], tmp_path) as grid:
        await grid.net("hospital").publish(BIRTHS, tags=[evil, "births"], description=evil,
                                           compute=[evil], get=[])
        gov = of(grid["hospital"])
        gov.store.add_user("bob", "scientist", None, by="test")
        async with httpx.AsyncClient(base_url=gov.console_url, timeout=30) as client:
            public = (await client.get("/")).text
            await _login(client, gov)
            owner = (await client.get("/")).text
            audit = (await client.get("/audit")).text
        for page in (public, owner, audit):
            assert "<img" not in page and "onerror=\"" not in page
        assert "#&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in public
        assert "compute: &lt;img" in owner


async def test_audit_paging_and_filters(tmp_path):
    async with open_network(["hospital"], tmp_path) as grid:
        hospital = grid["hospital"]
        gov = of(hospital)
        for i in range(120):
            hospital.audit("test.event", f"user{i % 3}", n=i)
        # federated training on this peer's data, as the owner-side handler records it
        for rnd in (1, 2, 3):
            hospital.audit("federated.train", "ai", job="births-logreg", round=rnd,
                           objects=["d1"], examples=200, secure=True)
        hospital.audit("federated.evaluate", "ai", job="births-logreg", round=3, objects=["d1"])
        async with httpx.AsyncClient(base_url=gov.console_url, timeout=30) as client:
            await _login(client, gov)
            first = (await client.get("/audit", params={"action": "test.event"})).text
            seqs = [int(s) for s in re.findall(r"<tr><td>(\d+)</td>", first)]
            assert len(seqs) == 50 and seqs == sorted(seqs, reverse=True)
            older = re.search(r'id="older" href="([^"]+)"', first).group(1).replace("&amp;", "&")
            assert 'id="newer"' not in first
            second = (await client.get(older)).text
            seqs2 = [int(s) for s in re.findall(r"<tr><td>(\d+)</td>", second)]
            assert len(seqs2) == 50 and max(seqs2) < min(seqs)
            newer = re.search(r'id="newer" href="([^"]+)"', second).group(1).replace("&amp;", "&")
            back = (await client.get(newer)).text
            assert [int(s) for s in re.findall(r"<tr><td>(\d+)</td>", back)] == seqs
            only = (await client.get("/audit", params={"action": "test.event",
                                                       "caller": "user1"})).text
            assert len(re.findall(r"<tr><td>\d+</td>", only)) == 40 and "user2" not in only
            prefix = (await client.get("/audit", params={"action": "federated."})).text
            assert len(re.findall(r"<tr><td>\d+</td>", prefix)) == 4
            r = await client.get("/audit", params={"before": "x"})
            assert r.status_code == 400
            page = (await client.get("/")).text
        assert 'id="trained-here"' in page
        (job,) = trained_here(gov.store)
        assert (job["caller"], job["job"], job["rounds"], job["last_round"], job["evals"]) == \
            ("ai", "births-logreg", 3, 3, 1)
        assert job["secure"] and job["examples"] == 200 and job["objects"] == "d1"


def test_numbers_and_bars_for_people():
    assert num(0.1 + 0.2) == "0.3" and num(0.10000000000000009) == "0.1"
    assert num(2.0) == "2" and num(1234.5) == "1,234.5" and num(0) == "0" and num(7) == "7"
    assert num(0.000012) == "1.2e-05" and num(float("nan")) == "nan" and num(None) == ""
    zero = bar(0.0, 0.0)  # a 0 / 0 budget: nothing granted, nothing spent
    assert (zero.percent, zero.full, zero.label) == (0, False, "0 / 0")
    assert bar(0.5, 0.0).full and bar(1.0, 1.0).full and not bar(0.2, 1.0).full
    assert bar(0.25, 1.0).percent == 25 and not bar(3.0, None).capped
