"""Bulk connections: large ``/rpc`` bodies on a TLS connection of their own, without HTTP/2.

Why: over HTTP/2 a 256 MB tensor crosses hypercorn's (or httpcore's) read loop, h2's frame
buffer and flow control, and the ASGI queue a megabyte at a time, with two copies in h2
alone; that, not TLS, is most of a transfer's CPU. Raw TLS moves the same bytes several
times faster. So a request whose body is large (:data:`MIN_BODY` bytes or more), or whose
reply the caller knows to be large (a held reply it fetches, see :mod:`p2pgrid.calls`),
goes on a *bulk connection*: the caller opens a TLS connection to the peer's usual
address, pinned to the peer's certificate exactly as its HTTP/2 connections are
(:func:`p2pgrid.tls.client_context`), offering the ALPN protocol :data:`ALPN` instead of
``h2``; the reply comes back on that same connection, so a caller nobody can dial
downloads as well as one that can.

The exchange, one at a time per connection (a connection is reused for the next)::

    request:  u32 n, n bytes of headers ("name\\0value\\0" pairs, latin-1), then the body
              (exactly its ``content-length`` header's bytes)
    reply:    u16 status, u64 n, then n bytes of body

The headers are those of an HTTP ``POST /rpc``, signed as any request (:mod:`p2pgrid.auth`),
with the digest :data:`p2pgrid.auth.CHANNEL` in place of the body's SHA-256: the body
follows the signed headers on the caller's own TLS connection to the server's pinned key,
which nobody else can write on, so the connection binds it to them and neither side hashes
it (0.55-0.7 ms per MB each). On the server the request is handed to the peer's own ASGI
app as ``POST /rpc`` (:func:`serve_connection`), so the signature, the size limits, the
per-caller admission are checked by the one implementation HTTP/2 requests go through
(:class:`p2pgrid.server.App`), which accepts the digest ``CHANNEL`` only from a bulk
connection (:data:`CHANNEL_BOUND` in the request's scope); nothing else can be asked on a
bulk connection.

What a caller can make the peer hold is bounded as for HTTP/2: the connection is one
of the peer's (admitted by its :class:`p2pgrid.limits.ConnectionTable`, per address and in
all), headers are at most :data:`MAX_HEAD` bytes and must arrive within the read timeout,
a body that stops arriving for the read timeout ends the request, a reply the caller does
not take within the write timeout ends the connection, an idle connection closes after
the idle timeout, and the body's buffer is the App's (made when bytes arrive).

Both ends read and write through :class:`p2pgrid.transport.trio.SocketTLS`, a
non-blocking ``ssl.SSLSocket``: the caller decrypts the reply straight into its buffer,
the server the request body straight into the App's (``recv_into``); both buffers come
from :mod:`p2pgrid.buffers`, warm memory an earlier transfer gave back.
"""

from __future__ import annotations

import ssl
import struct

import trio

from . import buffers
from .transport.trio import SocketTLS

ALPN = "p2pgrid-bulk/1"
RECEIVE_INTO = "p2pgrid.receive_into"  # ASGI scope extension: the body read into a buffer
CHANNEL_BOUND = "p2pgrid.channel_bound"  # ASGI scope extension: the body is bound by TLS
MIN_BODY = 4 << 20     # request bodies from this size travel on a bulk connection
MAX_HEAD = 64 << 10    # bytes of headers a bulk request may carry
MAX_HEADERS = 64       # and how many
RECEIVE = 1 << 20      # bytes the server reads per step of a body
IDLE_KEPT = 2          # idle bulk connections a caller keeps per peer

_LEN = struct.Struct(">I")
_REPLY = struct.Struct(">HQ")


# ------------------------------------------------------------------ server side

def _parse_head(block: bytes) -> list[tuple[bytes, bytes]] | None:
    parts = block.split(b"\0")
    if len(parts) % 2 != 1 or parts[-1] != b"" or len(parts) // 2 > MAX_HEADERS:
        return None
    pairs = [(parts[i].lower(), parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
    if any(not k or b":" in k for k, _ in pairs):
        return None
    return pairs


def encode_head(headers: dict[str, str]) -> bytes:
    """The request header block for `headers` (length-prefixed)."""
    block = b"".join(k.encode("latin-1") + b"\0" + v.encode("latin-1") + b"\0"
                     for k, v in headers.items())
    return _LEN.pack(len(block)) + block


class _Closed(Exception):
    """The bulk connection cannot carry another request."""


async def _read_exactly(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = await stream.receive_some(n - got)
        if not data:
            raise _Closed()
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Exchange:
    """One request's ASGI receive and send over a bulk connection."""

    def __init__(self, stream, declared: int, write_timeout: float) -> None:
        self.stream, self.left, self.write_timeout = stream, declared, write_timeout
        self.body_done = False
        self.usable = True         # False: the connection must close after this exchange
        self.status = 0
        self.length: int | None = None
        self.sent: int | None = None  # body bytes sent, once the reply's head is out

    async def receive(self) -> dict:
        if not self.body_done:
            try:
                data = await self.stream.receive_some(min(self.left, RECEIVE)) if self.left else b""
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = None
            if self.left and not data:
                self.usable = False
                return {"type": "http.disconnect"}
            self.left -= len(data)
            self.body_done = self.left == 0
            return {"type": "http.request", "body": data, "more_body": not self.body_done}
        # The body is whole: what comes next can only be the caller going away (it sends
        # nothing more before the reply). The App waits here while it works, to cancel
        # work nobody waits for.
        try:
            await self.stream.receive_some(1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.usable = False
        return {"type": "http.disconnect"}

    async def receive_into(self, view) -> int:
        """Read body bytes straight into `view` (up to what is left of the body), waiting
        for at least one; 0 if the caller went away."""
        if self.body_done:
            return 0
        view = view[:self.left]
        try:
            n = await self.stream.receive_into(view)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            n = 0
        if not n:
            self.usable = False
            return 0
        self.left -= n
        self.body_done = self.left == 0
        return n

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            for k, v in message.get("headers", ()):
                if k.lower() == b"content-length":
                    self.length = int(v)
            if self.length is None:  # every /rpc reply has one; anything else is a bug here
                raise RuntimeError("a bulk reply needs a content-length")
            return
        if kind != "http.response.body":
            return
        body = message.get("body", b"")
        if self.sent is None:
            body = [_REPLY.pack(self.status, self.length), body]
            self.sent = 0
        else:
            body = [body]
        for part in body:
            if not len(part):
                continue
            with trio.move_on_after(self.write_timeout) as scope:
                await self.stream.send_all(part)
            if scope.cancelled_caught:  # the caller does not take its reply
                self.usable = False
                raise trio.BrokenResourceError("bulk reply not taken within the write timeout")
        self.sent += len(message.get("body", b""))

    @property
    def complete(self) -> bool:
        return self.usable and self.sent is not None and self.sent == self.length


async def serve_connection(stream, app, *, client, server, idle_timeout: float,
                           read_timeout: float, write_timeout: float,
                           busy=lambda busy: None) -> None:
    """Serve bulk requests on `stream` (its TLS handshake done, ALPN :data:`ALPN`) one
    after another, each as ``POST /rpc`` to the ASGI `app`, until the caller closes,
    idles for `idle_timeout`, breaks a rule, or a reply cannot be completed. `busy(b)`
    says whether a request is open (an idle connection may be evicted for a new one).
    `client` and `server`: the ASGI addresses."""
    try:
        while True:
            busy(False)
            first = b""   # stays empty if the connection idles past idle_timeout
            with trio.move_on_after(idle_timeout):
                first = await stream.receive_some(_LEN.size)
            if not first:  # closed, or idle too long
                return
            busy(True)
            with trio.move_on_after(read_timeout) as scope:
                (n,) = _LEN.unpack(first + await _read_exactly(stream, _LEN.size - len(first)))
                if n > MAX_HEAD:
                    return
                headers = _parse_head(await _read_exactly(stream, n))
            if scope.cancelled_caught or headers is None:
                return
            declared = dict(headers).get(b"content-length", b"")
            if not declared.isdigit():
                return
            ex = _Exchange(stream, int(declared), write_timeout)
            extensions = {CHANNEL_BOUND: True}
            if hasattr(stream, "receive_into"):   # SocketTLS (not trio's SSLStream: unpatched)
                extensions[RECEIVE_INTO] = ex.receive_into
            scope_ = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                      "http_version": "2", "method": "POST", "scheme": "https",
                      "path": "/rpc", "raw_path": b"/rpc", "query_string": b"",
                      "root_path": "", "headers": headers, "client": client,
                      "server": server, "extensions": extensions}
            await app(scope_, ex.receive, ex.send)
            if not ex.complete:
                return
            if ex.left:
                # answered before its body was read (a bad signature, too large): the
                # rest of the body is on its way and must be read past; it is bounded
                # by the declared length the App has already accepted or refused
                with trio.move_on_after(read_timeout) as scope:
                    while ex.left:
                        data = await stream.receive_some(min(ex.left, RECEIVE))
                        if not data:
                            return
                        ex.left -= len(data)
                if scope.cancelled_caught:
                    return
    except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
        return


# ------------------------------------------------------------------ caller side

class Pool:
    """A caller's bulk connections to one peer address, pinned by `context` (which
    offers :data:`ALPN`): one exchange at a time per connection, up to
    :data:`IDLE_KEPT` kept idle for the next."""

    def __init__(self, address: str, context: ssl.SSLContext) -> None:
        self.address, self.context = address, context
        self._idle: list[SocketTLS] = []

    async def _connect(self, timeout: float) -> SocketTLS:
        host, _, port = self.address.rpartition(":")
        with trio.fail_after(timeout):
            stream = await SocketTLS.connect(host.strip("[]"), int(port), self.context)
        if stream.selected_alpn_protocol() != ALPN:
            await stream.aclose()
            raise trio.BrokenResourceError("the peer does not serve bulk connections")
        return stream

    async def exchange(self, head: bytes, parts, *, timeout: float, connect_timeout: float):
        """Send one request (`head` from :func:`encode_head`, then the body `parts`) and
        return ``(status, reply)``: the reply's body as a view of a buffer of its own. Raises BrokenResourceError, OSError or
        TooSlowError when the connection fails. A stale idle connection (closed by the
        peer) is noticed before use, or when the request's first bytes cannot be
        written, and the request goes on a fresh one."""
        while self._idle:
            stream = self._idle.pop()
            if stream.is_readable():    # closed by the peer while idle
                await stream.aclose()
                continue
            try:
                return await self._exchange(stream, head, parts, timeout)
            except _NotSent:
                continue   # the request never left: try another
        stream = await self._connect(connect_timeout)
        try:
            return await self._exchange(stream, head, parts, timeout)
        except _NotSent as e:
            raise trio.BrokenResourceError("the bulk connection broke") from e.__cause__

    async def _exchange(self, stream: SocketTLS, head: bytes, parts, timeout: float):
        done = False
        try:
            with trio.fail_after(timeout):
                try:
                    await stream.send_all(head)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    raise _NotSent() from e
                for part in parts:
                    await stream.send_all(part)
                top = memoryview(bytearray(_REPLY.size))
                await _receive_exactly(stream, top)
                status, n = _REPLY.unpack(top)
                buf = buffers.take(n)  # warm memory a finished reply gave back, if any
                view = memoryview(buf)
                await _receive_exactly(stream, view)
            done = True
            return status, view
        finally:
            if done and len(self._idle) < IDLE_KEPT:
                self._idle.append(stream)
            else:
                await stream.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for stream in idle:
            await stream.aclose()


class _NotSent(Exception):
    pass


async def _receive_exactly(stream: SocketTLS, view: memoryview) -> None:
    at = 0
    while at < len(view):
        n = await stream.receive_into(view[at:])
        if not n:
            raise trio.BrokenResourceError("the peer closed the bulk connection mid-reply")
        at += n


def client_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context` (a pinned client context, see :func:`p2pgrid.tls.client_context`) made to
    offer :data:`ALPN` instead of h2."""
    context.set_alpn_protocols([ALPN])
    return context

