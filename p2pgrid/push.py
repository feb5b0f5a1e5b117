"""Pushes: one-way messages on a long-lived HTTP/2 stream per destination.

A request and its reply cost about 1 ms of CPU on each side (signing, headers,
ASGI, httpx), which dominates protocols that trade many small messages, such as
SMPC rounds. A push stream pays that once: the sender opens ``POST /push`` with a
signed request (path ``/push``, the fixed digest :data:`STREAM_DIGEST`, a fresh
nonce) and then writes *frames* into the request body, each a 4-byte big-endian
length and one CBOR message from the wire registry. The receiving peer decodes
each frame as it arrives and dispatches it through its router, with the same
role checks as ``/rpc``, in the order sent; whatever the handler returns is
dropped, so pushed messages are those whose handlers only deposit something.

Authentication: the open is signed like any request; TLS, pinned to the
receiver's key, then protects every frame of that stream. (With ``--insecure``
h2c only the open is authenticated.)

Delivery is not acknowledged. A stream that breaks loses what was queued on it,
and both ends report it to the peer's push listeners (``peer.push_listeners``),
so protocols waiting on the other side can fail at once instead of at their
deadline. Streams close after :data:`IDLE` seconds without a message.

>>> frame = encode_frame(b"\\xa0")          # an encoded CBOR message: {}
>>> r = FrameReader(max_frame=1 << 10)
>>> r.feed(frame[:3]), r.feed(frame[3:] + frame[:1]), r.pending
([], [b'\\xa0'], 1)
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from .errors import MalformedMessage, P2PError, PayloadTooLarge, PeerUnavailable

log = logging.getLogger("p2pgrid.push")

PATH = "/push"
STREAM_DIGEST = "push-stream-v1"  # stands in for the body digest a streamed body cannot have
IDLE = 30.0            # seconds without a message before a push stream closes
QUEUE = 64             # messages queued per destination before push() waits
HEADER = 4
MIN_FRAME = 4 << 20    # bytes a stream takes in one frame, even where max_body is smaller

__all__ = ["encode_frame", "FrameReader", "Pushers", "PATH", "STREAM_DIGEST"]


def encode_frame(body) -> bytes:
    """One frame: the 4-byte big-endian length of `body`, then `body`."""
    return len(body).to_bytes(HEADER, "big") + bytes(body)


def _frame_parts(body) -> tuple:
    # a large body goes out as it is, after its header, rather than copied behind it
    if len(body) < 1 << 16:
        return (encode_frame(body),)
    return len(body).to_bytes(HEADER, "big"), body


class FrameReader:
    """Sans-IO frame splitter for a push stream's body."""

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data) -> list[bytes]:
        """Complete frames in `data` (plus what was held back); raises PayloadTooLarge
        for a frame over the limit and MalformedMessage for an empty one."""
        self._buf += data
        out, at, buf = [], 0, self._buf
        while len(buf) - at >= HEADER:
            n = int.from_bytes(buf[at:at + HEADER], "big")
            if n == 0:
                raise MalformedMessage("empty push frame")
            if n > self.max_frame:
                raise PayloadTooLarge(f"push frame of {n} bytes exceeds the limit of "
                                      f"{self.max_frame}")
            if len(buf) - at - HEADER < n:
                break
            out.append(bytes(buf[at + HEADER:at + HEADER + n]))
            at += HEADER + n
        del buf[:at]
        return out

    def finish(self) -> None:
        """The stream ended: nothing may be left half-sent."""
        if self._buf:
            raise MalformedMessage(f"push stream ended inside a frame ({len(self._buf)} bytes)")


Listener = Callable[[str, str], None]   # (peer name, why the stream broke)


class _Stream:
    """One destination's queue and the task that writes it into a /push request."""

    def __init__(self, name: str, key, target):
        self.name, self.key, self.target = name, key, target
        self.send, self.receive = trio.open_memory_channel(QUEUE)
        self.scope = trio.CancelScope()


class Pushers:
    """The sending side: a stream per destination, each task in `nursery`.

    `open_stream(target, frames)` is the transport's streamed request; it returns
    when the body has ended and the receiver answered. `encode(msg)` gives the
    message's CBOR bytes. `retire(target)` makes the transport's next stream to
    `target` take a new connection.
    """

    def __init__(self, open_stream: Callable[..., Awaitable[None]],
                 encode: Callable[[object], Awaitable[bytes]], *, idle: float = IDLE,
                 retire: Callable[[object], None] = lambda target: None):
        self._open_stream, self._encode, self.idle = open_stream, encode, idle
        self._retire = retire
        self._streams: dict[object, _Stream] = {}
        self.listeners: list[Listener] = []
        self.nursery: trio.Nursery | None = None

    async def push(self, name: str, target, msg) -> None:
        """Queue `msg` for the peer `name` at `target`; waits only while its queue is full."""
        key = (target.address, target.key_id)
        stream = self._streams.get(key)
        if stream is None:
            if self.nursery is None:
                raise PeerUnavailable("this peer is not running")
            stream = self._streams[key] = _Stream(name, key, target)
            self.nursery.start_soon(self._run, stream, target)
        try:
            await stream.send.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerUnavailable(f"the push stream to {name} broke") from None

    def drop(self, name: str) -> None:
        """Close the streams to peer `name` now, and let the next take a new connection.

        For when its stream to us was cut: it has likely gone away, and a stream
        to it that is idle would only show that at its next write, which the
        kernel accepts for a dead connection, and loses.
        """
        for stream in [s for s in self._streams.values() if s.name == name]:
            self._forget(stream)
            stream.scope.cancel()
            self._retire(stream.target)

    def report(self, name: str, why: str) -> None:
        for fn in list(self.listeners):
            try:
                fn(name, why)
            except Exception:  # noqa: BLE001 - one listener must not silence the others
                log.exception("push listener failed")

    def _forget(self, stream: _Stream) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]

    async def _frames(self, stream: _Stream):
        receive = stream.receive
        while True:
            msg, idle = None, True
            with trio.move_on_after(self.idle):  # never yield inside a cancel scope
                try:
                    msg = await receive.receive()
                except trio.EndOfChannel:
                    return
                idle = False
            if idle:
                break
            for part in _frame_parts(await self._encode(msg)):
                yield part
        # idle: new pushes go to a new stream from here on; send what raced in
        self._forget(stream)
        while True:
            try:
                msg = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            for part in _frame_parts(await self._encode(msg)):
                yield part

    async def _run(self, stream: _Stream, target) -> None:
        why = None
        try:
            with stream.scope:   # cancelled by drop(), whose caller has reported the break
                await self._open_stream(target, self._frames(stream))
        except Exception as e:  # noqa: BLE001 - reported to the listeners, never raised here
            why = e.message if isinstance(e, P2PError) else type(e).__name__
            log.info("push stream to %s broke: %s", stream.name, why)
        finally:
            self._forget(stream)   # the next push opens a new stream
            stream.receive.close()
        if why is not None:
            self.report(stream.name, why)
