"""Serving pieces without a network: policy, gate, routing, packages, part files."""

from __future__ import annotations

import hashlib
import struct
import types

import cbor2
import pytest
import torch
from torch import nn

from p2pgrid.errors import BadRequest, PayloadTooLarge, PermissionDenied, RateLimited, ShapeError
from p2pgrid.modelgraph import model_hash
from p2pgrid.serving import HostingPolicy, Policy, Terms
from p2pgrid.serving.gpt import GPT, generate
from p2pgrid.serving.package import (MAGIC, file_digests, import_package, live_spec, spec_hash,
                                     write_package)
from p2pgrid.serving.policy import Gate, parse_rate
from p2pgrid.serving.owner import Watch, replica_check, widen_pool
from p2pgrid.serving.routing import Routes
from p2pgrid.serving.transfer import PartFile, read_chunk

# ------------------------------------------------------------------ policy


def test_policy_checks_each_property_with_its_own_error():
    p = Policy(input_shape=(None, 1, 28, 28), dtype="float32", value_range=(0, 1), max_batch=4)
    x = torch.rand(3, 1, 28, 28)
    assert p.check_meta(x) == 3
    p.check_values(x)
    with pytest.raises(ShapeError, match="shape"):
        p.check_meta(torch.rand(3, 28, 28))
    with pytest.raises(ShapeError, match="dtype"):
        p.check_meta(x.half())
    with pytest.raises(BadRequest, match="limit of 4"):
        p.check_meta(torch.rand(5, 1, 28, 28))
    with pytest.raises(BadRequest, match="must be a tensor"):
        p.check_meta([1, 2, 3])
    with pytest.raises(BadRequest, match=r"lie in \[0.0, 1.0\]"):
        p.check_values(x - 0.5)
    inf = x.clone()
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(BadRequest, match="infinite"):
        p.check_values(inf)
    ints = Policy(dtype="int64", value_range=(0, 49))
    ints.check_values(torch.tensor([[0, 49]]))
    with pytest.raises(BadRequest):
        ints.check_values(torch.tensor([[50]]))


def test_policy_users_and_round_trip():
    p = Policy(users=["bob"], rate_limit="60/min", quota="1000/day")
    p.check_caller("bob")
    p.check_caller("hospital", owner="hospital")  # the owner is always allowed
    with pytest.raises(PermissionDenied, match="eve is not on the list"):
        p.check_caller("eve", owner="hospital")
    assert Policy.from_dict(p.to_dict()) == p
    t = Terms(allow_download=True, policy=p, description="d")
    assert Terms.from_dict(t.to_dict()) == t
    for bad in ({"users": "bob"}, {"rate_limit": "fast"}, {"max_batch": 0}, {"dtype": "str"},
                {"value_range": (1, 0)}, {"nope": 1}, {"input_shape": ("a",)}):
        with pytest.raises(BadRequest):
            Policy.from_dict(bad)


def test_parse_rate():
    assert parse_rate("60/min") == (60, 60.0)
    assert parse_rate("5 / s") == (5, 1.0)
    assert parse_rate("1000/day") == (1000, 86400.0)
    for bad in ("0/min", "60", "60/fortnight", "-1/s", None):
        with pytest.raises(BadRequest):
            parse_rate(bad)


def test_gate_token_bucket_refills_and_quota_windows_reset():
    now = [0.0]
    gate = Gate(Policy(rate_limit="60/min", quota="100/hour"), clock=lambda: now[0])
    for _ in range(60):
        gate.admit("bob")
    with pytest.raises(RateLimited) as e:
        gate.admit("bob")
    assert e.value.details["retry_after"] == pytest.approx(1.0)
    gate.admit("ana")  # buckets are per user
    now[0] += 1.0  # one token back per second
    gate.admit("bob")
    with pytest.raises(RateLimited):
        gate.admit("bob")
    gate.charge("bob", 60)
    gate.charge("bob", 40)
    with pytest.raises(RateLimited, match="quota"):
        gate.charge("bob", 1)
    now[0] += 3600.0  # next window
    gate.charge("bob", 100)


def test_hosting_policy_consent():
    terms = Terms(allow_download=False, allow_remote_inference=True)
    HostingPolicy().check("hospital", terms, 10, 0, 0)
    with pytest.raises(PermissionDenied):
        HostingPolicy(accept_from=()).check("hospital", terms, 10, 0, 0)
    with pytest.raises(PermissionDenied):
        HostingPolicy(accept_from=("clinic",)).check("hospital", terms, 10, 0, 0)
    with pytest.raises(PermissionDenied, match="only downloadable"):
        HostingPolicy(private=False).check("hospital", terms, 10, 0, 0)
    with pytest.raises(PermissionDenied, match="nothing to replicate"):
        HostingPolicy().check("hospital", Terms(allow_remote_inference=False), 10, 0, 0)
    with pytest.raises(PayloadTooLarge):
        HostingPolicy(max_bytes=100).check("hospital", terms, 60, 0, 50)
    with pytest.raises(PermissionDenied):
        HostingPolicy(max_models=1).check("hospital", terms, 1, 1, 0)


# ------------------------------------------------------------------ routing


def test_routes_prefer_least_expected_wait_and_avoid_failed_hosts():
    now = [0.0]
    r = Routes(clock=lambda: now[0], cooldown=5.0)
    assert r.pick(["b", "a"], "m") == "a"  # nothing known: fewest in flight, then name
    t = r.start("a", "m")
    assert r.pick(["a", "b"], "m") == "b"  # a is busy, b unmeasured counts as fast as the fastest
    r.done(t, ok=True, elapsed=0.010)
    r.done(r.start("b", "m"), ok=True, elapsed=0.050)
    assert r.pick(["a", "b"], "m") == "a"
    held = [r.start("a", "m") for _ in range(5)]  # 6 x 10 ms > 1 x 50 ms
    assert r.pick(["a", "b"], "m") == "b"
    for h in held:
        r.done(h, ok=True, measure=False)  # answers that are not latency samples
    assert r.snapshot()["a/m"]["latency_ms"] == 10.0
    r.done(r.start("a", "m"), ok=False)  # a did not answer
    assert r.pick(["a", "b"], "m") == "b"
    assert r.pick(["a"], "m") == "a"  # every host down: try them anyway
    now[0] += 5.1
    assert r.pick(["a", "b"], "m") == "a"


# ------------------------------------------------------------------ packages


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    mlp[1].running_mean.uniform_()
    gpt = GPT(vocab=40, context=16, width=32, depth=2, heads=4).eval()
    half = nn.Sequential(nn.Linear(3, 5), nn.Tanh()).to(torch.bfloat16)
    return [(mlp, torch.randn(5, 4)), (gpt, torch.randint(0, 40, (2, 9))),
            (half, torch.randn(2, 3).to(torch.bfloat16))]


def test_spec_hash_equals_model_hash_without_copies():
    for model, _ in _models():
        spec = live_spec(model)
        assert spec_hash(spec) == model_hash(model)
        # the spec holds the model's own tensors (same storage), not clones
        own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
        assert spec["state"] and all(t.data_ptr() in own for t in spec["state"].values())


def test_package_round_trip_and_digests(tmp_path):
    for i, (model, x) in enumerate(_models()):
        spec = live_spec(model)
        h = spec_hash(spec)
        path = tmp_path / f"m{i}.pkg"
        digests = write_package(spec, path, model_hash=h, chunk_size=1024)
        assert digests == file_digests(path, 1024)
        assert digests.sha256 == hashlib.sha256(path.read_bytes()).digest()
        back, header = import_package(path)
        assert header["model_hash"] == h == model_hash(back)
        assert torch.equal(back(x), model(x))
        # deterministic: the same model gives the same bytes
        write_package(live_spec(back), tmp_path / "again.pkg", model_hash=h, chunk_size=1024)
        assert (tmp_path / "again.pkg").read_bytes() == path.read_bytes()


def test_tampered_packages_are_refused(tmp_path):
    model, _ = _models()[0]
    spec = live_spec(model)
    path = tmp_path / "m.pkg"
    write_package(spec, path, model_hash=spec_hash(spec))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    header = cbor2.loads(raw[16:16 + n])

    def rewrite(h, tail=None):
        enc = cbor2.dumps(h, canonical=True)
        start = MAGIC + struct.pack("<Q", len(enc)) + enc
        start += bytes(-len(start) % 64)
        base = 16 + n + (-(16 + n) % 64)
        bad = tmp_path / "bad.pkg"
        bad.write_bytes(start + (raw[base:] if tail is None else tail))
        return bad

    with pytest.raises(BadRequest, match="not a p2pgrid model package"):
        (tmp_path / "x").write_bytes(b"PK\x03\x04" + raw[4:])
        import_package(tmp_path / "x")
    h = dict(header, tensors=[dict(header["tensors"][0], dtype="object")] + header["tensors"][1:])
    with pytest.raises(BadRequest, match="bad tensor entry"):
        import_package(rewrite(h))
    h = dict(header, tensors=[dict(header["tensors"][0], offset=64)] + header["tensors"][1:])
    with pytest.raises(BadRequest, match="wrong size or offset"):
        import_package(rewrite(h))
    with pytest.raises(BadRequest, match="the file has"):
        import_package(rewrite(header, tail=raw[16 + n + (-(16 + n) % 64):] + b"extra"))
    spec_bad = dict(header["spec"])
    spec_bad["forward"] = [dict(s) for s in spec_bad["forward"]]
    spec_bad["forward"][1]["op"] = "os.system"
    with pytest.raises(BadRequest):  # UnknownOp, from modelgraph's whitelist
        import_package(rewrite(dict(header, spec=spec_bad)))


def test_part_file_checks_chunks_and_finds_them_again(tmp_path):
    model, _ = _models()[1]
    spec = live_spec(model)
    src = tmp_path / "src.pkg"
    digests = write_package(spec, src, model_hash=spec_hash(spec), chunk_size=4096)
    part = PartFile(tmp_path / "in.part", digests).open()
    assert part.missing == list(range(digests.count))
    with pytest.raises(BadRequest, match="does not match"):
        part.write(0, read_chunk(src, digests, 1))
    for i in range(0, digests.count, 2):
        part.write(i, read_chunk(src, digests, i))
    again = PartFile(tmp_path / "in.part", digests).open()  # after a restart
    assert again.have == set(range(0, digests.count, 2))
    with pytest.raises(BadRequest, match="missing"):
        again.complete()
    for i in again.missing:
        again.write(i, read_chunk(src, digests, i))
    again.complete()
    assert (tmp_path / "in.part").read_bytes() == src.read_bytes()


def test_gpt_small_shape_and_sampling():
    with torch.device("meta"):
        small = GPT.small()
    n = sum(p.numel() for p in small.parameters())
    assert 124e6 < n < 125e6  # GPT-2 small: 124 M parameters, about 500 MB in float32
    torch.manual_seed(0)
    lm = GPT(vocab=10, context=8, width=16, depth=1, heads=2).eval()
    out = generate(lm, torch.tensor([1, 2]), 12, context=8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (14,) and out[:2].tolist() == [1, 2]


TERMS = Terms(policy=Policy(value_range=(0, 1), users=["bob"]))


class _Rec:  # what replica_check reads of a directory record
    def __init__(self, key_id, name, *announced, terms=TERMS):
        self.key_id, self.name = key_id, name
        wire_terms = cbor2.loads(cbor2.dumps(terms.to_dict()))  # as it arrives by gossip
        self.services = {"serving": {"models": [
            {"owner": "hospital", "name": n, "hash": h, "role": "replica", "terms": wire_terms}
            for n, h in announced]}}


def test_replica_check_writes_off_gone_and_silent_replicas_and_finds_strays():
    hm = types.SimpleNamespace(owner="hospital", name="digits", hash="h1", terms=TERMS,
                               replicas={"k1": "clinic", "k2": "lab", "k3": "uni"})
    watch = Watch()
    recs = [_Rec("k1", "clinic", ("digits", "h1")),  # fine
            _Rec("k2", "lab"),                        # live, announces nothing (yet)
            _Rec("k4", "old", ("digits", "h0"))]      # an old copy we do not count
    # k3 left the directory: lost at once; k2 and k4 get the grace period first
    assert replica_check(hm, recs, 100.0, watch, grace=5.0) == (["k3"], [])
    del hm.replicas["k3"]  # as tend does
    assert replica_check(hm, recs, 104.0, watch, grace=5.0) == ([], [])
    recs[1] = _Rec("k2", "lab", ("digits", "h1"))     # its record caught up: not lost
    assert replica_check(hm, recs, 105.0, watch, grace=5.0) == ([], [recs[2]])
    recs[2] = _Rec("k4", "old")                       # tend told it to drop its copy
    recs[1] = _Rec("k2", "lab")                       # silent again: a new grace period
    assert replica_check(hm, recs, 106.0, watch, grace=5.0) == ([], [])
    assert replica_check(hm, recs, 111.0, watch, grace=5.0) == (["k2"], [])
    del hm.replicas["k2"]
    other = _Rec("k5", "x", ("other-model", "h1"))    # another model: none of our business
    assert replica_check(hm, [other], 200.0, watch, grace=0.0) == (["k1"], [])
    # a copy under older terms is not a replica of the model as served now
    old_terms = _Rec("k1", "clinic", ("digits", "h1"), terms=Terms(policy=Policy(users=["eve"])))
    assert replica_check(hm, [old_terms], 300.0, Watch(), grace=0.0) == (["k1"], [])
    assert replica_check(hm, [_Rec("k1", "clinic", ("digits", "h1"))], 300.0, Watch(),
                         grace=0.0) == ([], [])


def test_widen_pool_keeps_named_hosts_until_the_owner_opens_it():
    hm = types.SimpleNamespace(pool=["clinic"])
    widen_pool(hm, ["lab"])
    assert hm.pool == ["clinic", "lab"]
    widen_pool(hm, None)              # replicate_model(count=...) on any peer
    assert hm.pool is None
    widen_pool(hm, ["uni"])           # still any peer: naming one more does not narrow it
    assert hm.pool is None


def test_catalog_routes_only_to_replicas_under_the_owners_current_terms():
    from p2pgrid.identity import Identity
    from p2pgrid.serving.catalog import catalog, grant_bytes

    owner = Identity.generate()
    now, old = TERMS.to_dict(), Terms(policy=Policy(users=None)).to_dict()  # old: anyone

    def entry(role, key_id, terms):
        e = {"owner": "hospital", "name": "digits", "hash": "h1", "size": 10, "role": role,
             "terms": cbor2.loads(cbor2.dumps(terms))}
        if role == "replica":
            e["grant"] = owner.sign(grant_bytes("hospital", "digits", "h1", key_id, terms))
        return types.SimpleNamespace(key_id=key_id, name=key_id.removesuffix("-key"),
                                     services={"serving": {"models": [e]}})

    class Directory:
        def __init__(self, recs):
            self.recs = recs

        def peers(self):
            return self.recs

        def label(self, rec):
            return rec.name

        def name_key(self, name):
            return owner.public_bytes if name == "hospital" else None

    recs = [entry("owner", "hospital-key", now), entry("replica", "clinic-key", now),
            entry("replica", "lab-key", old)]  # lab was away when the terms changed
    [info] = catalog(Directory(recs))
    assert sorted(info.hosts.values()) == ["clinic", "hospital"]
    # owner offline: the first granted replica's terms stand, and hosts must match them
    [info] = catalog(Directory(recs[1:]))
    assert list(info.hosts.values()) == ["clinic"] and info.terms["policy"]["users"] == ["bob"]


async def test_keeper_backs_off_when_no_peer_takes_a_replica(monkeypatch, autojump_clock):
    import trio

    from p2pgrid.errors import PeerUnavailable
    from p2pgrid.serving import owner

    attempts = []

    async def place(s, hm, count, hosts=None):
        attempts.append(trio.current_time())
        raise PeerUnavailable("no peer offers to host replicas")

    monkeypatch.setattr(owner, "place", place)
    peer = types.SimpleNamespace(directory=types.SimpleNamespace(peers=lambda **kw: []),
                                 audit=lambda *a, **k: None)
    s = types.SimpleNamespace(peer=peer, save=lambda: None, announce=lambda: None)
    hm = types.SimpleNamespace(owner="hospital", name="digits", hash="h1", terms=TERMS,
                               replicas={}, target=1, placing=0, pool=None)
    watch = Watch()
    for _ in range(400):  # 200 s of passes every 0.5 s, grace (ttl) 4 s
        await owner.tend(s, hm, watch, 4.0)
        await trio.sleep(0.5)
    gaps = [round(b - a, 1) for a, b in zip(attempts, attempts[1:])]
    assert gaps[:3] == [1.0, 2.0, 4.0] and max(gaps) == owner.MAX_RETRY_DELAY
