"""Outgoing requests: signed CBOR over HTTP/2, one pinned connection per peer.

A :class:`Target` names a peer by address *and* by key (its certificate, learned
from the signed directory record, or on first contact). Each target gets its own
``httpx.AsyncClient`` whose TLS context trusts only that certificate.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
from dataclasses import dataclass

import httpx
import trio

from . import h2tuning, tls, wire
from .auth import sign_request
from .errors import P2PError, PeerUnavailable, Unauthenticated, error_from_wire
from .identity import Identity, key_id

log = logging.getLogger("p2pgrid.client")

CHUNK = 1 << 20
OFFLOAD = 1 << 20
_NOT_DELIVERED = (httpx.ConnectError, httpx.WriteError, httpx.PoolTimeout, httpx.ConnectTimeout)


@dataclass(frozen=True)
class Target:
    address: str             # "host:port"
    key_id: str              # the audience requests are signed for
    cert: bytes | None = None  # pinned certificate (DER); None only in --insecure mode


async def _chunks(body: bytes):
    view = memoryview(body)
    for start in range(0, len(body), CHUNK):
        # bytes, not memoryview: httpcore slices what it gets, and slicing a
        # small bytes is cheap where re-slicing one huge body is quadratic
        yield bytes(view[start:start + CHUNK])


async def _maybe_thread(n: int, fn, *args):
    return await trio.to_thread.run_sync(fn, *args) if n > OFFLOAD else fn(*args)


class Transport:
    """Sends messages to peers as `name`, signing with `identity`."""

    def __init__(self, identity: Identity, name: str, *, insecure: bool = False,
                 timeout: float = 120.0):
        self.identity, self.name, self.insecure, self.timeout = identity, name, insecure, timeout
        self._clients: dict[tuple[str, bytes | None], httpx.AsyncClient] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        h2tuning.apply()

    def _client(self, target: Target) -> httpx.AsyncClient:
        k = (target.address, target.cert)
        c = self._clients.get(k)
        if c is None:
            if self.insecure:
                c = httpx.AsyncClient(http1=False, http2=True, base_url=f"http://{target.address}",
                                      timeout=self.timeout)
            else:
                if target.cert is None:
                    raise Unauthenticated(f"no pinned certificate for {target.address}")
                c = httpx.AsyncClient(http1=False, http2=True, verify=tls.client_context(target.cert),
                                      base_url=f"https://{target.address}", timeout=self.timeout)
            self._clients[k] = c
        return c

    async def request(self, target: Target, msg, *, timeout: float | None = None):
        """Send one message and return the reply message; remote errors re-raise here typed."""
        body = await _maybe_thread(_size_hint(msg), wire.encode, msg)
        digest = await _maybe_thread(len(body), lambda b: hashlib.sha256(b).hexdigest(), body)
        for attempt in (1, 2):
            headers = sign_request(self.identity, self.name, target.key_id, "POST", "/rpc",
                                   digest=digest, now=time.time())
            headers["content-type"] = "application/cbor"
            headers["content-length"] = str(len(body))
            client = self._client(target)
            content = _chunks(body) if len(body) > CHUNK else body
            try:
                resp = await client.post("/rpc", content=content, headers=headers,
                                          timeout=timeout or self.timeout)
                break
            except _NOT_DELIVERED as e:
                # A pooled connection the peer closed (it restarted, say): the
                # request never reached it, so sending again on a new one is safe.
                await self._drop(target)
                if attempt == 2:
                    raise PeerUnavailable(f"peer at {target.address} is unreachable: "
                                          f"{type(e).__name__}") from None
            except (httpx.TransportError, ssl.SSLError, OSError) as e:
                await self._drop(target)
                raise PeerUnavailable(f"peer at {target.address} did not answer: "
                                      f"{type(e).__name__}") from None
        self.bytes_sent += len(body)
        data = resp.content
        self.bytes_received += len(data)
        if resp.status_code != 200:
            try:
                body = wire.loads(data)
            except P2PError:
                body = None
            raise error_from_wire(body, resp.status_code)
        return await _maybe_thread(len(data), wire.decode, data)

    async def _drop(self, target: Target) -> None:
        c = self._clients.pop((target.address, target.cert), None)
        if c is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await c.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        with trio.move_on_after(2) as scope:
            scope.shield = True
            for c in clients:
                await c.aclose()


def _size_hint(msg) -> int:
    import torch
    return sum(v.numel() * v.element_size() for v in vars(msg).values()
               if isinstance(v, torch.Tensor)) if hasattr(msg, "__dict__") else 0


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
