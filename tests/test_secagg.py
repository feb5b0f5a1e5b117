"""Secure aggregation: masks cancel in the sum, dropouts are recovered, one update alone looks uniform."""

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings, strategies as st

from p2pgrid import wire
from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from p2pgrid.protocols.secagg import (DoubleMaskClient, DoubleMaskServer, SecAggClient, SecAggServer,
                              decode_fixed, encode_fixed, pair_seed, prg, shamir_combine, shamir_split)

PEERS = ["alice", "bob", "carol", "dave"]
F = 24


def setup(peers=PEERS, bits=F, **kw):
    clients = {p: SecAggClient(p, peers, bits, **kw) for p in peers}
    keys = {p: c.public_key() for p, c in clients.items()}
    return clients, keys


def updates(peers=PEERS, d=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(d, generator=g) * 3 for p in peers}


def weighted_mean(xs, ws, who):
    return sum(xs[p].double() * ws[p] for p in who) / sum(ws[p] for p in who)


def test_sum_equals_plain_sum_up_to_fixed_point_rounding():
    clients, keys = setup()
    xs = updates()
    ws = {"alice": 10, "bob": 250, "carol": 1, "dave": 77}
    masked = {p: clients[p].masked_update(xs[p], keys, round_id=3, num_examples=ws[p]) for p in PEERS}
    assert all(m.dtype == torch.int64 and m.shape == (258,) for m in masked.values())
    server = SecAggServer(PEERS, F)
    total, weight = server.unmask(masked)
    assert weight == sum(ws.values())
    plain = sum(xs[p].double() * ws[p] for p in PEERS)
    assert torch.allclose(total, plain, atol=len(PEERS) * 2.0 ** -F, rtol=0)
    mean = server.aggregate(masked, {})
    assert torch.allclose(mean, weighted_mean(xs, ws, PEERS), atol=2.0 ** -F)


def test_masked_updates_travel_on_the_wire():
    clients, keys = setup()
    keys = wire.loads(wire.dumps(keys))
    xs = updates()
    masked = wire.loads(wire.dumps({p: clients[p].masked_update(xs[p], keys, "r1") for p in PEERS}))
    assert torch.allclose(SecAggServer(PEERS).aggregate(masked), weighted_mean(xs, dict.fromkeys(PEERS, 1), PEERS),
                          atol=1e-6)


def test_one_peer_dropped_after_selection_is_recovered():
    clients, keys = setup()
    xs = updates()
    ws = {"alice": 5, "bob": 2, "carol": 9, "dave": 4}
    survivors = ["alice", "carol", "dave"]
    masked = {p: clients[p].masked_update(xs[p], keys, round_id=1, num_examples=ws[p]) for p in survivors}
    server = SecAggServer(PEERS)
    with pytest.raises(ProtocolError, match="reveal"):
        server.aggregate(masked, {})
    reveals = {p: clients[p].reveal_seeds_for(["bob"]) for p in survivors}
    assert all(set(r) == {"bob"} for r in reveals.values())  # only the seeds with the dropped peer
    reveals = wire.loads(wire.dumps(reveals))
    mean = server.aggregate(masked, reveals)
    assert torch.allclose(mean, weighted_mean(xs, ws, survivors), atol=2.0 ** -F)


def test_two_dropped_peers_and_first_peer_dropped():
    clients, keys = setup()
    xs = updates()
    survivors = ["bob", "dave"]
    masked = {p: clients[p].masked_update(xs[p], keys, round_id=1) for p in survivors}
    reveals = {p: clients[p].reveal_seeds_for(["alice", "carol"]) for p in survivors}
    mean = SecAggServer(PEERS).aggregate(masked, reveals)
    assert torch.allclose(mean, weighted_mean(xs, dict.fromkeys(PEERS, 1), survivors), atol=2.0 ** -F)


def looks_uniform(ring: np.ndarray) -> bool:
    """Every bit position a fair coin (5 sigma) and a flat low-byte histogram (chi-square, p ~ 1e-6)."""
    n = ring.size
    bits = ((ring[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
    counts = np.bincount((ring & np.uint64(0xFF)).astype(np.int64), minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    return bool(np.all(np.abs(bits - 0.5) < 5 * 0.5 / np.sqrt(n)) and chi2 < 370)


def test_a_single_masked_update_looks_uniform():
    clients, keys = setup(peers=["a", "b", "c"])
    x = torch.linspace(-1, 1, 8192)
    out = clients["b"].masked_update(x, keys, round_id=0).numpy().view(np.uint64)
    assert looks_uniform(out)
    # the same statistics reject the update without masks: the test has teeth
    assert not looks_uniform(encode_fixed(x, F))
    assert not looks_uniform(np.zeros(8192, dtype=np.uint64))


def test_masks_differ_between_rounds_and_pairs():
    clients, keys = setup()
    a1 = clients["alice"].masked_update(torch.zeros(64), keys, round_id=1)
    a2 = clients["alice"].masked_update(torch.zeros(64), keys, round_id=2)
    assert not torch.equal(a1, a2)
    k_a, k_b = SecAggClient("a", ["a", "b"])._key, SecAggClient("b", ["a", "b"])._key
    pub = lambda k: k.public_key().public_bytes_raw()  # noqa: E731
    assert pair_seed(k_a, pub(k_b), "a", "b", 1) == pair_seed(k_b, pub(k_a), "b", "a", 1)
    assert pair_seed(k_a, pub(k_b), "a", "b", 1) != pair_seed(k_a, pub(k_b), "a", "b", 2)


def test_clients_guard_their_reveals():
    clients, keys = setup()
    with pytest.raises(ProtocolError, match="no masked update"):
        clients["alice"].reveal_seeds_for(["bob"])
    for p in PEERS:
        clients[p].masked_update(torch.zeros(4), keys, round_id=1)
    with pytest.raises(ProtocolError):
        clients["alice"].reveal_seeds_for(["alice"])
    with pytest.raises(ProtocolError):
        clients["alice"].reveal_seeds_for(["mallory"])
    with pytest.raises(ProtocolError, match="only 1 peers would remain"):
        clients["alice"].reveal_seeds_for(["bob", "carol", "dave"])
    clients["alice"].reveal_seeds_for(["bob"])
    clients["alice"].reveal_seeds_for(["bob"])  # the same answer again is harmless
    with pytest.raises(ProtocolError, match="already revealed"):
        clients["alice"].reveal_seeds_for(["bob", "carol"])


def test_server_checks_its_inputs():
    clients, keys = setup()
    server = SecAggServer(PEERS)
    good = {p: clients[p].masked_update(torch.zeros(4), keys, round_id=1) for p in PEERS}
    with pytest.raises(ProtocolError, match="unselected"):
        server.aggregate({**good, "mallory": good["bob"]})
    with pytest.raises(ShapeError):
        server.aggregate({**good, "bob": good["bob"][:3]})
    with pytest.raises(ShapeError):
        server.aggregate({**good, "bob": good["bob"].float()})
    with pytest.raises(ProtocolError, match="need 2"):
        server.aggregate({"bob": good["bob"]}, {})


def test_encoding_limits():
    clients, keys = setup(peers=["a", "b"])
    with pytest.raises(BadRequest, match="too large"):
        clients["a"].masked_update(torch.tensor([1e12]), keys, round_id=0)
    with pytest.raises(BadRequest, match="NaN"):
        clients["a"].masked_update(torch.tensor([float("nan")]), keys, round_id=0)
    with pytest.raises(ShapeError):
        clients["a"].masked_update(torch.zeros(2, 2), keys, round_id=0)
    with pytest.raises(ProtocolError, match="no public key"):
        clients["a"].masked_update(torch.zeros(2), {"a": keys["a"]}, round_id=0)
    with pytest.raises(BadRequest):
        SecAggClient("a", ["a", "a", "b"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=20), st.integers(0, 40))
def test_fixed_point_round_trip(values, bits):
    x = torch.tensor(values, dtype=torch.float64)
    back = decode_fixed(encode_fixed(x, bits), bits)
    assert torch.all((back - x).abs() <= 2.0 ** -(bits + 1) + 1e-9)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.data())
def test_any_dropout_pattern_recovers_the_survivors(n, data):
    peers = [f"p{i}" for i in range(n)]
    survivors = data.draw(st.lists(st.sampled_from(peers), min_size=2, max_size=n, unique=True))
    clients, keys = setup(peers)
    xs = updates(peers, d=5, seed=n)
    masked = {p: clients[p].masked_update(xs[p], keys, round_id=n) for p in survivors}
    dropped = [p for p in peers if p not in survivors]
    reveals = {p: clients[p].reveal_seeds_for(dropped) for p in survivors} if dropped else {}
    mean = SecAggServer(peers).aggregate(masked, reveals)
    assert torch.allclose(mean, weighted_mean(xs, dict.fromkeys(peers, 1), survivors), atol=1e-6)


def test_prg_is_deterministic_and_seeded():
    s = bytes(range(32))
    assert np.array_equal(prg(s, 100), prg(s, 100))
    assert np.array_equal(prg(s, 100)[:10], prg(s, 10))
    assert not np.array_equal(prg(s, 10), prg(bytes(32), 10))


# ------------------------------------------------------------------ double masking

def test_shamir_threshold():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir_split(secret, 5, 3)
    assert shamir_combine(shares[:3]) == secret == shamir_combine([shares[4], shares[1], shares[2]])
    assert shamir_combine(shares[:2]) != secret


def run_double_mask(peers, xs, ws, drop_before_sharing=(), drop_after_sharing=(), round_id="r"):
    clients = {p: DoubleMaskClient(p, peers) for p in peers}
    server = DoubleMaskServer(peers)
    keys = wire.loads(wire.dumps({p: c.public_keys() for p, c in clients.items()}))
    outboxes = {p: clients[p].share_keys(keys, round_id) for p in peers if p not in drop_before_sharing}
    inboxes = server.route_shares(wire.loads(wire.dumps(outboxes)))
    masked = {p: clients[p].masked_update(xs[p], inboxes[p], ws[p]) for p in inboxes
              if p not in drop_after_sharing}
    answers = {p: clients[p].unmask_shares(masked) for p in masked}
    return clients, server, keys, masked, answers


def test_double_masking_recovers_survivors():
    peers = ["a", "b", "c", "d", "e"]
    xs, ws = updates(peers, d=33), {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    _, server, keys, masked, answers = run_double_mask(peers, xs, ws, ["e"], ["b"])
    mean = server.aggregate(masked, answers, keys, "r")
    assert torch.allclose(mean, weighted_mean(xs, ws, ["a", "c", "d"]), atol=2.0 ** -F)


def test_double_masking_protects_a_late_peer():
    """A coordinator that calls a peer dropped after getting its vector still sees noise."""
    peers = ["a", "b", "c", "d"]
    xs, ws = {p: torch.zeros(4096) for p in peers}, dict.fromkeys(peers, 1)
    clients = {p: DoubleMaskClient(p, peers) for p in peers}
    server = DoubleMaskServer(peers)
    keys = {p: c.public_keys() for p, c in clients.items()}
    inboxes = server.route_shares({p: clients[p].share_keys(keys, 1) for p in peers})
    masked = {p: clients[p].masked_update(xs[p], inboxes[p], 1) for p in peers}
    # the coordinator pretends "d" dropped, collects s-shares of d and strips d's pairwise masks
    fake = {p: masked[p] for p in ["a", "b", "c"]}
    answers = {p: clients[p].unmask_shares(fake) for p in fake}
    key_d = X25519PrivateKey.from_private_bytes(server._recover("d", "s", answers))
    ring = masked["d"].numpy().view(np.uint64).copy()
    for j in ["a", "b", "c"]:
        mask = prg(pair_seed(key_d, keys[j]["s"], "d", j, 1), ring.size)
        ring = ring - mask if "d" < j else ring + mask
    assert looks_uniform(ring)  # still masked by PRG(b_d)
    # and no client answers a second time, e.g. with "d" among the survivors
    with pytest.raises(ProtocolError, match="once per round"):
        clients["a"].unmask_shares(masked)


def test_double_masking_needs_a_threshold():
    peers = ["a", "b", "c", "d", "e"]
    xs, ws = updates(peers, d=3), dict.fromkeys(peers, 1)
    with pytest.raises(ProtocolError, match="need 3"):
        run_double_mask(peers, xs, ws, drop_before_sharing=["d", "e", "c"])
    clients = {p: DoubleMaskClient(p, peers) for p in peers}
    keys = {p: c.public_keys() for p, c in clients.items()}
    with pytest.raises(ProtocolError, match="state new"):
        clients["a"].masked_update(xs["a"], {}, 1)
    out = {p: clients[p].share_keys(keys, 0) for p in peers}
    inboxes = DoubleMaskServer(peers).route_shares(out)
    clients["a"].masked_update(xs["a"], inboxes["a"], 1)
    with pytest.raises(ProtocolError, match="survivors, need 3"):
        clients["a"].unmask_shares(["a", "b"])
    tampered = dict(inboxes["b"], a=b"\0" * len(inboxes["b"]["a"]))
    with pytest.raises(ProtocolError, match="do not decrypt"):
        clients["b"].masked_update(xs["b"], tampered, 1)


def test_double_masking_survives_a_dropout_before_sharing_keys():
    """A peer that advertised nothing leaves the round; the others agree on the smaller set."""
    peers = ["a", "b", "c", "d", "e"]
    xs, ws = updates(peers, d=9), {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    clients = {p: DoubleMaskClient(p, peers) for p in peers}
    keys = {p: clients[p].public_keys() for p in ["a", "b", "c", "e"]}     # d never answered
    with pytest.raises(ProtocolError, match="no public keys"):
        clients["a"].share_keys(keys, "r")
    outboxes = {p: clients[p].share_keys(keys, "r", allow_missing=True) for p in keys}
    assert clients["a"].peers == ["a", "b", "c", "e"] and clients["a"].state == "shared"
    server = DoubleMaskServer(["a", "b", "c", "e"], threshold=clients["a"].threshold)
    inboxes = server.route_shares(outboxes)
    masked = {p: clients[p].masked_update(xs[p], inboxes[p], ws[p]) for p in ["a", "c", "e"]}  # b drops too
    answers = {p: clients[p].unmask_shares(masked) for p in masked}
    mean = server.aggregate(masked, answers, keys, "r")
    assert torch.allclose(mean, weighted_mean(xs, ws, ["a", "c", "e"]), atol=2.0 ** -F)
    lonely = DoubleMaskClient("a", peers)
    with pytest.raises(ProtocolError, match="advertised keys, need 3"):
        lonely.share_keys({"a": lonely.public_keys(), "b": keys["b"]}, "r", allow_missing=True)
