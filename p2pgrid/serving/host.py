"""A peer's serving state: the models it hosts (its own and replicas), their terms,
what it announces, what survives a restart, and the request handlers.

Files under ``<data_dir>/serving/``: ``models/*.pkg`` (one package per hosted model),
``incoming/*.part`` (uploads in progress), ``downloads/*.part`` (downloads in progress),
``registry.cbor`` (what to serve again after a restart), ``hosting.cbor`` (this peer's
consent to host replicas).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio
from torch import nn

from .. import wire
from ..errors import (BadRequest, Conflict, NotFound, P2PError, PayloadTooLarge,
                      PeerUnavailable, PermissionDenied, ShapeError)
from ..identity import verify
from ..router import Router
from .catalog import grant_bytes, refusal
from .messages import (Chunk, CommitUpload, DropReplica, GetChunk, GetManifest, HostOffer,
                       Hosted, Infer, Manifest, Prediction, PutChunk, UploadState)
from .package import Digests, import_package, live_spec, spec_hash
from .policy import Gate, Policy
from .routing import Routes
from .transfer import PartFile, read_chunk

log = logging.getLogger("p2pgrid.serving")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VALUE_CHECK_INLINE = 1 << 20  # inputs up to this many bytes are checked on the event loop
MAX_UPLOADS_PER_OWNER = 4      # replica uploads in progress at once, per owner


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest(f"model names are 1-64 of [A-Za-z0-9_.-], not {name!r}")
    return name


@dataclass(frozen=True)
class Terms:
    """What the owner allows. ``allow_download=False``: nobody but the owner gets the
    weights through any API (replica hosts hold them, to compute)."""

    allow_download: bool = False
    allow_remote_inference: bool = True
    policy: Policy = field(default_factory=Policy)
    description: str = ""

    def to_dict(self) -> dict:
        return {"allow_download": self.allow_download,
                "allow_remote_inference": self.allow_remote_inference,
                "policy": self.policy.to_dict(), "description": self.description}

    @classmethod
    def from_dict(cls, d: dict) -> "Terms":
        if not isinstance(d, dict) or set(d) - {"allow_download", "allow_remote_inference",
                                               "policy", "description"}:
            raise BadRequest("terms: expected allow_download, allow_remote_inference, policy")
        if not all(isinstance(d.get(k, False), bool) for k in ("allow_download",
                                                                "allow_remote_inference")) \
                or not isinstance(d.get("description", ""), str):
            raise BadRequest("terms: flags must be booleans and the description a string")
        return cls(bool(d.get("allow_download", False)), bool(d.get("allow_remote_inference", True)),
                   Policy.from_dict(d.get("policy") or {}), d.get("description", ""))


@dataclass(frozen=True)
class HostingPolicy:
    """Whose replicas this peer agrees to host.

    By default a peer hosts replicas for any owner, of models that allow remote
    inference or downloads, up to ``max_models`` and ``max_bytes``. ``private=False``
    refuses models whose owner forbids downloads (hosting one means holding weights
    the owner keeps from everyone else). ``accept_from=()`` hosts nothing.
    """

    accept_from: tuple[str, ...] | None = None  # owners; None: anyone
    private: bool = True
    max_models: int = 16
    max_bytes: int = 8 << 30

    def to_dict(self) -> dict:
        return {"accept_from": None if self.accept_from is None else list(self.accept_from),
                "private": self.private, "max_models": self.max_models, "max_bytes": self.max_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "HostingPolicy":
        acc = d.get("accept_from")
        return cls(None if acc is None else tuple(acc), bool(d.get("private", True)),
                   int(d.get("max_models", 16)), int(d.get("max_bytes", 8 << 30)))

    def check(self, owner: str, terms: Terms, size: int, models: int, used: int) -> None:
        if self.accept_from is not None and owner not in self.accept_from:
            raise PermissionDenied(f"this peer does not host replicas for {owner}")
        if not (terms.allow_remote_inference or terms.allow_download):
            raise PermissionDenied("a model that allows neither remote inference nor downloads "
                                   "has nothing to replicate")
        if not terms.allow_download and not self.private:
            raise PermissionDenied("this peer hosts only downloadable models")
        if models >= self.max_models:
            raise PermissionDenied(f"this peer hosts {models} models already (its limit)")
        if used + size > self.max_bytes:
            raise PayloadTooLarge(f"hosting {size} more bytes would pass this peer's limit of "
                                  f"{self.max_bytes}")


@dataclass
class HostedModel:
    owner: str
    name: str
    hash: str
    terms: Terms
    role: str                     # "owner" or "replica"
    path: Path                    # its package
    digests: Digests
    module: nn.Module
    gate: Gate
    grant: bytes = b""            # replica: the owner's signature (see catalog)
    replicas: dict[str, str] = field(default_factory=dict)  # owner: key id -> name
    mpc: dict | None = None       # encrypted serving: the smpc model's description
    encrypted: object = None      # owner: the p2pgrid.smpc EncryptedModel handle
    calls: int = 0
    target: int = 0               # owner: replicas to keep (see owner.keep_replicas)
    pool: list[str] | None = None  # owner: the only peers replicas may go to (None: any)
    placing: int = 0              # owner: placements in progress (not saved)

    @property
    def key(self) -> tuple[str, str]:
        return self.owner, self.name

    def entry(self) -> dict:
        """This model's entry in our directory record."""
        e = {"owner": self.owner, "name": self.name, "hash": self.hash, "size": self.digests.size,
             "role": self.role, "terms": self.terms.to_dict()}
        if self.role == "owner":
            e["replicas"] = sorted(self.replicas.values())
            if self.mpc:
                e["mpc"] = self.mpc
        else:
            e["grant"] = self.grant
        return e

    def record(self) -> dict:
        """What the registry keeps to serve it again after a restart."""
        return {"owner": self.owner, "name": self.name, "hash": self.hash, "role": self.role,
                "terms": self.terms.to_dict(), "file": self.path.name,
                "digests": self.digests.to_dict(), "grant": self.grant,
                "replicas": self.replicas, "target": self.target, "pool": self.pool}


class Serving:
    """Per-peer serving state, kept in ``peer.extensions["serving"]``."""

    def __init__(self, peer):
        self.peer = peer
        self.root = Path(peer.config.data_dir) / "serving"
        self.models: dict[tuple[str, str], HostedModel] = {}
        self.uploads: dict[tuple[str, str, str], tuple[PartFile, Terms, bytes]] = {}
        self.hosting = HostingPolicy()
        self.routes = Routes()
        # inference threads at once; each torch op uses the intra-op threads too
        self.limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.loaded = trio.Event()
        self.last_download = None  # TransferReport of this peer's latest download
        self.pending: set[tuple[str, str]] = set()  # in the registry, not loaded yet
        self._lock = trio.Lock()

    # ------------------------------------------------------------ paths and persistence

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def package_path(self, owner: str, name: str, hash: str) -> Path:
        tag = hashlib.sha256(f"{owner}/{name}".encode()).hexdigest()[:16]
        return self.dir("models") / f"{tag}-{hash[:32]}.pkg"

    def save(self) -> None:
        # encrypted models are not restored: their shares live on the parties' sessions
        path = self.dir(".") / "registry.cbor"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(wire.dumps([m.record() for m in self.models.values() if not m.mpc]))
        tmp.replace(path)

    def save_hosting(self) -> None:
        (self.dir(".") / "hosting.cbor").write_bytes(wire.dumps(self.hosting.to_dict()))

    def load_hosting(self) -> None:
        try:
            self.hosting = HostingPolicy.from_dict(wire.loads((self.root / "hosting.cbor").read_bytes()))
        except FileNotFoundError:
            pass
        except Exception:
            log.warning("could not read the hosting policy; using the default")

    async def load(self) -> None:
        """Serve again what was served before a restart (each package rebuilt and checked)."""
        try:
            items = wire.loads((self.root / "registry.cbor").read_bytes())
        except FileNotFoundError:
            items = []
        except Exception:
            log.warning("could not read the serving registry; serving nothing from before")
            items = []
        self.pending = {(i.get("owner"), i.get("name")) for i in items if isinstance(i, dict)}
        for item in items:
            try:
                path = self.dir("models") / item["file"]
                digests = Digests.from_dict(item["digests"])
                module = await self.build(path, item["hash"])
                hm = HostedModel(item["owner"], item["name"], item["hash"],
                                 Terms.from_dict(item["terms"]), item["role"], path, digests, module,
                                 Gate(Policy()), bytes(item.get("grant") or b""),
                                 dict(item.get("replicas") or {}))
                hm.gate = Gate(hm.terms.policy)
                target = item.get("target", 0)
                hm.target = target if isinstance(target, int) and target >= 0 else 0
                pool = item.get("pool")
                hm.pool = [str(n) for n in pool] if isinstance(pool, list) else None
                self.models[hm.key] = hm
                self.announce()
            except Exception as e:
                log.warning("cannot serve %s/%s again: %s", item.get("owner"), item.get("name"), e)
            finally:
                self.pending.discard((item.get("owner"), item.get("name")))
        self.loaded.set()

    async def build(self, path: Path, hash: str) -> nn.Module:
        """Rebuild a package's model in a worker thread and check it has `hash`."""
        def work():
            module, header = import_package(path)
            if header["model_hash"] != hash or spec_hash(live_spec(module)) != hash:
                raise BadRequest("the package does not hold the model its hash names")
            return module
        return await trio.to_thread.run_sync(work, limiter=self.limiter)

    # ------------------------------------------------------------ announcing

    def announce(self) -> None:
        self.peer.services["serving"] = {
            "hosting": {"accept": "*" if self.hosting.accept_from is None
                        else list(self.hosting.accept_from), "private": self.hosting.private},
            "models": [m.entry() for m in self.models.values()]}
        self.peer.reissue()

    def hosted_bytes(self) -> int:
        return sum(m.digests.size for m in self.models.values() if m.role == "replica")

    # ------------------------------------------------------------ lookups and rights

    def get(self, owner: str, name: str) -> HostedModel:
        hm = self.models.get((owner, name))
        if hm is None and (owner, name) in self.pending:
            raise PeerUnavailable(f"{self.peer.name} is still loading {owner}/{name}; retry soon")
        if hm is None:
            raise NotFound(f"{self.peer.name} serves no model {owner}/{name}", model=name)
        return hm

    def check_download(self, hm: HostedModel, caller: str) -> None:
        if caller != hm.owner and not hm.terms.allow_download:
            raise PermissionDenied(refusal(f"{hm.owner}/{hm.name}", "download", mpc=bool(hm.mpc),
                                           allow_remote_inference=hm.terms.allow_remote_inference),
                                   model=hm.name)
        if caller != hm.owner:
            hm.terms.policy.check_caller(caller, hm.owner, f"{hm.owner}/{hm.name}")

    # ------------------------------------------------------------ inference

    async def infer(self, caller: str, msg: Infer, *, pooled=False):
        """`pooled`: the caller is unregistered here and shares the rate limit and quota
        of all unregistered callers (a :class:`p2pgrid.limits.Guest`: and its address's
        share of them; see p2pgrid.ratelimit)."""
        hm = None
        try:
            hm = self.get(msg.owner, msg.model)
            y = await self._infer(hm, caller, msg.x, pooled)
        except P2PError as e:
            self.peer.audit("model_call", caller, model=f"{msg.owner}/{msg.model}",
                            batch=_batch(msg.x), outcome=e.code)
            raise
        hm.calls += 1
        self.peer.audit("model_call", caller, model=f"{hm.owner}/{hm.name}", batch=_batch(msg.x),
                        outcome="ok", role=hm.role)
        return Prediction(y, self.peer.name)

    async def _infer(self, hm: HostedModel, caller: str, x, pooled=False):
        policy, owner = hm.terms.policy, caller == hm.owner
        if not hm.terms.allow_remote_inference and not owner:
            raise PermissionDenied(refusal(f"{hm.owner}/{hm.name}", "inference", mpc=bool(hm.mpc),
                                           allow_remote_inference=False))
        policy.check_caller(caller, hm.owner, f"{hm.owner}/{hm.name}")
        if not owner:
            hm.gate.admit(caller, pooled=pooled)
        rows = policy.check_meta(x)
        if x.numel() * x.element_size() <= _VALUE_CHECK_INLINE:
            policy.check_values(x)
        else:
            await trio.to_thread.run_sync(policy.check_values, x, limiter=self.limiter)
        if not owner:
            hm.gate.charge(caller, rows, pooled=pooled)
        return await trio.to_thread.run_sync(_forward, hm.module, x, limiter=self.limiter)


def _batch(x) -> int:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1


def _forward(module: nn.Module, x: torch.Tensor):
    try:
        with torch.no_grad():
            y = module(x)
    except P2PError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ShapeError(f"the model cannot run on this input: {type(e).__name__}: {first}") from None
    if isinstance(y, torch.Tensor):
        return y.detach()
    if isinstance(y, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in y):
        return [t.detach() for t in y]
    raise BadRequest("the model's output is not a tensor or a list of tensors")


# ------------------------------------------------------------------ handlers

router = Router()


def state(peer) -> Serving:
    s = peer.extensions.get("serving")
    if s is None:
        s = peer.extensions["serving"] = Serving(peer)
    return s


@router.on(Infer)
async def on_infer(peer, caller, msg: Infer):
    from .. import governance
    return await state(peer).infer(caller.name, msg, pooled=governance.guest(peer, caller))


@router.on(GetManifest)
async def on_manifest(peer, caller, msg: GetManifest):
    s = state(peer)
    hm = s.get(msg.owner, msg.model)
    try:
        s.check_download(hm, caller.name)
    except P2PError as e:
        peer.audit("model_download", caller.name, model=f"{hm.owner}/{hm.name}", outcome=e.code)
        raise
    peer.audit("model_download", caller.name, model=f"{hm.owner}/{hm.name}", outcome="ok",
               size=hm.digests.size)
    return Manifest(hm.owner, hm.name, hm.hash, hm.digests.to_dict())


@router.on(GetChunk)
async def on_chunk(peer, caller, msg: GetChunk):
    s = state(peer)
    hm = s.get(msg.owner, msg.model)
    s.check_download(hm, caller.name)
    if msg.hash != hm.hash:
        raise Conflict(f"{hm.owner}/{hm.name} changed: it is {hm.hash[:12]} now, not "
                       f"{msg.hash[:12]}", hash=hm.hash)
    data = await trio.to_thread.run_sync(read_chunk, hm.path, hm.digests, msg.index)
    return Chunk(msg.index, data)


@router.on(HostOffer)
async def on_offer(peer, caller, msg: HostOffer):
    """An owner (the caller) asks us to host a replica; we answer with what we have of it."""
    s = state(peer)
    check_model_name(msg.model)
    terms = Terms.from_dict(msg.terms)
    digests = Digests.from_dict(msg.digests)
    if not verify(caller.public_key, grant_bytes(caller.name, msg.model, msg.hash, peer.key_id,
                                                 msg.terms), msg.grant):
        raise BadRequest("the offer's grant is not the caller's signature of these terms")
    hm = s.models.get((caller.name, msg.model))
    if hm is not None and hm.role == "owner":
        raise Conflict(f"{peer.name} is the owner of {msg.model}; it hosts no replica of it")
    if hm is not None and hm.hash == msg.hash:
        return UploadState(list(range(digests.count)), digests.count)
    s.hosting.check(caller.name, terms, digests.size,
                    len([m for m in s.models.values() if m.role == "replica"]),
                    s.hosted_bytes() - (hm.digests.size if hm else 0))
    key = (caller.name, msg.model, msg.hash)
    upload = s.uploads.get(key)
    if upload is None and sum(k[0] == caller.name and k[1] != msg.model
                              for k in s.uploads) >= MAX_UPLOADS_PER_OWNER:
        raise PermissionDenied(f"{caller.name} has {MAX_UPLOADS_PER_OWNER} uploads in progress "
                               f"here already")
    if upload is None or upload[0].digests != digests:
        for k in [k for k in s.uploads if k[:2] == key[:2]]:  # an older version of it
            s.uploads.pop(k)[0].path.unlink(missing_ok=True)
        tag = hashlib.sha256(f"{caller.name}/{msg.model}/{msg.hash}".encode()).hexdigest()[:32]
        part = PartFile(s.dir("incoming") / f"{tag}.part", digests)
        await trio.to_thread.run_sync(part.open)
        s.uploads[key] = upload = (part, terms, msg.grant)
    part = upload[0]
    peer.audit("model_offer", caller.name, model=f"{caller.name}/{msg.model}", size=digests.size,
               have=len(part.have))
    return UploadState(sorted(part.have), digests.count)


@router.on(PutChunk)
async def on_put(peer, caller, msg: PutChunk):
    s = state(peer)
    upload = s.uploads.get((caller.name, msg.model, msg.hash))
    if upload is None:
        raise NotFound(f"no upload of {msg.model} from {caller.name} in progress; offer it first")
    part = upload[0]
    await trio.to_thread.run_sync(part.write, msg.index, msg.data)
    return UploadState([], part.digests.count)


@router.on(CommitUpload)
async def on_commit(peer, caller, msg: CommitUpload):
    s = state(peer)
    key = (caller.name, msg.model, msg.hash)
    hm = s.models.get(key[:2])
    if hm is not None and hm.hash == msg.hash and key not in s.uploads:
        return Hosted(msg.model, peer.name, msg.hash)  # committed before (a retried commit)
    upload = s.uploads.get(key)
    if upload is None:
        raise NotFound(f"no upload of {msg.model} from {caller.name} in progress")
    part, terms, grant = upload
    async with s._lock:
        if key not in s.uploads:  # a concurrent commit of the same upload finished it
            return Hosted(msg.model, peer.name, msg.hash)
        await trio.to_thread.run_sync(part.complete)
        path = s.package_path(caller.name, msg.model, msg.hash)
        part.path.replace(path)
        s.uploads.pop(key, None)
        try:
            module = await s.build(path, msg.hash)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        old = s.models.get(key[:2])
        s.models[key[:2]] = HostedModel(caller.name, msg.model, msg.hash, terms, "replica", path,
                                        part.digests, module, Gate(terms.policy), grant)
        if old is not None and old.path != path:
            old.path.unlink(missing_ok=True)
        s.save()
        s.announce()
    peer.audit("model_hosted", caller.name, model=f"{caller.name}/{msg.model}",
               hash=msg.hash, size=part.digests.size)
    return Hosted(msg.model, peer.name, msg.hash)


@router.on(DropReplica)
async def on_drop(peer, caller, msg: DropReplica):
    s = state(peer)
    for k in [k for k in s.uploads if k[:2] == (caller.name, msg.model)]:
        s.uploads.pop(k)[0].path.unlink(missing_ok=True)
    hm = s.models.get((caller.name, msg.model))
    if hm is not None and hm.role == "replica":
        del s.models[hm.key]
        hm.path.unlink(missing_ok=True)
        s.save()
        s.announce()
        peer.audit("model_dropped", caller.name, model=f"{caller.name}/{msg.model}")
    return Hosted(msg.model, peer.name, "")
