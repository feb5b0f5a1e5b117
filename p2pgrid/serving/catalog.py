"""What the directory says about served models, and which announcements to believe.

Every host of a model lists it in its directory record (``services["serving"]``). The
owner's entry is covered by the owner's own record signature. A replica's entry carries
a *grant*: the owner's signature over (owner, model, hash, host key, terms), so no peer
can pose as a replica of someone else's model, or change its terms, and a client can
still find the replicas while the owner is offline (it checks the grant against the key
the owner's name is bound to).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cbor2

from ..errors import BadRequest, NotFound
from ..identity import verify

__all__ = ["ModelInfo", "grant_bytes", "catalog", "find"]

_GRANT_DOMAIN = "p2pgrid.serving.grant/1"


def grant_bytes(owner: str, model: str, hash: str, host_key_id: str, terms: dict) -> bytes:
    """What an owner signs to let `host_key_id` serve its model under `terms`."""
    return cbor2.dumps([_GRANT_DOMAIN, owner, model, hash, host_key_id, terms], canonical=True)


def refusal(model: str, action: str, *, allow_remote_inference: bool, mpc: bool) -> str:
    """Why a caller other than the owner may not download or query `model` (action:
    "download" or "inference"), saying what the owner does allow instead."""
    if mpc:
        return (f"{model} is served encrypted: it may not be downloaded nor run on plaintext "
                f"inputs; use run_encrypted_inference (its parties compute on secret-shared inputs)")
    if action == "download":
        return (f"{model} may not be downloaded (remote inference only)" if allow_remote_inference
                else f"{model} may not be downloaded nor run remotely (its owner keeps it to itself)")
    return f"{model} does not allow remote inference"


@dataclass
class ModelInfo:
    """A served model as the network announces it."""

    owner: str
    name: str
    hash: str
    size: int
    terms: dict                      # allow_download, allow_remote_inference, policy, description
    hosts: dict[str, str] = field(default_factory=dict)  # key id -> label (owner first if up)
    owner_up: bool = False
    mpc: dict | None = None          # encrypted serving: parties, dealer

    @property
    def allow_download(self) -> bool:
        return bool(self.terms.get("allow_download"))

    @property
    def allow_remote_inference(self) -> bool:
        return bool(self.terms.get("allow_remote_inference"))

    @property
    def policy(self) -> dict:
        return dict(self.terms.get("policy") or {})

    def flags(self) -> list[str]:
        out = []
        if self.allow_remote_inference:
            out.append("inference")
        if self.allow_download:
            out.append("download")
        if self.mpc:
            out.append("mpc")
        return out

    def to_dict(self) -> dict:
        return {"owner": self.owner, "name": self.name, "hash": self.hash, "size": self.size,
                "flags": self.flags(), "terms": self.terms, "hosts": list(self.hosts.values()),
                "owner_up": self.owner_up, "mpc": self.mpc}


def _entries(rec) -> list[dict]:
    block = rec.services.get("serving") if isinstance(rec.services, dict) else None
    models = block.get("models") if isinstance(block, dict) else None
    if not isinstance(models, list):
        return []
    ok = []
    for e in models:
        if (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("owner", "name", "hash", "role"))
                and isinstance(e.get("terms"), dict) and isinstance(e.get("size"), int)):
            ok.append(e)
    return ok


def same_terms(a, b) -> bool:
    """Equal terms, however each went through CBOR (lists, tuples, key order)."""
    try:
        return cbor2.dumps(a, canonical=True) == cbor2.dumps(b, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return False


def catalog(directory) -> list[ModelInfo]:
    """Every model the live directory announces, with the hosts we may believe."""
    found: dict[tuple[str, str], ModelInfo] = {}
    replicas: list[tuple[object, dict]] = []
    for rec in directory.peers():
        bound = directory.label(rec) == rec.name
        for e in _entries(rec):
            if e["role"] == "owner":
                if bound and e["owner"] == rec.name:
                    info = ModelInfo(e["owner"], e["name"], e["hash"], e["size"], e["terms"],
                                     {rec.key_id: rec.name}, True,
                                     e.get("mpc") if isinstance(e.get("mpc"), dict) else None)
                    found[(info.owner, info.name)] = info
            elif e["role"] == "replica":
                replicas.append((rec, e))
    for rec, e in replicas:
        pub = directory.name_key(e["owner"])
        grant = e.get("grant")
        if pub is None or not isinstance(grant, bytes) or not verify(
                pub, grant_bytes(e["owner"], e["name"], e["hash"], rec.key_id, e["terms"]), grant):
            continue
        key = (e["owner"], e["name"])
        info = found.get(key)
        if info is None:  # owner offline: believe the granted replicas
            info = found[key] = ModelInfo(e["owner"], e["name"], e["hash"], e["size"], e["terms"])
        # a replica granted under older terms (its host was away when they changed)
        # would enforce those: route only to hosts of the owner's current terms
        if info.hash == e["hash"] and same_terms(info.terms, e["terms"]):
            info.hosts[rec.key_id] = directory.label(rec)
    return sorted(found.values(), key=lambda i: (i.name, i.owner))


def find(directory, name: str, owner: str | None = None) -> ModelInfo:
    """The one model called `name` ('owner/name' or name with `owner`), or NotFound."""
    if owner is None and "/" in name:
        owner, name = name.split("/", 1)
    hits = [i for i in catalog(directory) if i.name == name and (owner is None or i.owner == owner)]
    if not hits:
        raise NotFound(f"no peer serves a model named {name!r}"
                       + (f" by {owner}" if owner else ""), model=name)
    if len(hits) > 1:
        raise BadRequest(f"several owners serve {name!r}: say which, as "
                         + " or ".join(f"'{i.owner}/{i.name}'" for i in hits), model=name)
    return hits[0]
