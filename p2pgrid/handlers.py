"""The runtime's request handlers: objects, remote execution, gossip.

Rights, for a caller named N on an object:
- the object's owner and the hosting peer may do anything;
- ``compute``: N may run programs over it; ``get``: N may download it;
  ``aggregate``: N may download exact aggregates of it of the forms that
  :mod:`p2pgrid.release` verifies from the program, over at least ``min_rows`` records.
What leaves as the result of a program (fetched, or a stored result downloaded
later) is decided by the release gate (``release.gate``) from the program's
structure, never by the evaluator's ``Level``. A result is kept on the host with
the strictest rules of its inputs and its derivation (the expanded program).

Governance (``p2pgrid.governance``) has its say first: registered users' roles
are a ceiling (a guest may not compute), the owner role is privileged, approved
requests grant ``get`` (or the release of one program); where roles are in force a
result is bound to the user who computed it. Every operation is recorded with
``peer.audit``.
"""

from __future__ import annotations

import time

import torch
import trio

from . import release, wire
from .auth import Caller
from .directory import GossipDigest, GossipPush, handle_gossip
from .errors import BadRequest, NotFound, PermissionDenied, ShapeError
from .governance import policy as governance
from .messages import (Ack, DeleteObject, DescribeObject, Execute, GetObject, ListObjects,
                       ObjectInfo, ObjectInfos, Ping, Pong, PutObject, Value)
from .ops import AGGREGATE, OPAQUE, PUBLIC, Level
from .router import Router
from .store import ObjectMeta, Rules, normalise_tags
from .worker import Programs

router = Router()


def info(peer, meta: ObjectMeta) -> dict:
    d = meta.to_dict()
    d.pop("derivation", None)  # the program behind a result stays with its host
    d["peer"] = peer.name
    return d


def _privileged(peer, caller: Caller, meta: ObjectMeta) -> bool:
    return caller.name in (meta.owner, peer.name)


def may(peer, caller: Caller, meta: ObjectMeta, right: str) -> bool:
    verdict = governance.of(peer).verdict(caller, meta, right)
    if verdict is not None:
        return verdict
    if _privileged(peer, caller, meta):
        return True
    # a result's label ("public", "aggregate") is no right: release.gate decides results
    return meta.rules.allows(right, caller.name)


async def _meta_for(peer, caller: Caller, id: str, right: str) -> ObjectMeta:
    try:
        meta = await peer.meta(id)
    except NotFound:
        raise NotFound(f"no object {id} on {peer.name}") from None
    if not may(peer, caller, meta, right):
        peer.audit("denied", caller.name, object=id, right=right)
        if right == "get" and may(peer, caller, meta, "compute"):
            raise PermissionDenied(
                f"{caller.name} may compute on object {id} but not download it"
                + (" (only aggregates over enough records may leave)" if meta.rules.aggregate else ""),
                id=id, right=right)
        raise PermissionDenied(f"{caller.name} has no {right} right on object {id}", id=id, right=right)
    return meta


@router.on(Ping)
async def ping(peer, caller, msg):
    return Pong(peer.name, peer.key_id, time.time())


@router.on(PutObject)
async def put(peer, caller, msg: PutObject):
    gov = governance.of(peer)
    gov.require(caller, "compute")
    role = gov.role(caller)
    if role is None and not gov.strangers_store():
        raise PermissionDenied(f"{caller.name} is not registered on {peer.name}, and only "
                               f"registered users may store objects here (the owner's setting)")
    rules = Rules.from_dict(msg.rules) if msg.rules is not None else Rules(
        compute=(caller.name,), get=(caller.name,), aggregate=(caller.name,))
    meta = ObjectMeta(owner=caller.name, shape=tuple(msg.tensor.shape),
                      dtype=str(msg.tensor.dtype).removeprefix("torch."), tags=tuple(msg.tags),
                      description=msg.description, rules=rules)
    meta = await peer.put(msg.tensor, meta, None if role == "owner" else peer.quota())
    peer.audit("put", caller.name, object=meta.id, shape=list(meta.shape), dtype=meta.dtype)
    return ObjectInfo(info(peer, meta))


@router.on(DescribeObject)
async def describe(peer, caller, msg: DescribeObject):
    governance.of(peer).require(caller, "search")
    meta = await peer.meta(msg.id)
    if not (may(peer, caller, meta, "compute") or may(peer, caller, meta, "get")):
        raise PermissionDenied(f"{caller.name} has no right on object {msg.id}")
    peer.audit("search", caller.name, object=msg.id)
    return ObjectInfo(info(peer, meta))


@router.on(ListObjects)
async def list_objects(peer, caller, msg: ListObjects):
    governance.of(peer).require(caller, "search")
    tags = normalise_tags(msg.tags)
    metas = await trio.to_thread.run_sync(
        lambda: peer.store.search(tags) if tags else peer.store.list())
    peer.audit("search", caller.name, tags=list(tags))
    return ObjectInfos([info(peer, m) for m in metas
                        if may(peer, caller, m, "compute") or may(peer, caller, m, "get")
                        or m.tags])


@router.on(GetObject)
async def get(peer, caller, msg: GetObject):
    try:
        meta = await peer.meta(msg.id)
    except NotFound:
        raise NotFound(f"no object {msg.id} on {peer.name}") from None
    if release.stored_derivation(peer, meta) is None:
        meta = await _meta_for(peer, caller, msg.id, "get")
    else:
        # a result: the gate decides from its derivation, for those who may use it at all
        if not (may(peer, caller, meta, "compute") or may(peer, caller, meta, "get")):
            peer.audit("denied", caller.name, object=msg.id, right="get")
            raise PermissionDenied(f"{caller.name} has no right on object {msg.id}",
                                   id=msg.id, right="get")
        decision = await release.gate_stored(peer, caller, meta)
        if not decision.allowed:
            peer.audit("denied", caller.name, object=msg.id, right="get", why=decision.why)
            raise PermissionDenied(release.refusal(peer, caller, decision), id=msg.id, right="get")
    # mapped: a value for another peer is only sent, so its bytes can leave straight from
    # the blob's pages; the peer's own requests get a copy, which they may keep
    value = await peer.load(msg.id, mapped=caller.public_key != peer.identity.public_bytes)
    peer.audit("get", caller.name, object=msg.id, shape=list(meta.shape))
    return wire.owned(Value(value, info(peer, meta)))  # a fresh tensor: sent by reference


@router.on(DeleteObject)
async def delete(peer, caller, msg: DeleteObject):
    meta = await peer.meta(msg.id)
    is_result = meta.expires is not None
    gov = governance.of(peer)
    if not (gov.role(caller) == "owner" or _privileged(peer, caller, meta)
            or is_result and may(peer, caller, meta, "compute")):
        raise PermissionDenied(f"{caller.name} may not delete object {msg.id}")
    await peer.delete(msg.id)
    peer.audit("delete", caller.name, object=msg.id)
    return Ack()


def _leaf_ids(program) -> list[str]:
    nodes = program.get("nodes") if isinstance(program, dict) else None
    if not isinstance(nodes, list):
        raise BadRequest("program must be a map with a list of nodes")
    return [n["obj"] for n in nodes if isinstance(n, dict) and n.get("op") == "leaf"
            and isinstance(n.get("obj"), str)]


def _leaf_level(meta: ObjectMeta) -> Level:
    if meta.level == "aggregate":
        return AGGREGATE
    if meta.level == "public":
        return PUBLIC
    return Level("row", 0, meta.shape[0]) if meta.shape else OPAQUE


@router.on(Execute)
async def execute(peer, caller, msg: Execute):
    governance.of(peer).require(caller, "compute")
    ids = _leaf_ids(msg.program)
    metas = {i: await _meta_for(peer, caller, i, "compute") for i in dict.fromkeys(ids)}
    min_rows = max([m.rules.min_rows for m in metas.values()] or [peer.config.min_rows])

    # shapes, sizes and the caller's budget checked before any real work, which then
    # runs where it can be stopped (p2pgrid.worker)
    programs = Programs.of(peer)
    leaves = {i: (m, _leaf_level(m)) for i, m in metas.items()}
    cost = programs.dry_run(caller, msg.program, leaves, min_rows=min_rows)
    probe = cost.probe
    # The release decision comes before the real data is touched: a refused download
    # never runs, so neither its result nor its failure can tell anything.
    decision, deriv = await release.gate(peer, caller, msg.program, metas)
    peer.audit("compute", caller.name, objects=list(metas), fetch=msg.fetch,
               release=decision.basis or "none", shape=list(getattr(probe, "shape", ())))
    if msg.fetch and not decision.allowed:
        peer.audit("denied", caller.name, objects=list(metas), right="get", why=decision.why)
        raise PermissionDenied(release.refusal(peer, caller, decision), level="row")
    if decision.allowed and deriv.failed:
        raise release.ComputeFailed(release.GENERIC_FAILURE)
    failed = deriv.failed
    try:
        value, _ = await programs.execute(caller, msg.program, leaves, cost, min_rows=min_rows)
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
    except (ShapeError, ArithmeticError, RuntimeError, ValueError) as e:
        # values can make the real run fail where the dry run passed: whoever may
        # receive the output may hear why; for anyone else the failure is not reported
        # at all, as that alone would tell something about the values
        if decision.allowed:
            if isinstance(e, ShapeError):
                raise
            raise release.ComputeFailed(release.GENERIC_FAILURE) from None
        value, failed = None, True
    if not decision.allowed and (value is None or not isinstance(probe, torch.Tensor)
                                 or value.shape != probe.shape or value.dtype != probe.dtype):
        # kept remote for a caller who may not see it: what it holds, or whether it
        # failed, must not show in its shape; a failed one is a placeholder
        value, failed = torch.zeros(tuple(getattr(probe, "shape", ())),
                                    dtype=getattr(probe, "dtype", torch.float32)), True
    if msg.fetch:
        return Value(value, None)
    rules = _result_rules(peer, caller, metas)
    meta = ObjectMeta(owner=peer.name, shape=tuple(value.shape),
                      dtype=str(value.dtype).removeprefix("torch."), tags=tuple(msg.tags),
                      description=msg.description or f"result for {caller.name}",
                      rules=rules,
                      level="aggregate" if decision.kind == release.AGGREGATE else "row",
                      expires=time.time() + peer.config.result_ttl,
                      derivation=release.Derivation(deriv.nodes, failed).to_json())
    return ObjectInfo(info(peer, await peer.put(value.contiguous(), meta)))


def _result_rules(peer, caller: Caller, metas: dict[str, ObjectMeta]) -> Rules:
    """The strictest rules of the inputs; where roles are in force, narrowed to the
    caller, so that nobody else computes on or downloads what they computed."""
    rules = Rules.strictest(m.rules for m in metas.values()) if metas else Rules()
    if not governance.of(peer).active or caller.name == peer.name:
        return rules
    me = (caller.name,)
    return Rules(compute=me,
                 get=me if all(may(peer, caller, m, "get") for m in metas.values()) else (),
                 aggregate=me if all(may(peer, caller, m, "aggregate") for m in metas.values())
                 else (), min_rows=rules.min_rows)


@router.on(GossipDigest)
async def gossip_digest(peer, caller, msg: GossipDigest):
    if msg.sender.public_key != caller.public_key:
        raise PermissionDenied("a gossip digest must carry the sender's own record")
    return handle_gossip(peer.directory, msg, time.monotonic(), source=caller.key_id)


@router.on(GossipPush)
async def gossip_push(peer, caller, msg: GossipPush):
    # New records count against the caller's key (p2pgrid.addrbook: per-source limits).
    return handle_gossip(peer.directory, msg, time.monotonic(), source=caller.key_id)
