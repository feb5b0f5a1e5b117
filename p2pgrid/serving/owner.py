"""The owner's side: package a model, serve it, place and drop its replicas.

Placement: candidates are the live peers whose directory record does not say they
refuse replicas of this owner (see :class:`~p2pgrid.serving.host.HostingPolicy`), or
the peers named in ``hosts``; they are tried in order of fewest models hosted, then
lowest ping, and each decides for itself when offered. Each accepted one gets the package by :func:`transfer.upload` and a
grant (the owner's signature of model, hash, host and terms) that clients check.
If fewer than ``replicas`` accept, the ones placed are dropped again and the call fails.

Keeping: :func:`keep_replicas` runs for the peer's lifetime and holds each model at the
replica count its owner asked for: a replica whose host left the directory (or stopped
announcing it) is written off and another peer gets a new one; a host that comes back
with a replica written off meanwhile is told to drop it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial

import trio
from torch import nn

from ..errors import BadRequest, NotFound, P2PError, PeerUnavailable
from ..messages import Ping
from .catalog import grant_bytes, same_terms
from .host import HostedModel, Serving, Terms, check_model_name
from .messages import DropReplica, HostOffer
from .package import live_spec, spec_hash, write_package
from .policy import Gate
from .transfer import TransferReport, request, upload

log = logging.getLogger("p2pgrid.serving")


async def serve(s: Serving, model: nn.Module, name: str, terms: Terms, *, replicas: int = 0,
                hosts: list[str] | None = None, mpc: dict | None = None) -> HostedModel:
    peer = s.peer
    check_model_name(name)
    if not isinstance(model, nn.Module):
        raise BadRequest("serve_model needs a torch.nn.Module")
    if not isinstance(replicas, int) or replicas < 0:
        raise BadRequest("replicas: a non-negative int")
    if replicas and not (terms.allow_remote_inference or terms.allow_download):
        raise BadRequest("replicas of a model that allows neither remote inference nor "
                         "downloads would serve nobody")
    await s.loaded.wait()
    model.eval()
    spec = await trio.to_thread.run_sync(live_spec, model)
    h = await trio.to_thread.run_sync(spec_hash, spec)
    path = s.package_path(peer.name, name, h)
    digests = await trio.to_thread.run_sync(partial(write_package, spec, path, model_hash=h))
    del spec
    old = s.models.get((peer.name, name))
    if old is not None:
        await unserve(s, name, keep_file=old.path == path)
    hm = HostedModel(peer.name, name, h, terms, "owner", path, digests, model, Gate(terms.policy),
                     mpc=mpc)
    s.models[hm.key] = hm
    s.save()
    s.announce()
    peer.audit("model_served", peer.name, model=f"{peer.name}/{name}", hash=h, size=digests.size,
               replicas=replicas)
    if replicas or hosts:
        want = replicas or len(hosts)
        try:
            await place(s, hm, want, hosts)
        except BaseException:
            with trio.CancelScope(shield=True):
                await unserve(s, name)
            raise
        hm.target, hm.pool = want, None if hosts is None else list(hosts)
        s.save()
    return hm


def widen_pool(hm: HostedModel, hosts: list[str] | None) -> None:
    """After a placement asked for by the owner: `hosts` join the peers replicas may go
    to; a placement on any peer (hosts=None) lets them go anywhere from then on."""
    if hosts is None:
        hm.pool = None
    elif hm.pool is not None:
        hm.pool = sorted(set(hm.pool) | set(hosts))


async def place(s: Serving, hm: HostedModel, count: int, hosts: list[str] | None = None, *,
                on_chunk=None) -> list[TransferReport]:
    """Put `count` more replicas of `hm` on other peers; all or none."""
    refusals: list[str] = []
    reports: list[TransferReport] = []
    placed: list[str] = []
    hm.placing += 1
    try:
        for rec in await candidates(s, hm, hosts):
            if len(placed) == count:
                break
            try:
                reports.append(await _upload_to(s, hm, rec, on_chunk=on_chunk))
                placed.append(rec.key_id)
            except P2PError as e:
                refusals.append(f"{rec.name}: {type(e).__name__}: {e.message}")
        if len(placed) < count:
            raise PeerUnavailable(f"placed {len(placed)} of {count} replicas of {hm.name}"
                                  + (f"; refused: {'; '.join(refusals)}" if refusals
                                     else "; no peer offers to host replicas"),
                                  refusals=refusals)
    except BaseException:
        with trio.CancelScope(shield=True):
            for kid in placed:
                await _drop(s, hm, kid)
        raise
    finally:
        hm.placing -= 1
    if s.models.get(hm.key) is not hm:  # unserved (or served anew) meanwhile
        with trio.CancelScope(shield=True):
            for kid in placed:
                await _drop(s, hm, kid)
        raise NotFound(f"{hm.name} stopped being served while its replicas were placed")
    return reports


async def _upload_to(s: Serving, hm: HostedModel, rec, *, on_chunk=None) -> TransferReport:
    peer = s.peer
    terms = hm.terms.to_dict()
    grant = peer.identity.sign(grant_bytes(peer.name, hm.name, hm.hash, rec.key_id, terms))
    offer = HostOffer(hm.name, hm.hash, hm.digests.to_dict(), terms, grant)
    t0 = time.perf_counter()
    _, report = await upload(peer, rec.key_id, offer, hm.path, hm.digests, on_chunk=on_chunk)
    hm.replicas[rec.key_id] = rec.name
    s.save()
    s.announce()
    log.info("replica of %s on %s: %d of %d chunks sent in %.2f s", hm.name, rec.name,
             report.sent, report.chunks, time.perf_counter() - t0)
    return report


async def _drop(s: Serving, hm: HostedModel, key_id: str) -> None:
    try:
        with trio.move_on_after(10):
            await request(s.peer, key_id, DropReplica(hm.name))
    except P2PError as e:
        log.info("could not drop the replica of %s on %s: %s", hm.name, key_id, e)
    hm.replicas.pop(key_id, None)


async def candidates(s: Serving, hm: HostedModel, hosts: list[str] | None):
    """Peers to offer a replica to, best first."""
    d = s.peer.directory
    if hosts is not None:
        out = []
        for h in hosts:
            try:
                rec = d.lookup(h)
            except NotFound:
                raise PeerUnavailable(f"{h} is not in the directory") from None
            if rec.key_id == s.peer.key_id:
                raise BadRequest("the owner serves its model anyway: name other peers in hosts")
            out.append(rec)
        return out
    recs = []
    for rec in d.peers(include_self=False):
        if rec.key_id in hm.replicas or d.label(rec) != rec.name:
            continue
        block = rec.services.get("serving") if isinstance(rec.services, dict) else None
        hosting = block.get("hosting") if isinstance(block, dict) else None
        if isinstance(hosting, dict):
            accept = hosting.get("accept")
            if not (accept == "*" or isinstance(accept, list) and s.peer.name in accept):
                continue
            if not hm.terms.allow_download and not hosting.get("private", True):
                continue
            load = len(block.get("models") or [])
        else:  # no word yet (an older record): ask last; the offer is the real consent
            load = 1 << 20
        recs.append((load, rec))
    rtts: dict[str, float] = {}

    async def ping(rec):
        t0 = time.perf_counter()
        try:
            await s.peer.request(rec, Ping())
            rtts[rec.key_id] = time.perf_counter() - t0
        except P2PError:
            pass

    with trio.move_on_after(2):  # a slow or silent peer is asked last, not dropped
        async with trio.open_nursery() as n:
            for _, rec in recs:
                n.start_soon(ping, rec)
    ranked = sorted(recs, key=lambda r: (r[0], rtts.get(r[1].key_id, float("inf")), r[1].name))
    return [rec for _, rec in ranked]


async def unserve(s: Serving, name: str, *, keep_file: bool = False) -> None:
    """Stop serving our model `name` here and on its replicas."""
    hm = s.models.get((s.peer.name, name))
    if hm is None or hm.role != "owner":
        raise NotFound(f"{s.peer.name} serves no model of its own named {name!r}")
    async with trio.open_nursery() as n:
        for kid in list(hm.replicas):
            n.start_soon(_drop, s, hm, kid)
    del s.models[hm.key]
    if not keep_file:
        hm.path.unlink(missing_ok=True)
    s.save()
    s.announce()
    s.peer.audit("model_unserved", s.peer.name, model=f"{s.peer.name}/{name}")


# ------------------------------------------------------------------ keeping replicas

MAX_RETRY_DELAY = 60.0  # seconds between placement attempts that find no taker, at most


@dataclass
class Watch:
    """What the keeper remembers of one model between passes."""

    missing: dict[str, float] = field(default_factory=dict)  # replica key id -> unseen since
    strays: dict[str, float] = field(default_factory=dict)   # host key id -> seen since
    retry_at: float = 0.0     # no placement before this (back-off)
    delay: float = 0.0        # the back-off's current step
    why: str = ""             # the last placement failure, logged once


def _announces(rec, hm: HostedModel, *, any_version: bool = False) -> bool:
    """Does `rec` (a directory record) announce a replica of `hm` (of this hash and
    these terms, unless `any_version`)?"""
    block = rec.services.get("serving") if isinstance(rec.services, dict) else None
    models = block.get("models") if isinstance(block, dict) else None
    terms = hm.terms.to_dict()
    return any(isinstance(e, dict) and e.get("role") == "replica" and e.get("owner") == hm.owner
               and e.get("name") == hm.name
               and (any_version or e.get("hash") == hm.hash and same_terms(e.get("terms"), terms))
               for e in models or ())


def _overdue(since: dict[str, float], key: str, now: float, grace: float) -> bool:
    """Seen now, first seen `grace` seconds ago or more (then forgotten, to start over)."""
    if now - since.setdefault(key, now) < grace:
        return False
    del since[key]
    return True


def replica_check(hm: HostedModel, records, now: float, watch: Watch, grace: float
                  ) -> tuple[list[str], list]:
    """(lost, strays) for one of our models, from the live directory records (sans-IO).

    lost: key ids of replicas whose host left the directory, or has not announced the
    replica for `grace` seconds. strays: records of live hosts announcing a replica we
    do not count (written off while they were away), for `grace` seconds. `watch`
    keeps when each was first seen, between calls.
    """
    live = {r.key_id: r for r in records}
    lost, strays = [], []
    for kid in hm.replicas:
        rec = live.get(kid)
        if rec is not None and _announces(rec, hm):
            watch.missing.pop(kid, None)
        elif rec is None:
            watch.missing.pop(kid, None)
            lost.append(kid)
        elif _overdue(watch.missing, kid, now, grace):
            lost.append(kid)
    for kid, rec in live.items():
        if kid in hm.replicas or not _announces(rec, hm, any_version=True):
            watch.strays.pop(kid, None)
        elif _overdue(watch.strays, kid, now, grace):
            strays.append(rec)
    return lost, strays


async def tend(s: Serving, hm: HostedModel, watch: Watch, grace: float) -> None:
    """One pass of :func:`keep_replicas` over one model."""
    if hm.placing:  # serve_model or replicate_model is at work on it
        return
    d = s.peer.directory
    live = d.peers(include_self=False)
    lost, strays = replica_check(hm, live, trio.current_time(), watch, grace)
    for kid in lost:
        host = hm.replicas.get(kid, kid)
        log.warning("the replica of %s on %s is gone; placing another", hm.name, host)
        s.peer.audit("replica_lost", host, model=f"{hm.owner}/{hm.name}")
        await _drop(s, hm, kid)  # if its host is still there, it holds a copy we do not count
    if lost:
        s.save()
        s.announce()
    for rec in strays:
        if (len(hm.replicas) < hm.target and _announces(rec, hm)
                and (hm.pool is None or rec.name in hm.pool)):
            # back with the current version, and still wanted: it holds a grant for it
            hm.replicas[rec.key_id] = rec.name
            s.save()
            s.announce()
            log.info("%s is back with its replica of %s; counting it again", rec.name, hm.name)
            s.peer.audit("replica_back", rec.name, model=f"{hm.owner}/{hm.name}")
            continue
        log.info("%s is back with a replica of %s we replaced; dropping it", rec.name, hm.name)
        await _drop(s, hm, rec.key_id)
    if hm.target > len(hm.replicas) and trio.current_time() < watch.retry_at:
        return  # the last attempt found no taker: back off rather than ask everyone again
    for _ in range(hm.target - len(hm.replicas)):
        try:
            hosts = None
            if hm.pool is not None:  # the owner named the peers it trusts with the weights
                by_name = {r.name: r for r in live}
                hosts = [n for n in hm.pool
                         if n in by_name and by_name[n].key_id not in hm.replicas]
                if not hosts:
                    raise PeerUnavailable(f"none of the peers named to host it ({', '.join(hm.pool)}) "
                                          "is up without a replica")
            await place(s, hm, 1, hosts)
        except P2PError as e:  # no candidate now: try again later, less often each time
            watch.delay = min(MAX_RETRY_DELAY, 2 * (watch.delay or grace / 8))
            watch.retry_at = trio.current_time() + watch.delay
            if watch.why != e.message:  # said once, not every pass
                watch.why = e.message
                log.warning("%s has %d of its %d replicas; could not place another: %s",
                            hm.name, len(hm.replicas), hm.target, e.message)
            return
        watch.retry_at, watch.delay, watch.why = 0.0, 0.0, ""
        s.peer.audit("replica_placed", s.peer.name, model=f"{hm.owner}/{hm.name}",
                     replicas=len(hm.replicas), target=hm.target)


async def keep_replicas(s: Serving) -> None:
    """For the peer's lifetime: keep each model we own at its target replica count.

    Every ttl/4 (at most 5 s) each model is checked; a replica missing for the
    directory's ttl (a host that left has been unheard of that long already) is
    replaced, and a placement that finds no taker is retried with back-off.
    """
    ttl = s.peer.directory.ttl
    interval = max(0.5, min(5.0, ttl / 4))
    watches: dict[str, Watch] = {}
    while True:
        await trio.sleep(interval)
        for hm in [m for m in s.models.values() if m.role == "owner" and not m.mpc]:
            if s.models.get(hm.key) is not hm:
                continue
            try:
                await tend(s, hm, watches.setdefault(hm.name, Watch()), ttl)
            except P2PError as e:
                log.info("keeping the replicas of %s: %s", hm.name, e.message)
            except Exception:  # never take the peer down over a replica
                log.exception("keeping the replicas of %s", hm.name)
        names = {hm.name for hm in s.models.values()}
        for name in [n for n in watches if n not in names]:
            del watches[name]
