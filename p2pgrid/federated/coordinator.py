"""The coordinator: rounds of federated training over whichever peers answer in time.

A round (see :meth:`Coordinator.run_round`):

1. find the peers holding data for the query in the directory (:mod:`.data`), and
   probe the ones not yet known to accept: a peer whose rules deny the caller the
   compute right, or whose privacy budget is spent, says so and is left out;
2. let the strategy sample among the accepting peers and write the config;
3. send the global model (structure + weights) and collect updates until every
   selected peer answered or the round's deadline passed. A peer that fails or is
   too slow is noted and the round goes on with the others if at least
   ``min_peers`` answered; else the run stops with an error naming each failure.
   With secure aggregation this step is Bonawitz et al.'s four steps (signed key
   advertisement, encrypted key shares, masked updates, unmasking; see
   :mod:`p2pgrid.protocols.secagg`), so only the sum of the updates is ever unmasked;
4. aggregate (strategy), add client-level DP noise if asked, evaluate, checkpoint.

The network is reached only through a :class:`Link`, so the loop can be driven by
an in-memory link as well as by :class:`PeerLink` (the local peer).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import trio
from torch import nn

from p2pgrid.protocols.dp import RDPAccountant, add_gaussian_noise, clip_update
from p2pgrid.protocols.fedavg import FedAvg, FitIns, FitRes, Strategy, flatten, unflatten
from p2pgrid.protocols.local_train import evaluate as evaluate_locally
from p2pgrid.protocols.secagg import DoubleMaskServer

from .. import wire
from ..errors import (BadRequest, NotFound, P2PError, PeerUnavailable, PermissionDenied, ProtocolError,
                      RoundFailed)
from ..identity import verify
from ..modelgraph import export_model, import_model, model_hash
from .checkpoint import Checkpoints
from .data import find_shards
from .messages import (Advertise, EvalRes, Evaluate, Keys, MaskedRes, Probe, ProbeRes, ShareKeys,
                       Shares, Train, Unmask, UnmaskRes, keys_statement)
from .options import ClientDP, FitEvent, FitResult, LocalDP, RoundRecord

__all__ = ["Link", "PeerLink", "Plan", "Coordinator", "structure_of", "job_id"]

log = logging.getLogger("p2pgrid.federated")


class Link(Protocol):
    """What the coordinator needs from the network."""
    sent: int
    received: int

    def shards(self, query: str) -> dict[str, list[list[str]]]: ...

    def public_key(self, peer: str) -> bytes | None: ...

    async def request(self, peer: str, msg, timeout: float): ...


class PeerLink:
    """A :class:`Link` through the local peer; counts encoded message bytes each way
    (messages to itself are dispatched locally and not counted)."""

    def __init__(self, peer):
        self.peer = peer
        self.sent = 0
        self.received = 0

    def shards(self, query: str) -> dict[str, list[list[str]]]:
        return find_shards(self.peer.directory, query)

    def public_key(self, name: str) -> bytes | None:
        try:
            return self.peer.directory.lookup(name).public_key
        except P2PError:
            return None

    def _is_self(self, name: str) -> bool:
        return name in (self.peer.name, self.peer.key_id)

    async def request(self, to: str, msg, timeout: float):
        local = self._is_self(to)
        if not local:
            self.sent += len(wire.encode(msg))
        try:
            with trio.fail_after(max(timeout, 0.001)):
                reply = await self.peer.request(to, msg, timeout=max(timeout, 0.001))
        except trio.TooSlowError:
            raise PeerUnavailable(f"{to} did not answer within {timeout:.1f} s") from None
        if not local:
            self.received += len(wire.encode(reply))
        return reply


def structure_of(spec: dict) -> dict:
    """A model spec without its weights: what travels next to a state dict."""
    return {k: v for k, v in spec.items() if k != "state"}


def job_id(structure: dict, data: str) -> str:
    """The default job name: stable for one model structure and data query, so that
    ``resume=True`` finds the checkpoint after a restart."""
    h = hashlib.sha256((model_hash(structure) + "|" + " ".join(sorted(data.split()))).encode())
    return "fit-" + h.hexdigest()[:12]


def _seed(seed: int, round: int, peer: str) -> int:
    return int(hashlib.sha256(f"{seed}:{round}:{peer}".encode()).hexdigest()[:15], 16)


def _reason(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e) or ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@dataclass
class Plan:
    """Everything a run is asked to do (see ``Network.federated_fit``)."""
    job: str
    data: str
    rounds: int
    strategy: FedAvg
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: dict = field(default_factory=lambda: {"name": "sgd", "lr": 0.05})
    loss: str = "cross_entropy"
    secure: bool = False
    client_dp: ClientDP | None = None
    local_dp: LocalDP | None = None
    evaluate: Any = None                 # a data query, an (x, y) pair, or None
    evaluate_every: int = 1
    seed: int = 0
    fractional_bits: int = 32
    probe_timeout: float = 30.0
    discover_timeout: float = 10.0       # wait this long for min_peers data holders to appear
    setup_timeout: float = 10.0
    clip_grad_norm: float | None = None  # peers clip each step's gradient to this L2 norm
    wait_for: tuple[str, ...] | int | None = None   # data holders (names, or how many) round 1 waits for
    wait_timeout: float = 60.0

    def __post_init__(self):
        if not isinstance(self.strategy, Strategy):
            raise BadRequest("strategy must be a p2pgrid.protocols.fedavg.Strategy (FedAvg, FedProx, "
                             "FedAdam, FedMedian, or your own)")
        if (self.secure or self.client_dp is not None) and not isinstance(self.strategy, FedAvg):
            # both see only a (noisy) sum of updates: only a weighted mean can be made of it
            raise BadRequest(f"secure aggregation and client-level DP need a FedAvg-family "
                             f"strategy (FedAvg, FedProx, FedAdam), not "
                             f"{type(self.strategy).__name__}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise BadRequest("rounds must be a positive int")
        if self.secure and self.strategy.min_peers < 2:
            raise BadRequest("secure aggregation needs min_peers >= 2 (one update alone is no secret)")
        if self.evaluate_every < 1:
            raise BadRequest("evaluate_every must be >= 1")
        if self.clip_grad_norm is not None and (
                isinstance(self.clip_grad_norm, bool) or not isinstance(self.clip_grad_norm, (int, float))
                or not 0 < self.clip_grad_norm < math.inf):
            raise BadRequest("clip_grad_norm must be a positive number")
        if self.wait_for is not None:
            w = self.wait_for
            if isinstance(w, str):
                w = (w,)
            if isinstance(w, bool) or (isinstance(w, int) and w < 1) or (
                    not isinstance(w, int) and (not w or not all(isinstance(p, str) and p for p in w))):
                raise BadRequest("wait_for must be a positive count or a list of peer names")
            self.wait_for = w if isinstance(w, int) else tuple(w)
        if isinstance(self.wait_timeout, bool) or not isinstance(self.wait_timeout, (int, float)) \
                or not 0 <= self.wait_timeout < math.inf:
            raise BadRequest("wait_timeout must be a number of seconds >= 0")

    def cost(self) -> dict | None:
        """The DP part of the training config: what a data owner charges to its ledger."""
        out = {}
        if self.client_dp is not None:
            out["client"] = self.client_dp.to_config()
        if self.local_dp is not None:
            out["local"] = self.local_dp.to_config()
        return out or None


class Coordinator:
    """Runs a :class:`Plan` over a :class:`Link`; see the module docstring."""

    def __init__(self, link: Link, plan: Plan, model: nn.Module, *, checkpoints: Checkpoints | None = None,
                 resume: bool = False, progress: bool = True,
                 on_event: Callable[[FitEvent], Any] | None = None):
        from ..torchscript import from_torchscript
        model = from_torchscript(model)   # traced/scripted: rebuilt from whitelisted layers
        self.link, self.plan, self.model = link, plan, model
        spec = export_model(model)
        self.structure = structure_of(spec)
        self.params: dict[str, torch.Tensor] = dict(spec["state"])
        self.checkpoints, self.progress, self.on_event = checkpoints, progress, on_event
        self.history: list[RoundRecord] = []
        self.accountant = RDPAccountant()
        self.accepted: dict[str, tuple] = {}     # peer -> the data pairs it accepted
        self.examples: dict[str, int] = {}
        self.refused: dict[str, str] = {}        # peer -> why it takes no part
        self._last_failure: dict[str, str] = {}
        self._probe_failures: dict[str, str] = {}   # this round's, for error messages
        self.start_round = 1
        if resume and checkpoints is not None:
            self._restore()
        self._rounds_bar = self._peers_bar = None

    # ------------------------------------------------------------ checkpoints
    def _restore(self) -> None:
        ckpt = self.checkpoints.load(self.plan.job)
        if ckpt is None:
            return
        saved = ckpt["model"]
        if model_hash(structure_of(saved)) != model_hash(self.structure):
            raise BadRequest(f"the checkpoint of job {self.plan.job} is for another model structure")
        import_model(saved)  # the whole spec passes the whitelist before we use its weights
        self.params = {k: v.clone() for k, v in saved["state"].items()}
        self.history = [RoundRecord.from_dict(d) for d in ckpt["history"]]
        self.plan.strategy.load_state_dict(ckpt.get("strategy") or {})
        for noise, rate, steps in ckpt.get("accountant", []):
            self.accountant.step(noise, rate, steps)
        self.start_round = int(ckpt["round"]) + 1
        log.info("job %s resumes after round %d", self.plan.job, ckpt["round"])

    async def _save(self, round: int) -> None:
        if self.checkpoints is None:
            return
        state = {"job": self.plan.job, "round": round,
                 "model": {**self.structure, "state": self.params},
                 "history": [h.to_dict() for h in self.history],
                 "strategy": self.plan.strategy.state_dict(),
                 "accountant": [list(h) for h in self.accountant.history],
                 "data": self.plan.data}
        await trio.to_thread.run_sync(self.checkpoints.save, self.plan.job, state)

    # ------------------------------------------------------------ events
    async def _emit(self, kind: str, round: int, **kw) -> None:
        if self.on_event is None:
            return
        out = self.on_event(FitEvent(kind, round, **kw))
        if inspect.isawaitable(out):
            await out

    # ------------------------------------------------------------ the run
    async def run(self) -> FitResult:
        from tqdm.auto import tqdm

        plan = self.plan
        self._rounds_bar = tqdm(total=plan.rounds, initial=min(self.start_round - 1, plan.rounds),
                                desc=f"federated {plan.data}", unit="round", disable=not self.progress,
                                dynamic_ncols=True)
        try:
            for r in range(self.start_round, plan.rounds + 1):
                record = await self.run_round(r)
                self.history.append(record)
                await self._save(r)
                self._rounds_bar.update(1)
                self._rounds_bar.set_postfix(_postfix(record), refresh=True)
                await self._emit("round_end", r, record=record)
        finally:
            self._rounds_bar.close()
        return FitResult(model=self.final_model(), params=self.params, history=list(self.history),
                         job=plan.job, excluded=dict(self.refused))

    def final_model(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in self.params.items():
                state[k].data.copy_(v)
        return model

    async def run_round(self, r: int) -> RoundRecord:
        plan, strategy = self.plan, self.plan.strategy
        t0, sent0, recv0 = time.perf_counter(), self.link.sent, self.link.received
        await self._emit("round_start", r)
        shards = self.link.shards(plan.data)
        absent: dict[str, str] = {}
        if r == self.start_round and plan.wait_for is not None:
            shards, absent = await self._wait_for(shards)
        if len(shards) < strategy.min_peers and plan.discover_timeout > 0:
            with trio.move_on_after(plan.discover_timeout):   # gossip may not have brought them yet
                while len(shards) < strategy.min_peers:
                    await trio.sleep(0.1)
                    shards = self.link.shards(plan.data)
        probe_failures = await self._probe(r, shards)
        self._probe_failures = probe_failures
        deadline = trio.current_time() + strategy.round_timeout
        available = sorted(p for p in shards if self.accepted.get(p) == _key(shards[p]))
        if len(available) < strategy.min_peers:
            raise ProtocolError(self._too_few_available(r, shards, available),
                                available=len(available), need=strategy.min_peers)
        instructions = strategy.configure_fit(r, self.params, available)
        if not instructions or not set(instructions) <= set(available):
            raise BadRequest(f"round {r}: {type(strategy).__name__}.configure_fit chose "
                             f"{sorted(instructions)}, not a non-empty subset of {available}")
        selected = sorted(instructions)
        dp = {}
        if plan.client_dp is not None:
            dp["client"] = plan.client_dp.to_config()
        if plan.local_dp is not None:
            dp["local"] = plan.local_dp.to_config()
        # the strategy's per-peer config, with what the caller of federated_fit chose on top
        config = {p: {**instructions[p].config, "local_epochs": plan.local_epochs,
                      "batch_size": plan.batch_size, "optimizer": dict(plan.optimizer),
                      "loss": plan.loss, **({"dp": dp} if dp else {}),
                      **({"clip_grad_norm": plan.clip_grad_norm} if plan.clip_grad_norm else {})}
                  for p in selected}
        self._peers_bar = self._bar(r, len(selected))
        try:
            if plan.secure:
                used, failures, agg = await self._secure_round(r, selected, shards, config, deadline)
            else:
                used, failures, agg = await self._plain_round(r, selected, shards, config, deadline)
        finally:
            self._peers_bar.close()
        new_params, loss, n, metrics = agg
        self.params = new_params
        if plan.client_dp is not None:
            # sample rate 1: the selection is public (seeded, and named in the record)
            self.accountant.step(plan.client_dp.noise_multiplier, 1.0)
        failures = {**{p: f"probe: {why}" for p, why in probe_failures.items()}, **failures}
        unused = self._unused(shards, used, available, selected, failures)
        unused.update(absent)
        record = RoundRecord(round=r, peers=used, failures=failures, unused=unused,
                             num_examples=n, loss=loss,
                             secure=plan.secure,
                             train_seconds=max(metrics["train_seconds"]) if metrics["train_seconds"] else None,
                             peer_seconds=max(metrics["peer_seconds"]) if metrics["peer_seconds"] else None,
                             local_epsilon=max(metrics["epsilon"]) if metrics["epsilon"] else None,
                             epsilon=(self.accountant.epsilon(plan.client_dp.delta)
                                      if plan.client_dp is not None else None))
        if plan.evaluate is not None and (r % plan.evaluate_every == 0 or r == plan.rounds):
            record.eval_loss, record.accuracy = await self._evaluate(r)
        record.bytes_sent = self.link.sent - sent0
        record.bytes_received = self.link.received - recv0
        record.seconds = time.perf_counter() - t0
        return record

    async def _wait_for(self, shards: dict) -> tuple[dict, dict[str, str]]:
        """Round 1 waits (up to ``wait_timeout``) until the data holders named in ``wait_for``,
        or that many of them, are in the directory; returns the shards and, for each named
        peer still missing, why it is not used."""
        plan = self.plan
        want = plan.wait_for

        def satisfied(found) -> bool:
            return len(found) >= want if isinstance(want, int) else set(want) <= set(found)

        with trio.move_on_after(plan.wait_timeout):
            while not satisfied(shards):
                await trio.sleep(0.1)
                shards = self.link.shards(plan.data)
        if isinstance(want, int):
            if not satisfied(shards):
                log.warning("job %s: %d of the %d data holders waited for appeared in %g s",
                            plan.job, len(shards), want, plan.wait_timeout)
            return shards, {}
        return shards, {p: f"named in wait_for, but no data matching {plan.data!r} from it reached "
                           f"the directory within {plan.wait_timeout:g} s"
                        for p in want if p not in shards}

    def _unused(self, shards: dict, used: list[str], available: list[str], selected: list[str],
                failures: dict[str, str]) -> dict[str, str]:
        """{peer: why} for each peer holding data for the query that this round did not use."""
        out = {}
        for p in sorted(shards):
            if p in used:
                continue
            if p in failures:
                out[p] = failures[p]
            elif p in self.refused:
                out[p] = f"refused the job: {self.refused[p]}"
            elif p not in available:
                out[p] = f"has not accepted the job: {self._last_failure.get(p, 'no answer to the probe')}"
            elif p not in selected:
                out[p] = f"not sampled by {type(self.plan.strategy).__name__} this round"
            else:  # pragma: no cover - selected peers either answered or are in failures
                out[p] = "selected, but its update was not used"
        return out

    def _bar(self, r: int, total: int):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=f"round {r} peers", unit="peer", leave=False, position=1,
                    disable=not self.progress, dynamic_ncols=True)

    # ------------------------------------------------------------ probing
    async def _probe(self, r: int, shards: dict[str, list[list[str]]]) -> dict[str, str]:
        """Ask peers not yet known to accept; returns {peer: why} for those that did not."""
        todo = {p: Probe(self.plan.job, pairs, self._probe_cost()) for p, pairs in shards.items()
                if self.accepted.get(p) != _key(pairs)}
        if not todo:
            return {}
        timeout = min(self.plan.probe_timeout, self.plan.strategy.round_timeout)
        replies, failures = await self._gather(r, todo, trio.current_time() + timeout, phase="probe")
        for p, rep in replies.items():
            if isinstance(rep, ProbeRes):
                self.accepted[p] = _key(shards[p])
                self.examples[p] = rep.num_examples
                self.refused.pop(p, None)
        for p, (why, err) in failures.items():
            self.accepted.pop(p, None)
            if isinstance(err, (PermissionDenied, BadRequest, NotFound)):
                self.refused[p] = why
        return {p: why for p, (why, _) in failures.items() if p not in self.refused}

    def _probe_cost(self) -> dict | None:
        cost = self.plan.cost()
        if cost is None:
            return None
        return {**cost, "train": {"batch_size": self.plan.batch_size,
                                  "local_epochs": self.plan.local_epochs}}

    def _too_few_available(self, r: int, shards: dict, available: list[str]) -> str:
        need = self.plan.strategy.min_peers
        if not shards:
            return (f"round {r}: no peer publishes data matching {self.plan.data!r} "
                    f"(an #x and a #y object with those tags); need min_peers={need}")
        notes = [f"{p}: {self.refused[p]}" for p in sorted(shards) if p in self.refused]
        notes += [f"{p}: {self._last_failure.get(p, 'did not answer')}" for p in sorted(shards)
                  if p not in available and p not in self.refused]
        return (f"round {r}: {len(available)} of {len(shards)} peers holding {self.plan.data!r} "
                f"can take part, need min_peers={need}" + ("; " + "; ".join(notes) if notes else ""))

    # ------------------------------------------------------------ sending
    async def _gather(self, r: int, msgs: dict[str, Any], deadline: float, *, phase: str,
                      bar=None) -> tuple[dict[str, Any], dict[str, tuple[str, BaseException | None]]]:
        """Send every message concurrently; collect replies until all answered or `deadline`."""
        replies: dict[str, Any] = {}
        failures: dict[str, tuple[str, BaseException | None]] = {}
        if not msgs:
            return replies, failures
        send, recv = trio.open_memory_channel(len(msgs))

        async def one(p, msg):
            try:
                rep = await self.link.request(p, msg, timeout=deadline - trio.current_time())
            except (P2PError, OSError, ValueError, trio.TooSlowError) as e:
                send.send_nowait((p, None, e))
            else:
                send.send_nowait((p, rep, None))

        async with trio.open_nursery() as nursery:
            for p, m in msgs.items():
                nursery.start_soon(one, p, m)
            with trio.move_on_at(deadline):
                for _ in range(len(msgs)):
                    p, rep, err = await recv.receive()
                    if err is None:
                        replies[p] = rep
                        if bar is not None:
                            bar.update(1)
                        await self._emit("reply", r, peer=p, info={"phase": phase})
                    else:
                        failures[p] = (_reason(err), err)
                        await self._emit("failure", r, peer=p, info={"phase": phase,
                                                                     "reason": failures[p][0]})
            nursery.cancel_scope.cancel()
        for p in msgs:
            if p not in replies and p not in failures:
                failures[p] = (_NO_ANSWER + f" ({phase})", None)
                await self._emit("failure", r, peer=p, info={"phase": phase, "reason": failures[p][0]})
        for p, (why, _) in failures.items():
            self._last_failure[p] = why
        return replies, failures

    def _note_failures(self, failures: dict[str, tuple[str, BaseException | None]]) -> dict[str, str]:
        out = {}
        for p, (why, err) in failures.items():
            out[p] = why
            self.accepted.pop(p, None)  # probe again next round: it may be gone, or back
            if isinstance(err, PermissionDenied):
                self.refused[p] = why
        return out

    def _not_enough(self, r: int, phase: str, got: int, asked: int, need: int,
                    failures: dict[str, str]) -> RoundFailed:
        # peers left out at the probe explain why fewer were selected than hold data
        notes = {**{p: f"probe: {why}" for p, why in self._probe_failures.items()},
                 **failures}
        slow = sorted(p for p, why in failures.items() if why.startswith(_NO_ANSWER))
        others = sorted(p for p in notes if p not in slow)
        parts = []
        if others:  # refusals and errors came back at once: no deadline is involved
            parts.append(f"{len(others)} refused or failed: "
                         + "; ".join(f"{p}: {notes[p]}" for p in others))
        if slow:
            parts.append(f"{len(slow)} did not answer before the "
                         f"{self.plan.strategy.round_timeout:g} s deadline: {', '.join(slow)}")
        return RoundFailed(
            f"round {r}: {got} of {asked} selected peers returned a usable answer ({phase}), "
            f"need {need}" + ("; " + "; ".join(parts) if parts else ""),
            round=r, answered=got, need=need, refused=others, no_answer=slow)

    def _train_msg(self, r: int, p: str, pairs, config, round_id=None, inbox=None) -> Train:
        cfg = {**config, "seed": _seed(self.plan.seed, r, p)}
        return Train(self.plan.job, self.structure, FitIns(r, self.params, cfg), pairs, round_id,
                     dict(inbox or {}))

    # ------------------------------------------------------------ plain rounds
    async def _plain_round(self, r, selected, shards, config, deadline):
        plan, strategy = self.plan, self.plan.strategy
        msgs = {p: self._train_msg(r, p, shards[p], config[p]) for p in selected}
        await self._emit("fit_sent", r, info={"peers": list(selected)})
        replies, failures = await self._gather(r, msgs, deadline, phase="fit", bar=self._peers_bar)
        fits = []
        for p, rep in replies.items():
            if isinstance(rep, FitRes) and rep.round in (None, r):
                fits.append(dataclasses.replace(rep, peer=p))
            else:
                failures[p] = (f"answered with {type(rep).__name__}, not an update", None)
        failed = self._note_failures({p: f for p, f in failures.items()})
        # replies arrive in any order and float sums depend on order: sum by peer key so
        # that a seeded run is reproducible bit for bit
        fits.sort(key=lambda f: f.peer)
        if len(fits) < strategy.min_peers:
            raise self._not_enough(r, "fit", len(fits), len(selected), strategy.min_peers, failed)
        if isinstance(strategy, FedAvg):
            strategy.check_replies(r, self.params, fits, list(failed))
        metrics = {k: [f.metrics[k] for f in fits if _finite(f.metrics.get(k))]
                   for k in ("train_seconds", "peer_seconds", "epsilon")}
        mean = strategy.aggregate_metrics(fits)
        n = sum(f.num_examples for f in fits)
        if plan.client_dp is None:
            new = strategy.aggregate_fit(r, self.params, fits, list(failed))
            return sorted(f.peer for f in fits), failed, (new, mean.get("loss"), n, metrics)
        floats, ints = FedAvg.layout(self.params)
        fsum = torch.zeros(sum(self.params[k].numel() for k in floats), dtype=torch.float64)
        isum = torch.zeros(sum(self.params[k].numel() for k in ints), dtype=torch.float64)
        for f in fits:  # the peers clipped already; clipping again costs nothing and trusts no one
            clipped, _ = clip_update({"d": flatten(f.params, floats)}, plan.client_dp.clip)
            fsum += clipped["d"]
            isum += flatten(f.params, ints)
        new = self._apply_sum(r, fsum, isum, len(fits), len(selected))
        return sorted(f.peer for f in fits), failed, (new, mean.get("loss"), n, metrics)

    def _apply_sum(self, r: int, fsum: torch.Tensor, isum: torch.Tensor, weight: float,
                   selected: int) -> dict[str, torch.Tensor]:
        """New global weights from summed updates: the weighted mean, or under client-level
        DP the noisy sum over the number of selected peers (a fixed denominator)."""
        strategy, dp = self.plan.strategy, self.plan.client_dp
        floats, ints = FedAvg.layout(self.params)
        if dp is None:
            fdelta = fsum / weight
        else:
            fdelta = add_gaussian_noise({"d": fsum}, dp.clip, dp.noise_multiplier)["d"] / max(selected, 1)
        new = strategy.apply_update(r, self.params, fdelta)
        if ints:
            like = {k: self.params[k].to(torch.float64) for k in ints}
            parts = unflatten(isum / weight, like, ints)
            for k in ints:
                v = like[k] + parts[k]
                new[k] = (v >= 0.5) if self.params[k].dtype == torch.bool else v.round().to(self.params[k].dtype)
        return {k: new[k] for k in self.params}

    # ------------------------------------------------------------ secure rounds
    async def _secure_round(self, r, selected, shards, config, deadline):
        plan, strategy = self.plan, self.plan.strategy
        round_id = f"{r}-{secrets.token_hex(6)}"
        threshold = max(2, len(selected) // 2 + 1)
        need = max(threshold, strategy.min_peers)
        failed: dict[str, str] = {}

        def setup_deadline():
            return min(deadline, trio.current_time() + self.plan.setup_timeout)

        # 1. signed keys
        msgs = {p: Advertise(plan.job, round_id, p, list(selected), threshold, plan.fractional_bits)
                for p in selected}
        replies, failures = await self._gather(r, msgs, setup_deadline(), phase="advertise")
        keys = {}
        for p, rep in replies.items():
            if isinstance(rep, Keys) and rep.peer == p and self._signed(plan.job, round_id, p, selected,
                                                                       threshold, rep):
                keys[p] = {"c": rep.c, "s": rep.s, "signature": rep.signature}
            else:
                failures[p] = ("its secure-aggregation keys carry no valid signature", None)
        failed.update(self._note_failures(failures))
        if len(keys) < need:
            raise self._not_enough(r, "key advertisement", len(keys), len(selected), need, failed)
        # 2. encrypted key shares
        replies, failures = await self._gather(
            r, {p: ShareKeys(plan.job, round_id, keys) for p in keys}, setup_deadline(), phase="share")
        outboxes = {p: rep.ciphertexts for p, rep in replies.items() if isinstance(rep, Shares)}
        failed.update(self._note_failures(failures))
        if len(outboxes) < need:
            raise self._not_enough(r, "key sharing", len(outboxes), len(selected), need, failed)
        server = DoubleMaskServer(sorted(keys), plan.fractional_bits, threshold=threshold)
        inboxes = server.route_shares(outboxes)
        # 3. masked updates
        msgs = {p: self._train_msg(r, p, shards[p], config[p], round_id, inboxes[p]) for p in inboxes}
        await self._emit("fit_sent", r, info={"peers": sorted(msgs)})
        replies, failures = await self._gather(r, msgs, deadline, phase="fit", bar=self._peers_bar)
        masked, metrics = {}, {"train_seconds": [], "peer_seconds": [], "epsilon": []}
        for p, rep in replies.items():
            if isinstance(rep, MaskedRes) and rep.round == r:
                masked[p] = rep.masked
                for k in metrics:
                    if _finite(rep.metrics.get(k)):
                        metrics[k].append(rep.metrics[k])
            else:
                failures[p] = (f"answered with {type(rep).__name__}, not a masked update", None)
        failed.update(self._note_failures(failures))
        if len(masked) < need:
            raise self._not_enough(r, "fit", len(masked), len(selected), need, failed)
        # 4. unmasking
        replies, failures = await self._gather(
            r, {p: Unmask(plan.job, round_id, sorted(masked)) for p in masked},
            trio.current_time() + self.plan.setup_timeout, phase="unmask")
        answers = {p: rep.shares for p, rep in replies.items() if isinstance(rep, UnmaskRes)}
        try:
            total, weight = server.unmask(masked, answers, {p: {"s": keys[p]["s"]} for p in keys}, round_id)
        except ProtocolError as e:
            raise RoundFailed(f"round {r}: secure aggregation could not unmask the sum: {e.message}; "
                               + "; ".join(f"{p}: {w}" for p, (w, _) in failures.items())) from None
        floats, ints = FedAvg.layout(self.params)
        nf = sum(self.params[k].numel() for k in floats)
        ni = sum(self.params[k].numel() for k in ints)
        if total.numel() != nf + ni + 1:
            raise RoundFailed(f"round {r}: the unmasked sum has {total.numel()} entries, expected "
                               f"{nf + ni + 1}")
        new = self._apply_sum(r, total[:nf], total[nf:nf + ni], weight, len(selected))
        private = plan.client_dp is not None or plan.local_dp is not None
        loss = None if private else float(total[-1]) / weight   # peers send no loss under DP
        n = weight if plan.client_dp is None else sum(self.examples.get(p, 0) for p in masked)
        return sorted(masked), failed, (new, loss, int(n), metrics)

    def _signed(self, job, round_id, p, selected, threshold, rep: Keys) -> bool:
        public = self.link.public_key(p)
        if public is None:
            return False
        stmt = keys_statement(job, round_id, p, sorted(selected), threshold, rep.c, rep.s)
        return verify(public, stmt, rep.signature)

    # ------------------------------------------------------------ evaluation
    async def _evaluate(self, r: int) -> tuple[float | None, float | None]:
        ev = self.plan.evaluate
        if isinstance(ev, str):
            shards = self.link.shards(ev)
            if not shards:
                return None, None
            msgs = {p: Evaluate(self.plan.job, r, self.structure, self.params, pairs, self.plan.loss)
                    for p, pairs in shards.items()}
            timeout = min(self.plan.strategy.round_timeout, 60.0)
            replies, _ = await self._gather(r, msgs, trio.current_time() + timeout, phase="evaluate")
            res = [replies[p] for p in sorted(replies)
                   if isinstance(replies[p], EvalRes) and replies[p].num_examples > 0]
            if not res:
                return None, None
            n = sum(x.num_examples for x in res)
            loss = sum(x.loss * x.num_examples for x in res) / n
            accs = [x for x in res if x.accuracy is not None]
            acc = (sum(x.accuracy * x.num_examples for x in accs) / sum(x.num_examples for x in accs)
                   if accs else None)
            return loss, acc
        x, y = ev
        model = import_model({**self.structure, "state": self.params})
        m = await trio.to_thread.run_sync(evaluate_locally, model, x, y, self.plan.loss)
        acc = m.get("accuracy")
        return m["loss"], (None if acc is None or math.isnan(acc) else acc)


_NO_ANSWER = "no answer before the round's deadline"


def _key(pairs) -> tuple:
    return tuple(tuple(p) for p in pairs)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _postfix(rec: RoundRecord) -> dict:
    out = {"peers": len(rec.peers)}
    if rec.loss is not None:
        out["loss"] = f"{rec.loss:.3f}"
    if rec.accuracy is not None:
        out["acc"] = f"{rec.accuracy:.3f}"
    if rec.epsilon is not None:
        out["eps"] = f"{rec.epsilon:.2f}"
    return out
