"""Governance's request handlers: access requests, decisions, private releases, budgets."""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from .. import handlers as core  # a module reference: the two import each other
from .. import release, wire
from ..errors import BadRequest, NotFound, PermissionDenied
from ..router import Router
from ..worker import Programs
from . import mechanism
from .errors import PrivacyBudgetExceeded
from .messages import (BudgetInfo, BudgetQuery, DecideRequest, ListRequests, PrivateQuery,
                       Release, RequestAccess, RequestInfo, RequestInfos, WaitRequest)
from .policy import of

log = logging.getLogger("p2pgrid.governance")

router = Router()
MAX_WAIT = 30.0


def _public_request(req: dict) -> dict:
    return {k: v for k, v in req.items() if k != "key_id"}


@router.on(RequestAccess)
async def request_access(peer, caller, msg: RequestAccess):
    gov = of(peer)
    gov.require(caller, "request")
    try:
        meta = await peer.meta(msg.object_id)
    except NotFound:
        meta = None
    if meta is None or not (meta.tags or core.may(peer, caller, meta, "compute")
                            or core.may(peer, caller, meta, "get")):
        raise NotFound(f"no object {msg.object_id} on {peer.name}")
    if msg.program is not None:
        return await _request_release(peer, gov, caller, meta, msg)
    epsilon = None
    if msg.epsilon is not None:
        epsilon = mechanism.check_epsilon(msg.epsilon)
        if gov.store.dataset(meta.id) is None:
            raise BadRequest(f"object {meta.id} takes no private queries: its owner has declared "
                             f"no bounds for it")
    item = await trio.to_thread.run_sync(lambda: gov.store.create_request(
        user=caller.name, key_id=caller.key_id, object_id=meta.id,
        right="get" if epsilon is None else "budget", epsilon=epsilon, reason=msg.reason))
    gov.notify()
    return RequestInfo(_public_request(item))


async def _request_release(peer, gov, caller, meta, msg: RequestAccess) -> RequestInfo:
    """A request that the owner approve one exact program's result for the caller
    (release rule (d)): filed under the program's hash, with the program for the owner
    to read. The program must read `meta`'s object and the caller may compute on it."""
    if msg.epsilon is not None:
        raise BadRequest("a program release request takes no epsilon")
    ids = list(dict.fromkeys(core._leaf_ids(msg.program)))
    metas = {i: await core._meta_for(peer, caller, i, "compute") for i in ids}
    deriv = release.expand(msg.program, lambda oid: release.stored_derivation(peer, metas[oid])
                           if oid in metas else None)
    if meta.id not in deriv.leaves:
        raise BadRequest(f"the program does not read object {meta.id}")
    h = deriv.hash()
    reason = f"{msg.reason.strip()[:1200]}\nprogram {h[:16]}: {release.render(deriv)}"[:2000]
    item = await trio.to_thread.run_sync(lambda: gov.store.create_request(
        user=caller.name, key_id=caller.key_id, object_id=release.approval_id(h),
        right="program", epsilon=None, reason=reason))
    gov.notify()
    return RequestInfo(_public_request(item))


def _visible(gov, caller, rid: str) -> dict:
    req = gov.store.request(rid)
    if req is None or not (req["user"] == caller.name or gov.capable(caller, "admin")):
        raise NotFound(f"no request {rid} of yours")
    return req


@router.on(WaitRequest)
async def wait_request(peer, caller, msg: WaitRequest):
    gov = of(peer)
    _visible(gov, caller, msg.id)
    timeout = min(max(float(msg.timeout), 0.0), MAX_WAIT)
    return RequestInfo(_public_request(await gov.wait_decided(msg.id, timeout)))


@router.on(ListRequests)
async def list_requests(peer, caller, msg: ListRequests):
    gov = of(peer)
    admin = gov.capable(caller, "admin")
    items = gov.store.requests(msg.status, user=None if admin else caller.name)
    return RequestInfos([_public_request(r) for r in items])


@router.on(DecideRequest)
async def decide(peer, caller, msg: DecideRequest):
    gov = of(peer)
    if not gov.capable(caller, "admin"):
        role = gov.role(caller) or "not registered here"
        raise PermissionDenied(f"{caller.name} ({role}) may not decide requests on {peer.name}; "
                               f"only its owner may", capability="admin")
    item = await trio.to_thread.run_sync(lambda: gov.store.decide(
        msg.id, approve=bool(msg.approve), why=msg.why, by=caller.name))
    gov.notify()
    return RequestInfo(_public_request(item))


@router.on(PrivateQuery)
async def private_query(peer, caller, msg: PrivateQuery):
    gov = of(peer)
    gov.require(caller, "compute")
    gov.require_release(caller, "take private releases")
    pooled = gov.guest(caller)   # None, or the pool and its address's share
    ids = list(dict.fromkeys(core._leaf_ids(msg.program)))
    if len(ids) != 1:
        raise BadRequest("a private query reads exactly one dataset")
    meta = await core._meta_for(peer, caller, ids[0], "compute")
    declared = gov.store.dataset(meta.id)
    if declared is None:
        raise BadRequest(f"object {meta.id} takes no private queries: its owner has declared no "
                         f"bounds for it (p2pgrid budget bounds)")
    bounds, _ = declared
    bounds.check(meta.shape)
    plan = mechanism.plan(msg.program, {meta.id: (meta.shape, bounds)})
    # the program's cost, as for any program (the query runs on float64 data)
    Programs.of(peer).dry_run(caller, msg.program,
                            {meta.id: (replace(meta, dtype="float64"), core._leaf_level(meta))},
                            min_rows=0)
    epsilon = mechanism.check_epsilon(msg.epsilon)
    query = {**plan.describe(), "mechanism": "laplace", "scale": plan.scale(epsilon)}

    def release():
        data = peer.store.load(meta.id)
        _warn_clipping(peer, meta.id, data, bounds)
        exact = mechanism.run(msg.program, plan, mechanism.clamp(data, bounds))
        del data
        noisy = mechanism.laplace(exact, plan.sensitivity, epsilon)
        del exact
        stored, limits, replayed = gov.store.charge(
            user=caller.name, object_id=meta.id, epsilon=epsilon, release_id=msg.release_id,
            query=query, value=wire.dumps(noisy), pooled=pooled)
        return wire.loads(stored), limits, replayed

    try:
        value, limits, replayed = await trio.to_thread.run_sync(release)
    except PrivacyBudgetExceeded as e:
        peer.audit("release.denied", caller.name, object=meta.id, epsilon=epsilon,
                   remaining=e.remaining)
        raise
    info = {**query, "epsilon": epsilon, "replayed": replayed,
            "remaining": min(v["left"] for v in limits.values()), "limits": limits}
    return Release(value, info)


_warned: set[tuple[str, str, str]] = set()   # (peer, object, bounds) the owner was told about


def _warn_clipping(peer, object_id: str, data, bounds) -> None:
    """Log (on this, the owner's, peer only; never in a reply) when the declared bounds clip
    more than 1 % of a column: the released statistics would then describe clamped data.
    Once per dataset and bounds."""
    key = (peer.name, object_id, repr(bounds.to_list()))
    if key in _warned:
        return
    clipped = mechanism.clipped_columns(data, bounds)
    _warned.add(key)
    for column, share, pair in clipped:
        log.warning("%s: the bounds %s declared for column %d of dataset %s clip %.1f%% of its "
                    "values: private queries see them clamped (p2pgrid budget bounds %s ...)",
                    peer.name, pair, column, object_id, 100 * share, object_id)


@router.on(BudgetQuery)
async def budget(peer, caller, msg: BudgetQuery):
    gov = of(peer)
    gov.require(caller, "compute")
    info = gov.store.remaining(caller.name, msg.object_id, pooled=gov.guest(caller))
    if msg.object_id is not None:
        declared = gov.store.dataset(msg.object_id)
        info["bounds"] = declared[0].to_list() if declared else None
    return BudgetInfo(info)
