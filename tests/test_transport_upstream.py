"""Upstream bugs and limitations that p2pgrid.transport works around, reproduced.

Each test runs the stock library (objects as released) and the peer's class side by
side over real loopback sockets. Where the stock side fails, its case is
``xfail(strict=True)``: the day upstream fixes the bug, that case passes, the strict
xfail turns red, and the workaround (see the module docstrings of p2pgrid.transport.*)
can go. These are the reports to send upstream.
"""

from __future__ import annotations

from functools import partial

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from hypercorn.config import Config

from p2pgrid.transport import hypercorn as peer_server
from p2pgrid.transport.httpcore import PeerHTTPTransport

STOCK = "stock"


def _config(**over) -> Config:
    config = Config()
    config.bind, config.accesslog, config.graceful_timeout = ["127.0.0.1:0"], None, 0.1
    for k, v in over.items():
        setattr(config, k, v)
    return config


async def _app(scope, receive, send):
    """Answers at once, without reading a request body: a 413 to a POST, 200 to a GET."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return
    status = 413 if scope["method"] == "POST" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _start(nursery, server: str, config: Config, crashed: list) -> tuple[str, int]:
    """Start hypercorn as released (`server` STOCK) or the peer's own classes (stock
    speed, safety fixes on); a server that dies is recorded in `crashed`."""
    async def run(task_status):
        try:
            if server == STOCK:
                from hypercorn.trio import serve
                await serve(_app, config, task_status=task_status, mode="asgi")
            else:
                await peer_server.serve(_app, config, tuned=False, task_status=task_status)
        except BaseException as e:  # the stock server dies of it; cancellation passes
            rest = e.split(trio.Cancelled)[1] if isinstance(e, BaseExceptionGroup) else e
            if rest is None or isinstance(rest, trio.Cancelled):
                raise
            crashed.append(rest)

    (url,) = await nursery.start(run)
    host, port = url.split("://")[1].rsplit(":", 1)
    return host, int(port)


class _Outcome:
    def __init__(self, value=None, error=None) -> None:
        self.value, self.error = value, error

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


async def _outside_the_nursery(coro) -> _Outcome:
    """Await `coro`, keeping its exception for later: raised inside the test's nursery it
    would come out wrapped in an ExceptionGroup."""
    try:
        return _Outcome(await coro)
    except Exception as e:
        return _Outcome(error=e)


class RawH2:
    """A minimal HTTP/2 client (h2c, prior knowledge) driving h2 by hand on a socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.ended: dict[int, int] = {}  # stream id -> status, once its response ended
        self.status: dict[int, int] = {}

    async def flush(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def response(self, sid: int) -> int | None:
        """The status of stream `sid`'s response, or None if the connection ends first."""
        while sid not in self.ended:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended[ev.stream_id] = self.status.get(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return None
            await self.flush()  # SETTINGS ACKs, WINDOW_UPDATEs
        return self.ended[sid]


# ------------------------------------------------------------------ hypercorn

@pytest.mark.parametrize("server", [
    pytest.param(STOCK, marks=pytest.mark.xfail(strict=True, reason=(
        "hypercorn 0.18.0: DataReceived for a stream already answered -> self.streams[id] "
        "KeyError, which ends the connection and the server (pgjones/hypercorn#329, "
        "PRs #312/#334/#365)"))),
    "peer"])
async def test_data_after_an_early_answer_leaves_the_connection_serving(server):
    # The client sends a POST's HEADERS, gets the server's early answer (a 413 before the
    # body, as the peer gives for a declared size over its limit), then sends the body it
    # had in flight, then a GET on the same connection.
    crashed: list = []
    async with trio.open_nursery() as nursery:
        host, port = await _start(nursery, server, _config(), crashed)
        client = RawH2(await trio.open_tcp_stream(host, port))
        with trio.fail_after(10):
            client.h2.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "http"),
                                       (":authority", "x"), ("content-length", "10")])
            await client.flush()
            assert await client.response(1) == 413
            client.h2.send_data(1, b"x" * 10, end_stream=True)  # the body still in flight
            await client.flush()
            client.h2.send_headers(3, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                       (":authority", "x")], end_stream=True)
            await client.flush()
            second = await client.response(3)
            third = await _get_on_a_new_connection(host, port)  # the server as a whole
        await client.stream.aclose()
        nursery.cancel_scope.cancel()
    assert not crashed, crashed
    assert second == 200 and third == 200


async def _get_on_a_new_connection(host: str, port: int) -> int | None:
    try:
        client = RawH2(await trio.open_tcp_stream(host, port))
    except OSError:  # nobody listens any more
        return None
    async with client.stream:
        client.h2.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                   (":authority", "x")], end_stream=True)
        try:
            await client.flush()
            return await client.response(1)
        except trio.BrokenResourceError:
            return None


# ------------------------------------------------------------------ httpcore

@pytest.mark.parametrize("client", [
    pytest.param(STOCK, marks=pytest.mark.xfail(strict=True, raises=httpx.RemoteProtocolError,
                                                reason=(
        "httpcore 1.0.9 reuses an idle HTTP/2 connection the server has closed (it checks "
        "readability for HTTP/1.1 only): the request fails after it was written "
        "(cf. encode/httpcore#679)"))),
    "peer"])
def test_a_request_after_the_server_closed_an_idle_connection_gets_through(client):
    # hypercorn closes connections idle for keep_alive_timeout, as any server may.
    # (trio.run here: an error raised in a trio-mode test arrives in an ExceptionGroup)
    assert trio.run(_after_idle, client).result().status_code == 200


async def _after_idle(client: str) -> _Outcome:
    transport = (httpx.AsyncHTTPTransport(http1=False, http2=True) if client == STOCK
                 else PeerHTTPTransport())
    crashed: list = []
    async with trio.open_nursery() as nursery:
        host, port = await _start(nursery, STOCK, _config(keep_alive_timeout=0.3), crashed)
        async with httpx.AsyncClient(transport=transport) as http:
            with trio.fail_after(10):
                assert (await http.get(f"http://{host}:{port}/")).status_code == 200
                await trio.sleep(1.0)  # idle past the keep-alive: the server closes it
                second = await _outside_the_nursery(http.get(f"http://{host}:{port}/"))
        nursery.cancel_scope.cancel()
    return second


@pytest.mark.parametrize("client", [
    pytest.param(STOCK, marks=pytest.mark.xfail(strict=True, raises=ValueError, reason=(
        "httpcore 1.0.9 under trio: a request cancelled while a fresh HTTP/2 connection "
        "takes its initial stream permits (each acquire a checkpoint) leaves the count "
        "wrong; the server's SETTINGS then release too many: ValueError"))),
    "peer"])
def test_a_request_cancelled_on_a_fresh_connection_leaves_it_usable(client):
    assert trio.run(_after_a_cancelled_first_request, client).result().status_code == 200


async def _after_a_cancelled_first_request(client: str) -> _Outcome:
    transport = (httpx.AsyncHTTPTransport(http1=False, http2=True) if client == STOCK
                 else PeerHTTPTransport())
    crashed: list = []

    def h2_connection():
        conns = transport._pool.connections
        return conns[0]._connection if conns else None

    async with trio.open_nursery() as nursery:
        host, port = await _start(nursery, STOCK, _config(), crashed)
        url = f"http://{host}:{port}/"
        async with httpx.AsyncClient(transport=transport) as http:
            with trio.fail_after(10):
                with trio.CancelScope() as first:
                    async def cancel_once_initialised():
                        # the first moment another task runs after the connection's
                        # preface went out (stock: inside its loop of 99 acquires)
                        while not getattr(h2_connection(), "_sent_connection_init", False):
                            await trio.sleep(0)
                        first.cancel()

                    nursery.start_soon(cancel_once_initialised)
                    await http.get(url)
                assert first.cancelled_caught
                second = await _outside_the_nursery(http.get(url))  # same connection
        nursery.cancel_scope.cancel()
    return second


@pytest.mark.parametrize("client", [
    # not strict: the stall needs the reader to take the WINDOW_UPDATE first, a race that
    # a loaded machine sometimes runs the other way
    pytest.param(STOCK, marks=pytest.mark.xfail(strict=False, raises=trio.TooSlowError, reason=(
        "httpcore 1.0.9: a body's sender waiting for flow control takes the read lock after "
        "another reader consumed its WINDOW_UPDATE, then reads on for data the server sends "
        "only after the body: both wait (pydantic/httpx2#1133, fix in PR #1163)"))),
    "peer"])
def test_a_streamed_body_beyond_the_window_while_another_response_is_read(client):
    # the shape of the peer's push stream (a long body) beside its pull stream (a
    # response that waits for what the push stream carries), on one connection
    assert trio.run(_body_beside_a_waiting_response, client) == (200, b"done")


async def _body_beside_a_waiting_response(client: str):
    uploaded = trio.Event()

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return
        if scope["method"] == "GET":  # the way back: answers once the upload is in
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if scope["path"] != "/warm":
                await uploaded.wait()
            await send({"type": "http.response.body", "body": b"done"})
            return
        await trio.sleep(0.5)  # a busy server: the client's body fills the window meanwhile
        while (await receive()).get("more_body"):
            pass
        uploaded.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    from hypercorn.trio import serve

    transport = (httpx.AsyncHTTPTransport(http1=False, http2=True) if client == STOCK
                 else PeerHTTPTransport(tuned=False))  # the fix alone, stock speed
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(partial(serve, app, _config(), mode="asgi"))
        async with httpx.AsyncClient(transport=transport, timeout=None) as http:
            await http.get(url + "/warm")  # one connection, SETTINGS exchanged
            got = {}

            async def read_back():
                async with http.stream("GET", url) as resp:
                    got["back"] = resp.status_code, await resp.aread()

            async def body():
                for _ in range(16):  # 16 x 16 KiB: beyond the 64 KiB window
                    yield b"x" * 16384

            with trio.move_on_after(5) as scope:  # done in well under a second, or never
                async with trio.open_nursery() as inner:
                    inner.start_soon(read_back)
                    await trio.sleep(0.2)  # the way back is being read
                    await http.post(url, content=body())
        nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        raise trio.TooSlowError("the upload and the response beside it both stalled")
    return got["back"]


# ------------------------------------------------------------------ trio

async def test_a_tls_read_returns_every_record_already_received(tmp_path):
    # Not a bug: trio's SSLStream.receive_some returns one TLS record (<= 16 KiB) per
    # call however much has arrived (python-trio/trio#196); DrainingTLS returns them all.
    import ssl

    from p2pgrid import tls
    from p2pgrid.identity import Identity
    from p2pgrid.transport.trio import DrainingTLS

    identity = Identity.generate()
    cert = tls.make_certificate(identity)
    certfile, keyfile = tls.server_context_files(identity, cert, tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certfile, keyfile)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def read_after_arrival(wrap) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            async def serve_once():
                stream = trio.SSLStream(await listeners[0].accept(), server_ctx, server_side=True)
                await stream.send_all(payload)
                await trio.sleep_forever()

            nursery.start_soon(serve_once)
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            client = trio.SSLStream(raw, tls.client_context(cert), server_hostname=None)
            await client.do_handshake()
            first = await client.receive_some(1)  # the server's data has started to arrive
            await trio.sleep(0.5)                 # ... and now all of it is in the socket
            got = len(first)
            stream = wrap(client)
            got = len(await stream.receive_some(len(payload)))
            nursery.cancel_scope.cancel()
        await listeners[0].aclose()
        return got

    stock = await read_after_arrival(lambda s: s)
    drained = await read_after_arrival(DrainingTLS)
    assert stock <= 16384 < drained
