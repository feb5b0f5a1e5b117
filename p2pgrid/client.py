"""Outgoing requests: signed CBOR over HTTP/2, one pinned connection per peer.

A :class:`Target` names a peer by address *and* by key (its certificate, learned
from the signed directory record, or on first contact). Each target gets its own
HTTP/2 connection pool (an ``httpx.AsyncHTTPTransport``) whose TLS context
trusts only that certificate.

Requests go to the transport directly, not through ``httpx.AsyncClient``: the
client's URL merging, cookie jar, auth and redirect machinery cost about a
quarter of a small request's CPU time and do nothing for signed RPC between
peers (no redirects, no cookies, no proxies). Large bodies are encoded with one
copy into a fresh buffer, and large replies are read into a buffer of their
declared size instead of being joined from chunks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import ssl
import threading
import time
from dataclasses import dataclass

import h2.exceptions
import httpx
import numpy as np
import trio

from . import buffers, bulk, tls, transport, wire
from .auth import CHANNEL, sign_request
from .errors import P2PError, PeerUnavailable, Unauthenticated, error_from_wire
from .identity import Identity, key_id

log = logging.getLogger("p2pgrid.client")

OFFLOAD = 1 << 20  # bodies larger than this are encoded, hashed and decoded in a worker thread
_NOT_DELIVERED = (httpx.ConnectError, httpx.WriteError, httpx.PoolTimeout, httpx.ConnectTimeout)
# h2's own ProtocolError escapes httpcore unmapped when a connection is closed
# under a request (another task's _drop, say) before the request started on it
_BROKEN = (httpx.TransportError, ssl.SSLError, OSError, h2.exceptions.ProtocolError)


@dataclass(frozen=True)
class Target:
    address: str             # "host:port"
    key_id: str              # the audience requests are signed for
    cert: bytes | None = None  # pinned certificate (DER); None only in --insecure mode


def remote_error(data, status: int) -> P2PError:
    """The typed error a peer answered with `status` and the body `data`."""
    try:
        body = wire.loads(data)
    except P2PError:
        body = None
    return error_from_wire(body, status)


async def maybe_thread(n: int, fn, *args):
    """fn(*args), in a worker thread when it handles more than OFFLOAD bytes."""
    return await trio.to_thread.run_sync(fn, *args) if n > OFFLOAD else fn(*args)


async def _encode_and_hash(msg) -> tuple:
    """The message's encoding (a snapshot: later changes to its tensors are not
    sent) and the SHA-256 of it, which the request signs.

    For a large message the two overlap: one worker thread copies the tensors
    into the send buffer a slice at a time while another hashes the slices
    already copied. Both must finish before the request's headers can go, so
    this is time nothing else hides.
    """
    if wire.payload_bytes(msg) <= OFFLOAD:
        body = wire.encode_buffer(msg)
        return body, hashlib.sha256(body).hexdigest()
    parts = await trio.to_thread.run_sync(wire.encode_parts, msg)
    if len(parts) == 1:
        body = parts[0]
        return body, await trio.to_thread.run_sync(lambda: hashlib.sha256(body).hexdigest())
    buf = buffers.take(sum(len(p) for p in parts))
    copied = _Progress()

    def copy():
        at = 0
        try:
            for part in parts:
                src = np.frombuffer(part, dtype=np.uint8)
                for start in range(0, len(src), _SLICE):
                    piece = src[start:start + _SLICE]
                    buf[at:at + len(piece)] = piece
                    at += len(piece)
                    copied.advance(at)
        finally:
            copied.advance(at, done=True)

    def digest():
        sha, hashed = hashlib.sha256(), 0
        while True:
            upto, done = copied.wait_past(hashed)
            sha.update(buf[hashed:upto])
            hashed = upto
            if done:
                return sha.hexdigest()

    hexdigest = []

    async def hash_as_copied():
        hexdigest.append(await trio.to_thread.run_sync(digest))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, copy)
        nursery.start_soon(hash_as_copied)
    return memoryview(buf), hexdigest[0]


_SLICE = 4 << 20  # bytes copied between hash updates


class _Progress:
    """How far one thread has got, for another to follow."""

    def __init__(self):
        self._cond = threading.Condition()
        self._at, self._done = 0, False

    def advance(self, at: int, done: bool = False) -> None:
        with self._cond:
            self._at, self._done = at, done
            self._cond.notify()

    def wait_past(self, at: int) -> tuple[int, bool]:
        with self._cond:
            while self._at <= at and not self._done:
                self._cond.wait()
            return self._at, self._done


def _server_address(resp: httpx.Response) -> str:
    """The IP address the response's connection reached, from its socket."""
    stream = resp.extensions.get("network_stream")
    try:
        peer = stream.get_extra_info("server_addr") if stream is not None else None
    except (AttributeError, OSError):   # closed already, or not a socket
        return ""
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


async def _read_reply(resp: httpx.Response):
    """The reply body: bytes, or for a large declared length a view of a buffer that size."""
    declared = resp.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) <= OFFLOAD or "content-encoding" in resp.headers:
        return await resp.aread()
    buf, at = buffers.take(int(declared)), 0
    async for chunk in resp.aiter_raw():
        if at + len(chunk) > len(buf):
            raise httpx.RemoteProtocolError("reply is longer than its content-length")
        buf[at:at + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        at += len(chunk)
    return memoryview(buf)[:at]


class Transport:
    """Sends messages to peers as `name`, signing with `identity`."""

    def __init__(self, identity: Identity, name: str, *, insecure: bool = False,
                 timeout: float = 120.0, local_address: str | None = None):
        self.identity, self.name, self.insecure, self.timeout = identity, name, insecure, timeout
        self.local_address = local_address   # the IP our connections leave from (None: any)
        self.headers: dict[str, str] = {}  # sent with every request (a membership certificate)
        self._pools: dict[tuple[str, bytes | None], httpx.AsyncHTTPTransport] = {}
        # A pool whose connection failed is retired, not closed: closing it under
        # other requests still running on it would fail them too, though their
        # peer may be fine. It closes when its last request is done.
        self._busy: dict[int, int] = {}
        self._retired: dict[int, httpx.AsyncHTTPTransport] = {}
        self._bulk: dict[tuple[str, bytes], bulk.Pool] = {}  # bulk connections, per target
        self.bytes_sent = 0
        self.bytes_received = 0
        self._tuned = transport.tuned()  # speed changes on the peer's connections, or stock speed
        transport.require_safety()

    def _pool(self, target: Target, lane: str = "rpc") -> httpx.AsyncHTTPTransport:
        # Push streams get a connection of their own ("push" lane): a request that shares
        # a connection with a stream that stays open can wait on that stream's flow
        # control and reads (httpcore reads for one stream at a time).
        k = (target.address, target.cert, lane)
        pool = self._pools.get(k)
        if pool is None:
            from .transport.httpcore import PeerHTTPTransport

            kind = functools.partial(PeerHTTPTransport, tuned=self._tuned,
                                     local_address=self.local_address)
            if self.insecure:
                pool = kind()
            else:
                if target.cert is None:
                    raise Unauthenticated(f"no pinned certificate for {target.address}")
                try:
                    verify = tls.client_context(target.cert)
                except ValueError:  # a signed record may still carry garbage for a certificate
                    raise Unauthenticated(f"the certificate pinned for {target.address} is "
                                          f"unusable") from None
                pool = kind(verify=verify)
            self._pools[k] = pool
        return pool

    async def request(self, target: Target, msg, *, timeout: float | None = None,
                      encoded: bytes | None = None, large_reply: bool = False):
        """Send one message and return the reply message; remote errors re-raise here typed.
        `encoded`: the message's encoding, where the caller has it already. A large
        message, or one whose reply the caller knows to be large (`large_reply`), travels
        on a bulk connection over TLS (:mod:`p2pgrid.bulk`)."""
        if not self.insecure:
            if encoded is not None and (large_reply or len(encoded) >= bulk.MIN_BODY):
                return await self._bulk_request(target, [encoded], timeout or self.timeout)
            if encoded is None and (large_reply or wire.payload_bytes(msg) >= bulk.MIN_BODY):
                return await self._bulk_stream(target, msg, timeout or self.timeout)
        if encoded is None:
            body, digest = await _encode_and_hash(msg)
        else:
            body, digest = encoded, hashlib.sha256(encoded).hexdigest()
        size = len(body)
        url = f"{'http' if self.insecure else 'https'}://{target.address}/rpc"
        timeouts = httpx.Timeout(timeout or self.timeout).as_dict()
        for attempt in (1, 2):
            headers = sign_request(self.identity, self.name, target.key_id, "POST", "/rpc",
                                   digest=digest, now=time.time()) | self.headers
            headers["content-type"] = "application/cbor"
            headers["content-length"] = str(size)
            headers["host"] = target.address  # httpx adds it only when it builds the stream
            pool = self._pool(target)
            self._busy[id(pool)] = self._busy.get(id(pool), 0) + 1
            try:
                # the body in one piece (bytes or a view): TunedHTTP2Connection frames it as views
                request = httpx.Request("POST", url, headers=headers, stream=httpx.ByteStream(body),
                                        extensions={"timeout": timeouts})
                try:
                    resp = await pool.handle_async_request(request)
                except _NOT_DELIVERED as e:
                    # A pooled connection the peer closed (it restarted, say): the
                    # request never reached it, so sending again on a new one is safe.
                    self._retire(target, pool)
                    if attempt == 2:
                        raise PeerUnavailable(f"peer at {target.address} is unreachable: "
                                              f"{type(e).__name__}") from None
                    continue
                except _BROKEN as e:
                    self._retire(target, pool)
                    raise PeerUnavailable(f"peer at {target.address} did not answer: "
                                          f"{type(e).__name__}") from None
                try:
                    data = await _read_reply(resp)  # closes resp once read
                except BaseException as e:
                    with trio.move_on_after(1) as scope:
                        scope.shield = True
                        with contextlib.suppress(Exception):
                            await resp.aclose()
                    if isinstance(e, _BROKEN):
                        self._retire(target, pool)
                        raise PeerUnavailable(f"peer at {target.address} did not answer: "
                                              f"{type(e).__name__}") from None
                    raise
                break
            finally:
                await self._release(pool)
        self.bytes_sent += size
        self.bytes_received += len(data)
        if resp.status_code != 200:
            raise remote_error(data, resp.status_code)
        # adopt: a large reply is read into a buffer of our own (see _read_reply)
        return await maybe_thread(len(data), lambda d: wire.decode(d, adopt=True), data)

    async def _bulk_stream(self, target: Target, msg, timeout: float):
        """A message on a bulk connection, sent from its own buffers (no snapshot copy,
        no hash: the connection binds the body to the signed headers, see
        :data:`p2pgrid.auth.CHANNEL`). A tensor changed while the message is in flight
        arrives changed, as it would have been read a moment later."""
        parts = await maybe_thread(wire.payload_bytes(msg), wire.encode_parts, msg)
        return await self._bulk_request(target, parts, timeout)

    async def _bulk_request(self, target: Target, parts, timeout: float):
        """:meth:`request` on a bulk connection: the body `parts` (buffers) after headers
        signed as any request's, with the digest :data:`p2pgrid.auth.CHANNEL`."""
        parts = [memoryview(p).cast("B") for p in parts]
        size = sum(len(p) for p in parts)
        if target.cert is None:
            raise Unauthenticated(f"no pinned certificate for {target.address}")
        k = (target.address, target.cert)
        pool = self._bulk.get(k)
        if pool is None:
            try:
                context = bulk.client_context(tls.client_context(target.cert))
            except ValueError:
                raise Unauthenticated(f"the certificate pinned for {target.address} is "
                                      f"unusable") from None
            pool = self._bulk[k] = bulk.Pool(target.address, context)
        headers = sign_request(self.identity, self.name, target.key_id, "POST", "/rpc",
                               digest=CHANNEL, now=time.time()) | self.headers
        headers["content-type"] = "application/cbor"
        headers["content-length"] = str(size)
        try:
            status, data = await pool.exchange(bulk.encode_head(headers), parts,
                                               timeout=timeout, connect_timeout=min(timeout, 10.0))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise PeerUnavailable(f"peer at {target.address} did not answer: "
                                  f"{type(e).__name__}") from None
        except trio.TooSlowError:
            raise PeerUnavailable(f"peer at {target.address} did not answer within "
                                  f"{timeout:g} s") from None
        self.bytes_sent += size
        self.bytes_received += len(data)
        if status != 200:
            raise remote_error(data, status)
        # adopt: the reply's buffer is ours alone
        return await maybe_thread(len(data), lambda d: wire.decode(d, adopt=True), data)

    async def stream(self, target: Target, path: str, frames, *, digest: str,
                     open_timeout: float = 10.0, headers: dict[str, str] | None = None) -> None:
        """POST `path` with a body streamed from the async iterator `frames` (each item
        sent as it comes); returns once the body has ended and the reply is 200,
        raises the remote error or PeerUnavailable otherwise. The request is signed
        with the fixed `digest` the route expects; `headers` are added to it."""
        url = f"{'http' if self.insecure else 'https'}://{target.address}{path}"
        extra = headers or {}
        headers = sign_request(self.identity, self.name, target.key_id, "POST", path,
                               digest=digest, now=time.time()) | self.headers
        headers.update(extra)
        headers["content-type"] = "application/cbor"
        headers["host"] = target.address
        headers["transfer-encoding"] = "chunked"  # tells httpcore there is a body (not sent in h2)
        sent = 0

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self):
                nonlocal sent
                async for chunk in frames:
                    sent += len(chunk)
                    yield chunk

            async def aclose(self):
                await frames.aclose()

        timeouts = httpx.Timeout(open_timeout, read=None, write=open_timeout).as_dict()
        pool = self._pool(target, "push")
        self._busy[id(pool)] = self._busy.get(id(pool), 0) + 1
        try:
            request = httpx.Request("POST", url, headers=headers, stream=Body(),
                                    extensions={"timeout": timeouts})
            try:
                resp = await pool.handle_async_request(request)
                data = await _read_reply(resp)
            except _BROKEN as e:
                self._retire(target, pool)
                raise PeerUnavailable(f"peer at {target.address} broke the stream: "
                                      f"{type(e).__name__}") from None
        finally:
            self.bytes_sent += sent
            await self._release(pool)
        if resp.status_code != 200:
            raise remote_error(data, resp.status_code)

    async def receive_stream(self, target: Target, path: str, on_data, started, *, digest: str,
                             open_timeout: float = 10.0,
                             headers: dict[str, str] | None = None) -> None:
        """POST `path` with an empty body and hand each chunk of the reply's body to
        `await on_data(chunk)` as it comes, until the reply ends. `started(address)` is
        called once the reply's headers say 200 (within `open_timeout`), with the IP
        address the connection's socket reached ("" if unknown); another status
        raises the remote error, a broken connection PeerUnavailable. Rides the same
        connection as :meth:`stream` to `target`."""
        url = f"{'http' if self.insecure else 'https'}://{target.address}{path}"
        extra = headers or {}
        headers = sign_request(self.identity, self.name, target.key_id, "POST", path,
                               digest=digest, now=time.time()) | self.headers
        headers.update(extra)
        headers["content-type"] = "application/cbor"
        headers["host"] = target.address   # no body headers: END_STREAM rides the HEADERS
        timeouts = httpx.Timeout(open_timeout, read=None, write=open_timeout).as_dict()
        pool = self._pool(target, "push")
        self._busy[id(pool)] = self._busy.get(id(pool), 0) + 1
        resp = None
        try:
            request = httpx.Request("POST", url, headers=headers, stream=httpx.ByteStream(b""),
                                    extensions={"timeout": timeouts})
            try:
                with trio.fail_after(open_timeout):
                    resp = await pool.handle_async_request(request)
                if resp.status_code != 200:
                    raise remote_error(await _read_reply(resp), resp.status_code)
                started(_server_address(resp))
                async for chunk in resp.aiter_raw():
                    self.bytes_received += len(chunk)
                    await on_data(chunk)
            except trio.TooSlowError:
                self._retire(target, pool)
                raise PeerUnavailable(f"peer at {target.address} did not open the stream back "
                                      f"within {open_timeout:g} s") from None
            except _BROKEN as e:
                self._retire(target, pool)
                raise PeerUnavailable(f"peer at {target.address} broke the stream back: "
                                      f"{type(e).__name__}") from None
            finally:
                if resp is not None:
                    with trio.move_on_after(1) as scope:
                        scope.shield = True
                        with contextlib.suppress(Exception):
                            await resp.aclose()
        finally:
            await self._release(pool)

    def retire(self, target: Target, lane: str = "rpc") -> None:
        """The next request (or stream, lane "push") to `target` takes a new connection, if
        one is running on the current; an idle pooled connection is checked by httpcore
        before reuse, and a closed one is not reused."""
        pool = self._pools.get((target.address, target.cert, lane))
        if pool is not None and self._busy.get(id(pool)):   # it closes when its last ends
            self._retire(target, pool)

    def _retire(self, target: Target, pool: httpx.AsyncHTTPTransport) -> None:
        """New requests to `target` get a fresh pool; this one closes once idle."""
        for k in [k for k, p in self._pools.items() if p is pool]:
            del self._pools[k]
        self._retired[id(pool)] = pool

    async def _release(self, pool: httpx.AsyncHTTPTransport) -> None:
        n = self._busy.get(id(pool), 1) - 1
        if n:
            self._busy[id(pool)] = n
            return
        self._busy.pop(id(pool), None)
        if self._retired.pop(id(pool), None) is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(Exception):
                    await pool.aclose()

    async def aclose(self) -> None:
        pools = list(self._pools.values()) + list(self._retired.values())
        pools += list(self._bulk.values())
        self._pools, self._retired, self._bulk = {}, {}, {}
        with trio.move_on_after(2) as scope:
            scope.shield = True
            for pool in pools:
                await pool.aclose()


async def fetch_certificate(address: str, *, timeout: float = 5.0) -> bytes:
    """First contact (trust on first use): the certificate a peer presents at `address`.

    The result is only as trustworthy as the network path; callers check it
    against a key id they know (from mDNS, ``--join KEYID@host:port``, or a
    directory record) whenever they have one.
    """
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(tls.ALPN)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=ctx)
            try:
                await stream.do_handshake()
                der = stream.getpeercert(binary_form=True)
            finally:
                await stream.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as e:
        raise PeerUnavailable(f"cannot reach {address}: {type(e).__name__}") from None
    if not der:
        raise Unauthenticated(f"{address} presented no certificate")
    return der


async def learn_target(address: str, *, expect_key_id: str | None = None,
                       insecure: bool = False) -> Target:
    """A Target for a bare address, checked against `expect_key_id` when given."""
    if insecure:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=5.0) as c:
            try:
                r = await c.get(f"http://{address}/id")
            except httpx.TransportError as e:
                raise PeerUnavailable(f"cannot reach {address}: {type(e).__name__}") from None
        info = wire.loads(r.content)
        kid = key_id(bytes(info["public_key"]))
        cert = None
    else:
        cert = await fetch_certificate(address)
        try:
            kid = key_id(tls.cert_public_key(cert))
        except ValueError:
            raise Unauthenticated(f"{address} presented a certificate without an Ed25519 key") from None
    if expect_key_id is not None and kid != expect_key_id:
        raise Unauthenticated(f"{address} presented key {kid}, expected {expect_key_id}")
    return Target(address, kid, cert)
