"""Bulk connections (p2pgrid.bulk) between real peers over TLS on loopback.

Large bodies both ways arrive intact and are checked against their signed digest; a
caller that stops mid-body, sends oversized or malformed headers, or a body that does not
match its digest is cut or refused while the peer goes on serving; bulk connections are
the peer's connections (its table admits and counts them); small requests and h2c stay
on HTTP/2.
"""

import hashlib
import time
from functools import partial

import httpx

import pytest
import torch
import trio

from p2pgrid import auth, bulk, tls, wire
from p2pgrid.auth import sign_request
from p2pgrid.config import PeerConfig
from p2pgrid.errors import PeerUnavailable, Unauthenticated
from p2pgrid.messages import DeleteObject, GetObject, Ping, PutObject, Value
from p2pgrid.router import Router
from p2pgrid.testing import open_network
from p2pgrid.wire import dataclass, message

MB = 1 << 20


def _pools(peer) -> list:
    return list(peer.transport._bulk.values())


async def _connect(peer, to):
    """A raw bulk connection from `peer` to `to`, pinned as the transport pins it."""
    target = peer.target(peer.record(to))
    host, _, port = target.address.rpartition(":")
    context = bulk.client_context(tls.client_context(target.cert))
    with trio.fail_after(10):
        stream = await bulk.SocketTLS.connect(host, int(port), context)
    assert stream.selected_alpn_protocol() == bulk.ALPN
    return target, stream


def _head(peer, target, body_digest: str, length: int) -> bytes:
    headers = sign_request(peer.identity, peer.name, target.key_id, "POST", "/rpc",
                           digest=body_digest, now=time.time())
    headers["content-length"] = str(length)
    return bulk.encode_head(headers)


async def _closed_within(stream, seconds: float) -> bool:
    """Whether the server ends the connection within `seconds` (reading what it sends)."""
    buf = memoryview(bytearray(1 << 16))
    with trio.move_on_after(seconds):
        while True:
            try:
                if not await stream.receive_into(buf):
                    return True
            except trio.BrokenResourceError:
                return True
    return False


async def test_large_bodies_travel_bulk_intact_both_ways(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        x = torch.randint(0, 256, (bulk.MIN_BODY + 12345,), dtype=torch.uint8)
        info = await a.request("b", PutObject(x))
        assert _pools(a), "the upload did not take a bulk connection"
        stored = await grid["b"].load(info.meta["id"])
        assert torch.equal(stored, x)
        reply = await a.request("b", GetObject(info.meta["id"]))   # a held reply, fetched bulk
        assert isinstance(reply, Value) and torch.equal(reply.value, x)
        y = torch.randn(3 * MB // 4 + 7).double()                  # 6 MB of float64
        info2 = await a.request("b", PutObject(y))
        back = await a.request("b", GetObject(info2.meta["id"]))
        assert back.value.dtype == torch.float64 and torch.equal(back.value, y)
        # the connection was reused, not one per request
        assert sum(len(p._idle) for p in _pools(a)) == 1
        await a.request("b", DeleteObject(info.meta["id"]))
        assert isinstance(await a.request("b", Ping()), object)


async def test_a_body_that_does_not_match_its_digest_is_refused(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        target, stream = await _connect(a, "b")
        body = b"\x01" * (2 * MB)
        wrong = hashlib.sha256(b"something else").hexdigest()
        await stream.send_all(_head(a, target, wrong, len(body)) + body)
        top = memoryview(bytearray(10))
        await bulk._receive_exactly(stream, top)
        status, n = bulk._REPLY.unpack(top)
        assert status == 401
        await bulk._receive_exactly(stream, memoryview(bytearray(n)))
        # the connection carries the next request: a signature for another body is refused
        # before its body is read, and the body is read past
        await stream.send_all(_head(a, target, wrong, 3) + b"abc")
        await bulk._receive_exactly(stream, top)
        assert bulk._REPLY.unpack(top)[0] == 401
        await stream.aclose()
        # and a well-formed upload from the same caller goes through
        x = torch.ones(bulk.MIN_BODY, dtype=torch.uint8)
        info = await a.request("b", PutObject(x))
        assert torch.equal(await grid["b"].load(info.meta["id"]), x)


async def _reply(stream) -> int:
    top = memoryview(bytearray(10))
    await bulk._receive_exactly(stream, top)
    status, n = bulk._REPLY.unpack(top)
    await bulk._receive_exactly(stream, memoryview(bytearray(n)))
    return status


async def test_a_body_bound_by_its_connection_is_taken_only_there_and_once(tmp_path):
    """Headers that sign the digest auth.CHANNEL (no hash of the body) are taken on a bulk
    connection, once: the same signed headers with another body are a replay. Over
    HTTP/2 they are refused, naming what to sign instead."""
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        x = torch.randint(0, 256, (bulk.MIN_BODY,), dtype=torch.uint8)
        body = b"".join(bytes(p) for p in wire.encode_parts(PutObject(x)))
        target, stream = await _connect(a, "b")
        headers = sign_request(a.identity, a.name, target.key_id, "POST", "/rpc",
                               digest=auth.CHANNEL, now=time.time())
        headers["content-length"] = str(len(body))
        await stream.send_all(bulk.encode_head(headers) + body)        # as the transport sends it
        assert await _reply(stream) == 200
        other = b"".join(bytes(p) for p in wire.encode_parts(PutObject(x + 1)))
        await stream.send_all(bulk.encode_head(headers) + other)       # the same headers again
        assert await _reply(stream) == 401
        await stream.aclose()
        # over HTTP/2 nothing binds a body to its headers but their digest
        headers = sign_request(a.identity, a.name, target.key_id, "POST", "/rpc",
                               digest=auth.CHANNEL, now=time.time())
        pool = a.transport._pool(target)
        headers.update({"content-type": "application/cbor", "host": target.address,
                        "content-length": "3"})
        resp = await pool.handle_async_request(httpx.Request(
            "POST", f"https://{target.address}/rpc", headers=headers,
            stream=httpx.ByteStream(b"abc")))
        await resp.aread()
        assert resp.status_code == 401
        assert "only on a bulk connection" in wire.loads(resp.content)["message"]


async def test_a_caller_that_stops_mid_body_is_cut_and_the_peer_serves_on(tmp_path):
    cfg = PeerConfig(name="b", read_timeout=1.0)
    async with open_network(["a", cfg], tmp_path) as grid:
        a = grid["a"]
        target, stream = await _connect(a, "b")
        body = b"\x02" * (8 * MB)
        await stream.send_all(_head(a, target, hashlib.sha256(body).hexdigest(), len(body)))
        await stream.send_all(body[:MB])        # then nothing more
        t0 = trio.current_time()
        assert await _closed_within(stream, 10), "the stalled body was not cut"
        assert trio.current_time() - t0 < 8
        await stream.aclose()
        x = torch.arange(bulk.MIN_BODY, dtype=torch.uint8)
        info = await a.request("b", PutObject(x))
        assert torch.equal(await grid["b"].load(info.meta["id"]), x)


@pytest.mark.parametrize("head", [
    bulk._LEN.pack(bulk.MAX_HEAD + 1),                          # headers over the limit
    bulk._LEN.pack(5) + b"a\0b\0c",                             # not name/value pairs
    bulk._LEN.pack(4) + b"x\0y\0",                              # no content-length
], ids=["too-long", "malformed", "no-length"])
async def test_bad_headers_end_the_connection(tmp_path, head):
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        _, stream = await _connect(a, "b")
        await stream.send_all(head)
        assert await _closed_within(stream, 10)
        await stream.aclose()
        assert await a.request("b", Ping(), via="http")


async def test_headers_must_arrive_within_the_read_timeout(tmp_path):
    cfg = PeerConfig(name="b", read_timeout=0.5)
    async with open_network(["a", cfg], tmp_path) as grid:
        _, stream = await _connect(grid["a"], "b")
        await stream.send_all(bulk._LEN.pack(100) + b"x")   # a start, then silence
        assert await _closed_within(stream, 5)


async def test_bulk_connections_count_against_the_address_limit(tmp_path):
    cfg = PeerConfig(name="b", max_connections=64, max_connections_per_address=3)
    async with open_network(["a", cfg], tmp_path) as grid:
        a = grid["a"]
        streams, refused = [], 0
        for _ in range(4):   # none idle-evictable among them: each has an open request
            try:
                target, s = await _connect(a, "b")
            except trio.BrokenResourceError:   # refused at the door
                refused += 1
                continue
            await s.send_all(_head(a, target, "0" * 64, 10) + b"12345")  # half a body
            streams.append(s)
        # a's own h2 connections to b count too: at most 3 live at once from 127.0.0.1
        live = [s for s in streams if not await _closed_within(s, 0.5)]
        assert refused >= 1 and len(live) <= 3
        for s in streams:
            await s.aclose()


async def test_h2c_and_small_requests_stay_on_http2(tmp_path):
    async with open_network(["a", "b"], tmp_path, insecure=True) as grid:
        x = torch.randint(0, 256, (bulk.MIN_BODY + 1,), dtype=torch.uint8)
        info = await grid["a"].request("b", PutObject(x))
        assert not _pools(grid["a"])
        assert torch.equal((await grid["a"].request("b", GetObject(info.meta["id"]))).value, x)
    async with open_network(["a", "b"], tmp_path / "tls") as grid:
        await grid["a"].request("b", PutObject(torch.ones(1000)))
        assert not _pools(grid["a"])


async def test_a_peer_without_bulk_alpn_is_refused_not_misread(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        target = grid["a"].target(grid["a"].record("b"))
        host, _, port = target.address.rpartition(":")
        with pytest.raises(Unauthenticated):
            # a certificate other than the pinned one: the handshake fails
            other = tls.make_certificate(grid["b"].identity.__class__.generate())
            context = bulk.client_context(tls.client_context(other))
            try:
                with trio.fail_after(10):
                    await bulk.SocketTLS.connect(host, int(port), context)
            except trio.BrokenResourceError:
                raise Unauthenticated("pin refused") from None


async def test_odd_layouts_and_dtypes_travel_bulk_intact(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        for x in (torch.randn(1200, 1100).t(),                      # not contiguous, 5 MB
                  torch.rand(5 * MB) > 0.5,                          # bool, 5 MB
                  torch.randn(5 * MB).to(torch.bfloat16)[::2]):      # strided bfloat16
            info = await a.request("b", PutObject(x))
            back = (await a.request("b", GetObject(info.meta["id"]))).value
            assert back.dtype == x.dtype and torch.equal(back, x)
        assert _pools(a)


async def test_a_stale_idle_bulk_connection_is_replaced(tmp_path):
    cfg = PeerConfig(name="b", idle_timeout=0.5)
    async with open_network(["a", cfg], tmp_path) as grid:
        a = grid["a"]
        x = torch.ones(bulk.MIN_BODY, dtype=torch.uint8)
        await a.request("b", PutObject(x))
        await trio.sleep(1.5)   # the peer closes the idle connection
        info = await a.request("b", PutObject(x))
        assert torch.equal(await grid["b"].load(info.meta["id"]), x)


async def test_errors_reach_the_caller_as_themselves(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        a, b = grid["a"], grid["b"]
        x = torch.ones(bulk.MIN_BODY, dtype=torch.uint8)
        await a.request("b", PutObject(x))   # a bulk connection is open and idle
        rec = a.record("b")
        await grid.stop("b")
        with pytest.raises(PeerUnavailable):  # not an ExceptionGroup around it
            await a.request(rec, PutObject(x))
        assert b.name == "b"

# ------------------------------------------------------------------ work nobody waits for

_slow = Router()
_started: list[float] = []
_stopped: list[str] = []


@message("test.bulk_slow")
@dataclass(frozen=True)
class _Slow:
    payload: torch.Tensor
    seconds: float


@_slow.on(_Slow)
async def _slow_handler(peer, caller, msg: _Slow):
    _started.append(trio.current_time())
    try:
        await trio.sleep(msg.seconds)
    except trio.Cancelled:
        _stopped.append("cancelled")
        raise
    _stopped.append("finished")
    return Ping()


async def test_work_for_a_bulk_caller_that_goes_stops(tmp_path):
    """A handler working for a bulk request stops when its caller goes, as over HTTP/2
    (there the server cancels it as hypercorn queues the disconnect; here a task waits
    for the caller's connection to close)."""
    _started.clear(), _stopped.clear()
    async with open_network(["h", "bob"], tmp_path, routers=[_slow]) as grid:
        big = torch.ones(bulk.MIN_BODY // 4 + 1024)

        async with trio.open_nursery() as n:
            n.start_soon(partial(grid["bob"].request, "h", _Slow(big, 60.0), timeout=90))
            with trio.fail_after(30):
                while not _started:
                    await trio.sleep(0.01)
            assert _pools(grid["bob"])          # it went on a bulk connection
            n.cancel_scope.cancel()             # the caller gives up: nobody waits now
        with trio.fail_after(5):
            while not _stopped:
                await trio.sleep(0.02)
        assert _stopped == ["cancelled"]
