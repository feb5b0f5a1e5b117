"""httpcore (and httpx's transport): the peer's client connections.

Fixes:

- **A pooled HTTP/2 connection the server closed is used anyway.** httpcore 1.0.9 checks
  an idle HTTP/1.1 connection for readability (a server's FIN) before reusing it, but
  not an HTTP/2 one: the next request is written to a dead socket and fails with
  ``RemoteProtocolError``/``ReadError`` after it was (perhaps) delivered, so the caller
  cannot know whether to retry. Related upstream: encode/httpcore#679 (open: a
  connection whose h2 state is CLOSED is still "available") and #159. Here a connection
  that has carried a stream, has none open, and is readable is closed and
  ``ConnectionNotAvailable`` raised before anything is written, so the pool retries on a
  fresh connection. Reproduction: tests/test_transport_upstream.py. Remove when
  httpcore checks HTTP/2 connections as it does HTTP/1.1 ones.
- **"semaphore released too many times" after a cancelled request.** A fresh HTTP/2
  connection takes 99 of its 100 stream permits one by one (one stream until the
  server's SETTINGS say more) and gives them back when SETTINGS arrive; trio's
  ``Semaphore.acquire`` is a checkpoint even when a permit is free, so a request
  cancelled during those 99 (a gossip exchange timing out) left the count wrong, and a
  later request failed with ``ValueError``. Upstream has neighbours, not this one:
  encode/httpcore#1022 and #943 (stream counts drifting on cancellation), #1061.
  :class:`FreePermitSemaphore` takes a free permit without a checkpoint. Remove when
  httpcore acquires the initial permits without checkpoints (or with a shield).

- **A body's sender waits for a WINDOW_UPDATE another task already read.** When a
  request body has used its flow-control window, httpcore 1.0.9's
  ``_wait_for_outgoing_flow`` calls ``_receive_events``, which takes the read lock
  and then reads the socket unconditionally. If another task (reading a response on
  the same connection) held the lock and consumed the WINDOW_UPDATE meanwhile, the
  sender reads on for data the server will only send after the body: both wait until
  a timeout. Our push and pull streams share a connection, so with stock httpcore a
  call on a push stream went unanswered for 120 s (the old xfail of
  tests/test_patchguard.py). :class:`SafeHTTP2Connection` checks the window again
  once it holds the lock. Upstream: reported against httpcore's successor fork as
  pydantic/httpx2#1133 (fix proposed in pydantic/httpx2#1163, the same re-check); no
  issue in encode/httpcore. Reproduction:
  tests/test_transport_upstream.py. Remove when httpcore re-checks the window.

The fixes are in :class:`SafeHTTP2Connection`, used even with ``P2PGRID_UNPATCHED=1``
(stock httpcore is not correct for our long-lived streams); the speed changes in
:class:`TunedHTTP2Connection`.

Speed (not bugs; httpcore's general-purpose defaults): our window and frame settings
(:func:`p2pgrid.transport.h2.settings`; httpcore also sends a 16 MiB WINDOW_UPDATE per
stream, which our INITIAL_WINDOW_SIZE makes redundant); HEADERS wait for the first DATA
frame and an in-memory body's last DATA frame carries END_STREAM (httpcore writes
after HEADERS, after every DATA frame and for END_STREAM: three writes and TLS records
per small request); no write lock taken when there is nothing to write (httpcore
takes it after every event read); DATA frames are views of the body (httpcore slices ``data[n:]`` per
frame, copying the rest of the body each time); a whole 1 MB frame per read (httpcore
reads 64 KiB); TLS streams from :mod:`p2pgrid.transport.trio`; plain header literals.

Scope: nothing global. :class:`PeerHTTPTransport` is an ``httpx.AsyncHTTPTransport``
whose pool (:class:`PeerConnectionPool`) builds :class:`PeerHTTPConnection`, which
speaks HTTP/2 only, over :class:`TunedHTTP2Connection` and :class:`PeerTrioBackend`.
Only :class:`p2pgrid.client.Transport` creates them.
"""

from __future__ import annotations

import contextlib

import h2.events
import httpx
import trio
from httpcore import AsyncConnectionPool
from httpcore._async import http2 as ch2
from httpcore._async.connection import AsyncHTTPConnection
from httpcore._backends.trio import TrioBackend, TrioStream
from httpcore._synchronization import AsyncSemaphore

from . import FRAME, WINDOW
from .h2 import LeanH2Connection, settings
from .hpack import plain_headers
from .trio import BigReads, DrainingTLS, socket_of


class FreePermitSemaphore(AsyncSemaphore):
    """httpcore's semaphore, taking a free permit under trio without a checkpoint."""

    async def acquire(self) -> None:
        if not self._backend:
            self.setup()
        if self._backend == "trio":
            try:
                return self._trio_semaphore.acquire_nowait()
            except trio.WouldBlock:
                pass
        await super().acquire()


_STREAM_EVENTS = (h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded,
                  h2.events.StreamReset)


class SafeHTTP2Connection(ch2.AsyncHTTP2Connection):
    """httpcore's HTTP/2 connection with the fixes of this module, at stock speed."""

    # httpcore assigns a fresh AsyncSemaphore to this attribute once per connection
    @property
    def _max_streams_semaphore(self):
        return self._p2p_semaphore

    @_max_streams_semaphore.setter
    def _max_streams_semaphore(self, semaphore) -> None:
        self._p2p_semaphore = FreePermitSemaphore(semaphore._bound)

    def _flow(self, stream_id: int) -> int:
        return min(self._h2_state.local_flow_control_window(stream_id),
                   self._h2_state.max_outbound_frame_size)

    async def _wait_for_outgoing_flow(self, request, stream_id) -> int:
        while (flow := self._flow(stream_id)) <= 0:
            await self._receive_events(request, flow_for=stream_id)
        return flow

    async def _receive_events(self, request, stream_id=None, *, flow_for=None) -> None:
        # As httpcore's, except that a sender waiting for flow control (`flow_for`)
        # checks its window again once it holds the read lock: another task's read may
        # have brought the WINDOW_UPDATE meanwhile, and reading on would wait for data
        # the server only sends after our body (see the module docstring).
        async with self._read_lock:
            ended = self._connection_terminated
            if ended is not None:
                if stream_id and ended.last_stream_id and stream_id > ended.last_stream_id:
                    self._request_count -= 1
                    raise ch2.ConnectionNotAvailable()
                raise ch2.RemoteProtocolError(ended)
            if flow_for is not None:
                must_read = self._flow(flow_for) <= 0
            else:
                must_read = stream_id is None or not self._events.get(stream_id)
            if must_read:
                for event in await self._read_incoming_data(request):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        await self._receive_remote_settings_change(event)
                    elif isinstance(event, _STREAM_EVENTS):
                        if event.stream_id in self._events:
                            self._events[event.stream_id].append(event)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self._connection_terminated = event
        await self._write_outgoing_data(request)

    def _readable_or_closed(self) -> bool:
        try:
            return bool(self._network_stream.get_extra_info("is_readable"))
        except (OSError, ValueError):  # the socket is closed already
            return True

    async def _refuse_if_closed(self, stream_id: int) -> None:
        """Raise ConnectionNotAvailable, writing nothing, if the server closed this idle
        connection (see the module docstring)."""
        # Only a connection that has carried a stream before qualifies: a fresh one is
        # readable too (the server's SETTINGS), and _request_count also counts requests
        # still waiting for their first stream id, so it cannot tell.
        opened = self._h2_state.highest_outbound_stream_id or 0
        if 0 < opened < stream_id and len(self._events) == 1 and self._readable_or_closed():
            # idle after a reply yet readable: the server has almost certainly closed the
            # connection (anything else it sends arrives before the reply that ended the
            # last stream); let the pool retry on a new one, nothing was sent
            self._connection_error = True
            self._state = ch2.HTTPConnectionState.CLOSED
            with contextlib.suppress(Exception):
                await self._network_stream.aclose()
            raise ch2.ConnectionNotAvailable()

    async def _send_request_headers(self, request, stream_id) -> None:
        await self._refuse_if_closed(stream_id)
        await super()._send_request_headers(request, stream_id)


class TunedHTTP2Connection(SafeHTTP2Connection):
    """SafeHTTP2Connection with the speed changes of this module."""

    READ_NUM_BYTES = FRAME + 9  # a whole 1 MB frame per read (httpcore: 64 KiB)

    def __init__(self, origin, stream, keepalive_expiry=None) -> None:
        super().__init__(origin=origin, stream=stream, keepalive_expiry=keepalive_expiry)
        self._h2_state = LeanH2Connection(config=self.CONFIG)

    async def _send_connection_init(self, request) -> None:
        state = self._h2_state
        state.local_settings = settings(client=True, max_streams=100, max_header_list=65536,
                                        ENABLE_PUSH=0)
        state.max_inbound_frame_size = FRAME
        plain_headers(state)
        state.initiate_connection()
        state.increment_flow_control_window(WINDOW)
        await self._write_outgoing_data(request)

    async def _write_outgoing_data(self, request) -> None:
        # httpcore calls this after every event it reads, mostly with nothing to send;
        # each call still takes the write lock (a scheduler trip) for an empty write
        if not self._h2_state._data_to_send and self._write_exception is None:
            return
        await super()._write_outgoing_data(request)

    async def _send_request_headers(self, request, stream_id) -> None:
        await self._refuse_if_closed(stream_id)
        end_stream = not ch2.has_body_headers(request)
        authority = [v for k, v in request.headers if k.lower() == b"host"][0]
        headers = [(b":method", request.method), (b":authority", authority),
                   (b":scheme", request.url.scheme), (b":path", request.url.target)] + [
            (k.lower(), v) for k, v in request.headers
            if k.lower() not in (b"host", b"transfer-encoding")]
        self._h2_state.send_headers(stream_id, headers, end_stream=end_stream)
        if end_stream:
            await self._write_outgoing_data(request)
        # else HEADERS leave with the first DATA frame

    async def _send_request_body(self, request, stream_id) -> None:
        if not ch2.has_body_headers(request):
            return
        if isinstance(request.stream, httpx.ByteStream):
            # one chunk, all in memory: END_STREAM rides on its last DATA frame
            async for data in request.stream:
                await self._send_stream_data(request, stream_id, data, end_stream=True)
            return
        async for data in request.stream:  # a stream of chunks: as httpcore does it
            await self._send_stream_data(request, stream_id, data)
        await self._send_end_stream(request, stream_id)

    async def _send_stream_data(self, request, stream_id, data, end_stream=False) -> None:
        view = memoryview(data).cast("B")
        while True:
            flow = min(self._h2_state.local_flow_control_window(stream_id),
                       self._h2_state.max_outbound_frame_size)
            if flow <= 0:
                # what is queued (our HEADERS, say) must be out before we wait on the server
                await self._write_outgoing_data(request)
                flow = await self._wait_for_outgoing_flow(request, stream_id)
            chunk, view = view[:flow], view[flow:]
            self._h2_state.send_data(stream_id, chunk, end_stream=end_stream and not view)
            await self._write_outgoing_data(request)
            if not view:
                return


class PeerTrioStream(TrioStream):
    """httpcore's trio stream over :class:`BigReads`, whose TLS is :class:`DrainingTLS`."""

    async def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        plain = await super().start_tls(ssl_context, server_hostname, timeout)
        return PeerTrioStream(DrainingTLS(plain._stream))

    def get_extra_info(self, info: str):
        if info == "ssl_object":
            return getattr(self._stream, "_ssl_object", None)
        sock = socket_of(self._stream)
        if info == "socket":
            return sock
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "is_readable":
            return sock.is_readable()
        return None


class PeerTrioBackend(TrioBackend):
    """Connects as httpcore's trio backend, with our stream wrappers."""

    async def connect_tcp(self, host, port, timeout=None, local_address=None,
                          socket_options=None):
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        return PeerTrioStream(BigReads(stream._stream))


class PeerHTTPConnection(AsyncHTTPConnection):
    """One pooled connection, HTTP/2 only, on `h2_class` (:class:`TunedHTTP2Connection`
    or :class:`SafeHTTP2Connection`)."""

    h2_class: type = TunedHTTP2Connection

    async def handle_async_request(self, request):
        if self._connection is None:
            try:
                async with self._request_lock:
                    if self._connection is None:
                        stream = await self._connect(request)
                        self._connection = self.h2_class(
                            origin=self._origin, stream=stream,
                            keepalive_expiry=self._keepalive_expiry)
            except BaseException:
                self._connect_failed = True
                raise
        return await super().handle_async_request(request)


class PeerConnectionPool(AsyncConnectionPool):
    """A connection pool whose connections are :class:`PeerHTTPConnection`."""

    h2_class: type = TunedHTTP2Connection

    def create_connection(self, origin) -> PeerHTTPConnection:
        connection = PeerHTTPConnection(
            origin=origin, ssl_context=self._ssl_context, keepalive_expiry=self._keepalive_expiry,
            http1=False, http2=True, retries=self._retries, local_address=self._local_address,
            uds=self._uds, network_backend=self._network_backend,
            socket_options=self._socket_options)
        connection.h2_class = self.h2_class
        return connection


class PeerHTTPTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (exception mapping, request/response types) over
    :class:`PeerConnectionPool`: HTTP/2 only, TLS `verify` as httpx takes it; `tuned`:
    the speed changes too (else the fixes only, over stock streams)."""

    def __init__(self, *, verify=True, tuned: bool = True, local_address: str | None = None) -> None:
        super().__init__(http1=False, http2=True, verify=verify, local_address=local_address)
        stock = self._pool  # never used: configured by httpx, rebuilt with our classes
        self._pool = PeerConnectionPool(
            ssl_context=stock._ssl_context, max_connections=stock._max_connections,
            max_keepalive_connections=stock._max_keepalive_connections,
            keepalive_expiry=stock._keepalive_expiry, http1=False, http2=True,
            retries=stock._retries, local_address=stock._local_address, uds=stock._uds,
            network_backend=PeerTrioBackend() if tuned else stock._network_backend,
            socket_options=stock._socket_options)
        self._pool.h2_class = TunedHTTP2Connection if tuned else SafeHTTP2Connection
