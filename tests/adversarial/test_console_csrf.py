"""Cross-site request forgery against the owner's console forms.

The owner is logged in; a page elsewhere makes the owner's browser send the console
forms that change rules, users, budgets, bounds and grants: with no CSRF token, with
the token of another session, with the right token from another origin, or as a GET.
Each is refused (403, or 405 for a GET) and changes nothing; the same form with the
session's own token from the console's page does change the peer. Before these forms
existed the console could not change any of this (rules changed from the CLI only).
"""

import re

import httpx
import torch

from p2pgrid.datasets import birth_records
from p2pgrid.governance import of
from p2pgrid.testing import open_network

BIRTHS = birth_records(100, seed=2)


async def _session(base: str, token: str):
    client = httpx.AsyncClient(base_url=base, timeout=30)
    assert (await client.get("/login", params={"token": token})).status_code == 303
    page = (await client.get("/")).text
    return client, re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def _state(hospital, gov, oid):
    store = gov.store
    return (hospital.store.meta(oid).rules, sorted(store.users()), store.registered_only, store.budgets(), store.datasets(),
            store.setting("default_epsilon"), store.setting("guest_epsilon"), store.grants())


async def test_forged_owner_forms_change_nothing(tmp_path):
    async with open_network(["hospital", "bob"], tmp_path) as grid:
        hospital = grid["hospital"]
        ptr = await grid.net("hospital").publish(BIRTHS, tags=["births"], compute=["bob"], get=[])
        gov = of(hospital)
        gov.store.add_user("bob", "scientist", grid["bob"].identity.public_bytes, by="test")
        gov.store.decide(gov.store.create_request(user="bob", key_id=grid["bob"].key_id,
                                                  object_id=ptr.id, right="get", epsilon=None,
                                                  reason="x")["id"], approve=True, by="test")
        forms = [(f"/data/{ptr.id}/rules", {"get": "*"}),
                 (f"/data/{ptr.id}/bounds", {"bounds": "0:1", "total": "99"}),
                 ("/users", {"name": "mallory", "role": "owner"}),
                 ("/users/bob/remove", {}),
                 ("/users/mode", {"mode": "registered"}),
                 ("/budget/user", {"user": "mallory", "epsilon": "1000"}),
                 ("/budget/default", {"epsilon": "1000"}),
                 ("/budget/guests", {"epsilon": "1000"}),
                 ("/grants/revoke", {"user": "bob", "object": ptr.id, "right": "get"})]
        owner, csrf = await _session(gov.console_url, gov.token)
        other, other_csrf = await _session(gov.console_url, gov.token)
        try:
            assert other_csrf != csrf  # a token per session
            before = _state(hospital, gov, ptr.id)
            for path, data in forms:
                attacks = [
                    ("no token", dict(data=data)),
                    ("another session's token", dict(data={**data, "csrf": other_csrf})),
                    ("cross-site origin", dict(data={**data, "csrf": csrf},
                                               headers={"origin": "http://evil.example"})),
                    ("cross-site fetch", dict(data={**data, "csrf": csrf},
                                              headers={"sec-fetch-site": "cross-site"})),
                ]
                for what, kw in attacks:
                    r = await owner.post(path, **kw)
                    assert r.status_code == 403, (path, what, r.status_code)
                r = await owner.get(path, params={**data, "csrf": csrf})
                assert r.status_code == 405, (path, "GET", r.status_code)
            assert _state(hospital, gov, ptr.id) == before
            assert not [e for e in gov.store.audit_tail(200) if e.get("caller") == "hospital (console)"]
            assert torch.equal(await (await grid.net("bob").search("#births"))["hospital"][0].get(),
                               BIRTHS)  # bob's grant still holds
            # the same forms with the session's own token are real, and do change the peer
            for path, data in forms:
                r = await owner.post(path, data={**data, "csrf": csrf})
                assert r.status_code == 303, (path, r.status_code, r.text[:200])
            assert (await hospital.meta(ptr.id)).rules.get == ("*",)
            assert gov.store.registered_only and gov.store.user("mallory") is not None
            assert gov.store.grants() == []
        finally:
            await owner.aclose()
            await other.aclose()
