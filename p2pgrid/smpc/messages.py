"""Wire messages of the SMPC plugin (registered in :mod:`p2pgrid.wire` as ``smpc.*``).

Round payloads travel as :class:`p2pgrid.protocols.smpc.RoundMessage` (``smpc.round``); the
dealer's answers as :class:`p2pgrid.protocols.smpc.Material` inside :class:`Dealt`.
"""

from __future__ import annotations

from dataclasses import field

import torch

from p2pgrid.wire import dataclass, message
from p2pgrid.protocols.smpc.messages import Material, Request


@message("smpc.input")
@dataclass(frozen=True)
class ShareInput:
    """An input owner hands party `party` its share: either the share itself or, for
    all but one party, the 16-byte PRG seed it expands to."""
    id: str
    group: dict
    party: int
    scale: int
    shape: list[int]
    rules: dict
    share: torch.Tensor | None = None
    seed: bytes | None = None
    # active groups: `share` is x - r (the same for every party) for the dealer's mask
    # `mask` (id), whose authenticated shares the party takes from the dealer
    mask: str = ""


@message("smpc.share_object")
@dataclass(frozen=True)
class ShareObject:
    """Ask the peer holding object `obj` to secret-share it among `group`'s parties."""
    obj: str
    id: str
    group: dict


@message("smpc.shared")
@dataclass(frozen=True)
class SharedInfo:
    id: str
    shape: list[int]
    scale: int
    group: dict


@message("smpc.run")
@dataclass(frozen=True)
class RunProgram:
    """Run `program` among the parties. Output i is kept as shared tensor ``keep[i]``
    (if not "") and/or its share is returned to the caller if ``reveal[i]``."""
    session: str
    group: dict
    program: dict
    keep: list[str]
    reveal: list[bool]
    next_session: str = ""
    truncation: str = "auto"
    timeout: float = 60.0
    mask: str = ""        # active groups: the requester's output masks (one per revealed output)


@message("smpc.result")
@dataclass(frozen=True)
class ProgramResult:
    shapes: list[list[int]]
    scales: list[int]
    shares: list[torch.Tensor | None]     # only for outputs revealed to the caller
    values: list[float] = ()              # scalars the protocol made public (loss...)


@message("smpc.abort")
@dataclass(frozen=True)
class Abort:
    session: str
    reason: str


@message("smpc.deal")
@dataclass(frozen=True)
class Deal:
    """A party asks the dealer for its material for a session's whole plan, and for
    the sessions in `more` (the same plan, run later) in the same reply."""
    session: str
    group: dict
    party: int
    plan: str
    requests: list[Request]
    more: list[str] = field(default_factory=list)


@message("smpc.dealt")
@dataclass(frozen=True)
class Dealt:
    """The material for `Deal.session`, then for each of `Deal.more` in order; `protocol`:
    the dealer's :data:`.state.PROTOCOL` (1 from releases before it travelled)."""
    materials: list[Material]
    more: list[list[Material]] = field(default_factory=list)
    protocol: int = 1


@message("smpc.delete")
@dataclass(frozen=True)
class DeleteShares:
    ids: list[str]


@message("smpc.register_model")
@dataclass(frozen=True)
class RegisterModel:
    """`limits`: what each party enforces on users' predictions: ``rate_limit`` (calls per
    user, '60/min'), ``quota`` (input rows per user per window, '10000/day'), ``max_batch``."""
    id: str
    group: dict
    layers: list[dict]
    users: list[str]
    limits: dict | None = None


@message("smpc.train")
@dataclass(frozen=True)
class TrainStep:
    """One SGD step of model `model` on the batch that `program`'s two outputs (x, y) give."""
    session: str
    group: dict
    model: str
    program: dict
    lr: float
    loss: str = "mse"
    want_loss: bool = True
    next_session: str = ""
    timeout: float = 60.0
    mask: str = ""        # active groups: the requester's mask for the loss


@message("smpc.predict")
@dataclass(frozen=True)
class Predict:
    """Encrypted inference: model `model` on `program`'s output, revealed to the caller
    only (or kept shared as `keep`)."""
    session: str
    group: dict
    model: str
    program: dict
    keep: str = ""
    next_session: str = ""
    timeout: float = 60.0
    # the caller's input shares sent with the call (this party's), used for this session
    # only: a batch needs no ShareInput request of its own
    inputs: list[ShareInput] | None = None
    mask: str = ""        # active groups: the requester's mask for the output


@message("smpc.deal_mask")
@dataclass(frozen=True)
class DealMask:
    """Ask the dealer for random masks r (one per shape) for `group`: the requester gets
    each r in the clear, each party its authenticated shares of it (``TakeMask``). An
    input owner sends x - r; a requester adds r to an output it alone may unmask."""
    id: str
    group: dict
    shapes: list[list[int]]


@message("smpc.mask_dealt")
@dataclass(frozen=True)
class MaskDealt:
    masks: list[torch.Tensor]


@message("smpc.take_mask")
@dataclass(frozen=True)
class TakeMask:
    """Party `party` takes its shares of mask `id` (answered with a ``Dealt``: its MAC key
    share, then the masks)."""
    id: str
    group: dict
    party: int
