"""The tuned transport (p2pgrid.transport, client, server, wire) over real sockets.

Bodies of many sizes both ways, large and small requests sharing a connection,
size limits, certificate pinning; and the wire's fast paths for large arrays
against cbor2's plain decoding.
"""

import random

import cbor2
import numpy as np
import pytest
import torch
import trio

import p2pgrid
from p2pgrid import wire
from p2pgrid.client import Target, Transport
from p2pgrid.config import PeerConfig
from p2pgrid.errors import MalformedMessage
from p2pgrid.messages import DeleteObject, GetObject, Ping, Pong, PutObject, Value
from p2pgrid.testing import open_network

MB = 1 << 20
SIZES = [0, 1, 7, wire.BIG - 1, wire.BIG, MB - 1, MB, MB + 1, 3 * MB + 7]


async def _round_trip(peer, to: str, tensor: torch.Tensor) -> torch.Tensor:
    info = await peer.request(to, PutObject(tensor))
    reply = await peer.request(to, GetObject(info.meta["id"]))
    await peer.request(to, DeleteObject(info.meta["id"]))
    assert isinstance(reply, Value)
    return reply.value


@pytest.mark.parametrize("insecure", [False, True], ids=["tls", "h2c"])
async def test_bodies_of_many_sizes_round_trip_intact(tmp_path, insecure):
    rng = torch.Generator().manual_seed(7)
    async with open_network(["a", "b"], tmp_path, insecure=insecure) as grid:
        for n in SIZES:
            x = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=rng)
            back = await _round_trip(grid["a"], "b", x)  # upload, then download
            assert back.dtype == torch.uint8 and torch.equal(back, x), n
        for x in (torch.randn(1000, 333, generator=rng),                 # 1.3 MB float32
                  torch.randn(3 * MB // 8 + 1, generator=rng).double(),  # odd length float64
                  torch.randn(600, 701, generator=rng) > 0):             # bool travels as ext array
            back = await _round_trip(grid["b"], "a", x)  # the other direction
            assert back.dtype == x.dtype and torch.equal(back, x)


async def test_large_and_small_requests_share_one_connection(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        await a.request("b", Ping(), via="http")  # the connection exists before the burst
        big = torch.randint(0, 256, (24 * MB,), dtype=torch.uint8)
        pongs, backs = [], []

        async def big_one():
            backs.append(await _round_trip(a, "b", big))

        async def pings():
            for _ in range(20):
                pongs.append(await a.request("b", Ping(), via="http"))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(big_one)
                for _ in range(3):
                    nursery.start_soon(pings)
        assert torch.equal(backs[0], big)
        assert len(pongs) == 60 and all(isinstance(p, Pong) and p.name == "b" for p in pongs)
        (pool,) = [p for k, p in a.transport._pools.items() if k[2] == "rpc"]
        assert len(pool._pool.connections) == 1  # one HTTP/2 connection carried it all


async def test_concurrent_first_requests_on_a_fresh_connection_all_succeed(tmp_path):
    # Regression: a fresh connection is readable at once (the server's SETTINGS).
    # The check for "closed while idle in the pool" once fired there for a second
    # concurrent request and closed the connection under the first one, which
    # then failed (KeyError in httpcore) or hung.
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        target = a.target(a.record("b"))

        async def burst(transport, attempt):
            replies = []

            async def ping():
                replies.append(await transport.request(target, Ping(), timeout=10))

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(ping)
            await trio.sleep(0.01 * (attempt % 3))  # let SETTINGS/ACKs arrive in between
            replies.append(await transport.request(target, Ping(), timeout=10))
            return replies

        for attempt in range(20):
            transport = Transport(a.identity, "a")
            try:
                with trio.fail_after(30):  # the bug once hung here instead of failing
                    replies = await burst(transport, attempt)
            finally:
                await transport.aclose()
            assert len(replies) == 9 and all(isinstance(r, Pong) for r in replies), attempt


async def test_a_request_cancelled_on_a_fresh_connection_leaves_it_usable(tmp_path):
    # Regression: cancelled while httpcore set up a fresh connection's stream
    # permits, a request left too many of them; the next request on that connection
    # then failed with "ValueError: semaphore released too many times".
    async with open_network(["a", "b"], tmp_path) as grid:
        a = grid["a"]
        target = a.target(a.record("b"))
        rng = random.Random(1)
        for attempt in range(150):
            transport = Transport(a.identity, "a")
            try:
                with trio.move_on_after(rng.uniform(0, 0.004)):  # cancelled somewhere
                    await transport.request(target, Ping(), timeout=10)
                with trio.fail_after(30):
                    assert isinstance(await transport.request(target, Ping(), timeout=10), Pong)
            finally:
                await transport.aclose()


async def test_oversized_body_is_refused_and_the_peer_keeps_serving(tmp_path):
    small = PeerConfig(name="b", data_dir=tmp_path / "b", max_body=MB)
    async with open_network(["a", small], tmp_path) as grid:
        a = grid["a"]
        await a.request("b", Ping())
        with pytest.raises(p2pgrid.PayloadTooLarge):
            await a.request("b", PutObject(torch.zeros(2 * MB, dtype=torch.uint8)))
        # the same connection still serves small and just-under-the-limit requests
        assert isinstance(await a.request("b", Ping()), Pong)
        x = torch.randint(0, 256, (MB - 4096,), dtype=torch.uint8)
        assert torch.equal(await _round_trip(a, "b", x), x)
        (pool,) = [p for k, p in a.transport._pools.items() if k[2] == "rpc"]
        assert len(pool._pool.connections) == 1


async def test_a_client_pinned_to_the_wrong_certificate_cannot_talk(tmp_path):
    async with open_network(["a", "b"], tmp_path) as grid:
        a, b = grid["a"], grid["b"]
        wrong = Target(b.address, b.key_id, a.cert)  # a's own certificate, not b's
        with pytest.raises((p2pgrid.Unauthenticated, p2pgrid.PeerUnavailable)):
            with trio.fail_after(10):
                await a.transport.request(wrong, Ping())
        right = Target(b.address, b.key_id, b.cert)
        assert isinstance(await a.transport.request(right, Ping()), Pong)


async def test_keep_alive_closes_idle_connections_only():
    # TunedTCPServer keeps one idle timer per connection instead of one per request
    from functools import partial

    import httpx
    from hypercorn.config import Config

    from p2pgrid.transport.httpcore import PeerHTTPTransport
    from p2pgrid.transport.hypercorn import serve
    clients = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return
        clients.append(scope["client"])
        if scope["path"] == "/slow":
            await trio.sleep(1.0)  # longer than the keep-alive: busy, not idle
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config()
    config.bind, config.keep_alive_timeout, config.accesslog = ["127.0.0.1:0"], 0.4, None
    config.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(partial(serve, app, config, tuned=True))
        # the peer's client notices the closed idle connection (stock httpcore does not:
        # tests/test_transport_upstream.py)
        async with httpx.AsyncClient(transport=PeerHTTPTransport()) as client:
            with trio.fail_after(10):
                assert (await client.get(url + "/slow")).text == "ok"
                assert (await client.get(url + "/")).text == "ok"
                await trio.sleep(1.5)  # idle past the keep-alive: the server closes it
                assert (await client.get(url + "/")).text == "ok"  # on a new connection
        nursery.cancel_scope.cancel()
    assert clients[0] == clients[1] != clients[2]


# ------------------------------------------------------------------ wire fast paths

BIG_VALUES = [
    torch.arange(MB, dtype=torch.float32).reshape(1024, 1024),
    torch.randn(wire.BIG // 2 + 3).to(torch.bfloat16),
    torch.randn(wire.BIG) > 0,
    np.arange(wire.BIG, dtype=">i4"),
    {"x": torch.ones(wire.BIG, dtype=torch.int16), "b": bytes(wire.BIG), "s": "text"},
    PutObject(torch.randint(0, 256, (3 * MB + 7,), dtype=torch.uint8), tags=["t"]),
    Value([torch.zeros(wire.BIG), {"k": torch.ones(3)}], meta={"a": 1}),
]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bytes(a.contiguous().view(torch.uint8).numpy()) ==
                bytes(b.contiguous().view(torch.uint8).numpy()))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f))
                                          for f in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("value", BIG_VALUES, ids=lambda v: type(v).__name__)
def test_large_arrays_encode_by_reference_and_decode_without_cbor2_copies(value):
    raw = wire.dumps(value)
    parts = wire.dumps_parts(value)
    assert len(parts) > 1 and b"".join(parts) == raw  # views spliced in, same bytes
    assert any(isinstance(p, memoryview) for p in parts)
    if type(value) in wire.registered().values():
        assert bytes(wire.encode_buffer(value)) == raw == wire.encode(value)
    expected = torch.from_numpy(value.astype("<i4")) if isinstance(value, np.ndarray) else value
    assert _same(expected, wire.loads(raw))  # (ndarrays come back as tensors)
    assert _same(wire.loads(raw), wire.loads(memoryview(bytearray(raw))))


def test_decoded_large_tensors_are_writable_and_independent_of_the_body():
    x = torch.arange(wire.BIG, dtype=torch.int32)
    body = bytearray(wire.dumps([x, x]))
    a, b = wire.loads(memoryview(body))
    a += 1
    body[-8:] = bytes(8)
    assert torch.equal(b, x) and torch.equal(a, x + 1)


def test_adopted_bodies_lend_their_memory_once():
    x = torch.arange(wire.BIG, dtype=torch.int32)
    body = np.frombuffer(wire.dumps([x, x]), np.uint8).copy()
    a, b = wire.loads(memoryview(body), adopt=True)
    assert torch.equal(a, x) and torch.equal(b, x)
    a += 1  # views of distinct payloads, or copies: never of each other
    assert torch.equal(b, x)
    twice = cbor2.dumps(cbor2.CBORTag(256, [
        cbor2.CBORTag(40, [[wire.BIG], cbor2.CBORTag(78, x.numpy().tobytes())]),
        cbor2.CBORTag(40, [[wire.BIG], cbor2.CBORTag(78, cbor2.CBORTag(25, 0))])]))  # a reference
    c, d = wire.loads(memoryview(np.frombuffer(twice, np.uint8).copy()), adopt=True)
    c += 1  # the payload named twice is lent to one of them only
    assert torch.equal(d, x) and torch.equal(c, x + 1)


def test_the_large_array_decoder_agrees_with_cbor2_on_damaged_bodies(monkeypatch):
    def plain(raw):  # cbor2 alone, as before the fast path
        with monkeypatch.context() as m:
            m.setattr(wire, "_skeleton", lambda data, adopt: None)
            return _outcome(raw)

    def _outcome(raw):
        try:
            return "ok", wire.loads(raw)
        except MalformedMessage as e:
            return "error", type(e)

    bodies = [wire.dumps(v) for v in BIG_VALUES[:5]] + [
        cbor2.dumps(cbor2.CBORTag(85, bytes(wire.BIG))),  # a bare typed array
        cbor2.dumps(cbor2.CBORTag(40, [[wire.BIG // 4 + 1], cbor2.CBORTag(85, bytes(wire.BIG))])),
        cbor2.dumps(cbor2.CBORTag(59001, ["bool", [wire.BIG], bytes([2]) * wire.BIG])),
        cbor2.dumps(cbor2.CBORTag(85, bytes(wire.BIG))) + b"\0",  # trailing byte
    ]
    rng = random.Random(5)
    cases = list(bodies)
    for _ in range(300):
        raw = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(min(len(raw), 48)) if rng.random() < 0.8 else rng.randrange(len(raw))
            raw[at] = rng.randrange(256)
        cases.append(bytes(raw[:rng.randrange(len(raw))]) if rng.random() < 0.2 else bytes(raw))
    for raw in cases:
        fast, slow = _outcome(raw), plain(raw)
        assert fast[0] == slow[0] and (fast[0] == "error" or _same(slow[1], fast[1]))
