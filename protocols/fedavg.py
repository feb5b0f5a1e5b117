"""Federated learning strategies: which peers train, with what config, and how replies combine.

A :class:`Strategy` is policy only (as in Flower): ``configure_fit`` picks peers and
writes their :class:`FitIns`; ``aggregate_fit`` turns their :class:`FitRes` into new
global parameters. Sending, timeouts and retries belong to whoever drives it.

Aggregation flattens every floating-point tensor into one vector per reply, so a
round costs one weighted matrix-vector product. Integer buffers (BatchNorm's
``num_batches_tracked``) take the weighted mean rounded to the nearest integer,
and boolean ones a weighted majority.

>>> import torch
>>> s = FedAvg(min_peers=2)
>>> g = {"w": torch.zeros(2)}
>>> sorted(s.configure_fit(1, g, ["a", "b", "c"]))
['a', 'b', 'c']
>>> s.aggregate_fit(1, g, [FitRes("a", {"w": torch.ones(2)}, 30, {}),
...                        FitRes("b", {"w": torch.full((2,), 2.)}, 10, {})], [])["w"]
tensor([1.2500, 1.2500])
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError
from p2pgrid.wire import message

from .dp import RDPAccountant, add_gaussian_noise, clip_update

__all__ = ["FitIns", "FitRes", "Strategy", "FedAvg", "FedMedian", "FedProx", "FedAdam", "DPFedAvg",
           "flatten", "unflatten", "weighted_metrics"]

Params = dict[str, torch.Tensor]


@message("fedavg.fit_ins")
@dataclass(frozen=True)
class FitIns:
    """What a peer is asked to do in one round: train from `params` as `config` says."""
    round: int
    params: dict[str, torch.Tensor]
    config: dict[str, Any]


@message("fedavg.fit_res")
@dataclass(frozen=True)
class FitRes:
    """A peer's reply: its new parameters (or, with ``delta``, new minus the global ones)."""
    peer: str
    params: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    delta: bool = False
    round: int | None = None


# ------------------------------------------------------------------ flattening

def flatten(params: Params, keys: list[str], dtype=torch.float64) -> torch.Tensor:
    """The tensors at `keys`, flattened and concatenated into one `dtype` vector."""
    if not keys:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([params[k].detach().reshape(-1).to(dtype) for k in keys])


def unflatten(vector: torch.Tensor, like: Params, keys: list[str]) -> Params:
    """Split a flat vector back into tensors shaped (and typed) like `like[k]`."""
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[i:i + n].reshape(like[k].shape).to(like[k].dtype)
        i += n
    return out


def weighted_metrics(replies: list[FitRes]) -> dict[str, float]:
    """Mean of each numeric metric over the replies that report it, weighted by num_examples."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for r in replies:
        for k, v in r.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                sums[k] = sums.get(k, 0.0) + v * r.num_examples
                weights[k] = weights.get(k, 0.0) + r.num_examples
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


# ------------------------------------------------------------------ strategies

class Strategy(ABC):
    """Policy of a federated round; knows nothing of the network.

    The driver (``net.federated_fit``) also reads `min_peers` (a round fails with
    fewer replies) and `round_timeout` (seconds until a round closes with the replies
    it has). Secure aggregation and client-level DP see only a sum of updates, so
    they need a :class:`FedAvg`-family strategy; any other works in plain rounds.
    """

    min_peers: int = 1
    round_timeout: float = 60.0

    @abstractmethod
    def configure_fit(self, round: int, params: Params, available_peers: list[str]) -> dict[str, FitIns]:
        """Which peers train this round, and with what instructions."""

    @abstractmethod
    def aggregate_fit(self, round: int, params: Params, replies: list[FitRes],
                      failures: list[str]) -> Params:
        """New global parameters from the replies; ProtocolError if too few came back."""

    def aggregate_metrics(self, replies: list[FitRes]) -> dict[str, float]:
        return weighted_metrics(replies)

    def state_dict(self) -> dict[str, Any]:
        """Whatever the strategy carries between rounds, as wire values (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after a coordinator restart)."""


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017), weighted by num_examples.

    `fraction` of the available peers (at least `min_peers`) are sampled each
    round with a generator seeded by (`seed`, round), so a round is reproducible.
    `train_config` is merged into every peer's config; the keys this module sets
    (``local_epochs``, ``batch_size``, ``optimizer``, ``loss``, ``round_timeout``)
    are what :func:`p2pgrid.protocols.local_train.train_locally` takes.
    """

    def __init__(self, *, min_peers: int = 2, fraction: float = 1.0, round_timeout: float = 60.0,
                 local_epochs: int = 1, batch_size: int = 32, optimizer: dict | None = None,
                 loss: str = "cross_entropy", train_config: dict | None = None, seed: int = 0):
        if min_peers < 1 or not 0 < fraction <= 1 or round_timeout <= 0 or local_epochs < 0:
            raise BadRequest("need min_peers >= 1, 0 < fraction <= 1, round_timeout > 0, "
                             "local_epochs >= 0")
        self.min_peers, self.fraction, self.round_timeout = min_peers, fraction, round_timeout
        self.local_epochs, self.batch_size, self.loss = local_epochs, batch_size, loss
        self.optimizer = dict(optimizer or {"name": "sgd", "lr": 0.05})
        self.train_config = dict(train_config or {})
        self.seed = seed

    # -- configure
    def sample(self, round: int, available_peers: list[str]) -> list[str]:
        peers = sorted(set(available_peers))
        if len(peers) < self.min_peers:
            raise ProtocolError(f"round {round}: {len(peers)} peers available, need {self.min_peers}")
        k = min(len(peers), max(self.min_peers, math.ceil(self.fraction * len(peers))))
        return sorted(random.Random(f"{self.seed}:{round}").sample(peers, k))

    def fit_config(self, round: int) -> dict[str, Any]:
        return {"round": round, "local_epochs": self.local_epochs, "batch_size": self.batch_size,
                "optimizer": dict(self.optimizer), "loss": self.loss,
                "round_timeout": self.round_timeout, **self.train_config}

    def configure_fit(self, round: int, params: Params, available_peers: list[str]) -> dict[str, FitIns]:
        config = self.fit_config(round)
        return {p: FitIns(round, params, dict(config)) for p in self.sample(round, available_peers)}

    # -- aggregate
    def check_replies(self, round: int, params: Params, replies: list[FitRes],
                      failures: list[str]) -> None:
        """Enough replies, one per peer, for this round, shaped and typed like `params`."""
        self._check(round, params, replies, failures)

    @classmethod
    def layout(cls, params: Params) -> tuple[list[str], list[str]]:
        """(floating-point keys, integer/bool keys), each sorted: the order of a flat update."""
        return cls._keys(params)

    def _check(self, round: int, params: Params, replies: list[FitRes], failures: list[str]) -> None:
        if len(replies) < self.min_peers:
            raise ProtocolError(f"round {round}: {len(replies)} replies ({len(failures)} failures), "
                                f"need {self.min_peers}", replies=len(replies), failures=len(failures))
        seen = set()
        for r in replies:
            if r.peer in seen:
                raise ProtocolError(f"round {round}: two replies from peer {r.peer}")
            seen.add(r.peer)
            if r.round is not None and r.round != round:
                raise ProtocolError(f"round {round}: peer {r.peer} replied for round {r.round}")
            if isinstance(r.num_examples, bool) or not isinstance(r.num_examples, int) \
                    or r.num_examples <= 0:
                raise BadRequest(f"peer {r.peer}: num_examples must be a positive int")
            if set(r.params) != set(params):
                missing, extra = set(params) - set(r.params), set(r.params) - set(params)
                raise ShapeError(f"peer {r.peer}: parameter names differ (missing {sorted(missing)[:3]}, "
                                 f"unexpected {sorted(map(str, extra))[:3]})")
            for k, t in r.params.items():
                if not isinstance(t, torch.Tensor) or t.shape != params[k].shape:
                    raise ShapeError(f"peer {r.peer}: {k!r} should have shape {list(params[k].shape)}")
                if t.is_floating_point() != params[k].is_floating_point() or t.is_complex():
                    raise ShapeError(f"peer {r.peer}: {k!r} has dtype {t.dtype}, expected {params[k].dtype}")

    @staticmethod
    def _keys(params: Params) -> tuple[list[str], list[str]]:
        if any(t.is_complex() for t in params.values()):
            raise ShapeError("complex parameters are not supported")
        floats = sorted(k for k, t in params.items() if t.is_floating_point())
        return floats, sorted(set(params) - set(floats))

    def mean_delta(self, params: Params, replies: list[FitRes]) -> torch.Tensor:
        """Weighted mean of the replies' float updates as one float64 vector (new minus global)."""
        floats, _ = self._keys(params)
        base = flatten(params, floats)
        rows = torch.stack([flatten(r.params, floats) - (0 if r.delta else base) for r in replies])
        w = torch.tensor([r.num_examples for r in replies], dtype=torch.float64)
        return (w / w.sum()) @ rows

    def _aggregate_ints(self, params: Params, replies: list[FitRes]) -> Params:
        _, ints = self._keys(params)
        w = torch.tensor([r.num_examples for r in replies], dtype=torch.float64)
        w = w / w.sum()
        out = {}
        for k in ints:
            vals = torch.stack([(r.params[k].to(torch.float64) + (params[k].to(torch.float64) if r.delta
                                                                 else 0)) for r in replies])
            mean = torch.tensordot(w, vals, dims=1)
            out[k] = (mean >= 0.5) if params[k].dtype == torch.bool else mean.round().to(params[k].dtype)
        return out

    def apply_update(self, round: int, params: Params, delta: torch.Tensor) -> Params:
        """New global parameters from the aggregated float update; FedAdam overrides this."""
        floats, _ = self._keys(params)
        return unflatten(flatten(params, floats) + delta, params, floats)

    def aggregate_fit(self, round: int, params: Params, replies: list[FitRes],
                      failures: list[str]) -> Params:
        self._check(round, params, replies, failures)
        new = self.apply_update(round, params, self.mean_delta(params, replies))
        new.update(self._aggregate_ints(params, replies))
        return {k: new[k] for k in params}


class FedMedian(Strategy):
    """Coordinate-wise median of the peers' new parameters (Yin et al. 2018): one peer
    sending garbage cannot move a coordinate beyond the honest peers' range. Every
    available peer trains; integer buffers take the median too (rounded down).

    >>> g = {"w": torch.zeros(3)}
    >>> s = FedMedian(min_peers=3)
    >>> s.aggregate_fit(1, g, [FitRes("a", {"w": torch.tensor([1., 2., 3.])}, 5),
    ...                        FitRes("b", {"w": torch.tensor([2., 2., 9.])}, 5),
    ...                        FitRes("c", {"w": torch.tensor([1e9, 0., 4.])}, 5)], [])["w"]
    tensor([2., 2., 4.])
    """

    def __init__(self, *, min_peers: int = 3, round_timeout: float = 60.0,
                 train_config: dict | None = None):
        if min_peers < 1 or round_timeout <= 0:
            raise BadRequest("need min_peers >= 1 and round_timeout > 0")
        self.min_peers, self.round_timeout = min_peers, round_timeout
        self.train_config = dict(train_config or {})

    def configure_fit(self, round: int, params: Params, available_peers: list[str]) -> dict[str, FitIns]:
        peers = sorted(set(available_peers))
        if len(peers) < self.min_peers:
            raise ProtocolError(f"round {round}: {len(peers)} peers available, need {self.min_peers}")
        config = {"round": round, "round_timeout": self.round_timeout, **self.train_config}
        return {p: FitIns(round, params, dict(config)) for p in peers}

    def aggregate_fit(self, round: int, params: Params, replies: list[FitRes],
                      failures: list[str]) -> Params:
        FedAvg(min_peers=self.min_peers).check_replies(round, params, replies, failures)
        out = {}
        for k, g in params.items():
            vals = torch.stack([r.params[k].to(torch.float64) + (g.to(torch.float64) if r.delta else 0)
                                for r in replies])
            if g.is_floating_point():   # the mean of the middle two for an even count
                srt, n = vals.sort(dim=0).values, len(replies)
                med = (srt[(n - 1) // 2] + srt[n // 2]) / 2
            else:
                med = vals.median(dim=0).values
            out[k] = med.to(g.dtype)
        return out


class FedProx(FedAvg):
    """FedAvg whose peers add (mu / 2) * ||w - w_global||^2 to their loss (Li et al. 2020).

    The term is the local trainer's business: this strategy puts ``prox_mu`` in the config.
    """

    def __init__(self, *, mu: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if mu < 0:
            raise BadRequest("mu must be >= 0")
        self.mu = mu

    def fit_config(self, round: int) -> dict[str, Any]:
        return {**super().fit_config(round), "prox_mu": self.mu}


class FedAdam(FedAvg):
    """Server-side Adam on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

    With Δ the weighted mean update: m = β1 m + (1 - β1) Δ; v = β2 v + (1 - β2) Δ²;
    x = x + η m / (√v + τ). As in the paper there is no bias correction, unless
    ``bias_correction=True``. State (m, v) lives in the strategy, one vector each.
    """

    def __init__(self, *, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 bias_correction: bool = False, **kwargs):
        super().__init__(**kwargs)
        if eta <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or tau <= 0:
            raise BadRequest("need eta > 0, 0 <= beta1, beta2 < 1, tau > 0")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.bias_correction = bias_correction
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0
        self._layout: list[tuple[str, tuple[int, ...]]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": self.m, "v": self.v,
                "layout": None if self._layout is None else [[k, list(s)] for k, s in self._layout]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m, v, layout = state.get("m"), state.get("v"), state.get("layout")
        if (m is None) != (v is None) or (m is not None and (
                not isinstance(m, torch.Tensor) or not isinstance(v, torch.Tensor) or m.shape != v.shape)):
            raise BadRequest("FedAdam state: m and v must be two tensors of one shape, or both null")
        self.t = int(state.get("t", 0))
        self.m = None if m is None else m.to(torch.float64)
        self.v = None if v is None else v.to(torch.float64)
        self._layout = None if layout is None else [(str(k), tuple(int(d) for d in s)) for k, s in layout]

    def apply_update(self, round: int, params: Params, delta: torch.Tensor) -> Params:
        floats, _ = self._keys(params)
        layout = [(k, tuple(params[k].shape)) for k in floats]
        if self._layout is None:
            self._layout = layout
            self.m = torch.zeros_like(delta)
            self.v = torch.zeros_like(delta)
        elif layout != self._layout:
            raise ShapeError("FedAdam: the model's parameters changed between rounds")
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta * delta
        eta = self.eta
        if self.bias_correction:
            eta = eta * math.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        step = eta * self.m / (self.v.sqrt() + self.tau)
        return unflatten(flatten(params, floats) + step, params, floats)


class DPFedAvg(FedAvg):
    """Client-level DP-FedAvg with central Gaussian noise (McMahan et al. 2018).

    Each reply's float update is clipped to L2 norm `clip`; the clipped updates are
    summed unweighted (weights would raise the sensitivity), N(0, (z * clip)^2) is
    added, and the sum is divided by the number of sampled peers. The noise comes from
    the OS CSPRNG (:class:`p2pgrid.protocols.private_random.PrivateRandom`), never from a seed. The
    accountant records one Gaussian step per round at sample rate 1: the peers are
    chosen by :meth:`FedAvg.sample` from a public seed and the round names them, so no
    amplification by sampling may be claimed. ``epsilon(delta)`` is the client-level
    guarantee for the released models, assuming the coordinator adding the noise is
    trusted (or runs inside secure aggregation). Integer buffers are not released
    privately: keep them out of the parameters (e.g. use LayerNorm, not BatchNorm)
    when that matters.
    """

    def __init__(self, *, clip: float = 1.0, noise_multiplier: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.accountant = RDPAccountant()
        self._selected: dict[int, int] = {}

    def configure_fit(self, round: int, params: Params, available_peers: list[str]) -> dict[str, FitIns]:
        ins = super().configure_fit(round, params, available_peers)
        self._selected[round] = len(ins)
        return ins

    def noisy_sum(self, params: Params, replies: list[FitRes]) -> torch.Tensor:
        """Sum of the clipped float updates plus N(0, (noise_multiplier * clip)^2)."""
        floats, _ = self._keys(params)
        base = flatten(params, floats)
        total = torch.zeros_like(base)
        for r in replies:
            clipped, _ = clip_update({"d": flatten(r.params, floats) - (0 if r.delta else base)}, self.clip)
            total += clipped["d"]
        return add_gaussian_noise({"d": total}, self.clip, self.noise_multiplier)["d"]

    def aggregate_fit(self, round: int, params: Params, replies: list[FitRes],
                      failures: list[str]) -> Params:
        self._check(round, params, replies, failures)
        selected = self._selected.pop(round, len(replies) + len(failures))
        delta = self.noisy_sum(params, replies) / max(selected, 1)  # fixed denominator
        self.accountant.step(self.noise_multiplier, 1.0)  # a public choice amplifies nothing
        new = self.apply_update(round, params, delta)
        new.update(self._aggregate_ints(params, replies))
        return {k: new[k] for k in params}

    def epsilon(self, delta: float) -> float:
        return self.accountant.epsilon(delta)
