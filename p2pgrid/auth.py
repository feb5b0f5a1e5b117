"""Signed requests: who sent this, for whom, and has it been seen before (sans-IO).

A client signs ``method, path, its name, the audience's key id, a timestamp, a
nonce and the body's SHA-256``. The server checks the signature with the key in
the request, that it is the audience, that the timestamp is within the window,
and that the nonce is fresh. Whether that key may use that *name* is the
name registry's business (see :class:`p2pgrid.names.Names`), not this module's.
A body on a bulk connection (:mod:`p2pgrid.bulk`) is bound to its signed headers by the
TLS connection they share, not by a hash: its headers sign the digest :data:`CHANNEL`,
which a server accepts only on such a connection.

>>> from p2pgrid.identity import Identity
>>> alice, server = Identity.generate(), Identity.generate()
>>> h = sign_request(alice, "alice", server.key_id, "POST", "/rpc", b"body", now=1000.0)
>>> v = Verifier(server.key_id)
>>> v.verify("POST", "/rpc", h, body_digest(b"body"), now=1001.0).name
'alice'
>>> v.verify("POST", "/rpc", h, body_digest(b"body"), now=1001.0)
Traceback (most recent call last):
...
p2pgrid.errors.ReplayDetected: request nonce was already used
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

from .errors import ReplayDetected, Unauthenticated
from .identity import Identity, key_id, verify

log = logging.getLogger("p2pgrid.auth")

H_NAME, H_KEY, H_AUD, H_TS, H_NONCE, H_DIGEST, H_SIG = (
    "x-p2p-name", "x-p2p-key", "x-p2p-aud", "x-p2p-ts", "x-p2p-nonce", "x-p2p-digest", "x-p2p-sig")
WINDOW = 60.0  # seconds of clock skew and transit we accept
H_CERT = "x-p2p-cert"  # optional: the caller's network membership certificate (p2pgrid.membership)
SKEW_LOG_EVERY = 60.0  # seconds between two warnings about one caller's clock


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def b64(b: bytes) -> str:
    """Unpadded base64url, as signed headers carry bytes."""
    return _b64(b)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _canonical(method, path, name, aud, ts, nonce, digest) -> bytes:
    return "\n".join(["p2pgrid-v1", method.upper(), path, name, aud, ts, nonce, digest]).encode()


def sign_request(identity: Identity, name: str, audience: str, method: str, path: str,
                 body: bytes | None = None, *, digest: str | None = None,
                 now: float) -> dict[str, str]:
    """Headers that authenticate one request (give `digest` for a body you stream)."""
    digest = digest if digest is not None else body_digest(body or b"")
    ts, nonce = f"{now:.3f}", os.urandom(16).hex()
    sig = identity.sign(_canonical(method, path, name, audience, ts, nonce, digest))
    return {H_NAME: name, H_KEY: _b64(identity.public_bytes), H_AUD: audience, H_TS: ts,
            H_NONCE: nonce, H_DIGEST: digest, H_SIG: _b64(sig)}


# The digest a bulk request's headers sign in place of the body's SHA-256. Its body
# follows the signed headers on the same TLS connection, which the caller opened to
# the server's pinned key: nobody else can write on it, change it or replay it (the
# headers' nonce is fresh), so the connection binds the body to the caller as calls on
# a push stream are bound (p2pgrid.calls), and neither side spends 0.55-0.7 ms per MB
# hashing it. Over HTTP/2 (h2c, or streams hypercorn multiplexes) it is refused.
CHANNEL = "tls-channel"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the name it claims and the key that proved it.
    ``cert``: the membership certificate it sent along (CBOR; checked by the peer
    against its network key, never trusted here). ``address``: the IP address of the
    connection it came on, as this peer's socket saw it (never a header the caller
    writes); "" where there is none (the peer itself, a test's direct dispatch)."""
    name: str
    public_key: bytes
    cert: bytes = field(default=b"", compare=False, repr=False)
    address: str = field(default="", compare=False)

    @cached_property   # asked for on every message a stream carries
    def key_id(self) -> str:
        return key_id(self.public_key)


class Verifier:
    """Checks signed headers for one audience, remembering nonces for the window."""

    def __init__(self, audience: str, *, window: float = WINDOW, max_nonces: int = 1 << 20):
        self.audience = audience
        self.window = window
        self.max_nonces = max_nonces
        self._nonces: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._skew_warned: OrderedDict[str, float] = OrderedDict()  # key id -> when

    def verify(self, method: str, path: str, headers, digest: str, *, now: float,
               address: str = "") -> Caller:
        """Return the caller, or raise Unauthenticated / ReplayDetected.

        `digest` is the SHA-256 of the body as received; it must match the signed one.
        `address`: the client IP of the connection the request came on (the server's
        socket's peer; see :attr:`Caller.address`).
        """
        try:
            name, key_b64, aud, ts, nonce, claimed, sig_b64 = (
                headers[h] for h in (H_NAME, H_KEY, H_AUD, H_TS, H_NONCE, H_DIGEST, H_SIG))
        except KeyError as e:
            raise Unauthenticated(f"request is not signed (missing {e.args[0]})") from None
        try:
            public, sig, t = _unb64(key_b64), _unb64(sig_b64), float(ts)
        except (ValueError, TypeError):
            raise Unauthenticated("malformed signature headers") from None
        if len(public) != 32 or not name or len(name) > 64 or len(nonce) > 64:
            raise Unauthenticated("malformed signature headers")
        if aud != self.audience:
            raise Unauthenticated("request was signed for another peer")
        if claimed != digest:
            raise Unauthenticated("body does not match its signed digest")
        if not verify(public, _canonical(method, path, name, aud, ts, nonce, claimed), sig):
            raise Unauthenticated("bad signature")
        if abs(now - t) > self.window:
            self._warn_skew(name, key_id(public), t - now, now)
            # clock_offset (ours minus theirs) lets the caller see that its clock is off
            raise ReplayDetected(f"request timestamp is {now - t:+.0f} s off; the window is "
                                 f"{self.window:.0f} s", clock_offset=round(now - t, 1))
        self._forget(now)
        k = (key_b64, nonce)
        if k in self._nonces:
            raise ReplayDetected("request nonce was already used")
        self._nonces[k] = t
        cert = b""
        if H_CERT in headers:
            try:
                cert = _unb64(headers[H_CERT])
            except (ValueError, TypeError):
                raise Unauthenticated("malformed membership certificate header") from None
            if len(cert) > 4096:
                raise Unauthenticated("membership certificate header too long")
        return Caller(name, public, cert, address)

    def _warn_skew(self, name: str, kid: str, offset: float, now: float) -> None:
        # Signed, so the name is the key's own claim; one line per key a minute, so a
        # skewed peer retrying all day does not flood the log. Bounded like the nonces.
        last = self._skew_warned.get(kid)
        if last is not None and now - last < SKEW_LOG_EVERY:
            return
        self._skew_warned[kid] = now
        self._skew_warned.move_to_end(kid)
        while len(self._skew_warned) > 1024:
            self._skew_warned.popitem(last=False)
        log.warning("refusing requests from %r (key %s): its clock is %+.0f s off ours, "
                    "outside the %.0f s window; one of the two clocks needs fixing (NTP)",
                    name, kid, offset, self.window)

    def _forget(self, now: float) -> None:
        while self._nonces:
            k, t = next(iter(self._nonces.items()))
            if t >= now - 2 * self.window and len(self._nonces) < self.max_nonces:
                break
            self._nonces.popitem(last=False)
