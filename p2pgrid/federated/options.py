"""What a data scientist configures, and what a federated run gives back.

The objects here are small frozen dataclasses that turn into the plain maps the
wire carries (:meth:`SGD.to_config`, :meth:`ClientDP.to_config`): a data owner's peer
checks those maps against its own whitelists (``p2pgrid.protocols.local_train``), so nothing
here is trusted on the receiving side.

>>> SGD(lr=0.05, momentum=0.9).to_config()
{'name': 'sgd', 'lr': 0.05, 'momentum': 0.9}
>>> ClientDP(clip=1.0, noise_multiplier=1.1).delta
1e-05
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import BadRequest

__all__ = ["SGD", "Adam", "ClientDP", "LocalDP", "RoundRecord", "FitResult", "FitEvent",
           "optimizer_config"]


@dataclass(frozen=True)
class SGD:
    """Plain or momentum SGD on each data owner's peer."""
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def to_config(self) -> dict:
        out = {"name": "sgd", "lr": float(self.lr)}
        defaults = SGD()
        for f in ("momentum", "weight_decay", "nesterov"):
            if getattr(self, f) != getattr(defaults, f):
                out[f] = getattr(self, f)
        return out


@dataclass(frozen=True)
class Adam:
    """Adam on each data owner's peer (its moments start afresh every round)."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def to_config(self) -> dict:
        return {"name": "adam", "lr": float(self.lr), "betas": [float(b) for b in self.betas],
                "eps": float(self.eps), "weight_decay": float(self.weight_decay)}


def optimizer_config(opt) -> dict:
    """An optimizer object (or an already-built ``{"name": ...}`` map) as its wire config."""
    if isinstance(opt, (SGD, Adam)):
        return opt.to_config()
    if isinstance(opt, dict) and isinstance(opt.get("name"), str):
        return dict(opt)
    raise BadRequest("optimizer must be p2pgrid.federated.SGD(...), Adam(...) or a "
                     "{'name': ..., 'lr': ...} map")


def _check_dp(clip, noise_multiplier, delta, what):
    if not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
        raise BadRequest(f"{what}: clip must be a positive number")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0
            and math.isfinite(noise_multiplier)):
        raise BadRequest(f"{what}: noise_multiplier must be >= 0")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise BadRequest(f"{what}: delta must be in (0, 1)")


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP-FedAvg (McMahan et al. 2018): each peer clips its update to L2
    norm `clip`; the coordinator adds N(0, (noise_multiplier * clip)^2) to the sum and
    divides by the number of selected peers. Epsilon is reported at `delta`.

    The noise is added by the coordinator, so the guarantee to a data owner assumes
    an honest coordinator (with secure aggregation it sees only the clipped sum).
    Epsilon is accounted at sample rate 1, on the coordinator and on every peer's
    ledger: which peers take part in a round is chosen from a public seed and named
    in the round's record, so no amplification by sampling holds.
    """
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _check_dp(self.clip, self.noise_multiplier, self.delta, "ClientDP")

    def to_config(self) -> dict:
        return {"clip": float(self.clip), "noise_multiplier": float(self.noise_multiplier),
                "delta": float(self.delta)}


@dataclass(frozen=True)
class LocalDP:
    """Per-example DP-SGD on each data owner's peer (Abadi et al. 2016): the peer itself
    clips every example's gradient and adds the noise, so the guarantee needs no
    trust in the coordinator. Each peer reports its epsilon at `delta`."""
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _check_dp(self.clip, self.noise_multiplier, self.delta, "LocalDP")

    def to_config(self) -> dict:
        return {"clip": float(self.clip), "noise_multiplier": float(self.noise_multiplier),
                "delta": float(self.delta)}


@dataclass
class RoundRecord:
    """One round as the coordinator saw it. ``loss`` is the peers' mean training loss
    (weighted by examples); ``eval_loss``/``accuracy`` come from ``evaluate``;
    ``bytes`` counts the encoded messages the coordinator sent and received in the
    round (model out, updates back, secure-aggregation steps, evaluation);
    ``train_seconds`` is the slowest peer's pure local training time and
    ``peer_seconds`` the longest a peer spent on its request (decode, rebuild the model,
    load data, train, mask), so ``seconds - peer_seconds`` is transport and coordinator."""
    round: int
    peers: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    # every peer whose data matched the query but that this round did not use, and why
    # (refused, failed, not sampled, or named in wait_for and never seen)
    unused: dict[str, str] = field(default_factory=dict)
    num_examples: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    accuracy: float | None = None
    epsilon: float | None = None
    local_epsilon: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    train_seconds: float | None = None
    peer_seconds: float | None = None
    secure: bool = False

    @property
    def bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoundRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class FitResult:
    """What :meth:`Network.federated_fit` returns."""
    model: nn.Module                       # a copy of the given model with the final weights
    params: dict[str, torch.Tensor]        # the final global weights (its state dict)
    history: list[RoundRecord]
    job: str
    excluded: dict[str, str] = field(default_factory=dict)   # peer -> why it took no part

    def _repr_html_(self) -> str:
        from ..display import table
        return table(["round", "peers", "loss", "eval loss", "accuracy", "epsilon", "seconds"],
                     [[r.round, r.peers, r.loss, r.eval_loss, r.accuracy, r.epsilon, r.seconds]
                      for r in self.history],
                     caption=f"federated fit {self.job}"
                     + (f"; excluded: {self.excluded}" if self.excluded else ""))

    @property
    def epsilon(self) -> float | None:
        """Client-level epsilon spent by the whole run (None without ClientDP)."""
        return self.history[-1].epsilon if self.history else None


@dataclass(frozen=True)
class FitEvent:
    """Progress of a run, for ``federated_fit(on_event=...)``: ``kind`` is one of
    "round_start", "fit_sent", "reply", "failure", "round_end"."""
    kind: str
    round: int
    peer: str | None = None
    record: RoundRecord | None = None
    info: dict[str, Any] = field(default_factory=dict)
