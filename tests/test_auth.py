import pytest

from p2pgrid.auth import H_DIGEST, H_SIG, Verifier, body_digest, sign_request
from p2pgrid.errors import ReplayDetected, Unauthenticated
from p2pgrid.identity import Identity


@pytest.fixture
def keys():
    return Identity.generate(), Identity.generate()


def test_good_request(keys):
    alice, server = keys
    h = sign_request(alice, "alice", server.key_id, "POST", "/rpc", b"x", now=100.0)
    caller = Verifier(server.key_id).verify("POST", "/rpc", h, body_digest(b"x"), now=100.5)
    assert caller.name == "alice" and caller.public_key == alice.public_bytes


def test_replay_refused(keys):
    alice, server = keys
    v = Verifier(server.key_id)
    h = sign_request(alice, "alice", server.key_id, "POST", "/rpc", b"x", now=100.0)
    v.verify("POST", "/rpc", h, body_digest(b"x"), now=100.0)
    with pytest.raises(ReplayDetected):
        v.verify("POST", "/rpc", h, body_digest(b"x"), now=101.0)


@pytest.mark.parametrize("skew", [-61.0, 61.0, 3600.0])
def test_stale_or_future_timestamp(keys, skew):
    alice, server = keys
    h = sign_request(alice, "alice", server.key_id, "POST", "/rpc", b"x", now=1000.0)
    with pytest.raises(ReplayDetected, match="window"):
        Verifier(server.key_id).verify("POST", "/rpc", h, body_digest(b"x"), now=1000.0 + skew)


def test_other_audience_refused(keys):
    alice, server = keys
    h = sign_request(alice, "alice", Identity.generate().key_id, "POST", "/rpc", b"x", now=1.0)
    with pytest.raises(Unauthenticated, match="another peer"):
        Verifier(server.key_id).verify("POST", "/rpc", h, body_digest(b"x"), now=1.0)


def test_tampered_body_or_headers(keys):
    alice, server = keys
    v = Verifier(server.key_id)
    h = sign_request(alice, "alice", server.key_id, "POST", "/rpc", b"x", now=1.0)
    with pytest.raises(Unauthenticated, match="digest"):
        v.verify("POST", "/rpc", h, body_digest(b"y"), now=1.0)
    forged = dict(h, **{H_DIGEST: body_digest(b"y")})
    with pytest.raises(Unauthenticated, match="bad signature"):
        v.verify("POST", "/rpc", forged, body_digest(b"y"), now=1.0)
    renamed = dict(h, **{"x-p2p-name": "mallory"})
    with pytest.raises(Unauthenticated, match="bad signature"):
        v.verify("POST", "/rpc", renamed, body_digest(b"x"), now=1.0)
    with pytest.raises(Unauthenticated, match="bad signature"):
        v.verify("POST", "/other", h, body_digest(b"x"), now=1.0)


def test_missing_or_garbage_headers(keys):
    _, server = keys
    v = Verifier(server.key_id)
    with pytest.raises(Unauthenticated, match="not signed"):
        v.verify("POST", "/rpc", {}, body_digest(b""), now=1.0)
    h = sign_request(keys[0], "alice", server.key_id, "POST", "/rpc", b"", now=1.0)
    with pytest.raises(Unauthenticated):
        v.verify("POST", "/rpc", dict(h, **{H_SIG: "!!!"}), body_digest(b""), now=1.0)
    with pytest.raises(Unauthenticated):
        v.verify("POST", "/rpc", dict(h, **{"x-p2p-key": "AAAA"}), body_digest(b""), now=1.0)
