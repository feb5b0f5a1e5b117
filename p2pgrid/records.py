"""Peer records: what a peer says about itself, signed (sans-IO).

A :class:`PeerRecord` is a signed :class:`RecordHead` (name, key, version, times,
``content_version`` and a hash of the content) plus the content it hashes (addresses,
TLS certificate, roles, published objects, services). A heartbeat re-signs the head
only; the content travels only when ``content_version`` moves (see
:mod:`p2pgrid.directory` and docs/ARCHITECTURE.md). Listings are the owner's
(:func:`listing_problem`); names are checked by :func:`check_name`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import cbor2

from . import identity as _identity
from .wire import message

__all__ = ["ObjectSummary", "RecordHead", "PeerRecord", "HEAD_FIELDS", "HEAD_BYTES",
           "sign_record", "check_name", "listing_problem", "normalize_tags", "MAX_OBJECTS",
           "MAX_NAME"]

_SIGNING_DOMAIN = "p2pgrid.dir.head/2"  # so a record signature is never valid for anything else
_CONTENT_DOMAIN = "p2pgrid.dir.content/2"
_KEY_ID_SHAPE = re.compile(r"[0-9a-f]{16}")
MAX_NAME = 64
MAX_OBJECTS = 2000  # objects one record may list
HEAD_BYTES = 260  # about a RecordHead on the wire (to fit replies under a byte cap)


# ---------------------------------------------------------------- records

# Head fields: what a heartbeat re-signs. Every other field but the signature is
# content, covered by the head through ``content_hash`` (a field added to PeerRecord
# later, such as a membership certificate, is content by default).
HEAD_FIELDS = ("name", "public_key", "version", "issued_at", "ttl", "content_version")


@message("dir.object")
@dataclass(frozen=True)
class ObjectSummary:
    """What the directory knows of a published object: enough to find it, never its values."""

    id: str
    tags: list[str]
    description: str
    shape: list[int]
    dtype: str
    owner: str
    level: str = "row"
    # a table's column names (searchable like tags)
    columns: list[str] = dataclasses.field(default_factory=list)


@message("dir.head")
@dataclass(frozen=True)
class RecordHead:
    """A record's signed liveness part: what a heartbeat changes, and a hash of the rest.

    It travels alone when the receiver already holds the content it names (the owner
    re-signs its record every heartbeat; the tag index, services and certificate travel
    only when ``content_version`` moves). ``content_version`` is the record version at
    which the content last changed, so a receiver holding any version at or above it
    holds that content."""

    name: str
    public_key: bytes
    version: int
    issued_at: float
    ttl: float
    content_version: int
    content_hash: bytes
    signature: bytes

    @cached_property
    def key_id(self) -> str:
        return _identity.key_id(self.public_key)

    def signing_bytes(self) -> bytes:
        body = {f: getattr(self, f) for f in HEAD_FIELDS}
        body["content_hash"] = self.content_hash
        return cbor2.dumps([_SIGNING_DOMAIN, body], canonical=True)

    def verify(self) -> bool:
        try:
            data = self.signing_bytes()
        except (TypeError, ValueError, cbor2.CBOREncodeError):
            return False
        return _identity.verify(self.public_key, data, self.signature)

    def cache_key(self) -> tuple:
        """Every signed field and the signature: two heads with equal keys verify alike."""
        return tuple(getattr(self, f) for f in HEAD_FIELDS) + (self.content_hash, self.signature)


@message("dir.record")
@dataclass(frozen=True)
class PeerRecord:
    """A peer's signed self-description: a :class:`RecordHead` plus its content
    (addresses, TLS certificate, roles, objects, services, membership certificate,
    revocation list). ``version`` grows on every
    re-issue, ``content_version`` only when the content changes."""

    name: str
    public_key: bytes
    addresses: list[str]  # "host:port", best first
    cert: bytes  # the peer's TLS certificate, DER; opaque here
    roles: list[str]
    objects: list[ObjectSummary]
    services: dict  # free-form, CBOR-able
    version: int
    issued_at: float  # owner's clock, unix seconds; informational only
    ttl: float = 0.0  # the owner re-issues within this many seconds (0: unstated)
    membership: bytes = b""   # its network membership certificate (p2pgrid.membership), CBOR
    revocations: bytes = b""  # the newest network revocation list its owner knows, CBOR
    content_version: int = 0  # the version at which the content last changed (0: this one)
    signature: bytes = b""

    @cached_property
    def key_id(self) -> str:
        return _identity.key_id(self.public_key)

    @cached_property
    def content_hash(self) -> bytes:
        """Hash of the canonical CBOR of every content field (see HEAD_FIELDS)."""
        body = {}
        for f in dataclasses.fields(self):
            if f.name in HEAD_FIELDS or f.name == "signature":
                continue
            value = getattr(self, f.name)
            if f.name == "objects":
                value = [_summary_plain(o) for o in value]
            body[f.name] = value
        data = cbor2.dumps([_CONTENT_DOMAIN, body], canonical=True)
        return hashlib.blake2b(data, digest_size=16).digest()

    @cached_property
    def wire_size(self) -> int:
        """Bytes this record takes on the wire (to fit replies under a byte cap)."""
        from . import wire
        return len(wire.encode(self))

    def head(self) -> RecordHead:
        """The signed liveness part of this record."""
        return RecordHead(name=self.name, public_key=self.public_key, version=self.version,
                          issued_at=self.issued_at, ttl=self.ttl,
                          content_version=self.content_version,
                          content_hash=self.content_hash, signature=self.signature)

    def with_head(self, head: RecordHead) -> PeerRecord:
        """This record's content under `head` (whose content hash must be this one's)."""
        rec = dataclasses.replace(self, **{f: getattr(head, f) for f in HEAD_FIELDS},
                                  signature=head.signature)
        rec.__dict__["content_hash"] = self.content_hash  # same content, hashed already
        return rec

    def signing_bytes(self) -> bytes:
        """What the signature covers: the head's fields and the content's hash, under a
        domain tag (so a record signature is never valid for anything else)."""
        return self.head().signing_bytes()

    def verify(self) -> bool:
        """True iff the signature is this record's public key's signature of its fields."""
        try:
            return self.head().verify()
        except (TypeError, ValueError, cbor2.CBOREncodeError):
            return False


def _summary_plain(o: ObjectSummary) -> dict:
    if not isinstance(o, ObjectSummary):
        raise TypeError("an object summary is expected")
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(ObjectSummary)}


def sign_record(ident: _identity.Identity, **fields) -> PeerRecord:
    """Build a PeerRecord from `fields` (public_key defaults to ident's) and sign it.
    ``content_version`` defaults to ``version`` (the content changed in this version)."""
    fields.pop("signature", None)
    pub = fields.setdefault("public_key", ident.public_bytes)
    if bytes(pub) != ident.public_bytes:
        raise ValueError("public_key does not belong to the signing identity")
    if not fields.get("content_version"):
        fields["content_version"] = fields.get("version", 0)
    unsigned = PeerRecord(**fields)
    return dataclasses.replace(unsigned, signature=ident.sign(unsigned.signing_bytes()))


def check_name(name) -> str | None:
    """Why `name` is not a usable peer name, or None if it is."""
    if not isinstance(name, str) or not name:
        return "a peer name must be a non-empty string"
    if len(name) > MAX_NAME:
        return f"a peer name has at most {MAX_NAME} characters"
    if not name.isprintable() or any(c.isspace() for c in name) or "#" in name:
        return "a peer name has no spaces, control characters or '#'"
    if _KEY_ID_SHAPE.fullmatch(name):
        return "a peer name must not look like a key id (16 hex digits)"
    return None


def listing_problem(rec: PeerRecord) -> str | None:
    """Why `rec`'s listing is not its owner's own, or None if it is.

    A record lists only objects published by the peer that signs it: each object's
    ``owner`` must be the record's name. Objects others stored on a peer (``PutObject``)
    are theirs, not the host's, and are not listed in the host's record at all."""
    if len(rec.objects) > MAX_OBJECTS:
        return f"lists {len(rec.objects)} objects (at most {MAX_OBJECTS})"
    for o in rec.objects:
        if not isinstance(o, ObjectSummary) or o.owner != rec.name:
            owner = getattr(o, "owner", None)
            return f"lists object {getattr(o, 'id', '?')!r} as owned by {owner!r}, not by {rec.name!r}"
    return None


def normalize_tags(query: str | Iterable[str]) -> list[str]:
    """'#February, #birth-records' -> ['february', 'birth-records']."""
    parts = re.split(r"[\s,]+", query) if isinstance(query, str) else list(query)
    out = []
    for p in parts:
        t = str(p).strip().lstrip("#").lower()
        if t and t not in out:
            out.append(t)
    return out
