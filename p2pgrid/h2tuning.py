"""HTTP/2 tuning for bulk tensors and quick round trips: h2, hypercorn, httpcore, trio's TLS.

Stock settings cap a 256 MB tensor at a few MB/s and a tiny request at several
milliseconds. None of the libraries exposes the knobs involved, so
:func:`apply` patches them, each patch small, commented with what it fixes and
idempotent (call it once per process; later calls do nothing):

- **Flow control and frame size** (hypercorn, httpcore): 64 KiB windows and
  16 KiB frames mean a WINDOW_UPDATE round trip per 64 KiB and a trip through
  Python per 16 KiB. We advertise 32 MiB windows and 1 MiB frames, and read
  a whole frame per ``recv``.
- **One write per message** (hypercorn, httpcore): each library flushed after
  the HEADERS frame, after every DATA frame and again for END_STREAM: three
  ``send`` calls, TLS records and wake-ups of the peer per small request, each
  way. HEADERS and DATA now wait in h2's buffer and leave together.
- **Fewer copies of DATA** (h2): serialising a DATA frame copied its payload
  four times, parsing one twice, and ``data_to_send`` copied all of it once
  more; now once each way.
- **Every received TLS record per read** (trio): SSLStream returned one 16 KiB
  record per ``receive_some``, each a trip through the reader's loop.
- **One keep-alive timer per connection** (hypercorn), not a task per request; it ends
  with the connection's reading, and a write the client does not take ends the connection.
- **Plain HPACK literals** (h2): no pure-Python Huffman coding of our headers.
- **A pooled connection the peer closed is noticed before it is used**
  (httpcore), so the request goes on a new one instead of failing.
- **Cheap frame repr** (hyperframe): h2 logs every received frame with an
  eager ``repr``, which hex-encodes a DATA frame's payload.

Nothing here changes what goes on the wire beyond settings, frame boundaries
and header encoding: the same frames, flags and flow-control accounting, so
TLS pinning, signatures and the peer's size limits are untouched. See
scripts/bench_transport.py for what each buys.
"""

from __future__ import annotations

import contextlib
import functools
import struct

import h2.settings

from . import patchguard

WINDOW = 32 * 1024 * 1024        # per stream and per connection
FRAME = 1 << 20                  # largest DATA frame either side sends (h2 allows up to 2**24-1)
SMALL = 64 * 1024                # response DATA up to this size waits in h2's buffer for the next flush

_applied = False


def apply() -> None:
    """Install the patches, once per process, after :func:`p2pgrid.patchguard.check`
    found every patched library at a supported version and shape (else it raises
    :class:`p2pgrid.patchguard.PatchMismatch`, or with ``P2PGRID_UNPATCHED=1`` warns and
    leaves the libraries stock)."""
    global _applied
    if _applied:
        return
    if not patchguard.check(what="transport tuning (p2pgrid.h2tuning)"):
        _applied = True  # stock libraries, as asked: warned once
        return
    _cheap_frame_repr()
    _lean_h2_data()
    _drain_tls_records()
    _tune_hypercorn()
    _one_idle_timer()
    _coalesce_hypercorn_writes()
    _tune_httpcore()
    _uncancellable_free_permits()
    _applied = True


# ------------------------------------------------------------------ h2 / hyperframe

def _cheap_frame_repr() -> None:
    # h2 logs every received frame with an eager repr(frame), and a DATA frame's
    # repr re-serialises and hex-encodes its payload: ~0.5 ms per 1 MB frame,
    # for a log line nobody reads. Show the length instead.
    from hyperframe.frame import DataFrame

    DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"


_FRAME_HEADER = struct.Struct(">HBBBL")  # RFC 9113 4.1: 24-bit length, type, flags, stream id


def _lean_h2_data() -> None:
    import h2.connection
    import h2.frame_buffer
    from hyperframe.exceptions import InvalidDataError, InvalidFrameError
    from hyperframe.frame import DataFrame, Frame

    Connection = h2.connection.H2Connection

    def _prepare_for_sending(self, frames) -> None:
        # Was: self._data_to_send += b"".join(f.serialize() for f in frames), where
        # serialising a DATA frame copies its payload three times (memoryview
        # tobytes, body join, header + body). An unpadded DATA frame is a 9-byte
        # header and the payload, so write those straight into the buffer.
        buf = self._data_to_send
        limit = self.max_outbound_frame_size
        for f in frames:
            if type(f) is DataFrame and "PADDED" not in f.flags and len(f.data) > 1024:
                n = len(f.data)
                flags = 0x01 if "END_STREAM" in f.flags else 0
                buf += _FRAME_HEADER.pack(n >> 8, n & 0xFF, 0x0, flags, f.stream_id)
                buf += f.data
                f.body_len = n
            else:
                buf += f.serialize()
            assert f.body_len <= limit

    original_data_to_send = Connection.data_to_send

    def data_to_send(self, amount=None):
        # Was bytes(self._data_to_send): a copy of everything queued (1 MB frames
        # included) only to be handed to send_all, which takes any buffer. Hand
        # over the bytearray itself; h2 starts a new one. Both callers (hypercorn's
        # _flush, httpcore's _write_outgoing_data) only test it for emptiness
        # and send it.
        if amount is None:
            data, self._data_to_send = self._data_to_send, bytearray()
            return data
        return original_data_to_send(self, amount)

    def __next__(self):
        # As h2's FrameBuffer.__next__, but the frame body is parsed from a view
        # of the buffer instead of a slice (a copy of up to a whole 1 MB frame,
        # which the frame's parse_body then copies again with tobytes()).
        data = self._data
        if len(data) < 9:
            raise StopIteration
        try:
            f, length = Frame.parse_frame_header(memoryview(data)[:9])
        except (InvalidDataError, InvalidFrameError) as err:  # pragma: no cover
            raise h2.frame_buffer.ProtocolError(
                f"Received frame with invalid header: {err!s}") from err
        if len(data) < length + 9:
            raise StopIteration
        self._validate_frame_length(length)
        with memoryview(data) as view, view[9:9 + length] as body:
            try:
                f.parse_body(body)  # every frame type copies what it keeps (tobytes, ints)
            except InvalidDataError as err:
                raise h2.frame_buffer.ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise h2.frame_buffer.FrameDataMissingError("Frame data missing or invalid") from err
        del data[:9 + length]  # views released: the bytearray may shrink in place
        new_frame = self._update_header_buffer(f)
        return new_frame if new_frame is not None else self.__next__()

    Connection._prepare_for_sending = _prepare_for_sending
    Connection.data_to_send = data_to_send
    h2.frame_buffer.FrameBuffer.__next__ = __next__


def _plain_headers(connection) -> None:
    # hpack Huffman-codes every header value it sends, in pure Python, at about
    # 0.2 us a byte, and the peer decodes it the same way; our signature
    # headers are ~250 bytes of fresh base64 and hex per request that Huffman
    # shrinks by a fifth. Send them as plain literals (valid HPACK; the
    # dynamic table works the same), for this connection only.
    connection.encoder.encode = functools.partial(type(connection.encoder).encode,
                                                  connection.encoder, huffman=False)


def _drain_tls_records() -> None:
    """Return every TLS record already received, not one per receive_some call.

    trio's SSLStream.receive_some makes one SSLObject.read, and OpenSSL hands
    back at most one record (16 KiB) per read, so a 1 MB DATA frame took 64
    trips through hypercorn's (or httpcore's) read loop and h2's frame buffer,
    each with a scheduler checkpoint. After the normal read, also take the
    records that are complete in the incoming buffer (no I/O, no waiting), up
    to max_bytes. Errors are left for the next call to report: OpenSSL keeps
    them (a close_notify or a bad record), and trio sends anything the reads
    queued for the peer on its next operation.
    """
    import ssl

    import trio
    import trio._highlevel_socket

    # What SSLStream asks its socket for (trio's default for receive_some()
    # without a size): 64 KiB, four records per recv and per pass through
    # trio's retry loop. 256 KiB: a quarter of the passes for bulk data, and
    # nothing changes for small messages (recv returns what is there).
    trio._highlevel_socket.DEFAULT_RECEIVE_SIZE = max(
        trio._highlevel_socket.DEFAULT_RECEIVE_SIZE, 256 * 1024)
    original = trio.SSLStream.receive_some

    async def receive_some(self, max_bytes=None):
        data = await original(self, max_bytes)
        if not data or max_bytes is None or len(data) >= max_bytes:
            return data
        ssl_object, incoming = self._ssl_object, self._incoming
        if not incoming.pending and not ssl_object.pending():
            return data
        parts, size = [data], len(data)
        while size < max_bytes:
            try:
                more = ssl_object.read(max_bytes - size)
            except ssl.SSLError:  # SSLWantReadError: no whole record left
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    trio.SSLStream.receive_some = receive_some


# ------------------------------------------------------------------ hypercorn (server)

def _tune_hypercorn() -> None:
    from hypercorn.protocol import h2 as hh2
    from hypercorn.trio import tcp_server

    tcp_server.MAX_RECV = FRAME + 9  # read a whole frame per syscall, not 64 KiB

    original_init = hh2.H2Protocol.__init__
    original_initiate = hh2.H2Protocol.initiate

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        old = self.connection.local_settings
        self.connection.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: old.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: old.max_header_list_size,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
        })
        # h2 reads these from local_settings only in its constructor, and a
        # replaced settings object produces no "changed" event on ACK
        self.connection.max_inbound_frame_size = FRAME
        _plain_headers(self.connection)
        self._p2p_window = self.context.event_class()  # set (and replaced) on WINDOW_UPDATE

    async def initiate(self, headers=None, settings=None):
        await original_initiate(self, headers, settings)
        self.connection.increment_flow_control_window(WINDOW)
        await self._flush()

    hh2.H2Protocol.__init__ = __init__
    hh2.H2Protocol.initiate = initiate


def _one_idle_timer() -> None:
    """One keep-alive timer task per connection, not one per request; and writes
    that the client does not take within ``write_timeout`` end the connection.

    hypercorn stops its idle timer when a request arrives and starts a new
    timer task (nursery.start: a spawn and a handshake) when the connection
    goes idle again: 0.15-0.25 ms of a ~1.2 ms request here. Instead the
    Updated events only note when the connection went idle, and one task per
    connection closes it after keep_alive_timeout of idleness, or once the
    server is shutting down and it is idle (within a second), as hypercorn does.
    The task ends as soon as the connection's reading ends: a connection cut
    mid-request never reports itself idle again, and a timer waiting for that
    kept its task group, and so its socket, open for good.

    hypercorn shields every write from cancellation and gives it no time limit, so
    a client that stops reading (or vanished without a FIN) held a connection for
    as long as TCP retransmits: here such a write ends the connection instead.
    """
    import trio
    from hypercorn.events import Closed, RawData, Updated
    from hypercorn.trio import tcp_server

    TCPServer = tcp_server.TCPServer
    original_init = TCPServer.__init__
    original_protocol_send = TCPServer.protocol_send
    original_read_data = TCPServer._read_data
    _GONE = (trio.BrokenResourceError, trio.ClosedResourceError)

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._p2p_idle_since = trio.current_time()  # None while a request is open
        self._p2p_reading = True                    # False once the read loop has ended
        self._p2p_write_timeout = getattr(self.config, "p2p_write_timeout", None) or float("inf")

    async def protocol_send(self, event) -> None:
        kind = type(event)
        if kind is Updated:
            self._p2p_idle_since = trio.current_time() if event.idle else None
        elif kind is RawData:
            stuck = False
            async with self.send_lock:
                # shielded as in hypercorn (a cancelled writer must not cut a TLS
                # record in half), but bounded: a stuck write ends the connection
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self._p2p_write_timeout
                    try:
                        await self.stream.send_all(event.data)
                    except _GONE:
                        await self.protocol.handle(Closed())
                stuck = scope.cancelled_caught
            if stuck:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.stream)
                    await self.protocol.handle(Closed())
        else:
            await original_protocol_send(self, event)

    async def _read_data(self) -> None:
        try:
            await original_read_data(self)
        finally:
            self._p2p_reading = False

    async def _idle_timeout(self) -> None:
        # started once, by TCPServer.run; ends with the connection's task group
        timeout = self.config.keep_alive_timeout
        while self._p2p_reading:
            since = self._p2p_idle_since
            now = trio.current_time()
            if since is not None and (now - since >= timeout or self.context.terminated.is_set()):
                break
            await trio.sleep(min(1.0, timeout if since is None else since + timeout - now))
        else:
            return  # the read loop ended: hypercorn closes the connection itself
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    TCPServer.__init__ = __init__
    TCPServer.protocol_send = protocol_send
    TCPServer._read_data = _read_data
    TCPServer._idle_timeout = _idle_timeout


def _coalesce_hypercorn_writes() -> None:
    """One write per small response (HEADERS + DATA + END_STREAM), not three.

    hypercorn flushes after the HEADERS frame, then hands each body chunk to its
    send task (a task switch, a copy into a 32 KiB StreamBuffer and a flush per
    frame), then flushes an empty END_STREAM frame. Here a body chunk goes
    straight into h2's buffer (waiting for the flow-control window if needed),
    and HEADERS and small DATA are flushed by END_STREAM, by the next large
    chunk, or by the send task when it next runs (the scheduler batch after
    they were queued), whichever comes first. ASGI sends one message at a time
    per stream, so frames of a stream keep their order.
    """
    import h2.events
    import h2.exceptions
    import priority
    from hypercorn.protocol import h2 as hh2
    from hypercorn.protocol.events import Body, EndBody, Response

    original_stream_send = hh2.H2Protocol.stream_send
    original_window_updated = hh2.H2Protocol._window_updated
    original_handle = hh2.H2Protocol.handle
    _GONE = (KeyError, priority.MissingStreamError, h2.exceptions.ProtocolError)

    async def _wake_window_waiters(self) -> None:
        woken, self._p2p_window = self._p2p_window, self.context.event_class()
        await woken.set()

    async def _send_body(self, sid: int, data) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                return
            room = min(self.connection.local_flow_control_window(sid),
                       self.connection.max_outbound_frame_size)
            if room <= 0:
                window = self._p2p_window  # before flushing, which may yield
                await self._flush()  # what is queued must leave before we wait on the peer
                await window.wait()  # a WINDOW_UPDATE, a reset or the end
                continue
            chunk, view = view[:room], view[room:]
            self.connection.send_data(sid, chunk)
            if len(chunk) > SMALL or len(self.connection._data_to_send) > SMALL:
                await self._flush()  # big: send now (and wait, for backpressure)
        await self.has_data.set()  # the send task flushes if nothing else does first

    async def stream_send(self, event) -> None:
        kind = type(event)
        sid = getattr(event, "stream_id", None)
        if kind is Response:
            try:
                self.connection.send_headers(
                    sid, [(b":status", b"%d" % event.status_code)] + event.headers
                    + self.config.response_headers("h2"))
            except _GONE:
                return
            await self.has_data.set()  # the send task flushes if nothing else does first
        elif kind is Body and sid in self.stream_buffers:
            try:
                await _send_body(self, sid, event.data)
            except _GONE:
                return
        elif kind is EndBody and sid in self.stream_buffers:
            # Everything this stream sent is already in h2's buffer; the send
            # task only ever found its StreamBuffer empty.
            try:
                self.connection.end_stream(sid)
                await self._flush()
            except _GONE:
                pass
            finally:
                self.stream_buffers.pop(sid, None)
                try:
                    self.priority.remove_stream(sid)
                except priority.MissingStreamError:
                    pass
        else:
            await original_stream_send(self, event)

    async def _window_updated(self, stream_id) -> None:
        await original_window_updated(self, stream_id)
        await _wake_window_waiters(self)

    async def send_task(self) -> None:
        # hypercorn's send task, plus: before sleeping, flush whatever the fast
        # paths above left in h2's buffer (a response's HEADERS, small DATA).
        while not self.closed:
            try:
                stream_id = next(self.priority)
            except priority.DeadlockError:
                await self._flush()
                await self.has_data.wait()
                await self.has_data.clear()
            else:
                await self._send_data(stream_id)

    async def handle(self, event) -> None:
        # hypercorn hands all the events of one read to _handle_events at once.
        # Split the batch after each new request, so a wrapper of _handle_events
        # that looks streams up (p2pgrid.hypercorn_fixes drops DATA for unknown
        # streams) sees the streams opened earlier in the same read: with one
        # write per request, a request's HEADERS and DATA arrive together.
        if type(event) is not hh2.RawData:
            await original_handle(self, event)
            await _wake_window_waiters(self)  # a closed connection ends their wait
            return
        try:
            events = self.connection.receive_data(event.data)
        except h2.exceptions.ProtocolError:
            await self._flush()
            await self.send(hh2.Closed())
            return
        start = 0
        for i, ev in enumerate(events):
            if type(ev) is h2.events.RequestReceived and i + 1 < len(events):
                await self._handle_events(events[start:i + 1])
                start = i + 1
        await self._handle_events(events[start:])

    hh2.H2Protocol.stream_send = stream_send
    hh2.H2Protocol._window_updated = _window_updated
    hh2.H2Protocol.send_task = send_task
    hh2.H2Protocol.handle = handle


# ------------------------------------------------------------------ httpcore (client)

def _uncancellable_free_permits() -> None:
    """A free permit of httpcore's stream semaphore is taken without a checkpoint.

    A fresh HTTP/2 connection takes 99 of its 100 permits one by one (one stream
    until the server's SETTINGS say more) and gives them back when SETTINGS
    arrive. trio's ``Semaphore.acquire`` is a checkpoint even when a permit is free,
    so a request cancelled during those 99 (a gossip exchange timing out, say) left
    the connection with permits it then gave back again: ``ValueError: semaphore
    released too many times`` on a later request.
    """
    import trio
    from httpcore import _synchronization as sync

    plain = sync.AsyncSemaphore.acquire

    async def acquire(self) -> None:
        if not self._backend:
            self.setup()
        if self._backend == "trio":
            try:
                return self._trio_semaphore.acquire_nowait()
            except trio.WouldBlock:
                pass
        await plain(self)

    sync.AsyncSemaphore.acquire = acquire


def _tune_httpcore() -> None:
    """Settings, one write per small request, and no copies of the body.

    httpcore writes after HEADERS, after every DATA frame and for END_STREAM;
    it also sends a WINDOW_UPDATE per stream and slices ``data[chunk:]`` per
    frame (copying the rest of the body each time). Here HEADERS wait for the
    first DATA frame, the last DATA frame of an in-memory body (httpx's
    ByteStream) carries END_STREAM, frames are views of the body, and the
    stream window comes from our settings.
    """
    import httpx
    from httpcore._async import http2 as ch2

    Conn = ch2.AsyncHTTP2Connection
    Conn.READ_NUM_BYTES = FRAME + 9  # was 64 KiB: a 1 MB frame in one recv (h2c)

    def _readable_or_closed(conn) -> bool:
        try:
            return bool(conn._network_stream.get_extra_info("is_readable"))
        except (OSError, ValueError):  # the socket is closed already
            return True

    async def _send_connection_init(self, request):
        self._h2_state.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
        })
        del self._h2_state.local_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]
        self._h2_state.max_inbound_frame_size = FRAME
        _plain_headers(self._h2_state)
        self._h2_state.initiate_connection()
        self._h2_state.increment_flow_control_window(WINDOW)
        await self._write_outgoing_data(request)

    async def _send_request_headers(self, request, stream_id):
        # Only a connection that has carried a stream before qualifies: a fresh
        # one is readable too (the server's SETTINGS), and _request_count counts
        # requests still waiting for their first stream id, so it cannot tell.
        opened = self._h2_state.highest_outbound_stream_id or 0
        if 0 < opened < stream_id and len(self._events) == 1 and _readable_or_closed(self):
            # Idle in the pool after a reply, yet readable: the peer has almost
            # certainly closed the connection (it restarted, say); everything
            # else it sends (SETTINGS, WINDOW_UPDATE) arrives before the reply
            # that ended the last stream. httpcore checks this for HTTP/1.1 only.
            # With HEADERS, DATA and END_STREAM in one write, a dead
            # connection now shows only when the reply never comes, too late to
            # know that the request was not delivered; here it is known, so let
            # the pool retry on a fresh connection.
            self._connection_error = True
            self._state = ch2.HTTPConnectionState.CLOSED
            with contextlib.suppress(Exception):
                await self._network_stream.aclose()
            raise ch2.ConnectionNotAvailable()
        end_stream = not ch2.has_body_headers(request)
        authority = [v for k, v in request.headers if k.lower() == b"host"][0]
        headers = [(b":method", request.method), (b":authority", authority),
                   (b":scheme", request.url.scheme), (b":path", request.url.target)] + [
            (k.lower(), v) for k, v in request.headers
            if k.lower() not in (b"host", b"transfer-encoding")]
        self._h2_state.send_headers(stream_id, headers, end_stream=end_stream)
        # httpcore also sent a WINDOW_UPDATE of 16 MiB per stream here; our
        # INITIAL_WINDOW_SIZE setting already gives every stream WINDOW.
        if end_stream:
            await self._write_outgoing_data(request)
        # else HEADERS leave with the first DATA frame

    async def _send_request_body(self, request, stream_id):
        if not ch2.has_body_headers(request):
            return
        if isinstance(request.stream, httpx.ByteStream):
            # One chunk, all in memory: END_STREAM rides on its last DATA frame.
            async for data in request.stream:
                await self._send_stream_data(request, stream_id, data, end_stream=True)
            return
        async for data in request.stream:  # a stream of chunks: as httpcore does it
            await self._send_stream_data(request, stream_id, data)
        await self._send_end_stream(request, stream_id)

    async def _send_stream_data(self, request, stream_id, data, end_stream=False):
        view = memoryview(data).cast("B")
        while True:
            flow = min(self._h2_state.local_flow_control_window(stream_id),
                       self._h2_state.max_outbound_frame_size)
            if flow <= 0:
                # What is queued (our HEADERS, say) must be out before we wait on the peer.
                await self._write_outgoing_data(request)
                flow = await self._wait_for_outgoing_flow(request, stream_id)
            chunk, view = view[:flow], view[flow:]
            self._h2_state.send_data(stream_id, chunk, end_stream=end_stream and not view)
            await self._write_outgoing_data(request)
            if not view:
                return

    Conn._send_connection_init = _send_connection_init
    Conn._send_request_headers = _send_request_headers
    Conn._send_request_body = _send_request_body
    Conn._send_stream_data = _send_stream_data
