"""hypercorn: the peer's server, built from subclasses of hypercorn's own classes.

Safety fixes (:class:`SafeH2Protocol`, :class:`SafeTCPServer`; on even with
``P2PGRID_UNPATCHED=1``, since stock hypercorn is not safe to serve with):

- **DATA for a stream already answered ends the connection.** hypercorn 0.18.0's
  ``H2Protocol._handle_events`` looks a DataReceived's stream up with
  ``self.streams[event.stream_id]``; a stream the app has already answered (a 401 for a
  bad signature, a 413 for a declared size over the limit, before the body was read) is
  gone from ``streams``, so the client's in-flight DATA raises ``KeyError``, which ends
  the connection and every request on it. Upstream: pgjones/hypercorn#329 (the bug),
  pull requests #312 and #334 (open) and #365; the StreamEnded branch got the same guard
  for #197. :class:`SafeH2Protocol` drops such frames, crediting their flow-control
  window as RFC 9113 6.9 asks, and judges each DATA frame after the events before it
  were handled (handling one can close the stream the next one belongs to).
  Reproduction: tests/test_transport_upstream.py. Remove when a release has the guard
  and credits the window.
- **One connection's exception ends the server.** ``trio.serve_listeners`` lets a
  handler's exception through, which would end every connection and the peer.
  :class:`SafeTCPServer` logs it at ERROR with its traceback, counts it
  (:class:`p2pgrid.transport.FailureCount`) and closes only that connection.
  Also where the peer's :class:`p2pgrid.limits.ConnectionTable` admits connections
  (``config.p2p_connections``). Not an upstream bug (a design choice); stays.

Speed changes (:class:`TunedH2Protocol`, :class:`TunedTCPServer`):

- **Three writes per small response.** ``H2Protocol`` flushes after HEADERS, hands each
  body chunk to its send task (a task switch, a copy into a 32 KiB ``StreamBuffer``, a
  flush per frame), then flushes an empty END_STREAM frame. Here a body chunk goes
  straight into h2's buffer (waiting for the window if needed), and HEADERS and small
  DATA leave with END_STREAM, the next large chunk or the send task's next run. ASGI
  sends one message at a time per stream, so a stream's frames keep their order.
- **A timer task per request.** hypercorn stops its keep-alive timer when a request
  arrives and starts a new task when the connection goes idle (0.15-0.25 ms of a ~1.2 ms
  request); here one task per connection, ending with the connection's reading.
- **A watcher task per request.** An app learns that its client went only by
  receiving ``http.disconnect``, so stopping work nobody waits for took a task per
  request waiting on ``receive()``. :class:`PeerTaskGroup` gives each request a
  :class:`Disconnect` that cancels the app's registered scopes as the message is
  queued (both server classes use it: it is how the peer stops abandoned work).
- **Unbounded writes.** hypercorn shields every write from cancellation with no time
  limit, so a client that stops reading held its connection for as long as TCP
  retransmits; here a write not taken within ``config.p2p_write_timeout`` ends the
  connection.
- **Settings and read size.** 32 MiB windows, 1 MiB frames, the whole frame per read
  (hypercorn reads ``MAX_RECV`` = 64 KiB), plain header literals, and TLS streams from
  :mod:`p2pgrid.transport.trio`.

None has an upstream issue: they are hypercorn's general-purpose trade-offs, not bugs.
They go when hypercorn exposes flow-control settings and coalesces a response's frames
(check with scripts/bench_transport.py before removing).

Scope: :func:`serve` runs its own accept loop (as ``hypercorn.trio.run.worker_serve``
does, without QUIC, workers or statsd) with these classes, because hypercorn picks
``TCPServer``, ``ProtocolWrapper`` and ``H2Protocol`` by module-global names: nothing of
hypercorn is changed for other servers in the process. :class:`PeerProtocolWrapper`
and :meth:`SafeTCPServer._serve_connection` follow hypercorn's connection set-up step by
step, so patchguard checks the shape of every hypercorn symbol they use.
"""

from __future__ import annotations

import logging
from functools import partial
from math import inf

import h2.events
import h2.exceptions
import priority
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from .. import bulk
from . import DISCONNECT, FRAME, SMALL, WINDOW, failures
from . import trio as tls
from .h2 import LeanH2Connection, settings
from .hpack import plain_headers

log = logging.getLogger("p2pgrid.server")

_GONE_STREAM = (KeyError, priority.MissingStreamError, h2.exceptions.ProtocolError)
_GONE_SOCKET = (trio.BrokenResourceError, trio.ClosedResourceError)


# ------------------------------------------------------------------ protocols

class SafeH2Protocol(H2Protocol):
    """H2Protocol that drops DATA for streams it has already closed (see module docstring)."""

    async def _handle_events(self, events) -> None:
        pending = []
        for event in events:
            if not isinstance(event, h2.events.DataReceived):
                pending.append(event)
                continue
            if pending:
                await super()._handle_events(pending)
                pending = []
            if event.stream_id in self.streams:
                await super()._handle_events([event])
                continue
            try:
                self.connection.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
        await super()._handle_events(pending)  # also flushes: our WINDOW_UPDATEs leave now


class TunedH2Protocol(SafeH2Protocol):
    """SafeH2Protocol with our settings, lean h2 connection and one write per response."""

    def __init__(self, app, config, context, task_group, connection_state, ssl, client,
                 server, send) -> None:
        super().__init__(app, config, context, task_group, connection_state, ssl, client,
                         server, send)
        self.connection = LeanH2Connection(config=self.connection.config)
        self.connection.local_settings = settings(
            client=False, max_streams=config.h2_max_concurrent_streams,
            max_header_list=config.h2_max_header_list_size, ENABLE_CONNECT_PROTOCOL=1)
        # h2 reads these from local_settings only in its constructor
        self.connection.max_inbound_frame_size = FRAME
        plain_headers(self.connection)
        self._p2p_window = self.context.event_class()  # set (and replaced) on WINDOW_UPDATE

    async def initiate(self, headers=None, settings=None) -> None:
        await super().initiate(headers, settings)
        self.connection.increment_flow_control_window(WINDOW)
        await self._flush()

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
            except _GONE_STREAM:
                return
            await self.has_data.set()  # the send task flushes if nothing else does first
        elif kind is Body and sid in self.stream_buffers:
            try:
                await self._send_body(sid, event.data)
            except _GONE_STREAM:
                return
        elif kind is EndBody and sid in self.stream_buffers:
            # everything this stream sent is in h2's buffer already; its StreamBuffer is empty
            try:
                self.connection.end_stream(sid)
                await self._flush()
            except _GONE_STREAM:
                pass
            finally:
                self.stream_buffers.pop(sid, None)
                try:
                    self.priority.remove_stream(sid)
                except priority.MissingStreamError:
                    pass
        else:
            await super().stream_send(event)

    async def _window_updated(self, stream_id) -> None:
        await super()._window_updated(stream_id)
        await self._wake_window_waiters()

    async def send_task(self) -> None:
        # as hypercorn's, plus: before sleeping, flush what the fast paths above left
        # in h2's buffer (a response's HEADERS, small DATA)
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
        # hypercorn hands all the events of one read to _handle_events at once. Split the
        # batch after each new request, so that SafeH2Protocol's "unknown stream" test
        # sees streams opened earlier in the same read: with one write per request, a
        # request's HEADERS and DATA arrive together.
        if type(event) is not RawData:
            await super().handle(event)
            await self._wake_window_waiters()  # a closed connection ends their wait
            return
        try:
            events = self.connection.receive_data(event.data)
        except h2.exceptions.ProtocolError:
            await self._flush()
            await self.send(Closed())
            return
        start = 0
        for i, ev in enumerate(events):
            if type(ev) is h2.events.RequestReceived and i + 1 < len(events):
                await self._handle_events(events[start:i + 1])
                start = i + 1
        await self._handle_events(events[start:])


class PeerProtocolWrapper(ProtocolWrapper):
    """hypercorn's ProtocolWrapper, with our H2Protocol class for ALPN h2, for h2c prior
    knowledge and for an h2c upgrade."""

    def __init__(self, h2_class, app, config, context, task_group, state, ssl, client,
                 server, send, alpn_protocol=None) -> None:
        # an HTTP/1.1 protocol first (cheap), replaced at once where ALPN chose h2
        super().__init__(app, config, context, task_group, state, ssl, client, server, send,
                         None)
        self.h2_class = h2_class
        if alpn_protocol == "h2":
            self.protocol = self._new_h2()

    def _new_h2(self):
        return self.h2_class(self.app, self.config, self.context, self.task_group,
                             self.state, self.ssl, self.client, self.server, self.send)

    async def handle(self, event) -> None:
        try:
            return await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:  # h2c with prior knowledge
            self.protocol, rest = self._new_h2(), error.data
            await self.protocol.initiate()
        except H2CProtocolRequiredError as error:  # an h2c upgrade
            self.protocol, rest = self._new_h2(), error.data
            await self.protocol.initiate(error.headers, error.settings)
        if rest != b"":
            await self.protocol.handle(RawData(data=rest))


# ------------------------------------------------------------------ requests

class Disconnect:
    """Whether a request's client has gone, and the cancel scopes to cancel when it goes.

    hypercorn tells an app that its client went only by queueing ``http.disconnect``
    for it to receive; an app busy with the request learns it only from a task that
    waits on ``receive()``, which cost a nursery and a task per request (about a tenth
    of a small request's server time). Here the server cancels the app's registered
    scopes as it queues the message."""

    __slots__ = ("gone", "_scopes")

    def __init__(self) -> None:
        self.gone = False
        self._scopes: list[trio.CancelScope] = []

    def watch(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` when the client goes (at once if it has gone)."""
        if self.gone:
            scope.cancel()
        self._scopes.append(scope)

    def unwatch(self, scope: trio.CancelScope) -> None:
        # an ended request's stream closes normally too: cancelling its finished
        # scope then would cost a task repr (trio records who cancelled) for nothing
        self._scopes.remove(scope)

    def set(self) -> None:
        self.gone = True
        for scope in self._scopes:
            scope.cancel()   # each leaves by unwatch() as its request ends


class PeerTaskGroup(TaskGroup):
    """hypercorn's TaskGroup, giving each request a :class:`Disconnect` in its scope's
    extensions (set as its ``http.disconnect`` is queued)."""

    async def spawn_app(self, app, config, scope, send):
        gone = Disconnect()
        scope["extensions"][DISCONNECT] = gone   # before the app's task first runs
        put = await super().spawn_app(app, config, scope, send)

        async def app_put(message) -> None:
            if message["type"] == "http.disconnect":
                gone.set()
            await put(message)
        return app_put


# ------------------------------------------------------------------ connections

class SafeTCPServer(TCPServer):
    """One accepted connection: admitted by the peer's table, its failure logged and
    counted, its socket always closed."""

    h2_protocol = SafeH2Protocol

    async def run(self) -> None:
        table = getattr(self.config, "p2p_connections", None)
        conn = None
        try:
            with trio.CancelScope() as scope:
                if table is not None:
                    conn = table.admit(_client_host(self.stream),
                                       lambda: getattr(self, "_p2p_idle_since", 0) is not None,
                                       scope.cancel)
                    if conn is None:
                        log.info("connection refused: too many connections and none idle")
                        return
                try:
                    await self._serve_connection()
                except Exception as e:  # Cancelled is not an Exception: shutdown still passes
                    # never silent: a broken change must show as errors, not dropped connections
                    failures.add(e)
                    counter = getattr(self.config, "p2p_failures", None)
                    if counter is not None:
                        counter.add(e)
                    log.exception("a connection failed; it is closed, the server goes on")
        finally:
            if conn is not None:
                table.release(conn)
            await trio.aclose_forcefully(self.stream)

    async def _serve_connection(self) -> None:
        # hypercorn's TCPServer.run, step by step, with our protocol classes
        secure = hasattr(self.stream, "do_handshake")
        if secure:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            alpn = self.stream.selected_alpn_protocol()
        else:
            alpn = "http/1.1"
        try:
            sock = tls.socket_of(self.stream)
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            if alpn == bulk.ALPN:  # a large body's own connection: not HTTP (p2pgrid.bulk)
                await self._serve_bulk(client, server)
                return
            async with PeerTaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = PeerProtocolWrapper(
                    self.h2_protocol, self.app, self.config, self.context, task_group,
                    ConnectionState(self.state), secure, client, server, self.protocol_send,
                    alpn)
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()


    async def _serve_bulk(self, client, server) -> None:
        def busy(open_request: bool) -> None:   # what the connection table asks of us
            self._p2p_idle_since = None if open_request else trio.current_time()

        app = partial(self.app, sync_spawn=None, call_soon=None)  # hypercorn's ASGI wrapper
        await bulk.serve_connection(
            self.stream, app, client=client, server=server,
            idle_timeout=self.config.keep_alive_timeout,
            read_timeout=getattr(self.config, "p2p_read_timeout", None) or 45.0,
            write_timeout=getattr(self.config, "p2p_write_timeout", None) or inf, busy=busy)


class TunedTCPServer(SafeTCPServer):
    """SafeTCPServer with one idle timer per connection, bounded writes and whole-frame reads."""

    h2_protocol = TunedH2Protocol

    def __init__(self, app, config, context, state, stream) -> None:
        super().__init__(app, config, context, state, stream)
        self._p2p_idle_since = trio.current_time()  # None while a request is open
        self._p2p_reading = True                    # False once the read loop has ended
        self._p2p_write_timeout = getattr(config, "p2p_write_timeout", None) or inf

    async def protocol_send(self, event) -> None:
        kind = type(event)
        if kind is Updated:
            self._p2p_idle_since = trio.current_time() if event.idle else None
        elif kind is RawData:
            stuck = False
            async with self.send_lock:
                # shielded as in hypercorn (a cancelled writer must not cut a TLS record
                # in half), but bounded: a stuck write ends the connection
                with trio.CancelScope(shield=True, deadline=trio.current_time()
                                      + self._p2p_write_timeout) as scope:
                    try:
                        await self.stream.send_all(event.data)
                    except _GONE_SOCKET:
                        await self.protocol.handle(Closed())
                stuck = scope.cancelled_caught
            if stuck:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.stream)
                    await self.protocol.handle(Closed())
        else:
            await super().protocol_send(event)

    async def _read_data(self) -> None:
        try:
            while True:
                try:
                    if self.config.read_timeout:
                        with trio.fail_after(self.config.read_timeout):
                            data = await self.stream.receive_some(FRAME + 9)  # a whole frame
                    else:  # the peer's case: App times bodies out (no scope per read here)
                        data = await self.stream.receive_some(FRAME + 9)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if not data:
                    break
            await self.protocol.handle(Closed())
        finally:
            self._p2p_reading = False
            # the idle timer sleeps until its deadline: end it now, or the connection's
            # task group, and with it the socket, would wait for it
            with trio.CancelScope(shield=True):
                await self.idle_task.stop()

    async def _idle_timeout(self) -> None:
        # started once per connection; _read_data ends it with the connection's reading.
        # It sleeps until the connection could have been idle long enough, not in a
        # poll every second: a peer holding a hundred connections woke 100 times a
        # second for nothing, a quarter of its idle CPU
        timeout = self.config.keep_alive_timeout
        while self._p2p_reading:
            since = self._p2p_idle_since
            now = trio.current_time()
            stopping = self.context.terminated.is_set()
            if since is not None and (now - since >= timeout or stopping):
                break
            delay = timeout if since is None else since + timeout - now
            if stopping:   # the server stops: close as soon as the open request ends
                await trio.sleep(min(1.0, delay))
            else:
                with trio.move_on_after(delay):
                    await self.context.terminated.wait()
        else:
            return  # the read loop ended: the connection closes itself
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


def _client_host(stream) -> str:
    try:
        peer = tls.socket_of(stream).getpeername()
    except (AttributeError, OSError):  # gone already, or not a socket
        return "?"
    return peer[0] if isinstance(peer, tuple) else str(peer)


# ------------------------------------------------------------------ serving

async def serve(app, config, *, tuned: bool, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the ASGI `app` with hypercorn `config` until cancelled, on the classes above
    (`tuned`: the speed changes too); reports the bound URLs via `task_status`."""
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    server_class = TunedTCPServer if tuned else SafeTCPServer
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            ssl_context = config.create_ssl_context()
            listeners, binds = [], []
            for secure, socks in ((True, sockets.secure_sockets), (False, sockets.insecure_sockets)):
                for sock in socks:
                    sock.listen(config.backlog)
                    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    if secure:
                        listener = (tls.TLSListener(listener, ssl_context) if tuned else
                                    trio.SSLListener(listener, ssl_context, https_compatible=True))
                    listeners.append(listener)
                    scheme = "https" if secure else "http"
                    binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            handler = partial(server_class, wrapped, config, context, lifespan_state)
            try:
                await trio.serve_listeners(handler, listeners, handler_nursery=server_nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await context.terminated.set()
