"""Wire messages between a coordinator and data owners' peers.

Training itself travels in :class:`p2pgrid.protocols.fedavg.FitIns` / ``FitRes`` (inside
:class:`Train`); the messages here add the data to use, the model's structure,
the steps of secure aggregation and evaluation. Models travel as the structure
half of a :mod:`p2pgrid.modelgraph` spec (modules and op program, no state) plus
a state dict of tensors: nothing a peer receives is ever executed as code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from p2pgrid.protocols.fedavg import FitIns

from ..wire import message

__all__ = ["Probe", "ProbeRes", "Train", "MaskedRes", "Advertise", "Keys", "ShareKeys", "Shares",
           "Unmask", "UnmaskRes", "Evaluate", "EvalRes"]


@message("federated.probe")
@dataclass(frozen=True)
class Probe:
    """May the caller train on these (x id, y id) pairs, and could one more round of
    `cost` (``{"client": ClientDP config, "local": LocalDP config, ...}``, or None for
    no DP) fit in the owner's privacy budget?"""
    job: str
    data: list[list[str]]
    cost: dict[str, Any] | None = None


@message("federated.probe_res")
@dataclass(frozen=True)
class ProbeRes:
    num_examples: int
    budget: dict[str, Any] = field(default_factory=dict)  # object id -> {"cap", "spent"}


@message("federated.train")
@dataclass(frozen=True)
class Train:
    """Train `fit.params` in the structure `model` on `data`; with `round_id`, answer
    with a masked update (secure aggregation), else with a ``FitRes`` of deltas."""
    job: str
    model: dict[str, Any]
    fit: FitIns
    data: list[list[str]]
    round_id: str | None = None
    inbox: dict[str, bytes] = field(default_factory=dict)  # secure aggregation shares routed to us


@message("federated.masked_res")
@dataclass(frozen=True)
class MaskedRes:
    """A masked update: alone, uniformly random in Z_2^64; only sums unmask."""
    peer: str
    round: int
    masked: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)  # timing and local epsilon only


@message("federated.advertise")
@dataclass(frozen=True)
class Advertise:
    """Secure aggregation, step 1: make this round's keys, as `you`, among `peers`."""
    job: str
    round_id: str
    you: str
    peers: list[str]
    threshold: int
    fractional_bits: int = 32


@message("federated.keys")
@dataclass(frozen=True)
class Keys:
    """Two X25519 public keys, signed with the peer's Ed25519 identity (see :func:`keys_statement`)."""
    peer: str
    c: bytes
    s: bytes
    signature: bytes


@message("federated.share_keys")
@dataclass(frozen=True)
class ShareKeys:
    """Step 2: every advertising peer's signed keys; answer with encrypted key shares."""
    job: str
    round_id: str
    keys: dict[str, dict[str, bytes]]  # peer -> {"c", "s", "signature"}


@message("federated.shares")
@dataclass(frozen=True)
class Shares:
    peer: str
    ciphertexts: dict[str, bytes]  # recipient -> encrypted shares


@message("federated.unmask")
@dataclass(frozen=True)
class Unmask:
    """Step 4: these peers' masked updates arrived; reveal what removes the masks."""
    job: str
    round_id: str
    survivors: list[str]


@message("federated.unmask_res")
@dataclass(frozen=True)
class UnmaskRes:
    peer: str
    shares: dict[str, dict[str, bytes]]


@message("federated.evaluate")
@dataclass(frozen=True)
class Evaluate:
    job: str
    round: int
    model: dict[str, Any]
    params: dict[str, torch.Tensor]
    data: list[list[str]]
    loss: str


@message("federated.eval_res")
@dataclass(frozen=True)
class EvalRes:
    num_examples: int
    loss: float
    accuracy: float | None = None


def keys_statement(job: str, round_id: str, peer: str, peers: list[str], threshold: int,
                   c: bytes, s: bytes) -> bytes:
    """What a peer signs about its secure-aggregation keys: bound to the job, the round,
    its name and the exact set of peers it was told about, so a coordinator can neither
    substitute keys nor show peers different rounds."""
    from ..wire import dumps
    return dumps(["p2pgrid-federated-secagg-keys/1", job, round_id, peer, sorted(peers),
                  int(threshold), bytes(c), bytes(s)])
