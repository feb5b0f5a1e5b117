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
connection and the peer with it.
"""

from __future__ import annotations

import logging

import h2.events
import h2.exceptions

log = logging.getLogger("p2pgrid.server")

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
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
        try:
            await original_run(self)
        except Exception:  # Cancelled is not an Exception: shutdown still passes
            log.exception("a connection failed; it is closed, the server goes on")

    hh2.H2Protocol._handle_events = _handle_events
    tcp_server.TCPServer.run = run
    _applied = True
