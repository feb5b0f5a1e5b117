"""Ed25519 identities: a key pair per peer (and so per user), kept on disk.

A peer's id is derived from its public key (like libp2p), so a name is a label
that can be checked against a key, never trusted on its own.

>>> import tempfile, pathlib
>>> ident = Identity.load_or_create(pathlib.Path(tempfile.mkdtemp()) / "key")
>>> sig = ident.sign(b"hello")
>>> verify(ident.public_bytes, b"hello", sig)
True
>>> len(ident.key_id)
16
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def key_id(public_bytes: bytes) -> str:
    """Short, stable id of a public key: first 64 bits of its SHA-256, hex."""
    return hashlib.sha256(public_bytes).hexdigest()[:16]


@lru_cache(maxsize=4096)
def _public_key(public_bytes: bytes) -> Ed25519PublicKey:
    # parsing a key costs a fifth of a verification; peers see the same few keys all day
    return Ed25519PublicKey.from_public_bytes(public_bytes)


def verify(public_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """True iff `signature` is `public_bytes`' Ed25519 signature of `data`."""
    try:
        _public_key(bytes(public_bytes)).verify(bytes(signature), data)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key. Its repr never shows the key."""

    private_key: Ed25519PrivateKey

    def __repr__(self) -> str:
        return f"Identity(key_id={self.key_id})"

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """Load the key at `path`, or create one there readable by its owner only (0600)."""
        path = Path(path)
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(path, 0o600)  # repair, rather than refuse: the key is still ours
            raw = path.read_bytes()
            key = serialization.load_pem_private_key(raw, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 key")
            return cls(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        ident = cls.generate()
        pem = ident.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return ident

    @cached_property  # derived on every request otherwise (20 us each)
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @cached_property
    def key_id(self) -> str:
        return key_id(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)
