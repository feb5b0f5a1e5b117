"""Helpers for the directory attacks: records an attacker can sign with keys it mints."""

from __future__ import annotations

import time

from p2pgrid.directory import ObjectSummary, sign_record
from p2pgrid.identity import Identity


def sybil(name: str, *, address: str = "127.0.0.1:1", ttl: float = 15.0, objects=(),
          ident: Identity | None = None, version: int = 1):
    """A validly signed record under a fresh key (keys are free)."""
    ident = ident or Identity.generate()
    return sign_record(ident, name=name, addresses=[address], cert=b"", roles=[],
                       objects=list(objects), services={}, version=version,
                       issued_at=time.time(), ttl=ttl)


def listing(oid: str, owner: str, *tags: str) -> ObjectSummary:
    return ObjectSummary(oid, list(tags), "births, by month", [500, 5], "float32", owner)


def dead_sybils(n: int, *, ttl: float = 15.0, base_port: int = 1):
    """`n` Sybil records whose addresses nobody answers (low ports on loopback)."""
    return [sybil(f"sybil{i}", address=f"127.0.0.1:{base_port + i}", ttl=ttl) for i in range(n)]
