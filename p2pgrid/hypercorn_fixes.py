"""Fixes for hypercorn bugs that a hostile or hasty client can trigger.

Answering a request before reading its body (a 401 for a bad signature, a 413
for a declared size over the limit) is what a server should do. But hypercorn's
HTTP/2 protocol then meets the client's in-flight DATA frames for a stream it
has already closed, looks the stream up with ``self.streams[id]`` and dies with
``KeyError``, taking down the whole connection and every request on it. We
drop such frames (crediting the flow-control window, as RFC 9113 6.9 asks) and
let everything else through unchanged.
"""

from __future__ import annotations

import h2.events
import h2.exceptions

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from hypercorn.protocol import h2 as hh2

    original = hh2.H2Protocol._handle_events

    async def _handle_events(self, events):
        # In order, event by event: a batch can hold a stream's RequestReceived and
        # its first DATA, so "unknown stream" must be judged after the events before it.
        pending = []
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                if pending:
                    await original(self, pending)
                    pending = []
                if event.stream_id in self.streams:  # created by the events just handled
                    pending.append(event)
                    continue
                try:
                    self.connection.acknowledge_received_data(event.flow_controlled_length,
                                                              event.stream_id)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                continue
            pending.append(event)
        await original(self, pending)

    hh2.H2Protocol._handle_events = _handle_events
    _applied = True
