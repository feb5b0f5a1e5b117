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

Links: the way back rides the sender's own connection. Beside each push stream
the sender opens ``POST /pull`` (signed the same way, fixed digest
:data:`PULL_DIGEST`, both requests naming one link id in :data:`LINK_HEADER`),
whose *response* body carries frames the other way: call replies and anything
the receiver pushes to the sender (:class:`BackLinks` on the receiving side).
So a peer that can only dial out (behind NAT, a firewall, or not listening at
all) is a full client, and no peer ever dials an address a message names. The
sender writes no frame before the way back is open, and the receiver ends the
way back when the push stream of its link ends.

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
import os
from typing import Awaitable, Callable

import trio

from .errors import MalformedMessage, P2PError, PayloadTooLarge, PeerUnavailable

log = logging.getLogger("p2pgrid.push")

PATH = "/push"
STREAM_DIGEST = "push-stream-v1"  # stands in for the body digest a streamed body cannot have
PULL_PATH = "/pull"
PULL_DIGEST = "pull-stream-v1"
LINK_HEADER = "x-p2p-link"   # pairs a push stream with its way back
LINKS_PER_CALLER = 4   # ways back one caller may hold open here; its oldest closes beyond
LINGER = 5.0           # seconds a closing link waits for its way back to end cleanly
IDLE = 30.0            # seconds without a message before a push stream closes
GRACE = 15.0           # the receiver waits IDLE + GRACE for a silent push body before a 408
QUEUE = 64             # messages queued per destination before push() waits
HEADER = 4
MIN_FRAME = 4 << 20    # bytes a stream takes in one frame, even where max_body is smaller

__all__ = ["encode_frame", "FrameReader", "Pushers", "BackLinks", "PATH", "STREAM_DIGEST",
           "PULL_PATH", "PULL_DIGEST", "LINK_HEADER"]


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
# (peer name, its public key, frame, the address of the connection it came on)
Deliver = Callable[[str, bytes, bytes, str], Awaitable[None]]


class _Stream:
    """One destination's link: the queue its push stream writes, and its way back."""

    def __init__(self, name: str, key, target, public_key: bytes):
        self.name, self.key, self.target, self.public_key = name, key, target, public_key
        self.send, self.receive = trio.open_memory_channel(QUEUE)
        self.scope = trio.CancelScope()
        self.link = os.urandom(12).hex()
        self.ready = trio.Event()    # the way back is open
        self.closing = False         # the push stream has ended (idle): the way back ends next
        self.back_ended = trio.Event()
        self.last_in = 0.0           # trio time of the last frame that came back
        self.address = ""            # the receiver's IP, as our socket to it saw it


class Pushers:
    """The sending side: a link per destination, each task in `nursery`.

    `open_stream(target, frames, link)` is the transport's streamed request; it
    returns when the body has ended and the receiver answered.
    `open_back(target, link, on_data, started)` is the transport's streamed
    reply (the way back): it calls ``started(address)`` (the receiver's IP, as the
    connection's socket saw it) once the receiver has accepted it and returns when the
    receiver ends it. `deliver(name, public_key, frame, address)` dispatches a frame
    that came back. `encode(msg)` gives the message's CBOR bytes.
    `retire(target)` makes the transport's next stream to `target` take a new
    connection. `busy(key_id)` says whether a call to that peer waits for its reply
    (its link then stays open however idle). `keepalive` (a message whose handler does
    nothing) is written on a stream kept open while its own body has been silent for
    `idle` seconds, so that the receiver does not cut it.
    """

    def __init__(self, open_stream: Callable[..., Awaitable[None]],
                 encode: Callable[[object], Awaitable[bytes]], *, idle: float = IDLE,
                 retire: Callable[[object], None] = lambda target: None,
                 open_back: Callable[..., Awaitable[None]] | None = None,
                 deliver: Deliver | None = None, max_frame: int = MIN_FRAME,
                 busy: Callable[[str], bool] = lambda key_id: False,
                 keepalive: object | None = None):
        self._open_stream, self._encode, self.idle = open_stream, encode, idle
        self.keepalive = keepalive
        self._retire, self._open_back, self._deliver = retire, open_back, deliver
        self._busy, self.max_frame = busy, max_frame
        self._streams: dict[object, _Stream] = {}
        self.listeners: list[Listener] = []
        self.nursery: trio.Nursery | None = None

    async def push(self, name: str, target, msg, *, public_key: bytes = b"") -> None:
        """Queue `msg` for the peer `name` (whose key is `public_key`) at `target`;
        waits only while its queue is full."""
        key = (target.address, target.key_id)
        stream = self._streams.get(key)
        if stream is None:
            if self.nursery is None:
                raise PeerUnavailable("this peer is not running")
            stream = self._streams[key] = _Stream(name, key, target, public_key)
            self.nursery.start_soon(self._run, stream, target)
        try:
            await stream.send.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerUnavailable(f"the push stream to {name} broke") from None

    async def send_existing(self, key_id: str, msg) -> bool:
        """Queue `msg` on a link already open to the peer with `key_id`; False if none
        is (nothing is dialled for it)."""
        for stream in list(self._streams.values()):
            if stream.key[1] == key_id and not stream.closing:
                try:
                    await stream.send.send(msg)
                    return True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    continue
        return False

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

    def _idle(self, stream: _Stream) -> bool:
        # idle both ways, and no call waiting on the way back
        return (trio.current_time() - stream.last_in >= self.idle
                and not self._busy(stream.key[1]))

    async def _frames(self, stream: _Stream):
        await stream.ready.wait()   # whatever these messages cause can come back
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
                if self._idle(stream):
                    break
                if self.keepalive is not None:
                    # kept open for its way back (or a waiting call) while this body is
                    # silent: once both peers hold links, each sends on the way back of the
                    # other's, and a body silent for IDLE + GRACE is cut by the receiver
                    for part in _frame_parts(await self._encode(self.keepalive)):
                        yield part
                continue
            for part in _frame_parts(await self._encode(msg)):
                yield part
        # idle: new pushes go to a new stream from here on; send what raced in
        self._forget(stream)
        stream.closing = True
        while True:
            try:
                msg = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            for part in _frame_parts(await self._encode(msg)):
                yield part

    async def _back(self, stream: _Stream, target, task_status=trio.TASK_STATUS_IGNORED):
        reader = FrameReader(self.max_frame)

        async def on_data(chunk) -> None:
            for frame in reader.feed(chunk):
                stream.last_in = trio.current_time()
                await self._deliver(stream.name, stream.public_key, frame, stream.address)

        def started(address: str = ""):
            stream.address = address
            stream.last_in = trio.current_time()
            stream.ready.set()
            task_status.started()

        await self._open_back(target, stream.link, on_data, started)
        reader.finish()
        stream.back_ended.set()
        if not stream.closing:
            raise PeerUnavailable(f"{stream.name} ended the stream back")

    async def _run(self, stream: _Stream, target) -> None:
        why = None
        try:
            with stream.scope:   # cancelled by drop(), whose caller has reported the break
                async with trio.open_nursery() as nursery:
                    # The way back first: the push stream's request never reads until
                    # its body ends, so the server's settings (the streams it allows
                    # beyond httpcore's first one) arrive on the way back's reply.
                    if self._open_back is None:
                        stream.ready.set()
                    else:
                        await nursery.start(self._back, stream, target)
                    await self._open_stream(target, self._frames(stream), stream.link)
                    stream.closing = True
                    # the receiver ends the way back once it has read the last frame
                    with trio.move_on_after(LINGER):
                        await stream.back_ended.wait()
                    nursery.cancel_scope.cancel()
        except Exception as e:  # noqa: BLE001 - reported to the listeners, never raised here
            why = _why(e)
            log.info("push stream to %s broke: %s", stream.name, why)
        finally:
            self._forget(stream)   # the next push opens a new stream
            stream.closing = True
            stream.receive.close()
        if why is not None:
            self.report(stream.name, why)


def _why(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_why(x) for x in e.exceptions)
    return e.message if isinstance(e, P2PError) else type(e).__name__


class _Back:
    """One way back: frames are written by the sender's own task, whole and in order
    (the lock), rather than handed to a writer task: a reply costs no extra task
    switch."""

    def __init__(self, caller, write: Callable[[bytes], Awaitable[None]]):
        self.caller = caller
        self.write = write
        self.lock = trio.StrictFIFOLock()
        self.open = True
        self.torn = False          # a frame was cut short: the stream must not end cleanly
        self.ended = trio.Event()  # no more frames: `serve` returns

    def end(self) -> None:
        self.open = False
        self.ended.set()

    async def put(self, parts: tuple, timeout: float) -> bool:
        """Write one frame's `parts`; False if this way back is closed (or closes meanwhile).
        A frame that is not out within `timeout` (the caller stopped reading) or whose
        write fails ends this way back: the rest of a stream after a cut frame would be
        garbage."""
        writing = False
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            try:   # the lock keeps frames whole and in order; free, it costs no checkpoint
                self.lock.acquire_nowait()
            except trio.WouldBlock:
                await self.lock.acquire()   # cancellable: nothing is written yet
            try:
                if not self.open:
                    return False
                scope.shield = True   # never cut a frame in half...
                writing = True
                for part in parts:
                    await self.write(part)
                return True
            except Exception as e:  # noqa: BLE001 - the way back is gone; the caller is told
                log.info("a way back to %s failed: %s", self.caller.name, type(e).__name__)
            finally:
                self.lock.release()
        if writing:   # ...unless it is stuck past the deadline
            self.torn = True
            self.end()
        return False


class BackLinks:
    """The receiving side of links: for each peer that opened one to us, the way
    back to it (the response body of its ``/pull``), newest last.

    `send(key_id, msg)` writes a message for that peer there; nothing is ever
    dialled for it. A caller holds at most :data:`LINKS_PER_CALLER` of them here.
    """

    def __init__(self, encode: Callable[[object], Awaitable[bytes]], *,
                 write_timeout: float = 60.0):
        self._encode = encode
        self.write_timeout = write_timeout
        self._links: dict[str, dict[str, _Back]] = {}   # key id -> link id -> way back

    def has(self, key_id: str) -> bool:
        return bool(self._links.get(key_id))

    async def send(self, key_id: str, msg, *, timeout: float | None = None) -> bool:
        """Write `msg` on the newest way back to the peer with `key_id`; False if it
        has none open (or it closed meanwhile). Waits while another frame is written
        there or the peer's flow-control window is full, up to `timeout` (default
        `write_timeout`): a way back whose frame does not go out by then is closed."""
        backs = self._links.get(key_id)
        if not backs:
            return False
        parts = _frame_parts(await self._encode(msg))
        timeout = self.write_timeout if timeout is None else timeout
        for back in reversed(list(backs.values())):
            if back.open and await back.put(parts, timeout):
                return True
        return False

    def close(self, key_id: str, link: str) -> None:
        """End the way back of `link` once the frame being written on it is out (its
        push stream ended)."""
        back = self._links.get(key_id, {}).get(link)
        if back is not None:
            back.end()

    async def serve(self, caller, link: str, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Let senders write frames for `caller` on `link` with `write` until the link is
        closed (returns) or cancelled (its request was cut)."""
        mine = self._links.setdefault(caller.key_id, {})
        old = mine.pop(link, None)
        if old is not None:
            old.end()
        while len(mine) >= LINKS_PER_CALLER:
            mine.pop(next(iter(mine))).end()
        back = mine[link] = _Back(caller, write)
        try:
            await back.ended.wait()
            async with back.lock:   # the frame being written goes out before the end
                pass
            if back.torn:   # its end after a cut frame shows the caller the stream broke
                log.info("a frame to %s did not go out in time: its way back ends", caller.name)
        finally:
            back.open = False
            if mine.get(link) is back:
                del mine[link]
            if not mine and self._links.get(caller.key_id) is mine:
                del self._links[caller.key_id]
