"""The peer's HTTP/2 edge: an ASGI app served by hypercorn's trio worker.

Routes: ``POST /rpc`` carries one signed CBOR message and answers one;
``POST /push`` opens a stream of one-way messages (see :mod:`p2pgrid.push`) and
``POST /pull`` its way back, a reply body of messages for the caller;
``GET /`` is the peer's page; ``GET /health`` a liveness probe. Everything
protocol-specific lives in handlers; this module only moves bytes, checks
sizes and signatures, and maps typed errors to HTTP statuses.

What a caller can make the edge hold is bounded (:class:`p2pgrid.limits.EdgeLimits`):
connections in all and per address, streams per connection, requests open per
caller key (and for all unregistered keys together, and those of one client address
a share of that); a body that stops arriving
for ``read_timeout`` gets 408; idle connections close after ``idle_timeout``. A
body is hashed by a small shared pool of threads once its bytes arrive, never by
a thread of its own started for what its headers declare; and a request whose
client goes away has its handler cancelled.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import threading
import time
from typing import Awaitable, Callable

import numpy as np
import trio

from . import buffers, bulk, push, transport, wire
from .auth import CHANNEL, H_DIGEST, Caller, Verifier
from .client import OFFLOAD, maybe_thread
from .errors import BadRequest, P2PError, PayloadTooLarge, RequestTimeout, Unauthenticated
from .limits import ConnectionTable, EdgeLimits, Guest, InFlight
from .transport import DISCONNECT

log = logging.getLogger("p2pgrid.server")

CHUNK = transport.FRAME  # response body per ASGI message: one DATA frame each
HASH_THREADS = 4   # threads hashing large bodies, shared by every connection of the process

Dispatch = Callable[[Caller, object], Awaitable[object]]
Page = Callable[[dict, bytes], Awaitable[tuple[int, str, bytes]]]
Pull = Callable[[Caller, str, Callable[[bytes], Awaitable[None]]], Awaitable[None]]


async def handle_lifespan(receive, send) -> None:
    """ASGI lifespan: nothing to set up or tear down beyond what the peer owns."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class App:
    """ASGI application; `dispatch(caller, message)` returns the reply message."""

    def __init__(self, verifier: Verifier, authorize: Callable[[Caller], None],
                 dispatch: Dispatch, *, max_body: int, page: Page | None = None,
                 identity_card: bytes = b"", push_broken: Callable[[str, str], None] | None = None,
                 pull: Pull | None = None,
                 push_ended: Callable[[Caller, str], None] | None = None,
                 limits: EdgeLimits = EdgeLimits(),
                 registered: Callable[[Caller], bool] = lambda caller: False):
        self.push_broken = push_broken  # (caller name, why) when an inbound push stream breaks
        self.pull = pull                # writes what is queued for a caller on its way back
        self.push_ended = push_ended    # (caller, link id) when a push stream ends cleanly
        self.limits = limits
        # connections that ended in an unexpected error (logged at ERROR with the traceback)
        self.connection_failures = transport.FailureCount()
        self.registered = registered  # registered callers do not share the strangers' pool
        self.in_flight = InFlight(limits.requests_per_key, limits.requests_unregistered)
        self.verifier = verifier
        self.authorize = authorize
        self.dispatch = dispatch
        self.max_body = max_body
        self.page = page
        self.identity_card = identity_card  # CBOR {name, public_key}: first contact without TLS

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await handle_lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if path == "/rpc" and method == "POST":
                await self._rpc(scope, headers, receive, send)
            elif path == push.PATH and method == "POST":
                await self._push(scope, headers, receive, send)
            elif path == push.PULL_PATH and method == "POST" and self.pull is not None:
                await self._pull(scope, headers, receive, send)
            elif path == "/health" and method == "GET":
                await _respond(send, 200, "text/plain", b"ok\n")
            elif path == "/id" and method == "GET":
                await _respond(send, 200, "application/cbor", self.identity_card)
            elif self.page is not None and method in ("GET", "POST"):
                body = await _read_body(self._timed(receive), 1 << 20) \
                    if method == "POST" else b""
                status, ctype, content = await self.page(scope | {"headers_dict": headers}, body)
                await _respond(send, status, ctype, content)
            else:
                await _respond(send, 404, "text/plain", b"not found\n")
        except _ClientGone:
            pass
        except P2PError as e:  # a page's body timed out or was too large
            await _respond(send, e.status, "text/plain", f"{e.message}\n".encode())

    def _timed(self, receive, timeout: float | None = None):
        """`receive`, but a body that stops arriving for `timeout` (default read_timeout)
        raises RequestTimeout."""
        timeout = self.limits.read_timeout if timeout is None else timeout
        # hypercorn's `receive` is a trio memory channel's: a message already queued is
        # taken without arming a timer (a cancel scope per chunk of every request)
        channel = getattr(receive, "__self__", None)
        queued = channel.receive_nowait if isinstance(channel, trio.MemoryReceiveChannel) \
            else None

        async def timed():
            if queued is not None:
                try:
                    return queued()
                except trio.WouldBlock:
                    pass
            with trio.move_on_after(timeout):
                return await receive()
            raise RequestTimeout(f"no part of the request body arrived for {timeout:g} s")
        return timed

    def _timed_into(self, scope):
        """The bulk connection's ``receive_into(view)`` (:mod:`p2pgrid.bulk`: the body read
        straight into our buffer), under the read timeout as `_timed`; None over HTTP/2."""
        into = scope.get("extensions", {}).get(bulk.RECEIVE_INTO)
        if into is None:
            return None
        timeout = self.limits.read_timeout

        async def timed(view) -> int:
            with trio.move_on_after(timeout):
                return await into(view)
            raise RequestTimeout(f"no part of the request body arrived for {timeout:g} s")
        return timed

    def _verify(self, scope, path: str, headers, digest: str) -> Caller:
        """The signed caller, with the address of the connection it came on."""
        return self.verifier.verify("POST", path, headers, digest, now=time.time(),
                                    address=client_address(scope))

    def _admit(self, caller: Caller):
        """Count `caller`'s open request; a context manager (RateLimited over the limits)."""
        registered = self.registered(caller)
        guest = None if registered else Guest(caller.address, self.limits.guest_address_share)
        self.in_flight.enter(caller.public_key, registered=registered, guest=guest)
        return _Leave(self.in_flight, caller.public_key, registered, guest)

    async def _rpc(self, scope, headers, receive, send):
        try:
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                raise PayloadTooLarge(f"declared body of {declared} bytes exceeds the limit of "
                                      f"{self.max_body}")
            # Check the signature before reading a possibly huge body: the signed
            # digest is compared with the body's once it has arrived, unless the body
            # is bound to the signed headers by the bulk connection they came on
            digest = headers.get(H_DIGEST, "")
            bound = digest == CHANNEL
            if bound and not scope["extensions"].get(bulk.CHANNEL_BOUND):
                raise Unauthenticated(f"the digest {CHANNEL!r} is taken only on a bulk "
                                      f"connection; sign the body's SHA-256")
            caller = self._verify(scope, "/rpc", headers, digest)
            self.authorize(caller)
            with self._admit(caller):
                body, sha = await _read_hashed_body(self._timed(receive), self.max_body,
                                                    int(declared) if declared else None,
                                                    self._timed_into(scope), hashed=not bound)
                if not bound and sha.hexdigest() != digest:
                    raise Unauthenticated("body does not match its signed digest")
                # adopt: the body buffer is ours alone, so tensors may keep it instead of a copy
                msg = await maybe_thread(
                    len(body), lambda b: wire.decode(b, max_size=self.max_body, adopt=True), body)
                del body
                reply = await _while_connected(scope, receive,
                                               lambda: self.dispatch(caller, msg))
                if wire.is_owned(reply):   # no snapshot needed: its tensors are the reply's alone
                    out = wire.encode_parts(reply)
                else:
                    out = await maybe_thread(wire.payload_bytes(reply), wire.encode_buffer,
                                                  reply)
            await _respond(send, 200, "application/cbor", out)
        except P2PError as e:
            if e.status >= 500:
                log.warning("rpc failed: %s", e.code)
            await _respond(send, e.status, "application/cbor", wire.dumps(e.to_wire()))
        except _ClientGone:
            raise
        except Exception:
            log.exception("unexpected error in rpc handler")
            err = P2PError("internal error; see the peer's log")
            await _respond(send, 500, "application/cbor", wire.dumps(err.to_wire()))


    async def _push(self, scope, headers, receive, send):
        caller = None
        try:
            caller = self._verify(scope, push.PATH, headers, push.STREAM_DIGEST)
            self.authorize(caller)
            # a call's own body is held to max_body where it is decoded, so that one
            # call over it is refused alone, not with the stream and every call on it
            limit = max(self.max_body, push.MIN_FRAME)
            reader = push.FrameReader(limit)
            # a push stream idles up to push.IDLE between messages before its sender ends it
            timed = self._timed(receive, max(self.limits.read_timeout, push.IDLE + push.GRACE))
            with self._admit(caller):
                while True:
                    event = await timed()
                    if event["type"] == "http.disconnect":
                        raise _ClientGone()
                    for frame in reader.feed(event.get("body", b"")):
                        msg = wire.decode(frame, max_size=limit, adopt=True)
                        try:
                            await self.dispatch(caller, msg)
                        except P2PError as e:  # nobody to answer: the handler's state says it
                            log.debug("pushed %s from %s refused: %s", type(msg).__name__,
                                      caller.name, e.code)
                    if not event.get("more_body", False):
                        break
                reader.finish()
            if self.push_ended is not None:
                self.push_ended(caller, headers.get(push.LINK_HEADER, ""))
            await _respond(send, 200, "application/cbor", wire.dumps(None))
        except _ClientGone:
            if caller is not None and self.push_broken is not None:
                self.push_broken(caller.name, "its push stream was cut off")
            raise
        except P2PError as e:
            if caller is not None and self.push_broken is not None:
                self.push_broken(caller.name, f"its push stream was refused: {e.message}")
            await _respond(send, e.status, "application/cbor", wire.dumps(e.to_wire()))


    async def _pull(self, scope, headers, receive, send):
        """The way back of a link: a 200 at once, then frames for the caller as its body
        until the link's push stream ends (or the caller goes)."""
        try:
            caller = self._verify(scope, push.PULL_PATH, headers, push.PULL_DIGEST)
            self.authorize(caller)
            link = headers.get(push.LINK_HEADER, "")
            if not 0 < len(link) <= 64:
                raise BadRequest(f"a stream back needs a link id ({push.LINK_HEADER}) of 1 to 64 "
                                 f"characters")
        except P2PError as e:
            await _respond(send, e.status, "application/cbor", wire.dumps(e.to_wire()))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/cbor")]})

        async def write(chunk) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        gone = scope["extensions"][DISCONNECT]
        with trio.CancelScope() as cancel:
            gone.watch(cancel)
            try:
                await self.pull(caller, link, write)
            finally:
                gone.unwatch(cancel)
        if cancel.cancelled_caught:
            if self.push_broken is not None:
                self.push_broken(caller.name, "its stream back was cut off")
            raise _ClientGone()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _ClientGone(Exception):
    pass


def client_address(scope) -> str:
    """The client's IP address as the server's socket saw it (hypercorn's ASGI
    ``client``), never from a header; "" where the server gives none."""
    client = scope.get("client")
    return str(client[0]) if client else ""


class _Leave:
    __slots__ = ("_flight", "_key", "_registered", "_guest")

    def __init__(self, flight: InFlight, key: bytes, registered: bool, guest: Guest | None):
        self._flight, self._key, self._registered, self._guest = flight, key, registered, guest

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._flight.leave(self._key, registered=self._registered, guest=self._guest)


async def _while_connected(scope, receive, work: Callable[[], Awaitable]):
    """``await work()``, cancelled if the client disconnects first: work that nobody
    waits for stops (a remote program's worker is killed, say). The peer's HTTP/2 server
    cancels it as it queues the disconnect (:class:`p2pgrid.transport.hypercorn.Disconnect`),
    with no task per request; elsewhere (a bulk connection, :mod:`p2pgrid.bulk`) a task
    waits for the disconnect on `receive`. Either way an error reaches the caller as
    itself, not in an ExceptionGroup."""
    gone = scope["extensions"].get(DISCONNECT)
    with trio.CancelScope() as cancel:
        if gone is not None:
            gone.watch(cancel)
            try:
                return await work()
            finally:
                gone.unwatch(cancel)
        outcome = None
        async with trio.open_nursery() as nursery:
            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass   # the body was read whole: nothing but a disconnect comes now
                cancel.cancel()
            nursery.start_soon(watch)
            try:   # kept, and re-raised outside the nursery: no ExceptionGroup
                outcome = (True, await work())
            except Exception as e:  # noqa: BLE001 - re-raised below
                outcome = (False, e)
            finally:
                nursery.cancel_scope.cancel()
        if outcome is not None:
            ok, value = outcome
            if not ok:
                raise value
            return value
    raise _ClientGone()


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        if chunk:
            chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_hashed_body(receive, limit: int, declared: int | None, receive_into=None,
                            *, hashed: bool = True):
    """The body and its running SHA-256, hashed chunk by chunk as it arrives (with
    `hashed` false: the body and None).

    Hashing while the rest is still in flight overlaps with the sender's work,
    where hashing afterwards (0.7-1.5 ms per MB on a small VM) would add to the
    round trip.
    A large body of declared size is copied into one buffer of that size (see
    ``wire.encode_buffer`` for why numpy) instead of joined from a list; the
    buffer is made when the first bytes arrive, not for what headers alone declare.
    With `receive_into` (a bulk connection's), the rest of the body is read straight into
    that buffer, hashed a megabyte or more at a time.
    """
    sha = hashlib.sha256() if hashed else None
    if declared is None or declared <= OFFLOAD:
        body = await _read_body(receive, limit)
        if hashed:
            sha.update(body)
        return body, sha
    buf = view = None
    at = 0
    hasher = _Hasher(sha) if hashed else _NoHash()
    try:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = msg.get("body", b"")
            if at + len(chunk) > min(declared, limit):
                raise PayloadTooLarge(f"body exceeds its declared length of {declared} bytes")
            if chunk:
                if buf is None:
                    buf = buffers.take(declared)
                    view = memoryview(buf)
                buf[at:at + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                hasher.add(view[at:at + len(chunk)])
                at += len(chunk)
            if not msg.get("more_body", False):
                break
            if receive_into is not None and buf is not None:
                at = await _receive_rest(receive_into, view, at, min(declared, limit), hasher)
                break
    finally:
        hasher.close()
    await hasher.wait()
    return (view[:at] if view is not None else b""), sha


async def _receive_rest(receive_into, view, at: int, end: int, hasher) -> int:
    """Read the body's bytes from `at` to `end` into `view` with `receive_into`; each
    megabyte (or the last piece) goes to `hasher` once it is in."""
    hashed = at
    while at < end:
        n = await receive_into(view[at:end])
        if not n:
            raise _ClientGone()
        at += n
        if at - hashed >= HASH_PIECE or at == end:
            hasher.add(view[hashed:at])
            hashed = at
    return at


HASH_PIECE = 1 << 20  # bytes handed to the hashing thread at once (each hand-over costs)


class _Hasher:
    """Hashes a body's chunks in order on a small pool of threads shared by every body,
    behind the loop that receives them.

    SHA-256 costs about 0.55 ms per MB here, a fifth of what the receiving loop spends
    on an upload; hashlib lets go of the GIL while it hashes, so in a thread it runs
    beside the loop's next reads instead of between them. A body has at most one
    job on the pool at a time (its chunks queue behind it), and none until its
    first chunk arrives: a stream that only declares a large body costs no thread.
    """

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self, sha):
        self._sha = sha
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._running = self._closed = False
        self._done = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    @classmethod
    def _executor(cls) -> concurrent.futures.ThreadPoolExecutor:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = concurrent.futures.ThreadPoolExecutor(
                    HASH_THREADS, thread_name_prefix="p2pgrid-hash")
            return cls._pool

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    finished = self._closed
                    break
                chunk = self._queue.popleft()
            self._sha.update(chunk)
        if finished:
            self._token.run_sync_soon(self._done.set)

    def _kick(self) -> None:  # lock held
        if not self._running:
            self._running = True
            self._executor().submit(self._drain)

    def add(self, chunk) -> None:
        with self._lock:
            self._queue.append(chunk)
            self._kick()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._running:
                return  # the running job sees it when the queue is empty
        self._done.set()

    async def wait(self) -> None:
        """Until every chunk added before close() is hashed."""
        await self._done.wait()


class _NoHash:
    """A body that is not hashed (bound by its connection: :data:`p2pgrid.auth.CHANNEL`)."""

    def add(self, chunk) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait(self) -> None:
        pass


async def _respond(send, status: int, ctype: str, body) -> None:
    """Send a reply: one buffer, or a list of buffers sent one after another."""
    parts = [memoryview(p).cast("B") for p in body] if isinstance(body, list) \
        else [memoryview(body).cast("B")]
    total = sum(len(p) for p in parts)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype.encode()),
                            (b"content-length", str(total).encode())]})
    sent = 0
    for view in parts:
        for start in range(0, len(view), CHUNK):
            chunk = view[start:start + CHUNK]
            sent += len(chunk)
            # a view: hypercorn copies each chunk into bytes itself
            await send({"type": "http.response.body", "body": chunk, "more_body": sent < total})
    if total == 0:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def serve(app, *, host: str, port: int, certfile: str | None, keyfile: str | None,
                limits: EdgeLimits | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` until cancelled; reports the bound "host:port" via task_status.
    `limits` (default: the App's, else EdgeLimits()) bound connections and timeouts."""
    from hypercorn.config import Config

    from .transport import hypercorn as peer_server

    tuned = transport.tuned()
    transport.require_safety()
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.h2_max_inbound_frame_size = transport.FRAME
    limits = limits or getattr(app, "limits", None) or EdgeLimits()
    config.h2_max_concurrent_streams = limits.max_streams
    config.keep_alive_timeout = limits.idle_timeout   # TunedTCPServer's timer: no open stream
    config.keep_alive_max_requests = 1 << 30
    config.read_timeout = None   # per read, it would cut long replies' waits: see App._timed
    config.ssl_handshake_timeout = limits.handshake_timeout
    config.p2p_write_timeout = limits.write_timeout
    config.p2p_read_timeout = limits.read_timeout    # a bulk connection's headers and body
    config.p2p_connections = ConnectionTable(*limits.connections())
    failures = getattr(app, "connection_failures", None)
    config.p2p_failures = failures if failures is not None else transport.FailureCount()
    config.max_app_queue_size = 64
    config.accesslog = None
    config.include_date_header = False    # per-response clock formatting and header bytes
    config.include_server_header = False  # for nobody: peers know what they talk to
    config.errorlog = logging.getLogger("p2pgrid.hypercorn")
    if certfile:
        config.certfile, config.keyfile = certfile, keyfile
        config.alpn_protocols = ["h2", bulk.ALPN]  # bulk: large bodies (p2pgrid.bulk)
    await peer_server.serve(app, config, tuned=tuned, task_status=task_status)
