"""The address book (sans-IO): per-source admission, fair eviction, protected partners."""

from __future__ import annotations

import dataclasses
import random

import pytest

from p2pgrid.addrbook import AddrBook, BookLimits
from p2pgrid.directory import Directory, ObjectSummary, sign_record
from p2pgrid.identity import Identity

KEYS = [Identity.generate() for _ in range(40)]


def rec(i, name=None, version=1, ttl=10.0, objects=()):
    name = name or f"p{i}"
    return sign_record(KEYS[i], name=name, addresses=[f"h{i}:1"], cert=b"c", roles=[],
                       objects=list(objects), services={}, version=version, issued_at=0.0,
                       ttl=ttl)


def test_a_source_introduces_a_bounded_number_per_window():
    book = AddrBook(BookLimits(new_per_source=2, window=1.0))
    assert [book.may_introduce("s", 0.0) for _ in range(3)] == [True, True, False]
    assert book.may_introduce("t", 0.5)  # per source
    assert not book.may_introduce("s", 0.9)
    assert book.may_introduce("s", 1.0)  # next window
    assert all(book.may_introduce(None, 0.0) for _ in range(10))  # local merges
    assert book.refused == 2


def test_merge_counts_new_keys_per_source_but_not_updates():
    d = Directory(KEYS[0], limits=BookLimits(new_per_source=3, window=1.0))
    first = d.merge([rec(i) for i in range(1, 10)], now=0.0, source="mallory")
    assert len(first) == 3
    # updates of held keys are not limited
    assert len(d.merge([rec(i, version=2) for i in range(1, 4)], now=0.1, source="mallory")) == 3
    assert len(d.merge([rec(i) for i in range(4, 10)], now=1.0, source="mallory")) == 3
    # a huge digest is answered with one round's worth of unknown keys
    assert len(d.wanted({KEYS[i].key_id: 1 for i in range(10, 40)})) == 3


def test_full_table_evicts_the_biggest_source_first_and_never_protected():
    d = Directory(KEYS[0], limits=BookLimits(max_records=6, new_per_source=100))
    d.issue(0.0, name="me", addresses=["me:1"], cert=b"c", roles=[], objects=[], services={})
    d.merge([rec(1, "hospital")], now=0.0, source=KEYS[1].key_id)
    d.merge([rec(2, "clinic")], now=0.0, source=KEYS[2].key_id)
    d.book.good(KEYS[1].key_id, 0.0)  # we reached the hospital ourselves
    d.merge([rec(i) for i in range(10, 20)], now=1.0, source="mallory")
    names = {r.name for r in d.peers()}
    assert len(d.peers()) == 6
    assert {"me", "hospital", "clinic"} <= names
    assert d.book.evicted == 7 and d.book.sources()["mallory"] == 3
    # evicted versions are tombstoned: relaying them again evicts nothing more
    d.merge([rec(i) for i in range(10, 20)], now=2.0, source="other")
    assert d.book.evicted == 7


def test_ttl_is_clamped_to_our_maximum():
    d = Directory(KEYS[0], ttl=10.0)
    assert d.max_ttl == 40.0
    for ttl, life in ((float("inf"), 40.0), (float("nan"), 10.0), (25.0, 25.0), (1.0, 10.0),
                      (-5.0, 10.0), (1e300, 40.0)):
        assert d.lifetime(dataclasses.replace(rec(1), ttl=ttl)) == life
    d.merge([rec(1, ttl=float("inf"))], now=0.0)
    assert d.expire(39.0) == [] and [r.name for r in d.expire(40.5)] == ["p1"]


def test_fanout_draws_from_the_protected_set():
    book = AddrBook(BookLimits(protected_ttl=10.0))
    cands = [rec(i) for i in range(1, 40)]
    book.good(KEYS[5].key_id, 0.0)
    rng = random.Random(1)
    for _ in range(50):
        picked = book.choose(cands, 2, 1.0, rng)
        assert len(picked) == 2 and len({r.key_id for r in picked}) == 2
        assert KEYS[5].key_id in {r.key_id for r in picked}
    assert KEYS[5].key_id not in book.protected(11.0)  # lapses without a new success
    book.good(KEYS[6].key_id, 0.0)
    book.failed(KEYS[7].key_id, 0.0)
    # records whose last exchange failed come last
    picks = {r.key_id for _ in range(200) for r in book.choose(cands[5:8], 2, 20.0, rng)}
    assert KEYS[7].key_id not in picks


def test_protection_is_bounded():
    book = AddrBook(BookLimits(max_protected=3))
    for i in range(6):
        book.good(KEYS[i].key_id, float(i))
    assert book.protected(6.0) == {KEYS[i].key_id for i in (3, 4, 5)}


def test_a_listing_of_another_owners_object_drops_the_record():
    d = Directory(KEYS[0])
    theirs = ObjectSummary("o", ["t"], "", [1], "float32", "hospital")
    assert d.merge([rec(1, "mallory", objects=[theirs])], now=0.0) == []
    assert d.rejected == 1
    mine = dataclasses.replace(theirs, owner="mallory")
    assert len(d.merge([rec(1, "mallory", objects=[mine])], now=0.0)) == 1
    with pytest.raises(ValueError):
        d.issue(0.0, name="me", addresses=[], cert=b"", roles=[], objects=[theirs], services={})
