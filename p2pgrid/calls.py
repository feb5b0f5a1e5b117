"""Calls: request/reply pairs carried on push streams (see :mod:`p2pgrid.push`).

A call is a request without HTTP: the caller pushes the encoded message as
:class:`Call` on its link to the callee; the callee dispatches it through its
router (the same role checks as ``/rpc``) in a task of its own and sends the
answer back as :class:`CallReply` (the reply message, or the typed error) on the
way back of that link: the response body of the ``/pull`` request the caller
opened beside its push stream (see :mod:`p2pgrid.push`). Each call costs two
one-way messages on streams that stay open, instead of an HTTP/2 request with its
headers, ASGI scope and httpx objects.

Replies never dial. The callee answers on a link already open between the two
(the caller's own, or where the caller reached it over a link the callee opened,
that one), and on nothing else: no address a message names is ever dialled, and a
caller nobody can reach (behind NAT, or not listening at all) gets its replies.

Authentication. A call arrives on a stream its caller opened with a signed request,
and over TLS pinned to the callee's key every frame of that stream is the caller's,
in order, once: the channel authenticates the call, as it does every push. So
over TLS a call carries no signature of its own (an Ed25519 verification was a
quarter of the callee's CPU per call). Over cleartext h2c (``--insecure``) frames
could be injected, so there each call is signed exactly as
:meth:`p2pgrid.client.Transport.request` signs (method ``POST``, path ``/call``,
its name, the audience's key id, a timestamp, a nonce and the SHA-256 of the
body), and the callee verifies it with the same verifier (stale and replayed calls
are refused) before it runs.

:meth:`p2pgrid.peer.Peer.request` sends small messages as calls; a message of
:data:`INLINE` bytes or more goes as an HTTP request instead, and a reply that large
is held by the callee under a one-time ticket that the caller redeems with a request
(:class:`FetchReply`): the request path streams large bodies without the copies a
pushed frame costs. A call fails with PeerUnavailable as soon as a break of its link is
noticed: the way back shows a cut at once; the stream there shows it at its next write,
and a waiting call writes a :class:`Nop` every :data:`KEEPALIVE` seconds for that. A call not answered
within its timeout fails with PeerUnavailable too, and its late reply is dropped.

>>> import tempfile, trio
>>> from p2pgrid.messages import Ping
>>> from p2pgrid.testing import open_network
>>> async def main():
...     async with open_network(["a", "b"], tempfile.mkdtemp()) as grid:
...         return (await grid["a"].call("b", Ping())).name
>>> trio.run(main)
'b'
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import field

import trio

from . import wire
from .auth import Caller, body_digest, sign_request
from .client import remote_error
from .errors import NotFound, P2PError, PeerUnavailable, RateLimited, Unauthenticated
from .router import Router
from .wire import dataclass, message

log = logging.getLogger("p2pgrid.calls")

PATH = "/call"
MAX_IN_FLIGHT = 256   # calls one caller may have running on this peer at once
KEEPALIVE = 0.5       # seconds between Nop writes while a call waits
INLINE = 1 << 20      # bytes: larger messages and replies take the request path
HOLD = 60.0           # seconds a large reply waits for its caller to fetch it
HELD_MAX = 16         # large replies held for one caller at most
HELD_BYTES = 2 << 30  # bytes of large replies held for one caller at most

__all__ = ["Call", "CallReply", "CancelCall", "FetchReply", "Nop", "Calls", "router"]


@message("rt.call")
@dataclass(frozen=True)
class Call:
    """A message for the receiving peer's router; `body` is its CBOR encoding;
    `headers` its signature where the stream is cleartext (empty over TLS). It names
    no address: the reply goes back on the caller's own link."""
    id: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@message("rt.nop")
@dataclass(frozen=True)
class Nop:
    """Nothing: written while a call waits, so that a dead connection shows as a write error."""


@message("rt.cancel_call")
@dataclass(frozen=True)
class CancelCall:
    """The caller no longer waits for call `id` (it timed out or was cancelled): the
    callee stops serving it, so that work nobody waits for stops."""
    id: int


@message("rt.call_reply")
@dataclass(frozen=True)
class CallReply:
    """The answer to call `id`: the reply message's CBOR encoding (`status` 200), the
    ticket of a reply too large to push (`status` 303, see :class:`FetchReply`), or an
    error as ``P2PError.to_wire()`` encodes it."""
    id: int
    status: int
    body: bytes


@message("rt.fetch_reply")
@dataclass(frozen=True)
class FetchReply:
    """Ask, as a request, for the reply a call left under `ticket`: large replies take
    the request path, which streams them without copies."""
    ticket: str


class Calls:
    """The calls one peer has sent and is waiting on, and the ones it is serving."""

    def __init__(self, peer):
        self.peer = peer
        self._ids = itertools.count(1)
        self._waiting: dict[tuple[str, int], tuple[trio.Event, list]] = {}
        self._serving: dict[str, int] = {}   # caller key id -> calls running for it
        # (caller key id, call id) -> (caller name, its scope): what a cancel stops
        self._scopes: dict[tuple[str, int], tuple[str, trio.CancelScope]] = {}
        # ticket -> (key id, until, reply, its bytes)
        self._held: dict[str, tuple[str, float, object, int]] = {}
        self.nursery: trio.Nursery | None = None
        peer.push_listeners.append(self._broken)

    def usable(self) -> bool:
        """Whether this peer can make calls (it is running; it need not listen)."""
        return self.nursery is not None

    def waits_on(self, key_id: str) -> bool:
        """Whether a call to the peer with `key_id` waits for its reply."""
        return any(k == key_id for k, _ in self._waiting)

    async def call(self, rec, msg, *, timeout: float) -> object:
        """Send `msg` to the peer of record `rec` as a call; its reply message, or its
        error raised. A message that encodes to :data:`INLINE` bytes or more goes as
        a request instead."""
        peer = self.peer
        body = wire.encode(msg)
        if len(body) >= INLINE:
            return await peer.transport.request(peer.target(rec), msg, timeout=timeout,
                                                encoded=body)
        headers = {}
        if peer.config.insecure:   # nothing else vouches for a cleartext frame
            headers = sign_request(peer.identity, peer.name, rec.key_id, "POST", PATH,
                                   digest=body_digest(body), now=time.time())
        call = Call(next(self._ids), body, headers)
        key = (rec.key_id, call.id)
        done, slot = trio.Event(), []
        self._waiting[key] = (done, slot)
        try:
            await peer.push(rec, call)
            deadline = trio.current_time() + timeout
            while not done.is_set() and trio.current_time() < deadline:
                with trio.move_on_at(min(deadline, trio.current_time() + KEEPALIVE)):
                    await done.wait()
                if not done.is_set():   # a stream nobody writes to never notices a dead peer
                    await peer.push(rec, Nop())
        finally:
            self._waiting.pop(key, None)
            if not slot:
                self._give_up(rec, call.id)
        if not slot:
            raise PeerUnavailable(f"{rec.name} did not answer call {type(msg).__name__} within "
                                  f"{timeout:g} s")
        status, payload = slot[0]
        if isinstance(payload, BaseException):
            raise payload
        if status == 303:
            return await peer.transport.request(peer.target(rec), FetchReply(payload.hex()),
                                                large_reply=True,
                                                timeout=timeout)
        if status != 200:
            raise remote_error(payload, status)
        return wire.loads(payload)

    def _give_up(self, rec, call_id: int) -> None:
        """Tell the callee, in the background, that nobody waits for call `call_id` now."""
        async def tell():
            try:
                await self.peer.push(rec, CancelCall(call_id))
            except P2PError:
                pass   # a callee we cannot reach sees its stream from us break instead
        if self.nursery is not None:
            try:
                self.nursery.start_soon(tell)
            except RuntimeError:
                pass   # the peer is closing: its streams, and so the call, go with it

    def cancel(self, caller: Caller, call_id: int) -> None:
        """Stop serving `caller`'s call `call_id`, if it still runs."""
        entry = self._scopes.get((caller.key_id, call_id))
        if entry is not None:
            entry[1].cancel()

    def _broken(self, name: str, why: str) -> None:
        # the calls a peer whose stream broke was waiting for: nobody waits any more
        for (_, _), (who, scope) in list(self._scopes.items()):
            if who == name:
                scope.cancel()
        try:
            kid = self.peer.record(name).key_id
        except P2PError:
            return
        for (k, _), (done, slot) in list(self._waiting.items()):
            if k == kid and not done.is_set():
                slot.append((503, PeerUnavailable(f"the stream to {name} broke: {why}")))
                done.set()

    # ------------------------------------------------------------ the callee's side
    def accept(self, stream_caller: Caller, msg: Call) -> None:
        """Check `msg` and start serving it; the answer goes back as a push. A call
        refused here is answered with its error too (and the error raised), so that
        its caller does not wait for its timeout."""
        if self.nursery is None:
            raise PeerUnavailable("this peer is not running")
        try:
            caller = stream_caller   # over TLS the stream vouches for its frames
            if msg.headers or self.peer.config.insecure:
                # the address is the stream's connection's: a call has no socket of its own
                caller = self.peer.verifier.verify("POST", PATH, msg.headers,
                                                   body_digest(msg.body), now=time.time(),
                                                   address=stream_caller.address)
                if caller.public_key != stream_caller.public_key:
                    raise Unauthenticated("a call must be signed by the key that opened its "
                                          "stream")
            self.peer.authorize(caller)
            kid = caller.key_id
            if self._serving.get(kid, 0) >= MAX_IN_FLIGHT:
                raise RateLimited(f"{caller.name} has {MAX_IN_FLIGHT} calls running here already")
        except P2PError as e:
            # to the stream's opener, whom its signed open authenticated
            answer = CallReply(msg.id, e.status, wire.dumps(e.to_wire()))
            self.nursery.start_soon(self._reply, stream_caller, answer)
            raise
        self._serving[kid] = self._serving.get(kid, 0) + 1
        self.nursery.start_soon(self._serve, caller, msg)

    async def _serve(self, caller: Caller, msg: Call) -> None:
        key = (caller.key_id, msg.id)
        try:
            with trio.CancelScope() as scope:
                self._scopes[key] = (caller.name, scope)
                await self._serve_one(caller, msg)
        finally:
            self._scopes.pop(key, None)
            kid = caller.key_id
            left = self._serving.get(kid, 1) - 1
            if left:
                self._serving[kid] = left
            else:
                self._serving.pop(kid, None)

    async def _serve_one(self, caller: Caller, msg: Call) -> None:
        peer = self.peer
        try:
            inner = wire.decode(msg.body, max_size=peer.config.max_body)
            reply = await peer.router.dispatch(peer, caller, inner)
            size = wire.payload_bytes(reply)
            if size < INLINE and len(body := wire.encode(reply)) < INLINE:
                answer = CallReply(msg.id, 200, body)
            else:   # too large to push: the caller fetches it with a request
                answer = CallReply(msg.id, 303, self._hold(caller, reply, size))
        except P2PError as e:
            if e.status >= 500:
                log.warning("call from %s failed: %s", caller.name, e.code)
            answer = CallReply(msg.id, e.status, wire.dumps(e.to_wire()))
        except Exception:  # noqa: BLE001 - answered like /rpc answers it
            log.exception("unexpected error in a call handler")
            err = P2PError("internal error; see the peer's log")
            answer = CallReply(msg.id, 500, wire.dumps(err.to_wire()))
        await self._reply(caller, answer)

    async def _reply(self, caller: Caller, answer: CallReply) -> None:
        # on a link open between us, never a new dial; a caller whose link broke has
        # been told so by its own end and no longer waits
        if await self.peer.reply(caller.key_id, answer, timeout=self.peer.config.request_timeout):
            return
        log.info("could not answer a call from %s: no stream between us is open",
                 caller.name)

    def _hold(self, caller: Caller, reply, size: int | None = None) -> bytes:
        """Keep `reply` for `caller` to fetch for :data:`HOLD` seconds; its ticket.

        A caller that never fetches cannot pile replies up here: past :data:`HELD_MAX`
        of its own, or :data:`HELD_BYTES` in all, its oldest is dropped (fetching that
        one then fails with NotFound, as an expired one does)."""
        now = time.monotonic()
        for t in [t for t, (_, until, _, _) in self._held.items() if until < now]:
            del self._held[t]
        size = wire.payload_bytes(reply) if size is None else size
        mine = [t for t, (kid, _, _, _) in self._held.items() if kid == caller.key_id]
        held = sum(n for kid, _, _, n in self._held.values() if kid == caller.key_id)
        while mine and (len(mine) >= HELD_MAX or held + size > HELD_BYTES):
            held -= self._held.pop(mine.pop(0))[3]   # dicts keep insertion order: oldest first
        ticket = os.urandom(16)
        self._held[ticket.hex()] = (caller.key_id, now + HOLD, reply, size)
        return ticket

    def fetch(self, caller: Caller, ticket: str):
        held = self._held.get(ticket)
        if held is None or held[0] != caller.key_id or held[1] < time.monotonic():
            raise NotFound("no reply is held under that ticket (fetched, expired, dropped for "
                           "newer ones, or another's)")
        del self._held[ticket]
        return held[2]

    def answered(self, callee: Caller, msg: CallReply) -> None:
        entry = self._waiting.get((callee.key_id, msg.id))
        if entry is None:   # late (timed out) or not ours: nobody waits for it
            return
        done, slot = entry
        if not done.is_set():
            slot.append((msg.status, msg.body))
            done.set()


router = Router()


@router.on(Call)
async def _call(peer, caller, msg: Call):
    peer.calls.accept(caller, msg)


@router.on(Nop)
async def _nop(peer, caller, msg: Nop):
    return None


@router.on(CancelCall)
async def _cancel_call(peer, caller, msg: CancelCall):
    peer.calls.cancel(caller, msg.id)


@router.on(CallReply)
async def _call_reply(peer, caller, msg: CallReply):
    peer.calls.answered(caller, msg)


@router.on(FetchReply)
async def _fetch_reply(peer, caller, msg: FetchReply):
    return peer.calls.fetch(caller, msg.ticket)
