"""The in-memory harness, rounds/bytes accounting, parallel composition, reveal/input."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from p2pgrid.protocols.smpc import (DealerFeed, LocalDealer, Prg, Round, input_shares, mul, parallel,
                            SmpcConfig, relu, reveal, reveal_to, run_parties, share_float)
from p2pgrid.protocols.smpc.testing import run_op


def test_reveal_and_reveal_to():
    x = torch.tensor([1.5, -2.25])
    xs = share_float(x, 3, Prg(bytes(16)))

    def party(ctx):
        s = ctx.wrap(xs[ctx.party])
        everyone = yield from reveal(ctx, s)
        only1 = yield from reveal_to(ctx, s, 1)
        return everyone, only1

    res = run_parties(3, party, seed=0)
    for p, (everyone, only1) in enumerate(res.outputs):
        assert everyone.tolist() == [1.5, -2.25]
        assert (only1 is None) == (p != 1)
    assert res.outputs[1][1].tolist() == [1.5, -2.25]
    # reveal: broadcast to 2 peers; reveal_to: parties 0 and 2 send one direct message
    assert res.stats.messages_sent == [3, 2, 3]
    assert res.stats.bytes_sent == [16 * 3, 16 * 2, 16 * 3]
    assert res.stats.tags == ["reveal", "reveal_to"]


def test_input_shares_from_an_owner():
    secret = torch.tensor([[3.0, -1.0]])

    def party(ctx):
        s = yield from input_shares(ctx, 2, secret if ctx.party == 2 else None, (1, 2))
        sq = yield from mul(ctx, s, s)
        return (yield from reveal(ctx, sq))

    res = run_parties(3, party, seed=0)
    assert all(o.tolist() == [[9.0, 1.0]] for o in res.outputs)


def test_input_errors():
    def wrong_shape(ctx):
        return (yield from input_shares(ctx, 0, torch.zeros(3) if ctx.party == 0 else None, (2,)))

    with pytest.raises(ShapeError):
        run_parties(2, wrong_shape, seed=0)


def test_parallel_merges_rounds():
    x = torch.randn(10, dtype=torch.float64)
    y = torch.randn(10, dtype=torch.float64)
    (a, b), stats = run_op(2, lambda ctx, s, t: parallel(relu(ctx, s), mul(ctx, s, t)), x, y)
    assert torch.allclose(a, torch.relu(x), atol=1e-4) and torch.allclose(b, x * y, atol=1e-3)
    assert stats.rounds == 4  # max of the two, not the sum
    assert stats.tags[0].startswith("par(")


def test_tag_mismatch_is_protocol_error():
    def party(ctx):
        yield Round("a" if ctx.party == 0 else "b", broadcast={"x": torch.zeros(1)})

    with pytest.raises(ProtocolError):
        run_parties(2, party, seed=0)


def test_unequal_lengths_is_protocol_error():
    def party(ctx):
        if ctx.party == 0:
            yield Round("x", broadcast={"x": torch.zeros(1)})
        return 1

    with pytest.raises(ProtocolError):
        run_parties(2, party, seed=0)


def test_bad_messages_are_protocol_errors():
    def yields_junk(ctx):
        yield "hello"

    with pytest.raises(ProtocolError):
        run_parties(2, yields_junk, seed=0)

    def self_addressed(ctx):
        yield Round("x", direct={ctx.party: {"x": torch.zeros(1)}})

    with pytest.raises(ProtocolError):
        run_parties(2, self_addressed, seed=0)

    def lying_shape(ctx):  # a peer sends a tensor of the wrong shape mid-protocol
        s = ctx.wrap(torch.zeros(3, dtype=torch.int64))
        if ctx.party == 1:
            inbox = yield Round("reveal", broadcast={"x": torch.zeros(4, dtype=torch.int64)})
            return inbox
        return (yield from reveal(ctx, s))

    with pytest.raises(ProtocolError):
        run_parties(2, lying_shape, seed=0)


def test_different_programs_detected_by_dealer_feed():
    def party(ctx):
        s = ctx.wrap(torch.zeros(3 + ctx.party, dtype=torch.int64))
        return (yield from mul(ctx, s, s))

    with pytest.raises(ProtocolError):
        run_parties(2, party, seed=0)


def test_prefetched_feed_matches_on_demand():
    x = torch.randn(8, 5, dtype=torch.float64)
    first, st1 = run_op(3, relu, x, seed=4)
    feed = DealerFeed(LocalDealer(b"prefetch-seed-16"), 3)
    dry = DealerFeed(LocalDealer(b"prefetch-seed-16"), 3)
    run_op(3, relu, x, feed=dry)
    feed.prefetch(dry.log, expand=True)
    second, st2 = run_op(3, relu, x, seed=4, feed=feed)
    assert torch.equal(first, second) and st1.rounds == st2.rounds and feed.pending == 0
    assert st1.dealer_bytes == st2.dealer_bytes


def test_deterministic_with_seed():
    x = torch.randn(5, dtype=torch.float64)

    def shares_of_result(seed):
        xs = share_float(x, 2, Prg(bytes(16)))
        res = run_parties(2, lambda ctx: relu(ctx, ctx.wrap(xs[ctx.party])), seed=seed)
        return res.outputs[0].share

    assert torch.equal(shares_of_result(1), shares_of_result(1))
    assert not torch.equal(shares_of_result(1), shares_of_result(2))


def test_context_validation():
    with pytest.raises(BadRequest):
        run_parties(1, lambda ctx: None)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 4), st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=6))
def test_mul_property(n, values):
    # dealer truncation: exact within range for every n (local SecureML truncation fails with
    # probability about |raw| / 2^63 per element, near 5% for products of 1e4-sized values)
    x = torch.round(torch.tensor(values, dtype=torch.float64) * 2 ** 16) / 2 ** 16  # encodable
    got, _ = run_op(n, mul, x, x.flip(0), config=SmpcConfig(truncation="dealer"))
    assert (got - x * x.flip(0)).abs().max() <= 1.5 * 2 ** -16  # truncation error only


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=6))
def test_mul_property_local_truncation(values):
    # |raw| < 2^33 here, so a SecureML failure has probability < 2^-30 per element
    x = torch.round(torch.tensor(values, dtype=torch.float64) * 2 ** 16) / 2 ** 16
    got, _ = run_op(2, mul, x, x.flip(0), config=SmpcConfig(truncation="local"))
    assert (got - x * x.flip(0)).abs().max() <= 1.5 * 2 ** -16


def test_plan_signature_ignores_which_rows_a_slice_takes_not_how_many():
    from p2pgrid.protocols.smpc.program import plan_signature, signature

    def batch(a, b):
        return {"nodes": [{"op": "leaf", "id": "x"},
                          {"op": "getitem", "args": [{"$": 0}, {"slice": [a, b, None]}]},
                          {"op": "leaf", "id": "w"},
                          {"op": "matmul", "args": [{"$": 1}, {"$": 2}]}],
                "outputs": [3]}

    leaves = {"x": ((20, 6), 16), "w": ((6, 3), 16)}
    assert signature(batch(0, 8), leaves) != signature(batch(8, 16), leaves)
    assert plan_signature(batch(0, 8), leaves) == plan_signature(batch(8, 16), leaves)
    assert plan_signature(batch(0, 8), leaves) != plan_signature(batch(16, 24), leaves)  # 4 rows
    assert plan_signature(batch(0, 8), leaves) != plan_signature(batch(0, 8), leaves, ("x",))
