"""The sans-IO directory: records, merge rules, names, expiry, search, digests."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from hypothesis import given, settings, strategies as st

from p2pgrid import wire
from p2pgrid.directory import (Directory, GossipDigest, GossipPush, GossipReply, ObjectSummary,
                               PeerRecord, handle_digest, handle_gossip, handle_push, sign_record)
from p2pgrid.errors import BadRequest, Conflict, NotFound
from p2pgrid.identity import Identity

KEYS = [Identity.generate() for _ in range(6)]


def obj(oid, *tags, owner="x"):
    return ObjectSummary(oid, list(tags), f"object {oid}", [10, 3], "float32", owner)


def _owned(objects, name):
    """A record lists only its owner's objects (directory.listing_problem)."""
    return [dataclasses.replace(o, owner=name) for o in objects]


def record(ident, name="p", version=1, objects=(), **over):
    fields = dict(name=name, addresses=["127.0.0.1:7000"], cert=b"\x30\x82cert", roles=[],
                  objects=_owned(objects, name), services={"models": {"m": {"in": [3]}}},
                  version=version, issued_at=1000.0 + version)
    fields.update(over)
    return sign_record(ident, **fields)


def directory(i=0, **kw):
    return Directory(KEYS[i], **kw)


def issue(d, name, now=0.0, objects=(), **over):
    fields = dict(name=name, addresses=[f"{name}:1"], cert=b"c", roles=[],
                  objects=_owned(objects, name), services={})
    fields.update(over)
    return d.issue(now, **fields)


# ---------------------------------------------------------------- records

def test_sign_and_verify_survive_the_wire():
    rec = record(KEYS[1], objects=[obj("o1", "a", "b")], roles=["crypto-provider"])
    assert rec.verify()
    back = wire.decode(wire.encode(rec), PeerRecord)
    assert back == rec and back.verify()
    assert back.key_id == KEYS[1].key_id
    assert rec.signing_bytes() == back.signing_bytes()


@pytest.mark.parametrize("change", [
    {"name": "mallory"}, {"addresses": ["6.6.6.6:1"]}, {"version": 99}, {"roles": ["crypto-provider"]},
    {"objects": [obj("evil", "a")]}, {"services": {}}, {"cert": b"other"}, {"issued_at": 1.5},
    {"public_key": KEYS[2].public_bytes}, {"signature": b"\0" * 64},
])
def test_tampered_record_is_rejected(change):
    rec = dataclasses.replace(record(KEYS[1]), **change)
    assert not rec.verify()
    d = directory()
    assert d.merge([rec], now=0.0) == []
    assert d.rejected == 1
    assert d.digest() == {}


def test_sign_record_refuses_a_foreign_public_key():
    with pytest.raises(ValueError):
        record(KEYS[1], public_key=KEYS[2].public_bytes)


def test_newer_version_wins_and_stale_is_ignored():
    d = directory()
    v1, v2, v3 = (record(KEYS[1], version=v, addresses=[f"h:{v}"]) for v in (1, 2, 3))
    assert d.merge([v2], now=0.0) == [v2]
    assert d.merge([v1], now=1.0) == []
    assert d.merge([v2], now=1.0) == []
    assert d.lookup("p").addresses == ["h:2"]
    assert d.merge([v1, v3], now=2.0) == [v3]
    assert d.lookup(KEYS[1].key_id) == v3
    assert d.rejected == 0


def test_issue_bumps_version_and_is_never_replaced_by_gossip():
    d = directory()
    r1 = issue(d, "me")
    r2 = issue(d, "me", objects=[obj("o", "t")])
    assert (r1.version, r2.version) == (1, 2) and d.own == r2 and r2.verify()
    # A stale copy of our own record relayed back is not stored...
    assert d.merge([r1], now=5.0) == []
    assert d.own == r2 and d.lookup("me") == r2
    # ...but a copy from a previous life with a higher version makes us outrank it.
    old_life = record(KEYS[0], name="me", version=50)
    d.merge([old_life], now=5.0)
    assert issue(d, "me").version == 51


def test_issue_refuses_bad_names_and_names_bound_elsewhere():
    d = directory()
    with pytest.raises(BadRequest):
        issue(d, "has space")
    with pytest.raises(BadRequest):
        issue(d, KEYS[3].key_id)  # looks like a key id
    d.merge([record(KEYS[1], name="taken")], now=0.0)
    with pytest.raises(Conflict):
        issue(d, "taken")


def test_name_conflict_is_reported_and_never_served_by_name(caplog):
    d = directory()
    owner = record(KEYS[1], name="hospital", objects=[obj("o1", "birth-records")])
    impostor = record(KEYS[2], name="hospital", objects=[obj("o2", "birth-records")])
    with caplog.at_level(logging.WARNING, logger="p2pgrid.directory"):
        d.merge([owner], now=0.0)
        assert d.merge([impostor], now=1.0) == [impostor]  # kept, by key id only
        d.merge([record(KEYS[2], name="hospital", version=2)], now=2.0)
    assert [(c.name, c.bound_key_id, c.claimed_key_id, c.first_seen) for c in d.conflicts] == [
        ("hospital", KEYS[1].key_id, KEYS[2].key_id, 1.0)]  # once, not per heartbeat
    assert "hospital" in caplog.text and KEYS[2].key_id in caplog.text
    assert d.lookup("hospital") == owner
    assert d.lookup(KEYS[2].key_id).name == "hospital"
    hits = d.search("#birth-records")
    assert [o.id for o in hits["hospital"]] == ["o1"]
    assert KEYS[2].key_id not in hits or all(o.id != "o1" for o in hits[KEYS[2].key_id])


def test_binding_survives_expiry_and_can_be_saved():
    d = directory(ttl=10.0)
    issue(d, "me")
    d.merge([record(KEYS[1], name="alice")], now=0.0)
    assert [r.name for r in d.expire(now=11.0)] == ["alice"]
    with pytest.raises(NotFound):
        d.lookup("alice")
    # alice is dead, but her name is still hers.
    d.merge([record(KEYS[2], name="alice")], now=12.0)
    assert d.conflicts and d.conflicts[0].claimed_key_id == KEYS[2].key_id
    saved = d.bindings()
    assert saved["alice"] == KEYS[1].public_bytes and saved["me"] == KEYS[0].public_bytes
    fresh = directory(3)
    fresh.load_bindings(saved)
    assert fresh.name_key("alice") == KEYS[1].public_bytes and fresh.name_key("bob") is None
    fresh.merge([record(KEYS[2], name="alice")], now=0.0)
    with pytest.raises(NotFound):
        fresh.lookup("alice")
    assert fresh.conflicts[0].bound_key_id == KEYS[1].key_id


def test_expiry_drops_dead_peers_but_never_our_own_and_does_not_resurrect():
    d = directory(ttl=10.0)
    issue(d, "me", now=0.0)
    d.merge([record(KEYS[1], name="a"), record(KEYS[2], name="b")], now=0.0)
    d.merge([record(KEYS[2], name="b", version=2)], now=8.0)  # b's heartbeat
    assert d.expire(now=5.0) == []
    assert [r.name for r in d.expire(now=10.5)] == ["a"]
    assert set(d.digest()) == {KEYS[0].key_id, KEYS[2].key_id}
    # Another peer that has not expired a yet gossips the same dead version back: refused.
    assert d.merge([record(KEYS[1], name="a")], now=11.0) == []
    assert KEYS[1].key_id not in d.wanted({KEYS[1].key_id: 1})
    # A newer version means a is alive again.
    assert len(d.merge([record(KEYS[1], name="a", version=2)], now=12.0)) == 1
    assert sorted(r.name for r in d.expire(now=100.0)) == ["a", "b"]
    assert d.peers() == [d.own]


def test_search_with_combined_tags():
    d = directory()
    issue(d, "me", objects=[obj("mine", "February")])
    d.merge([record(KEYS[1], name="hospital", objects=[
        obj("o1", "#February", "birth-records"), obj("o2", "march", "birth-records"),
        obj("o3", "february")]),
        record(KEYS[2], name="clinic", objects=[obj("o4", "BIRTH-RECORDS", "february")])],
        now=0.0)
    hits = d.search("#february #birth-records")
    assert {k: [o.id for o in v] for k, v in hits.items()} == {"hospital": ["o1"], "clinic": ["o4"]}
    assert d.search(["February", "#Birth-Records"]) == hits
    assert d.search("february, birth-records") == hits
    assert {k: [o.id for o in v] for k, v in d.search("february").items()} == {
        "me": ["mine"], "hospital": ["o1", "o3"], "clinic": ["o4"]}
    assert d.search("#nothing") == {}
    assert sum(len(v) for v in d.search("").values()) == 5


def test_digest_newer_than_wanted_are_consistent():
    a, b = directory(0), directory(1)
    issue(a, "a")
    issue(b, "b")
    shared_old, shared_new = record(KEYS[2], name="c"), record(KEYS[2], name="c", version=2)
    only_a = record(KEYS[3], name="d")
    a.merge([shared_new, only_a], now=0.0)
    b.merge([shared_old], now=0.0)
    da, db = a.digest(), b.digest()
    assert {r.key_id for r in a.newer_than(db)} == {KEYS[0].key_id, KEYS[2].key_id, KEYS[3].key_id}
    assert set(b.wanted(da)) == {r.key_id for r in a.newer_than(db)}
    assert set(a.wanted(db)) == {KEYS[1].key_id} == {r.key_id for r in b.newer_than(da)}
    b.merge(a.records_for(b.wanted(da)), now=1.0)
    a.merge(b.newer_than(da), now=1.0)
    assert a.digest() == b.digest()
    assert a.newer_than(b.digest()) == [] and a.wanted(b.digest()) == []


def test_exchange_over_the_wire():
    a, b = directory(0), directory(1)
    issue(a, "a", objects=[obj("o", "t")])
    issue(b, "b")
    b.merge([record(KEYS[2], name="c")], now=0.0)
    msg = wire.decode(wire.encode(GossipDigest(sender=a.own, digest=a.digest())))
    reply = wire.decode(wire.encode(handle_digest(b, msg, now=1.0)), GossipReply)
    assert {r.name for r in reply.records} == {"b", "c"} and reply.want == []
    assert len(a.merge(reply.records, now=1.0)) == 2
    assert a.digest() == b.digest()
    issue(a, "a")  # heartbeat: now b wants a's new version on the next exchange
    reply = handle_gossip(b, GossipDigest(sender=b.own, digest=a.digest()), now=2.0)
    assert reply.want == [a.key_id]
    ack = handle_push(b, wire.decode(wire.encode(GossipPush(records=a.records_for(reply.want)))), 2.0)
    assert ack.accepted == 1 and a.digest() == b.digest()
    with pytest.raises(BadRequest):
        handle_gossip(b, reply, now=2.0)


# ---------------------------------------------------------------- convergence, any order

_RECORDS = {(k, v, n): record(KEYS[k], name=n, version=v)
            for k in range(2, 6) for v in range(1, 4) for n in ("x", "y", "z")}


@st.composite
def holdings(draw):
    """Two directories' worth of third-party records (conflicting names included)."""
    out = []
    for _ in range(2):
        picks = draw(st.lists(st.sampled_from(sorted(_RECORDS)), max_size=10))
        out.append([_RECORDS[p] for p in picks])
    return out


@settings(max_examples=60, deadline=None)
@given(holdings(), st.randoms(use_true_random=False), st.integers(1, 4))
def test_any_merge_order_converges(held, rnd, batches):
    a, b = directory(0), directory(1)
    issue(a, "a")
    issue(b, "b")
    for d, recs in zip((a, b), held):
        d.merge(recs, now=0.0)
    to_b, to_a = a.newer_than({}) + held[0], b.newer_than({}) + held[1]
    for d, recs in ((b, to_b), (a, to_a)):
        recs = list(recs)
        rnd.shuffle(recs)
        size = max(1, len(recs) // batches)
        for i in range(0, len(recs), size):
            d.merge(recs[i:i + size], now=1.0)
    assert a.digest() == b.digest()
    assert a.rejected == b.rejected == 0


def test_bind_name_is_first_use_wins():
    d = directory()
    assert d.bind_name("carol", KEYS[1].public_bytes, now=3.0)
    assert d.bind_name("carol", KEYS[1].public_bytes, now=4.0)
    assert not d.bind_name("carol", KEYS[2].public_bytes, now=5.0)
    assert not d.bind_name("bad name", KEYS[2].public_bytes, now=5.0)
    assert d.name_key("carol") == KEYS[1].public_bytes and d.name_key("bad name") is None
    assert [(c.name, c.claimed_key_id, c.first_seen) for c in d.conflicts] == [
        ("carol", KEYS[2].key_id, 5.0)]
    # A record from another key under that name is then kept by key id only.
    d.merge([record(KEYS[2], name="carol")], now=6.0)
    with pytest.raises(NotFound):
        d.lookup("carol")
