"""Dealer interface: conformance of LocalDealer, PRG compression, feeds and wire types."""

import pytest
import torch

from p2pgrid import wire
from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from p2pgrid.protocols.smpc import (DealerFeed, LocalDealer, Material, MaterialQueue, Prg, Request,
                            RoundMessage, plan_requests, relu, reveal, run_parties, share_float)
from p2pgrid.protocols.smpc.testing import DealerConformance


class TestLocalDealer(DealerConformance):
    def make_dealer(self):
        return LocalDealer(b"conformance-seed")


class TestLocalDealerFromEntropy(DealerConformance):
    n_values = (2, 5)

    def make_dealer(self):
        return LocalDealer()


def test_seeded_dealer_is_reproducible():
    a = LocalDealer(b"0123456789abcdef").elementwise_triples((4,), 3)
    b = LocalDealer(b"0123456789abcdef").elementwise_triples((4,), 3)
    assert [m.seed for m in a] == [m.seed for m in b]
    assert torch.equal(a[-1].corrections["c"], b[-1].corrections["c"])


def test_compression_sizes():
    mats = LocalDealer(b"0123456789abcdef").matmul_triples((64, 784), (784, 128), 3)
    assert [m.nbytes for m in mats] == [16, 16, 16 + 64 * 128 * 8]  # only c travels in full
    # a party's seed expands to the same a, b every time (deterministic)
    assert torch.equal(mats[0].expand()["a"], mats[0].expand()["a"])


def test_dealer_rejects_bad_requests():
    d = LocalDealer(b"0123456789abcdef")
    with pytest.raises(BadRequest):
        d.elementwise_triples((2,), 1)
    with pytest.raises(ShapeError):
        d.matmul_triples((2, 3), (4, 5), 2)
    with pytest.raises(ShapeError):
        d.elementwise_triples((2, 3), 2, (4,))
    with pytest.raises(BadRequest):
        d.truncation_pairs((2,), 0, 2)
    with pytest.raises(ProtocolError):
        Request("bogus", ((2,),))
    with pytest.raises(BadRequest):
        d.deal(Request("edabit", ((2,), (3,))), 2)


def test_material_rejects_bad_correction():
    m = LocalDealer(b"0123456789abcdef").elementwise_triples((3,), 2)[-1]
    bad = Material(m.kind, m.party, m.seed, m.spec, {"c": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(ProtocolError):
        bad.expand()


def test_wire_roundtrip():
    req = Request("matmul_triple", ((2, 3), (3, 4)))
    assert wire.decode(wire.encode(req)) == req
    mats = LocalDealer(b"0123456789abcdef").deal(req, 2)
    for m in mats:
        back = wire.decode(wire.encode(m), Material)
        for k, v in m.expand().items():
            assert torch.equal(back.expand()[k], v)
    msg = RoundMessage("sess", 3, "mul/open", 1, {"eps": torch.arange(6).reshape(2, 3)})
    back = wire.decode(wire.encode(msg), RoundMessage)
    assert back.tag == "mul/open" and torch.equal(back.tensors["eps"], msg.tensors["eps"])


def test_feed_prefetch_log_and_order():
    feed = DealerFeed(LocalDealer(b"0123456789abcdef"), 2)
    reqs = [Request("triple", ((3,), (3,))), Request("edabit", ((5,),))]
    feed.prefetch(reqs, expand=True)
    assert feed.pending == 2
    p0, p1 = feed.for_party(0), feed.for_party(1)
    t0 = p0.take(reqs[0])
    t1 = p1.take(reqs[0])
    assert torch.equal(t0["c"] + t1["c"], (t0["a"] + t1["a"]) * (t0["b"] + t1["b"]))
    with pytest.raises(ProtocolError):  # party 0 runs a different program
        p0.take(Request("dabit", ((5,),)))
    p0.take(reqs[1])
    p1.take(reqs[1])
    assert feed.log == reqs and feed.pending == 0
    assert feed.dealer_bytes == [32, 16 + 3 * 8 + 16 + 5 * 8]
    # on-demand dealing past the prefetched items
    p0.take(Request("dabit", ((2,),)))
    assert feed.pending == 1


def test_material_queue_remote_flow():
    """What a networked party does: plan, fetch the batch from the dealer, run."""
    x = torch.tensor([[-1.0, 2.0, 0.5]])
    xs = share_float(x, 3, Prg(bytes(16)))

    def program(ctx):
        y = yield from relu(ctx, ctx.wrap(xs[ctx.party]))
        return (yield from reveal(ctx, y))

    plan = plan_requests(3, program)
    dealer = LocalDealer()
    queues = [MaterialQueue(p) for p in range(3)]
    for req in plan:  # the dealer peer answers the batch; materials travel as CBOR
        for mat in dealer.deal(wire.decode(wire.encode(req), Request), 3):
            queues[mat.party].put(req, wire.decode(wire.encode(mat), Material))

    class QueueFeed:  # run_parties wants a feed; hand each party its queue
        n_parties = 3
        dealer_bytes = [0, 0, 0]

        def for_party(self, p):
            return queues[p]

    res = run_parties(3, program, feed=QueueFeed(), seed=0)
    assert all(o.tolist() == [[0.0, 2.0, 0.5]] for o in res.outputs)
    assert all(len(q) == 0 for q in queues)
    with pytest.raises(ProtocolError):
        queues[0].take(plan[0])  # nothing buffered
    with pytest.raises(ProtocolError):
        queues[0].put(plan[0], dealer.deal(plan[0], 3)[1])  # another party's material


def test_a_seed_expands_its_components_along_one_stream_without_overlap():
    """expand_seed lays an item's components one after the other along the seed's stream,
    each from a fresh 16-byte block: every component is its own stretch of keystream
    (none shares a word with another), and skipping some (a party's corrections) leaves
    the others as they are."""
    import itertools

    import numpy as np

    from p2pgrid.protocols.smpc.messages import expand_seed

    spec = (("a", (3,)), ("empty", (0, 4)), ("b", (2, 5)), ("c", (1,)), ("d", (4, 2, 2)))
    seed = bytes(range(16))
    whole = expand_seed(seed, spec)
    stream = Prg(seed).blocks(0, 64).view(np.int64)
    block = 0
    for name, shape in spec:
        n = int(np.prod(shape))
        assert whole[name].shape == shape and whole[name].dtype == torch.int64
        assert np.array_equal(whole[name].reshape(-1).numpy(), stream[2 * block:2 * block + n])
        block += (8 * n + 15) // 16
    words = np.concatenate([t.reshape(-1).numpy() for t in whole.values()])
    assert len(set(words.tolist())) == len(words) == 3 + 10 + 1 + 16
    names = [name for name, _ in spec]
    for k in range(1, len(names)):
        for skip in itertools.combinations(names, k):
            part = expand_seed(seed, spec, skip=set(skip))
            assert set(part) == set(names) - set(skip)
            assert all(torch.equal(part[n], whole[n]) for n in part)
    other = expand_seed(bytes(16), spec)
    assert not torch.equal(other["a"], whole["a"])


def test_a_half_correction_replaces_the_first_half_of_a_component():
    """A correction shaped S for a component shaped S + (2,) (a Z_2^128 value's low words,
    the high ones from the seed) replaces exactly the component's first half; a correction
    of any other shape or dtype is refused."""
    from p2pgrid.protocols.smpc.messages import Material, expand_seed

    spec = (("x.v", (3, 2)), ("x.m", (3, 2)), ("s.v", (2,)))
    seed = bytes(range(16))
    whole = expand_seed(seed, spec)
    low = torch.tensor([7, -1, 5], dtype=torch.int64)
    out = Material("a_trunc", 1, seed, spec, {"x.v": low}).expand()
    assert torch.equal(out["x.v"].reshape(-1)[:3], low)
    assert torch.equal(out["x.v"].reshape(-1)[3:], whole["x.v"].reshape(-1)[3:])
    assert torch.equal(out["x.m"], whole["x.m"]) and torch.equal(out["s.v"], whole["s.v"])
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int32),
                torch.zeros(3, 1, dtype=torch.int64)):
        with pytest.raises(ProtocolError):
            Material("a_trunc", 1, seed, spec, {"x.v": bad}).expand()
    scalar = Material("a_trunc", 1, seed, spec, {"s.v": torch.tensor(9)}).expand()["s.v"]
    assert scalar.tolist() == [9, whole["s.v"][1].item()]     # a 0-d value: one low word
