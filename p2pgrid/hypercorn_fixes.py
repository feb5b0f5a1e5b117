"""Fixes for hypercorn bugs that a hostile or hasty client can trigger.

Answering a request before reading its body (a 401 for a bad signature, a 413
for a declared size over the limit) is what a server should do. But hypercorn's
HTTP/2 protocol then meets the client's in-flight DATA frames for a stream it
has already closed, looks the stream up with ``self.streams[id]`` and dies with
``KeyError``, taking down the whole connection and every request on it. We
drop such frames (crediting the flow-control window, as RFC 9113 6.9 asks) and
let everything else through unchanged. A stream can also close while an earlier
DATA frame of the same batch is handled (the app answers as the body arrives), so
each DATA frame is judged when its turn comes.

And a bug in one connection ends that connection, not the server: trio's
``serve_listeners`` lets a handler's exception through, which would end every
connection and the peer with it. Such a failure is logged at ERROR with its
traceback and counted (:class:`FailureCount`: ``config.p2p_failures``, which
p2pgrid.server sets to the App's ``connection_failures``), never swallowed.

Connections are counted: a listener whose hypercorn Config carries a
:class:`p2pgrid.limits.ConnectionTable` (``config.p2p_connections``) admits each
accepted connection there first, so that idle connections from one address, or
from all, cannot take every file descriptor (see :mod:`p2pgrid.limits`); an
evicted connection is cancelled, and every connection's socket is closed when its
handler ends, however it ends (hypercorn's own close is skipped on cancellation).
"""

from __future__ import annotations

import logging

import h2.events
import trio
import h2.exceptions

from . import patchguard

log = logging.getLogger("p2pgrid.server")

_applied = False


class FailureCount:
    """Connections that ended in an unexpected exception (each logged at ERROR with its
    traceback). The server's App holds one (``app.connection_failures``); the module's
    ``failures`` counts every server in the process."""

    def __init__(self) -> None:
        self.count = 0
        self.last: str | None = None  # the last exception's type name, for a status line

    def add(self, exc: BaseException) -> None:
        self.count += 1
        self.last = type(exc).__name__


failures = FailureCount()


def apply() -> None:
    global _applied
    if _applied:
        return
    patchguard.check_required(("hypercorn",), ("H2Protocol._handle_events", "TCPServer.run"),
                              what="p2pgrid.hypercorn_fixes")
    from hypercorn.protocol import h2 as hh2
    from hypercorn.trio import tcp_server

    original = hh2.H2Protocol._handle_events

    async def _handle_events(self, events):
        # In order: "unknown stream" is judged for each DATA frame after every event
        # before it was handled (a batch can hold a stream's RequestReceived and its
        # first DATA; handling one DATA frame can end the stream before the next).
        pending = []
        for event in events:
            if not isinstance(event, h2.events.DataReceived):
                pending.append(event)
                continue
            if pending:
                await original(self, pending)
                pending = []
            if event.stream_id in self.streams:
                await original(self, [event])
                continue
            try:
                self.connection.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
        await original(self, pending)  # also flushes: our WINDOW_UPDATEs leave now

    original_run = tcp_server.TCPServer.run

    async def run(self):
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
                    await original_run(self)
                except Exception as e:  # Cancelled is not an Exception: shutdown still passes
                    # never silent: a broken patch must show as errors, not as dropped connections
                    failures.add(e)
                    counter = getattr(self.config, "p2p_failures", None)
                    if counter is not None:
                        counter.add(e)
                    log.exception("a connection failed; it is closed, the server goes on")
        finally:
            if conn is not None:
                table.release(conn)
            await trio.aclose_forcefully(self.stream)

    hh2.H2Protocol._handle_events = _handle_events
    tcp_server.TCPServer.run = run
    _applied = True


def _client_host(stream) -> str:
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    try:
        peer = sock.getpeername()
    except (AttributeError, OSError):  # gone already, or not a socket
        return "?"
    return peer[0] if isinstance(peer, tuple) else str(peer)
