"""Digest-first anti-entropy: root and ranges digests, heads alone for heartbeats,
deltas under a byte cap, signatures verified once per version."""

from __future__ import annotations

import dataclasses
import random

import trio

from p2pgrid import wire
from p2pgrid.directory import (FULL_DIGEST, MAX_EXCHANGE_BYTES, Directory, GossipDigest,
                               GossipPush, GossipReply, ObjectSummary, PeerRecord, RecordHead,
                               handle_digest, handle_push, sign_record)
from p2pgrid.gossip import Gossiper, MemoryNetwork
from p2pgrid.identity import Identity

KEYS = [Identity.generate() for _ in range(4)]
OTHERS = [Identity.generate() for _ in range(FULL_DIGEST + 60)]


def objects(name, n=3):
    return [ObjectSummary(f"{name}-{k}", ["tabular", f"t{k}"], "a table", [100, 4], "float32",
                          name) for k in range(n)]


def record(ident, name, version=1, cert=b"c" * 400, **over):
    fields = dict(name=name, addresses=[f"{name}:1"], cert=cert, roles=[],
                  objects=objects(name), services={}, version=version,
                  issued_at=float(version))
    fields.update(over)
    return sign_record(ident, **fields)


def own(d, name, objs=None, now=0.0):
    return d.issue(now, name=name, addresses=[f"{name}:1"], cert=b"c" * 400, roles=[],
                   objects=objects(name) if objs is None else objs, services={})


def carried(msg):
    """Through the wire, as a transport would carry it."""
    return wire.decode(wire.encode(msg))


def test_heartbeat_is_a_head_and_content_travels_only_when_it_changes():
    a, b = Directory(KEYS[0]), Directory(KEYS[1])
    r1 = own(a, "a")
    own(b, "b")
    assert r1.content_version == r1.version == 1
    b.merge([r1], now=0.0)
    r2 = own(a, "a")  # a heartbeat: same content
    assert (r2.version, r2.content_version) == (2, 1) and r2.verify()
    items, cut = a.delta(b.digest(), now=1.0)
    head = next(i for i in items if i.key_id == a.key_id)
    assert isinstance(head, RecordHead) and not cut
    assert len(wire.encode(head)) < len(wire.encode(r2)) / 2
    assert b.merge([carried(head)], now=1.0)[0] == r2  # assembled with the content b held
    assert b.lookup("a").version == 2 and b.lookup("a").objects == r1.objects
    # New content: a new content version, and the whole record travels.
    r3 = own(a, "a", objs=objects("a", 4))
    assert r3.content_version == 3
    items, _ = a.delta(b.digest(), now=2.0)
    assert [type(i) for i in items if i.key_id == a.key_id] == [PeerRecord]
    # A head naming content b does not hold is not applied: b asks for the whole record.
    assert b.merge([carried(r3.head())], now=2.0) == []
    assert b.digest()[a.key_id] == 0
    items, _ = a.delta(b.digest(), now=2.0)
    assert b.merge(items, now=2.0) and b.lookup("a") == r3
    assert b.digest()[a.key_id] == 3 and b.rejected == 0


def test_a_head_cannot_change_content_or_borrow_a_signature():
    a, b = Directory(KEYS[0]), Directory(KEYS[1])
    b.merge([own(a, "a")], now=0.0)
    hb = own(a, "a").head()
    for change in ({"issued_at": 99.0}, {"name": "mallory"}, {"content_version": 9},
                   {"content_hash": b"\0" * 16}, {"ttl": 1e9}):
        forged = dataclasses.replace(hb, **change)
        assert not forged.verify()
        assert b.merge([forged], now=1.0) == []
    assert b.merge([hb], now=1.0)  # the real head, after its forgeries, still applies
    tampered = dataclasses.replace(a.own, objects=objects("a", 1))  # content under a's head
    assert not tampered.verify()


def test_signature_checked_once_per_version():
    d = Directory(KEYS[1])
    good = record(KEYS[2], "c")
    bad = dataclasses.replace(record(KEYS[3], "e"), signature=b"\1" * 64)
    for partner in range(10):  # the same versions offered by ten partners
        d.merge([carried(good), carried(bad)], now=float(partner), source=f"p{partner}")
    assert d.verified == 2
    assert d.rejected == 10 and d.lookup("c") == good


def filled(n):
    d = Directory(KEYS[1])
    own(d, "b")
    d.merge([record(OTHERS[i], f"o{i}") for i in range(n)], now=0.0)
    return d


def test_digest_exchange_root_then_ranges_then_delta():
    b = filled(FULL_DIGEST + 20)
    a = Directory(KEYS[0])
    own(a, "a")
    a.merge(b.newer_than({}), now=0.0)
    b.merge([a.own], now=0.0)
    assert a.digest() == b.digest()
    # In sync: the root alone, and an empty answer.
    reply = carried(handle_digest(b, GossipDigest(sender=a.own.head(), digest={},
                                                  root=a.summary.root()), now=1.0))
    assert (reply.records, reply.want, reply.summary) == ([], [], b"")
    # One record changes at b: the root differs, b answers with its bucket hashes...
    fresh = record(OTHERS[7], "o7", version=2, content_version=1)
    b.merge([fresh], now=1.0)
    reply = carried(handle_digest(b, GossipDigest(sender=a.own.head(), digest={},
                                                  root=a.summary.root()), now=1.0))
    assert reply.records == [] and reply.level >= 1 and len(reply.summary) == 4 << reply.level
    differ = a.summary.differing(reply.level, reply.summary)
    assert len(differ) == 1
    # ...a lists only the entries of the bucket that differs, and gets the one head.
    from p2pgrid.summary import RangeSummary
    keys = RangeSummary.in_buckets(a.key_ids(), reply.level, differ)
    assert OTHERS[7].key_id in keys and len(keys) < len(a) / 2
    reply = carried(handle_digest(b, GossipDigest(sender=a.own.head(), digest=a.digest(keys),
                                                  root=a.summary.root(), level=reply.level,
                                                  buckets=differ), now=1.0))
    assert [(type(r), r.key_id, r.version) for r in reply.records] == [
        (RecordHead, OTHERS[7].key_id, 2)]
    assert a.merge(reply.records, now=1.0) and a.digest() == b.digest()
    assert a.summary.root() == b.summary.root()


async def test_partial_catch_up_under_the_byte_cap():
    """A joiner against a directory too big for one reply: each reply stays under the
    cap, protected peers come first, and it catches up over a few exchanges."""
    n = 120
    b = Directory(KEYS[1])
    own(b, "b")
    big = b"c" * 2000  # records of about 2.5 KB: 120 of them are more than 2 caps' worth
    b.merge([record(OTHERS[i], f"o{i}", cert=big) for i in range(n)], now=0.0)
    b.book.good(OTHERS[n - 1].key_id, now=0.0)  # verified contact: sent first
    a = Directory(KEYS[0])
    own(a, "a")
    sizes, first = [], None
    for exchange in range(20):
        if exchange and a.digest() == b.digest():
            break
        data = wire.encode(handle_digest(b, carried(GossipDigest(sender=a.own, digest=a.digest())),
                                         now=1.0 + exchange))
        sizes.append(len(data))
        reply = wire.decode(data)
        first = first or reply.records[0].key_id
        a.merge(reply.records, now=1.0 + exchange, source=b.key_id)
    assert a.digest() == b.digest() and len(a) == n + 2
    assert first == OTHERS[n - 1].key_id
    assert len(sizes) >= 3  # not one huge reply
    assert max(sizes) <= MAX_EXCHANGE_BYTES + 4096, sizes


class Net:
    def __init__(self, n_others=FULL_DIGEST + 20):
        self.now = 0.0
        self.net = MemoryNetwork(clock=lambda: self.now)
        self.b = filled(n_others)
        self.a = Directory(KEYS[0])
        own(self.a, "a")
        self.a.merge(self.b.newer_than({}), now=0.0)
        self.b.merge([self.a.own], now=0.0)
        self.net.add("b:1", self.b)
        self.g = Gossiper(self.a, self.net.send, clock=lambda: self.now,
                          rng=random.Random(1), timeout=5.0)


async def test_in_sync_exchange_is_one_small_message():
    net = Net()
    net.a.verified = net.b.verified = 0
    before = net.net.bytes_sent
    await net.g.exchange("b:1", net.a.own, stats=_stats(), key_id=net.b.key_id)
    assert net.net.messages == 2 and net.net.bytes_sent - before < 600
    assert net.a.verified == 0 and net.b.verified == 0  # nothing new: nothing verified


def _stats():
    from p2pgrid.gossip import RoundStats
    return RoundStats()


async def test_record_updated_during_an_exchange():
    """b re-issues its record (new content) and learns a newer third-party record
    between the two steps of a's exchange: nothing is lost or rejected, and the next
    exchange converges."""
    net = Net()
    a, b = net.a, net.b
    own(a, "a")  # a's heartbeat (its head travels in the digest)
    a.merge([record(OTHERS[5], "o5", version=2, content_version=1)], now=0.0)  # roots differ
    sent = []
    orig = net.net.send

    async def send(address, msg, key_id=None):
        sent.append(type(msg).__name__)
        reply = await orig(address, msg, key_id=key_id)
        if len(sent) == 1:
            own(b, "b", objs=objects("b", 5))  # b changes mid-exchange
            b.merge([record(OTHERS[3], "o3", version=5)], now=net.now)
        return reply

    net.g.send = send
    stats = _stats()
    await net.g.exchange("b:1", a.own, stats, key_id=b.key_id)
    assert sent[:2] == ["GossipDigest", "GossipDigest"]
    assert b.lookup("a").version == a.own.version and b.lookup("o5").version == 2
    net.now += 1
    await net.g.exchange("b:1", a.own, _stats(), key_id=b.key_id)
    assert a.digest() == b.digest()
    assert len(a.lookup("b").objects) == 5 and a.lookup("o3").version == 5
    assert a.rejected == b.rejected == 0


async def test_heartbeats_cost_heads_in_a_running_network():
    """Many rounds of heartbeats between two directories: after the first, pushes and
    replies carry heads only."""
    net = Net()
    a, b = net.a, net.b
    g2 = Gossiper(b, net.net.send, clock=lambda: net.now, rng=random.Random(2))
    net.net.add("a:1", a)
    sizes = []
    for _ in range(5):
        own(a, "a")
        own(b, "b")
        before = net.net.bytes_sent
        await net.g.exchange("b:1", a.own, _stats(), key_id=b.key_id)
        await g2.exchange("a:1", b.own, _stats(), key_id=a.key_id)
        sizes.append(net.net.bytes_sent - before)
        net.now += 1
    assert a.digest() == b.digest()
    assert max(sizes) < 3 * 1024, sizes  # two heads and summaries, never a 1 KB record
    assert isinstance(wire.decode(wire.encode(GossipPush(records=[a.own.head()]))).records[0],
                      RecordHead)


async def test_handle_push_accepts_heads():
    a, b = Directory(KEYS[0]), Directory(KEYS[1])
    b.merge([own(a, "a")], now=0.0)
    ack = handle_push(b, carried(GossipPush(records=[own(a, "a").head()])), now=1.0, source="x")
    assert ack.accepted == 1 and b.lookup("a").version == 2


def test_range_summary_is_the_digest_whatever_the_order():
    from p2pgrid.summary import MAX_LEVEL, RangeSummary, bucket_of
    rnd = random.Random(5)
    keys = [f"{rnd.getrandbits(64):016x}" for _ in range(300)]
    x, y = RangeSummary(), RangeSummary()
    for k in keys:
        x.set(k, 1)
    for k in reversed(keys):  # another order, a detour through other versions
        y.set(k, 7)
        y.set(k, 1)
    assert x.root() == y.root() and x.buckets(6) == y.buckets(6)
    y.set(keys[10], 2)
    y.set(keys[20], None)
    assert x.root() != y.root()
    for level in (0, 3, 6, MAX_LEVEL):
        differ = x.differing(level, y.buckets(level))
        assert set(differ) == {bucket_of(keys[10], level), bucket_of(keys[20], level)}
        # from the index (few buckets) or by one pass (many): the same keys
        got = x.keys_by_bucket(level, range(1 << level))
        assert sorted(k for ks in got.values() for k in ks) == sorted(keys)
        assert all(bucket_of(k, level) == b for b, ks in got.items() for k in ks)
    y.set(keys[10], 1)
    y.set(keys[20], 1)
    assert x.root() == y.root()


def test_record_ttl_grows_with_the_directory_so_heartbeat_heads_per_peer_stay_bounded():
    d = Directory(KEYS[0], ttl=30.0)
    assert own(d, "a").ttl == 30.0  # a small network: our own ttl
    d.merge([record(o, f"p{i}") for i, o in enumerate(OTHERS)], now=0.0)
    n = len(d)
    for heads_per_s in (0.5, 2.0):
        d.heads_per_s = heads_per_s
        rec = own(d, "a")
        # every peer re-signs every ttl/3: each peer receives 3N/ttl heads a second
        assert rec.ttl == 3 * n / heads_per_s > 30.0 and 3 * n / rec.ttl == heads_per_s
        assert rec.content_version == 1  # the ttl is in the head: no content travels
        # a record stating that longer ttl is honoured here, and nothing beyond the cap
        assert d.lifetime(dataclasses.replace(rec, ttl=rec.ttl)) == rec.ttl
        assert d.lifetime(dataclasses.replace(rec, ttl=float("inf"))) == 4 * rec.ttl
        assert d.max_lifetime() == 4 * rec.ttl


def test_expiry_follows_the_newest_version_and_skips_superseded_deadlines():
    d = Directory(KEYS[0], ttl=10.0)
    own(d, "a")
    d.merge([record(KEYS[1], "b", 1), record(KEYS[2], "c", 1)], now=0.0)
    for t in range(1, 30):  # b heartbeats every second; c falls silent
        d.merge([record(KEYS[1], "b", t + 1)], now=float(t))
    # many deadlines were pushed for b; only the last one counts
    assert [r.name for r in d.expire(10.5)] == ["c"]
    assert d.expire(29.0) == [] and "b" in {r.name for r in d.peers()}
    assert [r.name for r in d.expire(39.5)] == ["b"]
    assert len(d._deadlines) <= 4 * len(d) + 64  # superseded entries do not pile up
    assert d.expire(1e6) == [] and len(d) == 1


def test_partners_are_drawn_without_listing_the_directory():
    """A round's partner choice costs O(fanout) draws on a large directory: uniform
    over the others with addresses, never ourselves, failed ones avoided."""
    d = Directory(KEYS[0])
    own(d, "a")
    recs = [record(o, f"p{i}") for i, o in enumerate(OTHERS)]
    recs[0] = record(OTHERS[0], "p0", addresses=[])
    d.merge(recs, now=0.0)
    pool = d.partners()
    assert len(pool) == len(OTHERS) - 1 and pool.get(KEYS[0].key_id) is None
    assert pool.get(OTHERS[0].key_id) is None and pool.get(OTHERS[1].key_id) is not None
    failed = {o.key_id for o in OTHERS[1:40]}
    for k in failed:
        d.book.failed(k, 0.0)
    rng, seen = random.Random(3), set()
    for _ in range(300):
        picked = d.book.choose(pool, 2, 0.0, rng)
        keys = {r.key_id for r in picked}
        assert len(keys) == 2 and not keys & failed
        seen |= keys
    assert seen == {o.key_id for o in OTHERS[40:]}  # every other one drawn
    d.drop([o.key_id for o in OTHERS[40:]], now=1.0)  # the pool follows the directory
    assert len(pool) == 39 and {r.key_id for r in pool[:]} == failed
    assert len(d.book.choose(pool, 2, 0.0, rng)) == 2  # only failed ones left: still two
