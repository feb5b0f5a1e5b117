"""Push streams: one-way messages on a long-lived HTTP/2 stream (p2pgrid.push)."""

import time

import httpx
import pytest
import torch
import trio
from hypothesis import given, settings, strategies as st

import p2pgrid
from p2pgrid import push, tls, wire
from p2pgrid.auth import sign_request
from p2pgrid.errors import MalformedMessage, PayloadTooLarge
from p2pgrid.identity import Identity
from p2pgrid.router import Router
from p2pgrid.testing import open_network
from p2pgrid.wire import dataclass, message


@message("test.note")
@dataclass(frozen=True)
class Note:
    n: int
    x: torch.Tensor


notes = Router()


@notes.on(Note)
async def _note(peer, caller, msg: Note):
    peer.extensions.setdefault("notes", []).append((caller.name, msg.n, msg.x))


# ------------------------------------------------------------------ framing (sans-IO)

@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=12), st.data())
def test_frames_survive_any_chunking(bodies, data):
    stream = b"".join(push.encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    reader, got, at = push.FrameReader(1 << 10), [], 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[at:cut])
        at = cut
    reader.finish()
    assert got == bodies


def test_frame_errors():
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 16"):
        push.FrameReader(16).feed(push.encode_frame(b"x" * 17))
    with pytest.raises(MalformedMessage, match="empty"):
        push.FrameReader(16).feed(b"\0\0\0\0")
    r = push.FrameReader(16)
    assert r.feed(push.encode_frame(b"abc")[:5]) == []
    with pytest.raises(MalformedMessage, match="inside a frame"):
        r.finish()


# ------------------------------------------------------------------ over the network

async def _wait_notes(peer, n, timeout=10):
    with trio.fail_after(timeout):
        while len(peer.extensions.get("notes", [])) < n:
            await trio.sleep(0.01)
    return peer.extensions["notes"]


@pytest.mark.parametrize("insecure", [False, True])
async def test_pushes_arrive_in_order_and_intact(tmp_path, insecure):
    async with open_network(["a", "b"], tmp_path, routers=[notes], insecure=insecure) as grid:
        a = grid["a"]
        sent = [torch.randn(int(n) % 50 + 1) for n in range(200)]
        sent[77] = torch.randn(1 << 19)  # 2 MB: many DATA frames
        for n, x in enumerate(sent):
            await a.push("b", Note(n, x))
        got = await _wait_notes(grid["b"], 200)
        assert [n for _, n, _ in got] == list(range(200))
        assert all(c == "a" and torch.equal(x, sent[n]) for c, n, x in got)
        assert len(a.pushers._streams) == 1          # all on one stream
        await a.push("a", Note(-1, torch.zeros(1)))  # to itself: dispatched in place
        assert a.extensions["notes"][-1][1] == -1


async def test_idle_streams_close_and_reopen(tmp_path):
    async with open_network(["a", "b"], tmp_path, routers=[notes]) as grid:
        a = grid["a"]
        a.pushers.idle = 0.2
        await a.push("b", Note(0, torch.zeros(1)))
        await _wait_notes(grid["b"], 1)
        with trio.fail_after(5):
            while a.pushers._streams:                # closed cleanly after 0.2 s idle
                await trio.sleep(0.05)
        broke = []
        grid["b"].push_listeners.append(lambda name, why: broke.append(name))
        await a.push("b", Note(1, torch.zeros(1)))
        assert [n for _, n, _ in await _wait_notes(grid["b"], 2)] == [0, 1]
        assert broke == []                           # an idle close is not a break


async def test_a_link_carries_messages_both_ways_and_closes_cleanly(tmp_path):
    # b's messages to a ride the way back of the link a opened: b dials nothing
    async with open_network(["a", "b"], tmp_path, routers=[notes]) as grid:
        a, b = grid["a"], grid["b"]
        broke = []
        for p in (a, b):
            p.push_listeners.append(lambda name, why, p=p: broke.append((p.name, name, why)))
        await a.push("b", Note(0, torch.zeros(1)))
        await _wait_notes(b, 1)
        assert b.links.has(a.key_id)
        for n in range(1, 4):
            await b.push("a", Note(n, torch.full((2,), float(n))))
        got = await _wait_notes(a, 3)
        assert [(who, n) for who, n, _ in got] == [("b", 1), ("b", 2), ("b", 3)]
        assert not b.pushers._streams                # nothing dialled from b
        a.pushers.idle = 0.3
        await a.push("b", Note(4, torch.zeros(1)))   # its next wait is a short one
        with trio.fail_after(10):                    # idle both ways: the link closes
            while a.pushers._streams or b.links.has(a.key_id):
                await trio.sleep(0.05)
        assert broke == []                           # cleanly, on both sides


async def test_a_link_kept_open_by_its_way_back_is_not_cut_for_silence(tmp_path, monkeypatch):
    # a opened a link to b once; b then sends to a on its way back for longer than the
    # receiver waits for a silent push body, and a has nothing to send. The link stays open
    # (traffic comes back on it), so its body must not look dead to b.
    monkeypatch.setattr(push, "IDLE", 1.0)
    monkeypatch.setattr(push, "GRACE", 1.0)   # b waits 2 s for a silent body
    cfgs = [p2pgrid.PeerConfig(name=n, data_dir=tmp_path / n, read_timeout=1.0) for n in "ab"]
    async with open_network(cfgs, tmp_path, routers=[notes]) as grid:
        a, b = grid["a"], grid["b"]
        broke = []
        for p in (a, b):
            p.push_listeners.append(lambda name, why, p=p: broke.append((p.name, name, why)))
        await a.push("b", Note(0, torch.zeros(1)))
        await _wait_notes(b, 1)
        await b.push("a", Note(0, torch.zeros(1)))   # on a's link, way back
        await _wait_notes(a, 1)
        a.pushers.idle = 1.0
        await a.push("b", Note(1, torch.zeros(1)))   # a's next wait is a short one
        for n in range(1, 51):                       # 5 s of traffic back, well over 2 s
            await b.push("a", Note(n, torch.zeros(1)))
            await trio.sleep(0.1)
        assert not b.pushers._streams                # all of it on a's link, way back
        assert len(await _wait_notes(a, 51)) == 51
        assert broke == []


async def test_a_stopped_peer_is_reported_to_listeners(tmp_path):
    async with open_network(["a", "b"], tmp_path, routers=[notes]) as grid:
        broke = []
        grid["a"].push_listeners.append(lambda name, why: broke.append((name, why)))
        await grid["b"].push("a", Note(0, torch.zeros(1)))   # a stream from b to a
        await _wait_notes(grid["a"], 1)
        await grid.stop("b")
        with trio.fail_after(5):
            while not broke:
                await trio.sleep(0.02)
        assert broke[0][0] == "b" and "cut off" in broke[0][1]


class _RawPush:
    def __init__(self, peer, identity=None, name="mallory"):
        self.peer, self.identity, self.name = peer, identity or Identity.generate(), name
        self.client = httpx.AsyncClient(http2=True, http1=False, verify=tls.client_context(peer.cert),
                                        base_url=f"https://{peer.address}")

    async def post(self, body: bytes, *, signed=True, now=None):
        headers = {"content-type": "application/cbor"}
        if signed:
            headers.update(sign_request(self.identity, self.name, self.peer.key_id, "POST",
                                        push.PATH, digest=push.STREAM_DIGEST,
                                        now=time.time() if now is None else now))
        r = await self.client.post(push.PATH, content=body, headers=headers)
        return r.status_code, (wire.loads(r.content) if r.content else None)


async def test_a_stream_back_whose_caller_goes_is_ended_at_once(tmp_path):
    """The server stops a way back (a pull stream) as soon as its caller's connection
    goes, from hypercorn's disconnect (transport.hypercorn.Disconnect), not from a
    watcher task; the peer goes on serving."""
    async with open_network(["a", "b"], tmp_path, routers=[notes]) as grid:
        b = grid["b"]
        broke = []
        b.push_listeners.append(lambda name, why: broke.append((name, why)))
        raw = _RawPush(b)
        headers = sign_request(raw.identity, raw.name, b.key_id, "POST", push.PULL_PATH,
                               digest=push.PULL_DIGEST, now=time.time())
        headers[push.LINK_HEADER] = "link-1"
        async with raw.client.stream("POST", push.PULL_PATH, headers=headers) as r:
            assert r.status_code == 200          # the way back is open, waiting for frames
        await raw.client.aclose()                # the caller goes
        with trio.fail_after(5):
            while not broke:
                await trio.sleep(0.02)
        assert broke == [("mallory", "its stream back was cut off")]
        assert await grid.net("a").peer("b").ping() < 5


@pytest.mark.parametrize("case, status, code", [
    ("unsigned", 401, "unauthenticated"),
    ("stale", 401, "replay"),
    ("garbage", 400, "malformed_message"),
    ("cut", 400, "malformed_message"),
    ("huge-frame", 413, "payload_too_large"),
    ("unknown-type", 400, None),
])
async def test_bad_push_streams_get_4xx_and_the_peer_keeps_serving(tmp_path, case, status, code):
    async with open_network(["a", "b"], tmp_path, routers=[notes]) as grid:
        b = grid["b"]
        raw = _RawPush(b)
        good = push.encode_frame(wire.encode(Note(1, torch.ones(2))))
        body = {"unsigned": good, "stale": good, "garbage": push.encode_frame(b"\xff\x00junk"),
                "cut": good + good[:7], "huge-frame": ((1 << 30) + 1).to_bytes(4, "big") + b"x",
                "unknown-type": push.encode_frame(wire.dumps({"_t": "no.such", "v": 1}))}[case]
        got, err = await raw.post(body, signed=case != "unsigned",
                                  now=time.time() - 3600 if case == "stale" else None)
        assert got == status and err["error"] == (code or err["error"]) and 400 <= got < 500, err
        if case == "cut":       # the whole frame before the cut was delivered
            assert [n for _, n, _ in await _wait_notes(b, 1)] == [1]
        else:
            assert not b.extensions.get("notes")
        # the peer still answers requests and takes pushes
        assert await grid.net("a").peer("b").ping() < 5
        await grid["a"].push("b", Note(2, torch.ones(1)))
        assert (await _wait_notes(b, 1 + (case == "cut")))[-1][1] == 2


# ------------------------------------------------------------------ calls over pushes

stall = Router()


@message("test.stall")
@dataclass(frozen=True)
class Stall:
    seconds: float


@stall.on(Stall)
async def _stall(peer, caller, msg: Stall):
    await trio.sleep(msg.seconds)
    return Note(0, torch.zeros(1))


async def test_calls_answer_like_requests(tmp_path):
    from p2pgrid.errors import NotFound
    from p2pgrid.messages import GetObject, Ping, Pong

    async with open_network(["a", "b"], tmp_path, routers=[notes, stall]) as grid:
        a = grid["a"]
        pong = await a.call("b", Ping())
        assert isinstance(pong, Pong) and pong.name == "b"
        with pytest.raises(NotFound):                           # typed errors come back typed
            await a.call("b", GetObject("no-such-object"))
        many = await _gather([lambda: a.call("b", Ping()) for _ in range(50)])
        assert all(isinstance(p, Pong) for p in many)          # concurrent calls, each answered
        with pytest.raises(p2pgrid.PeerUnavailable, match="within 0.2 s"):
            await a.call("b", Stall(2.0), timeout=0.2)
        # a call whose callee goes away fails at once, not at its timeout
        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            n.start_soon(grid.stop, "b")
            with pytest.raises(p2pgrid.PeerUnavailable):
                await a.call("b", Stall(30.0), timeout=30)
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("insecure", [False, True])
async def test_calls_are_verified_and_replays_refused(tmp_path, insecure):
    # Over TLS the stream vouches for an unsigned call; a signature, where one
    # comes, is still checked. Over h2c every call must be signed.
    from p2pgrid.auth import Caller
    from p2pgrid.calls import PATH, Call
    from p2pgrid.errors import ReplayDetected, Unauthenticated
    from p2pgrid.messages import Ping, Pong

    async with open_network(["a", "b"], tmp_path, insecure=insecure) as grid:
        a, b = grid["a"], grid["b"]
        body = wire.encode(Ping())
        import hashlib
        headers = sign_request(a.identity, "a", b.key_id, "POST", PATH,
                               digest=hashlib.sha256(body).hexdigest(), now=time.time())
        me = Caller("a", a.identity.public_bytes)
        b.calls.accept(me, Call(1, body, headers=headers))
        with pytest.raises(ReplayDetected):
            b.calls.accept(me, Call(2, body, headers=headers))      # the same signature again
        with pytest.raises(Unauthenticated):                         # a body it did not sign
            b.calls.accept(me, Call(3, body, headers=dict(headers, **{"x-p2p-nonce": "00"})))
        other = Identity.generate()
        h2 = sign_request(other, "mallory", b.key_id, "POST", PATH,
                          digest=hashlib.sha256(body).hexdigest(), now=time.time())
        with pytest.raises(Unauthenticated, match="opened its stream"):
            b.calls.accept(me, Call(4, body, headers=h2))           # signed by another key
        if insecure:
            with pytest.raises(Unauthenticated, match="not signed"):
                b.calls.accept(me, Call(5, body))
        else:
            b.calls.accept(me, Call(5, body))
        # and the real path works in either mode
        assert isinstance(await a.call("b", Ping()), Pong)


async def _gather(fns):
    out = [None] * len(fns)

    async def one(i, fn):
        out[i] = await fn()
    async with trio.open_nursery() as n:
        for i, fn in enumerate(fns):
            n.start_soon(one, i, fn)
    return out


async def test_a_first_call_notices_a_callee_that_stops(tmp_path):
    # no stream back from b yet: only the Nop writes of the waiting call can notice
    async with open_network(["a", "b"], tmp_path, routers=[stall]) as grid:
        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            async def stop_soon():
                await trio.sleep(0.5)
                await grid.stop("b")
            n.start_soon(stop_soon)
            with pytest.raises(p2pgrid.PeerUnavailable):
                await grid["a"].call("b", Stall(30.0), timeout=30)
        assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------ requests as calls

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_small_requests_ride_calls_and_large_replies_are_fetched(tmp_path):
    from p2pgrid.calls import INLINE, FetchReply
    from p2pgrid.errors import NotFound
    from p2pgrid.messages import GetObject, Ping, Pong, PutObject

    async with open_network(["a", "b", "c"], tmp_path) as grid:
        a, b = grid["a"], grid["b"]
        http = []
        real_request = a.transport.request

        async def counted(target, msg, **kw):
            if type(msg).__module__ != "p2pgrid.directory":   # gossip runs beside, unordered
                http.append(type(msg).__name__)
            return await real_request(target, msg, **kw)
        a.transport.request = counted
        assert isinstance(await a.request("b", Ping()), Pong)
        assert "Ping" not in http                                   # it went as a call
        assert isinstance(await a.request("b", Ping(), via="http"), Pong)
        assert "Ping" in http
        with pytest.raises(ValueError, match="via"):
            await a.request("b", Ping(), via="pigeon")
        # a reply of INLINE bytes or more is held by b and fetched with a request
        big = torch.randint(0, 256, (INLINE + 1,), dtype=torch.uint8)
        info = await a.request("b", PutObject(big))                # a large body: HTTP
        got = []
        real_hold = b.calls._hold
        b.calls._hold = lambda *args: got.append(real_hold(*args)) or got[-1]
        reply = await a.request("b", GetObject(info.meta["id"]))
        assert torch.equal(reply.value, big) and len(got) == 1
        assert http[-2:] == ["PutObject", "FetchReply"]
        assert not b.calls._held                                    # handed over once
        with pytest.raises(NotFound):                               # and only once
            await a.request("b", FetchReply(got[0].hex()), via="http")
        # a ticket is its caller's alone
        ticket = b.calls._hold(p2pgrid.auth.Caller("a", a.identity.public_bytes), reply)
        with pytest.raises(NotFound):
            await grid["c"].request("b", FetchReply(ticket.hex()), via="http")
        assert (await a.request("b", FetchReply(ticket.hex()), via="http")).value.numel() == big.numel()


async def test_a_call_over_the_callees_limit_is_refused_alone(tmp_path):
    from p2pgrid.config import PeerConfig
    from p2pgrid.messages import Ping, Pong, PutObject

    small = PeerConfig(name="b", data_dir=tmp_path / "b", max_body=4096)
    async with open_network(["a", small], tmp_path) as grid:
        a = grid["a"]
        assert isinstance(await a.request("b", Ping()), Pong)
        with pytest.raises(PayloadTooLarge):                        # 64 KB: a call, over 4 KB
            await a.request("b", PutObject(torch.zeros(1 << 16, dtype=torch.uint8)))
        assert isinstance(await a.request("b", Ping()), Pong)     # the same stream goes on


async def test_requests_go_through_at_once_after_a_restart_at_the_same_address(tmp_path):
    # The streams to a peer that went away stay open until their next write, which
    # the kernel accepts for a dead connection and loses; they are closed as soon as
    # the peer's own stream to us is cut, so neither side loses the next request.
    from p2pgrid.config import PeerConfig
    from p2pgrid.messages import Ping, Pong

    b_cfg = PeerConfig(name="b", data_dir=tmp_path / "b", port=_free_port())
    async with open_network(["a", b_cfg], tmp_path) as grid:
        assert isinstance(await grid["a"].request("b", Ping()), Pong)
        assert isinstance(await grid["b"].request("a", Ping()), Pong)
        old = grid["b"].address
        await grid.restart("b")
        assert grid["b"].address == old
        with trio.fail_after(10):
            assert isinstance(await grid["a"].request("b", Ping(), timeout=5), Pong)
            assert isinstance(await grid["b"].request("a", Ping(), timeout=5), Pong)


async def test_replies_held_for_a_caller_are_bounded(tmp_path):
    # A caller that never fetches its large replies cannot pile them up on the callee.
    from p2pgrid import calls
    from p2pgrid.auth import Caller
    from p2pgrid.messages import Value

    async with open_network(["a", "b"], tmp_path) as grid:
        b = grid["b"].calls
        me = Caller("a", grid["a"].identity.public_bytes)
        other = Caller("c", Identity.generate().public_bytes)
        theirs = b._hold(other, Value(torch.zeros(4)))
        tickets = [b._hold(me, Value(torch.zeros(4))) for _ in range(calls.HELD_MAX + 4)]
        held = [t for t in tickets if t.hex() in b._held]
        assert held == tickets[4:]                                  # the oldest went first
        assert theirs.hex() in b._held                              # another caller's stay
        real = calls.HELD_BYTES
        calls.HELD_BYTES = 100
        try:
            big = b._hold(me, Value(torch.zeros(20)))               # 80 bytes: older ones go
            mine = [n for kid, _, _, n in b._held.values() if kid == me.key_id]
            assert big.hex() in b._held and sum(mine) <= 100 and len(mine) == 2
            b._hold(me, Value(torch.zeros(20)))                     # and it goes for this one
            assert big.hex() not in b._held and theirs.hex() in b._held
        finally:
            calls.HELD_BYTES = real


async def test_a_refused_call_is_answered_at_once(tmp_path, monkeypatch):
    # more calls running than a caller may have: the extra one fails with RateLimited
    # straight away, not at its timeout
    from p2pgrid import calls
    monkeypatch.setattr(calls, "MAX_IN_FLIGHT", 2)
    async with open_network(["a", "b"], tmp_path, routers=[stall]) as grid:
        a = grid["a"]
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(lambda: a.call("b", Stall(1.0)))
            await trio.sleep(0.3)
            t0 = time.monotonic()
            with pytest.raises(p2pgrid.RateLimited):
                await a.call("b", Stall(0.0), timeout=20)
            assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ ways back (sans network)

async def _encode(msg):
    return msg


async def _serving(links, key_id):
    with trio.fail_after(5):
        while not links.has(key_id):
            await trio.sleep(0.01)


async def test_frames_written_by_concurrent_senders_stay_whole_and_in_order():
    from types import SimpleNamespace
    links, caller, out = push.BackLinks(_encode), SimpleNamespace(key_id="k", name="c"), []

    async def write(part):   # a slow writer: senders overlap
        await trio.sleep(0.01)
        out.append(bytes(part))

    big = [bytes([n]) * (1 << 17) for n in range(3)]   # each frame goes out in two parts
    async with trio.open_nursery() as n:
        n.start_soon(links.serve, caller, "L", write)
        await _serving(links, "k")
        for body in big:
            n.start_soon(links.send, "k", body)
            await trio.sleep(0)   # started in this order
        with trio.fail_after(5):
            while len(out) < 6:
                await trio.sleep(0.01)
        links.close("k", "L")
    reader = push.FrameReader(1 << 20)
    assert [f for part in out for f in reader.feed(part)] == big


async def test_a_frame_that_does_not_go_out_in_time_ends_its_way_back():
    # a caller that stops reading must not hold a replying task (or the link) for good
    from types import SimpleNamespace
    links = push.BackLinks(_encode, write_timeout=0.3)
    caller = SimpleNamespace(key_id="k", name="c")

    async def stuck(part):
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        n.start_soon(links.serve, caller, "L", stuck)
        await _serving(links, "k")
        with trio.fail_after(5):
            assert await links.send("k", b"reply") is False
            while links.has("k"):   # serve returned: the way back is gone
                await trio.sleep(0.01)
        assert await links.send("k", b"next") is False   # nothing open: never queued


# ------------------------------------------------------------------ the caller's address

@message("test.where")
@dataclass(frozen=True)
class Where:
    tag: str


where = Router()


@where.on(Where)
async def _where(peer, caller, msg: Where):
    peer.extensions.setdefault("where", {})[msg.tag] = caller.address
    return Note(0, torch.zeros(1))   # an answer, for the request and the call


async def test_every_caller_carries_the_address_of_its_connection(tmp_path):
    # What per-address limits key on: the client's IP as the callee's socket saw it, on
    # every way a message arrives (a request, a push stream, a call on one, a link's way
    # back), never anything the caller writes.
    async with open_network(["a", "b"], tmp_path, routers=[where]) as grid:
        a, b = grid["a"], grid["b"]
        a.transport.local_address = "127.0.0.2"      # a's connections leave from here now
        for pool in set(a.transport._pools.values()):
            a.transport._retire(None, pool)
        a.pushers.drop("b")
        await a.request("b", Where("request"), via="http")
        await a.request("b", Where("call"), via="call")
        rec = a.record("b")                          # on a's own push stream to b
        await a.pushers.push("b", a.target(rec), Where("push"), public_key=rec.public_key)
        with trio.fail_after(10):
            while "push" not in b.extensions.get("where", {}):
                await trio.sleep(0.02)
        # on the way back of a's link: b's address, as a's connection reached it
        assert await b.links.send(a.key_id, Where("way back"))
        with trio.fail_after(10):
            while "way back" not in a.extensions.get("where", {}):
                await trio.sleep(0.02)
        assert b.extensions["where"] == {"request": "127.0.0.2", "call": "127.0.0.2",
                                         "push": "127.0.0.2"}
        assert a.extensions["where"] == {"way back": "127.0.0.1"}
