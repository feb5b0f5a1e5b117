"""Typed errors, each mapped to one HTTP status.

A handler raises one of these; the server turns it into a CBOR error body with
that status, and the client turns the body back into the same exception class.
Messages are written for the person at the other end, so they must never
contain a share, a key or a private tensor value: name shapes, dtypes, ids.

>>> from p2pgrid.errors import PermissionDenied, error_from_wire
>>> e = error_from_wire(PermissionDenied("no get right on obj 1f").to_wire())
>>> type(e).__name__, e.status
('PermissionDenied', 403)
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of every error p2pgrid raises on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str = "", **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict:
        return {"error": self.code, "message": self.message, "status": self.status,
                "details": self.details}


class BadRequest(P2PError):
    """The request is well-formed CBOR but makes no sense (wrong fields, shapes, dtypes)."""
    status, code = 400, "bad_request"


class MalformedMessage(BadRequest):
    """The body is not valid CBOR, or not a known message."""
    code = "malformed_message"


class UnknownOp(BadRequest):
    """An op graph names an op outside the whitelist."""
    code = "unknown_op"


class ShapeError(BadRequest):
    """Operands' shapes or dtypes do not fit the op."""
    code = "shape_error"


class ComputeLimitExceeded(P2PError):
    """A program would cost its host more than the host allows its caller (memory held
    at once, floating-point operations, wall-clock time); ``details["limit"]`` names
    the peer's setting."""
    status, code = 422, "compute_limit"


class Unauthenticated(P2PError):
    """Missing, malformed, or wrong signature; unknown key."""
    status, code = 401, "unauthenticated"


class ReplayDetected(Unauthenticated):
    """A request's nonce was seen before, or its timestamp is outside the window."""
    code = "replay"


class PermissionDenied(P2PError):
    """The caller is authenticated but the object's rules do not allow this."""
    status, code = 403, "permission_denied"


class NotFound(P2PError):
    """No object, peer, model or route by that name."""
    status, code = 404, "not_found"


class Conflict(P2PError):
    """The request clashes with state (a name bound to another key, a duplicate id)."""
    status, code = 409, "conflict"


class PayloadTooLarge(P2PError):
    """The body (declared or actual) is larger than this peer accepts."""
    status, code = 413, "payload_too_large"


class RateLimited(P2PError):
    status, code = 429, "rate_limited"


class PeerUnavailable(P2PError):
    """A peer did not answer (down, unreachable, timed out)."""
    status, code = 503, "peer_unavailable"


class ProtocolError(P2PError):
    """A multi-party protocol broke: a party died, a message came out of order."""
    status, code = 502, "protocol_error"


class CheatingDetected(Conflict):
    """An actively secure SMPC session's MAC check failed: some party deviated.

    Raised on every honest party of the session (the message names the session, never
    a value); nothing derived from the session's openings is revealed.
    """
    status, code = 409, "cheating_detected"


class RoundFailed(ProtocolError):
    """A federated round could not go on: too few selected peers returned an update.
    The message names each peer left out and why (refused, failed, or too slow)."""
    code = "round_failed"


_REGISTRY: dict[str, type[P2PError]] = {}


def _register(cls: type[P2PError]) -> None:
    _REGISTRY[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(P2PError)


def register_error(cls: type[P2PError]) -> type[P2PError]:
    """Class decorator for errors defined elsewhere (protocols, governance)."""
    _REGISTRY[cls.code] = cls
    return cls


def error_from_wire(body: dict, status: int | None = None) -> P2PError:
    """Rebuild the typed exception a remote peer raised."""
    if not isinstance(body, dict):
        return P2PError(f"peer answered {status} with a body that is not an error")
    cls = _REGISTRY.get(body.get("error"), P2PError)
    exc = cls(str(body.get("message", "")), **(body.get("details") or {}))
    if cls is P2PError and status:
        exc.status = status
    return exc
