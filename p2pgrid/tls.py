"""TLS bound to a peer's Ed25519 key.

Each peer makes a self-signed certificate whose public key *is* its Ed25519
identity key. Clients do not trust any CA: they pin the exact certificate they
learned from the (signed) directory record, so a man in the middle needs the
peer's private key. Names and hostnames play no part, since peers are known by key.

>>> from p2pgrid.identity import Identity
>>> ident = Identity.generate()
>>> der = make_certificate(ident)
>>> cert_public_key(der) == ident.public_bytes
True
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .identity import Identity

ALPN = ["h2"]


def make_certificate(identity: Identity, *, days: int = 3650) -> bytes:
    """A self-signed X.509 certificate (DER) for the identity's own key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pgrid-{identity.key_id}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        # A self-signed cert is its own trust anchor for the pinning client.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("p2pgrid.peer")]), critical=False)
        .sign(identity.private_key, algorithm=None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def cert_public_key(der: bytes) -> bytes:
    """The raw Ed25519 public key inside a certificate (ValueError if it is not Ed25519)."""
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("certificate key is not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_certificate(identity: Identity, path: Path) -> bytes:
    """Reuse the certificate at `path` if it still carries this identity's key."""
    path = Path(path)
    if path.exists():
        der = path.read_bytes()
        try:
            if cert_public_key(der) == identity.public_bytes:
                return der
        except ValueError:
            pass
    der = make_certificate(identity)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(der)
    tmp.replace(path)
    return der


def server_context_files(identity: Identity, cert_der: bytes, directory: Path) -> tuple[str, str]:
    """Write PEM cert and key for hypercorn (which wants file paths); key file is 0600."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "tls-cert.pem", directory / "tls-key.pem"
    certfile.write_bytes(ssl.DER_cert_to_PEM_cert(cert_der).encode())
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    keyfile.touch(mode=0o600)
    keyfile.chmod(0o600)
    keyfile.write_bytes(pem)
    return str(certfile), str(keyfile)


def client_context(pinned_cert_der: bytes) -> ssl.SSLContext:
    """A client context that accepts exactly one certificate: the pinned one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the key, not a hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=pinned_cert_der)
    ctx.set_alpn_protocols(ALPN)
    return ctx
