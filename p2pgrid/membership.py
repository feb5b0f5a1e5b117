"""Network membership: certificates from a network key, and a signed revocation list (sans-IO).

Without a network key a peer trusts names on first use (see :mod:`p2pgrid.directory`).
With one, whoever runs the network (a hospital consortium, say) holds an Ed25519
*network key* and signs a :class:`Certificate` for each member: this name belongs to
this peer key until this date. Peers started with the network's public key accept a
name only under a valid certificate: directory records must carry one, and so must
every request a caller signs (header ``x-p2p-cert``). Certificates are revoked by a
:class:`RevocationList` the network key signs; every member carries the newest one it
knows in its directory record, so it spreads by gossip (highest ``serial`` wins).

The checks do no I/O and read no clock (times are passed in); the helpers that read and
write certificate and revocation list files, and :func:`open_membership`, are apart.

>>> from p2pgrid.identity import Identity
>>> net, ana = Identity.generate(), Identity.generate()
>>> cert = issue(net, "ana", ana.public_bytes, days=30, now=1000.0)
>>> m = Membership(net.public_bytes)
>>> m.why_not("ana", ana.public_bytes, cert, now=2000.0) is None
True
>>> m.why_not("bob", ana.public_bytes, cert, now=2000.0)
"the certificate is for 'ana', not 'bob'"
>>> crl = revoke(net, None, name="ana", now=3000.0)
>>> m.offer(crl), m.why_not("ana", ana.public_bytes, cert, now=3001.0)
(True, "the network's operator revoked 'ana' (revocation list 1)")
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cbor2

from . import wire
from .identity import Identity, key_id, verify
from .wire import message

__all__ = ["Certificate", "Revocation", "RevocationList", "Membership", "issue", "revoke",
           "parse_public_key", "format_public_key", "encode", "decode_certificate", "decode_revocations",
           "read_certificate", "write_certificate", "b64_certificate", "read_revocations", "write_revocations",
           "fingerprint", "MembershipError", "open_membership", "MAX_CERT", "MAX_CRL"]

MAX_CERT = 2048                # bytes of an encoded certificate we decode at all
MAX_CRL = 1 << 20              # bytes of an encoded revocation list
MAX_DAYS = 3650
_CERT_DOMAIN = "p2pgrid.net.cert/1"
_CRL_DOMAIN = "p2pgrid.net.crl/1"


def fingerprint(public_key: bytes) -> str:
    """A key's fingerprint as peers print it: its key id (16 hex digits)."""
    return key_id(bytes(public_key))


def _signed_body(domain: str, obj) -> bytes:
    body = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "signature"}
    if "revoked" in body:
        body["revoked"] = [dataclasses.asdict(r) for r in body["revoked"]]
    return cbor2.dumps([domain, body], canonical=True)


@message("net.cert")
@dataclass(frozen=True)
class Certificate:
    """The network key's word that `name` belongs to the peer key `key_id` until
    `expires_at`. ``public_key`` is the full key, or empty for a certificate issued
    to a key id only (64 bits: prefer the full key)."""

    network: str        # key id of the network key that signed it
    name: str
    key_id: str
    public_key: bytes
    serial: str         # random, names this certificate in logs
    issued_at: float    # unix seconds
    expires_at: float
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        return _signed_body(_CERT_DOMAIN, self)

    def binds(self, public_key: bytes) -> bool:
        """Whether this certificate is about `public_key`."""
        if self.public_key:
            return bytes(self.public_key) == bytes(public_key)
        return self.key_id == key_id(bytes(public_key))


@message("net.revocation")
@dataclass(frozen=True)
class Revocation:
    """One entry: every certificate for `key_id`, or every certificate for `name`
    issued at or before `at` (so the name can be invited again afterwards)."""

    name: str = ""
    key_id: str = ""
    at: float = 0.0


@message("net.crl")
@dataclass(frozen=True)
class RevocationList:
    network: str
    serial: int          # grows with every revocation; the highest wins
    issued_at: float
    revoked: list[Revocation]
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        return _signed_body(_CRL_DOMAIN, self)

    def revokes(self, cert: Certificate) -> bool:
        for r in self.revoked:
            if r.key_id and r.key_id == cert.key_id:
                return True
            if r.name and r.name == cert.name and cert.issued_at <= r.at:
                return True
        return False


# ---------------------------------------------------------------- issuing (the operator's side)

def issue(network: Identity, name: str, peer_key: bytes | str, *, days: float,
          now: float) -> Certificate:
    """Sign a certificate for `name` and `peer_key` (32 raw bytes, or a 16-hex key id)
    valid for `days` from `now`."""
    from .directory import check_name
    why = check_name(name)
    if why:
        raise ValueError(why)
    if not 0 < days <= MAX_DAYS:
        raise ValueError(f"a certificate lasts more than 0 and at most {MAX_DAYS} days")
    if isinstance(peer_key, (bytes, bytearray)):
        if len(peer_key) != 32:
            raise ValueError("a peer public key is 32 bytes")
        pub, kid = bytes(peer_key), key_id(bytes(peer_key))
    else:
        pub, kid = b"", str(peer_key).lower()
        if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
            raise ValueError("a key id is 16 hex digits")
    cert = Certificate(network=network.key_id, name=name, key_id=kid, public_key=pub,
                       serial=os.urandom(8).hex(), issued_at=float(now),
                       expires_at=float(now) + days * 86400.0)
    return dataclasses.replace(cert, signature=network.sign(cert.signing_bytes()))


def revoke(network: Identity, current: RevocationList | None, *, name: str = "",
           key_id: str = "", now: float) -> RevocationList:
    """The next revocation list: `current`'s entries plus one for `name` or `key_id`."""
    if bool(name) == bool(key_id):
        raise ValueError("revoke a name or a key id")
    if current is not None and current.network != network.key_id:
        raise ValueError("that revocation list belongs to another network")
    entries = list(current.revoked) if current else []
    entries.append(Revocation(name=name, key_id=key_id.lower(), at=float(now)))
    crl = RevocationList(network=network.key_id, serial=(current.serial if current else 0) + 1,
                         issued_at=float(now), revoked=entries)
    return dataclasses.replace(crl, signature=network.sign(crl.signing_bytes()))


# ---------------------------------------------------------------- encodings and files

def encode(obj: Certificate | RevocationList) -> bytes:
    return wire.encode(obj)


def _decode(data, cls, limit: int):
    from .errors import P2PError
    try:
        return wire.decode(bytes(data), cls, max_size=limit)
    except P2PError as e:
        raise ValueError(f"not a p2pgrid {cls.__name__}: {e.message}") from None


def decode_certificate(data: bytes) -> Certificate:
    """A certificate from its CBOR (ValueError if it is not one; its signature unchecked)."""
    return _decode(data, Certificate, MAX_CERT)


def decode_revocations(data: bytes) -> RevocationList:
    return _decode(data, RevocationList, MAX_CRL)


def _from_text_or_cbor(raw: bytes) -> bytes:
    text = raw.strip()
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return raw


def read_certificate(path: Path | str) -> Certificate:
    """A certificate file as written by ``p2pgrid network invite`` (base64 text, or raw CBOR)."""
    raw = Path(path).read_bytes()
    try:
        return decode_certificate(_from_text_or_cbor(raw))
    except ValueError:
        return decode_certificate(raw)


def b64_certificate(cert: Certificate) -> str:
    """A certificate as one line of text (what certificate files hold)."""
    return base64.urlsafe_b64encode(encode(cert)).decode()


def write_certificate(path: Path | str, cert: Certificate) -> None:
    Path(path).write_text(b64_certificate(cert) + "\n")


def read_revocations(path: Path | str) -> RevocationList:
    return decode_revocations(Path(path).read_bytes())


def write_revocations(path: Path | str, crl: RevocationList) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(encode(crl))
    os.replace(tmp, path)


def parse_public_key(text: str) -> bytes:
    """A public key as ``p2pgrid network init``, ``p2pgrid peer`` and ``p2pgrid users key``
    print it (base64url, or 64 hex digits); ValueError otherwise."""
    from .errors import BadRequest
    from .governance.roles import parse_key   # one parser of printed keys
    try:
        return parse_key(text)
    except BadRequest as e:
        raise ValueError(e.message) from None


def format_public_key(raw: bytes) -> str:
    from .governance.roles import format_key
    return format_key(raw)


# ---------------------------------------------------------------- checking (every member's side)

class Membership:
    """One peer's view of the network: its key, the newest revocation list, and the
    certificates that already verified (by their bytes, so each is verified once)."""

    def __init__(self, network_key: bytes, *, revocations: RevocationList | None = None,
                 cache: int = 4096):
        if len(network_key) != 32:
            raise ValueError("a network key is 32 bytes")
        self.network_key = bytes(network_key)
        self.network = key_id(self.network_key)
        self.revocations: RevocationList | None = None
        self._verified: OrderedDict[bytes, Certificate] = OrderedDict()
        self._by_key: OrderedDict[str, Certificate] = OrderedDict()  # key id -> last good cert
        self._cache = cache
        if revocations is not None and not self.offer(revocations):
            raise ValueError("that revocation list is not signed by this network's key")

    # -------------------------------------------------------- certificates

    def certificate(self, data: bytes | Certificate) -> Certificate | None:
        """`data` as a certificate signed by this network's key, else None."""
        if isinstance(data, Certificate):
            data = encode(data)
        data = bytes(data)
        cert = self._verified.get(data)
        if cert is not None:
            self._verified.move_to_end(data)
            return cert
        try:
            cert = decode_certificate(data)
        except ValueError:
            return None
        if cert.network != self.network or not verify(self.network_key, cert.signing_bytes(),
                                                       cert.signature):
            return None
        self._verified[data] = cert
        if len(self._verified) > self._cache:
            self._verified.popitem(last=False)
        return cert

    def why_not(self, name: str, public_key: bytes, cert: bytes | Certificate | None, *,
                now: float) -> str | None:
        """Why `public_key` may not use `name` in this network under `cert`, or None if it
        may. A certificate that passes is remembered for its key (see :meth:`known`)."""
        if cert is None or cert == b"":
            return "it presented no membership certificate"
        good = self.certificate(cert)
        if good is None:
            return "its certificate is not signed by this network's key"
        if good.name != name:
            return f"the certificate is for {good.name!r}, not {name!r}"
        if not good.binds(public_key):
            return f"the certificate is for key {good.key_id}, not {key_id(bytes(public_key))}"
        if now > good.expires_at:
            return f"its certificate for {name!r} expired"
        if now < good.issued_at - 3600:
            return "its certificate is not valid yet"
        if self.revocations is not None and self.revocations.revokes(good):
            return (f"the network's operator revoked {name!r} "
                    f"(revocation list {self.revocations.serial})")
        kid = key_id(bytes(public_key))
        self._by_key[kid] = good
        self._by_key.move_to_end(kid)
        if len(self._by_key) > self._cache:
            self._by_key.popitem(last=False)
        return None

    def known(self, public_key: bytes) -> Certificate | None:
        """The certificate that last passed for this key (calls on a stream whose opening
        request carried it need not carry it again)."""
        return self._by_key.get(key_id(bytes(public_key)))

    # -------------------------------------------------------- revocations

    def offer(self, crl: bytes | RevocationList | None) -> bool:
        """Adopt `crl` if the network key signed it and it is newer than ours."""
        if crl is None or crl == b"":
            return False
        if not isinstance(crl, RevocationList):
            try:
                crl = decode_revocations(crl)
            except ValueError:
                return False
        if self.revocations is not None and crl.serial <= self.revocations.serial:
            return False
        if crl.network != self.network or not verify(self.network_key, crl.signing_bytes(),
                                                      crl.signature):
            return False
        self.revocations = crl
        for kid, cert in list(self._by_key.items()):
            if crl.revokes(cert):
                del self._by_key[kid]
        return True

    def revocations_bytes(self) -> bytes:
        return encode(self.revocations) if self.revocations is not None else b""


class MembershipError(ValueError):
    """This peer cannot start as a member: no certificate, or one that does not fit."""


def open_membership(config, ident: Identity, *, now: float) -> tuple[Membership, bytes]:
    """A peer's view of its network from its config (``network_key``, ``cert``,
    ``revocations``, and the newest list saved in its data dir), with its own
    certificate's CBOR; MembershipError, for the user, when it cannot be a member."""
    try:
        m = Membership(parse_public_key(config.network_key))
    except ValueError as e:
        raise MembershipError(f"--network-key: {e}") from None
    saved = config.data_dir / "revocations.cbor"
    if saved.exists():
        m.offer(saved.read_bytes())
    if config.revocations and Path(config.revocations).exists():  # none yet: nobody revoked
        try:
            m.offer(read_revocations(config.revocations))
        except (OSError, ValueError) as e:
            raise MembershipError(f"{config.revocations}: {e}") from None
    if not config.cert:
        raise MembershipError(
            f"network {m.network} admits members only: give this peer its certificate "
            f"(--cert FILE, made by the network's operator with `p2pgrid network invite "
            f"{config.name} {ident.public_bytes.hex()}`)")
    try:
        cert = read_certificate(config.cert)
    except (OSError, ValueError) as e:
        raise MembershipError(f"{config.cert}: {e}") from None
    why = m.why_not(config.name, ident.public_bytes, cert, now=now)
    if why is not None:
        raise MembershipError(f"{config.cert}: this peer ({config.name}, key {ident.key_id}) "
                              f"cannot join network {m.network}: {why}")
    return m, encode(cert)
