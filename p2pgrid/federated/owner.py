"""The data owner's side: train on local data when asked, and let only updates leave.

Every handler first checks that the caller holds the ``compute`` right on each
object it names (:func:`p2pgrid.handlers.may`) and, for training, that the
owner's privacy budget allows one more release (:mod:`.ledger`). The training
loop is this peer's own code (:func:`p2pgrid.protocols.local_train.train_locally`), run in
a worker thread, configured by the message's whitelisted options; the model is
rebuilt from a checked op graph (:func:`p2pgrid.modelgraph.import_model`). What
goes back is the parameter update (new minus received weights), clipped when the
round uses client-level DP, and masked when it uses secure aggregation.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from p2pgrid.protocols.dp import clip_update
from p2pgrid.protocols.fedavg import FedAvg, FitRes, flatten
from p2pgrid.protocols.local_train import TrainingStopped, evaluate, train_locally
from p2pgrid.protocols.secagg import DoubleMaskClient

from ..errors import BadRequest, NotFound, PermissionDenied, ProtocolError, ShapeError, P2PError
from ..handlers import may
from ..identity import verify
from ..modelgraph import import_model
from ..router import Router
from .checkpoint import Checkpoints
from .ledger import PrivacyLedger, round_cost
from .messages import (Advertise, EvalRes, Evaluate, Keys, MaskedRes, Probe, ProbeRes, ShareKeys,
                       Shares, Train, Unmask, UnmaskRes, keys_statement)

__all__ = ["router", "OwnerState", "state_of"]

log = logging.getLogger("p2pgrid.federated")
router = Router()

MAX_PAIRS = 64
SESSION_TTL = 3600.0
MAX_SESSIONS_PER_CALLER = 16
_PUBLIC = ("train_seconds", "peer_seconds", "epsilon", "delta")  # metrics safe to send under DP
KEY_WAIT = 8.0  # seconds a peer waits for gossip to name a fellow peer of a secure round


@dataclass
class _Session:
    """One secure-aggregation round on this peer."""
    client: DoubleMaskClient
    you: str
    peers: list[str]
    threshold: int
    created: float = field(default_factory=time.monotonic)
    inbox_ready: bool = False


class OwnerState:
    """Per-peer federated state: the privacy ledger, secure-aggregation sessions, and
    the trainings in progress (one per coordinator and job: a newer round stops an
    older one that is still running)."""

    def __init__(self, peer):
        self.peer = peer
        self.ledger = PrivacyLedger(peer.config.data_dir / "federated" / "privacy.cbor")
        self.sessions: dict[tuple[str, str, str], _Session] = {}
        self.running: dict[tuple[str, str], tuple[int, threading.Event]] = {}
        self.training: set[tuple[str, int]] = set()  # (job, round) being trained now
        # runs this peer coordinated, for its page: job -> {job, history}; those of earlier
        # lives of the peer come from their checkpoints
        self.runs: dict[str, dict] = {
            job: {"job": job, "history": h}
            for job, h in Checkpoints(peer.config.data_dir / "federated" / "jobs").histories().items()}

    def prune(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for k in [k for k, s in self.sessions.items() if now - s.created > SESSION_TTL]:
            del self.sessions[k]

    def add_session(self, key: tuple[str, str, str], session: _Session) -> None:
        self.prune()
        mine = sorted((s.created, k) for k, s in self.sessions.items() if k[0] == key[0])
        for _, k in mine[:max(0, len(mine) - MAX_SESSIONS_PER_CALLER + 1)]:
            del self.sessions[k]
        self.sessions[key] = session

    def train(self, model_spec: dict, params: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, config: dict, should_stop) -> tuple[dict, int, dict]:
        """Rebuild the model, train it on (x, y); (update = new - params, n, metrics).
        Runs in a worker thread."""
        model = import_model({**model_spec, "state": params})
        new, n, metrics = train_locally(
            model, x, y, epochs=config["local_epochs"], batch_size=config["batch_size"],
            optimizer=config["optimizer"], loss=config["loss"], prox_mu=config["prox_mu"],
            global_params=params, dp=config["local_dp"], seed=config["seed"], should_stop=should_stop,
            clip_grad_norm=config["clip_grad_norm"])
        delta = {k: (new[k] - params[k]).to(params[k].dtype) for k in params}
        return delta, n, metrics


_warm = threading.Event()
_warming = threading.Lock()


def warm_up() -> None:
    """One tiny training step and evaluation, so a peer's first real round does not pay for
    torch's lazy imports. Once per process; safe to call from any thread."""
    with _warming:
        if _warm.is_set():
            return
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
        train_locally(model, x, y, epochs=1, batch_size=4, optimizer={"name": "sgd", "lr": 0.1},
                      loss="cross_entropy", seed=0)
        evaluate(model, x, y, "cross_entropy")
        _warm.set()


def state_of(peer) -> OwnerState:
    st = peer.extensions.get("federated")
    if st is None:
        st = peer.extensions["federated"] = OwnerState(peer)
    return st


# ------------------------------------------------------------------ data

def _check_pairs(data) -> list[list[str]]:
    if not isinstance(data, list) or not 0 < len(data) <= MAX_PAIRS or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(i, str) for i in p) for p in data):
        raise BadRequest(f"data must be 1..{MAX_PAIRS} [x id, y id] pairs")
    return data


async def _metas(peer, caller, data) -> list:
    """Metas of every object named, after checking the caller's compute right on each."""
    out = []
    for x_id, y_id in _check_pairs(data):
        pair = []
        for oid in (x_id, y_id):
            try:
                meta = await peer.meta(oid)
            except NotFound:
                raise NotFound(f"no object {oid} on {peer.name}") from None
            if not may(peer, caller, meta, "compute"):
                raise PermissionDenied(f"{caller.name} has no compute right on object {oid}; "
                                       f"its data takes no part in federated training",
                                       id=oid, right="compute")
            pair.append(meta)
        if not pair[0].shape or not pair[1].shape or pair[0].shape[0] != pair[1].shape[0]:
            raise ShapeError(f"objects {x_id} {list(pair[0].shape)} and {y_id} {list(pair[1].shape)} "
                             f"need the same number of rows")
        out.append(tuple(pair))
    return out


def _load(peer, metas) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs in a thread: the pairs' tensors, concatenated."""
    xs = [peer.store.load(mx.id) for mx, _ in metas]
    ys = [peer.store.load(my.id) for _, my in metas]
    try:
        return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
    except RuntimeError:
        raise ShapeError("the data objects' shapes do not fit together") from None


def _ids(metas) -> list[str]:
    return [m.id for pair in metas for m in pair]


# ------------------------------------------------------------------ config

def _int(cfg, key, default, lo, hi) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be an int in [{lo}, {hi}]")
    return v


def _training_config(cfg: dict) -> dict:
    """The options this peer's training loop takes, checked; other keys are ignored."""
    if not isinstance(cfg, dict):
        raise BadRequest("config must be a map")
    out = {"local_epochs": _int(cfg, "local_epochs", 1, 0, 10_000),
           "batch_size": _int(cfg, "batch_size", 32, 1, 1 << 20),
           "optimizer": cfg.get("optimizer", {"name": "sgd", "lr": 0.05}),
           "loss": cfg.get("loss", "cross_entropy"),
           "prox_mu": cfg.get("prox_mu", 0.0),
           "seed": _int(cfg, "seed", 0, 0, (1 << 62)),
           "clip_grad_norm": cfg.get("clip_grad_norm"),   # train_locally checks it
           "local_dp": None, "client_dp": None}
    dp = cfg.get("dp") or {}
    if not isinstance(dp, dict):
        raise BadRequest("dp must be a map")
    if dp.get("local") is not None:
        local = dp["local"]
        if not isinstance(local, dict):
            raise BadRequest("dp.local must be a map")
        out["local_dp"] = {k: local[k] for k in ("clip", "noise_multiplier", "delta") if k in local}
    if dp.get("client") is not None:
        client = dp["client"]
        clip = client.get("clip") if isinstance(client, dict) else None
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf:
            raise BadRequest("dp.client.clip must be a positive number")
        out["client_dp"] = dict(client)
    out["cost"] = dp or None
    return out


def _curve(state: OwnerState, cost, n: int, cfg: dict):
    return round_cost(cost, num_examples=n, batch_size=cfg["batch_size"], epochs=cfg["local_epochs"],
                      trust_client_dp=state.ledger.trust_client_dp)


# ------------------------------------------------------------------ handlers

@router.on(Probe)
async def probe(peer, caller, msg: Probe):
    metas = await _metas(peer, caller, msg.data)
    n = sum(mx.shape[0] for mx, _ in metas)
    state = state_of(peer)
    cfg = _training_config({"dp": msg.cost or {}, **((msg.cost or {}).get("train") or {})})
    state.ledger.check(_ids(metas), _curve(state, msg.cost, n, cfg))
    return ProbeRes(n, state.ledger.report(_ids(metas)))


async def _run_stoppable(fn):
    """Run ``fn(should_stop)`` in a worker thread. If this task is cancelled (the
    coordinator hung up, the peer is stopping) the thread is told to stop at its next
    step and left to finish on its own."""
    stop = threading.Event()
    try:
        return await trio.to_thread.run_sync(fn, stop.is_set, abandon_on_cancel=True)
    finally:
        stop.set()


@router.on(Train)
async def train(peer, caller, msg: Train):
    state = state_of(peer)
    received = time.perf_counter()
    ins = msg.fit
    if isinstance(ins.round, bool) or not isinstance(ins.round, int) or ins.round < 0:
        raise BadRequest("round must be a non-negative int")
    cfg = {**_training_config(ins.config), "round": ins.round}
    session = None
    if msg.round_id is not None:
        session = state.sessions.get((caller.key_id, msg.job, msg.round_id))
        if session is None or session.client.state != "shared":
            raise ProtocolError(f"no secure-aggregation round {msg.round_id} ready on {peer.name}")
    metas = await _metas(peer, caller, msg.data)
    n_rows = sum(mx.shape[0] for mx, _ in metas)
    token = state.ledger.charge(_ids(metas), _curve(state, cfg["cost"], n_rows, cfg))
    released = False
    key = (caller.key_id, msg.job)
    older = state.running.get(key)
    if older is not None and older[0] < ins.round:
        older[1].set()  # the coordinator moved on: stop the stale round
    stop_flag = threading.Event()
    state.running[key] = (ins.round, stop_flag)
    state.training.add((msg.job, ins.round))
    peer.audit("federated.train", caller.name, job=msg.job, round=ins.round, objects=_ids(metas),
               examples=n_rows, secure=session is not None)
    try:
        x, y = await trio.to_thread.run_sync(_load, peer, metas)

        def work(should_stop):
            return state.train(msg.model, dict(ins.params), x, y, cfg,
                               lambda: should_stop() or stop_flag.is_set())

        try:
            delta, n, metrics = await _run_stoppable(work)
        except TrainingStopped:
            raise ProtocolError(f"{peer.name} stopped round {ins.round}: a newer round began") from None
        floats, ints = FedAvg.layout(ins.params)
        if cfg["client_dp"] is not None:
            clipped, _ = clip_update({k: delta[k] for k in floats}, float(cfg["client_dp"]["clip"]))
            delta.update(clipped)
        # Under DP only the update is covered by the guarantee: the training loss stays here.
        private = cfg["client_dp"] is not None or cfg["local_dp"] is not None
        if session is None:
            released = True
            metrics["peer_seconds"] = time.perf_counter() - received
            if private:
                metrics = {k: metrics[k] for k in _PUBLIC if k in metrics}
            return FitRes(peer.name, delta, n, metrics, delta=True, round=ins.round)
        # secure aggregation: weighted by examples, or by 1 under client-level DP (whose
        # sensitivity a weight would raise); the loss rides along so only its sum is seen
        loss = metrics.get("loss", math.nan)
        loss = 0.0 if private or not math.isfinite(loss) else float(loss)
        vec = torch.cat([flatten(delta, floats), flatten(delta, ints), torch.tensor([loss], dtype=torch.float64)])
        weight = 1 if cfg["client_dp"] is not None else n
        masked = await trio.to_thread.run_sync(session.client.masked_update, vec, msg.inbox, weight)
        released = True
        metrics["peer_seconds"] = time.perf_counter() - received
        public = {k: metrics[k] for k in _PUBLIC if k in metrics}
        return MaskedRes(session.you, ins.round, masked, public)
    finally:
        state.training.discard((msg.job, ins.round))
        if state.running.get(key, (None, None))[1] is stop_flag:
            del state.running[key]
        if not released:
            state.ledger.refund(token)


@router.on(Evaluate)
async def evaluate_model(peer, caller, msg: Evaluate):
    metas = await _metas(peer, caller, msg.data)
    ledger = state_of(peer).ledger
    capped = [oid for oid in _ids(metas) if ledger.cap(oid) is not None]
    if capped:
        # a loss or accuracy over capped data is a release the ledger cannot price
        raise PermissionDenied(f"{peer.name}: {', '.join(capped)} may only be used by "
                               "differentially private training (its owner capped its epsilon); "
                               "evaluate on data without a cap")
    peer.audit("federated.evaluate", caller.name, job=msg.job, round=msg.round, objects=_ids(metas))
    x, y = await trio.to_thread.run_sync(_load, peer, metas)

    def work():
        model = import_model({**msg.model, "state": dict(msg.params)})
        return evaluate(model, x, y, msg.loss)

    m = await trio.to_thread.run_sync(work)
    acc = m.get("accuracy")
    return EvalRes(len(x), float(m["loss"]), None if acc is None or math.isnan(acc) else float(acc))


# ------------------------------------------------------------------ secure aggregation

def _me(peer, label: str) -> bool:
    return label in (peer.name, peer.key_id)


@router.on(Advertise)
async def advertise(peer, caller, msg: Advertise):
    state = state_of(peer)
    peers = sorted(set(msg.peers))
    if not _me(peer, msg.you) or msg.you not in peers:
        raise BadRequest(f"{msg.you!r} does not name this peer among the round's peers")
    if len(peers) < 2 or len(peers) > 1000:
        raise BadRequest("secure aggregation needs 2..1000 peers")
    floor = len(peers) // 2 + 1
    if not floor <= msg.threshold <= len(peers) or msg.threshold < 2:
        raise BadRequest(f"threshold must be in [{max(2, floor)}, {len(peers)}]")
    client = DoubleMaskClient(msg.you, peers, msg.fractional_bits, threshold=msg.threshold)
    keys = client.public_keys()
    state.add_session((caller.key_id, msg.job, msg.round_id),
                      _Session(client, msg.you, peers, msg.threshold))
    stmt = keys_statement(msg.job, msg.round_id, msg.you, peers, msg.threshold, keys["c"], keys["s"])
    return Keys(msg.you, keys["c"], keys["s"], peer.identity.sign(stmt))


@router.on(ShareKeys)
async def share_keys(peer, caller, msg: ShareKeys):
    state = state_of(peer)
    session = state.sessions.get((caller.key_id, msg.job, msg.round_id))
    if session is None:
        raise ProtocolError(f"no secure-aggregation round {msg.round_id} on {peer.name}")
    own = session.client.public_keys()
    keys = {}
    for name, k in msg.keys.items():
        if name not in session.peers:
            raise ProtocolError(f"keys from {name!r}, who is not among the round's peers")
        c, s, sig = k.get("c"), k.get("s"), k.get("signature")
        if not all(isinstance(v, bytes) for v in (c, s, sig)):
            raise BadRequest("each peer's keys need c, s and signature")
        if name == session.you:
            if c != own["c"] or s != own["s"]:
                raise ProtocolError("the coordinator relayed keys for this peer that are not its own")
        else:
            public = await _public_key(peer, name)
            if public is None:
                raise ProtocolError(f"cannot authenticate {name}'s keys: no such peer in the "
                                    f"directory of {peer.name}")
            stmt = keys_statement(msg.job, msg.round_id, name, session.peers, session.threshold, c, s)
            if not verify(public, stmt, sig):
                raise ProtocolError(f"{name}'s secure-aggregation keys carry no valid signature "
                                    f"by {name}")
        keys[name] = {"c": c, "s": s}
    cts = session.client.share_keys(keys, msg.round_id, allow_missing=True)
    return Shares(session.you, cts)


async def _public_key(peer, name: str, wait: float = KEY_WAIT) -> bytes | None:
    """The Ed25519 key this peer's own directory binds to `name`, waiting up to `wait`
    seconds for gossip to bring a peer it has not heard of yet (never taking the
    coordinator's word for it)."""
    with trio.move_on_after(wait):
        while True:
            try:
                return peer.directory.lookup(name).public_key
            except NotFound:
                await trio.sleep(0.05)
    return None


@router.on(Unmask)
async def unmask(peer, caller, msg: Unmask):
    state = state_of(peer)
    key = (caller.key_id, msg.job, msg.round_id)
    session = state.sessions.get(key)
    if session is None:
        raise ProtocolError(f"no secure-aggregation round {msg.round_id} on {peer.name}")
    try:
        shares = session.client.unmask_shares(msg.survivors)
    finally:
        if session.client.state == "done":
            state.sessions.pop(key, None)
    return UnmaskRes(session.you, shares)
