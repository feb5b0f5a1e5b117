"""Party context, the generator protocol shape, and the basic rounds (open, reveal, input).

Protocol shape
--------------
Every multi-round op is a generator function ``op(ctx, ...)`` run by each party:

    proto = beaver.mul(ctx, x, y)
    out = next(proto)                  # Round to send
    while True:
        inbox = <deliver out, collect {sender: payload} from the others>
        try:
            out = proto.send(inbox)
        except StopIteration as done:
            result = done.value            # e.g. the party's Shared result
            break

Protocols compose with ``yield from``; :func:`parallel` runs several side by side so
their rounds share messages. No protocol touches sockets, clocks or global state:
a :class:`PartyContext` carries the party index, the dealer feed, the config and the
party's own PRG. :func:`p2pgrid.protocols.smpc.harness.run_parties` drives n parties in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Mapping, Sequence, TypeVar

import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError

from .fixedpoint import DEFAULT_FRAC_BITS, FixedPoint
from .messages import Inbox, Round
from .preprocessing import Preprocessing
from .prg import Prg
from .sharing import Shared, share

__all__ = ["SmpcConfig", "PartyContext", "Protocol", "parallel", "open_ring", "open_xor",
           "reveal", "reveal_to", "input_shares", "collect", "TRUNCATION_MODES"]

T = TypeVar("T")
Protocol = Generator[Round, Inbox, T]
TRUNCATION_MODES = ("auto", "local", "dealer")


@dataclass(frozen=True)
class SmpcConfig:
    """Session-wide protocol parameters (all parties must agree).

    ``truncation``: ``"local"`` (SecureML, 2 parties only, 0 rounds, tiny failure
    probability), ``"dealer"`` (1 round, any n, no failure within range) or ``"auto"``
    (local for 2 parties, dealer for 3+).
    """

    frac_bits: int = DEFAULT_FRAC_BITS
    truncation: str = "auto"

    def __post_init__(self):
        FixedPoint(self.frac_bits)  # validates
        if self.truncation not in TRUNCATION_MODES:
            raise BadRequest(f"truncation must be one of {TRUNCATION_MODES}")


@dataclass(frozen=True)
class PartyContext:
    """Everything a party's protocol code may use; passed explicitly, never global."""

    party: int
    n_parties: int
    pre: Preprocessing
    config: SmpcConfig = field(default_factory=SmpcConfig)
    rng: Prg = field(default_factory=Prg.from_entropy)  # this party's private randomness

    def __post_init__(self):
        if not isinstance(self.n_parties, int) or self.n_parties < 2:
            raise BadRequest("SMPC needs at least 2 parties")
        if not 0 <= self.party < self.n_parties:
            raise BadRequest("party index out of range")

    @property
    def encoder(self) -> FixedPoint:
        return FixedPoint(self.config.frac_bits)

    @property
    def others(self) -> list[int]:
        return [p for p in range(self.n_parties) if p != self.party]

    def wrap(self, share_tensor: torch.Tensor, scale: int | None = None) -> Shared:
        """This party's share tensor as a Shared (scale defaults to frac_bits)."""
        return Shared(share_tensor, self.party, self.n_parties,
                      self.config.frac_bits if scale is None else scale)

    def public(self, value, scale: int | None = None) -> Shared:
        """A public value as a (trivial) sharing: party 0 holds it, the others hold 0."""
        scale = self.config.frac_bits if scale is None else scale
        ring = FixedPoint(scale).encode(value)
        return Shared(ring if self.party == 0 else torch.zeros_like(ring), self.party,
                      self.n_parties, scale)

    def check_shared(self, x, op: str, name: str = "operand") -> Shared:
        if not isinstance(x, Shared):
            raise BadRequest(f"{op}: {name} must be a Shared (got {type(x).__name__}); "
                             "share public data first or use the public-operand form")
        if x.party != self.party or x.n_parties != self.n_parties:
            raise BadRequest(f"{op}: {name} belongs to party {x.party}/{x.n_parties}, "
                             f"not this party {self.party}/{self.n_parties}")
        return x


def collect(ctx: PartyContext, inbox: Inbox, name: str, like: torch.Tensor,
            senders: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Tensor `name` from each expected sender, checked against `like`'s shape and dtype."""
    out = []
    for p in (ctx.others if senders is None else senders):
        payload = inbox.get(p)
        if payload is None or name not in payload:
            raise ProtocolError(f"party {ctx.party}: no {name!r} from party {p} this round")
        t = payload[name]
        if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype:
            raise ProtocolError(f"party {ctx.party}: {name!r} from party {p} has shape/dtype "
                                f"{getattr(t, 'shape', None)}/{getattr(t, 'dtype', None)}, "
                                f"expected {list(like.shape)}/{like.dtype}")
        out.append(t)
    return out


def open_ring(ctx: PartyContext, tag: str, values: Mapping[str, torch.Tensor]
              ) -> Protocol[dict[str, torch.Tensor]]:
    """One round: broadcast additive shares of several tensors, return their sums (public)."""
    inbox = yield Round(tag, broadcast=dict(values))
    out = {}
    for name, mine in values.items():
        total = mine.clone()
        for t in collect(ctx, inbox, name, mine):
            total += t
        out[name] = total
    return out


def open_xor(ctx: PartyContext, tag: str, values: Mapping[str, torch.Tensor]
             ) -> Protocol[dict[str, torch.Tensor]]:
    """One round: broadcast XOR shares, return their XOR (public)."""
    inbox = yield Round(tag, broadcast=dict(values))
    out = {}
    for name, mine in values.items():
        total = mine.clone()
        for t in collect(ctx, inbox, name, mine):
            total ^= t
        out[name] = total
    return out


def reveal(ctx: PartyContext, x: Shared, *, decode: bool = True) -> Protocol[torch.Tensor]:
    """Open `x` to everyone: float64 values (or raw ring words with decode=False)."""
    ctx.check_shared(x, "reveal")
    opened = (yield from open_ring(ctx, "reveal", {"x": x.share}))["x"]
    return FixedPoint(x.scale).decode(opened) if decode else opened


def reveal_to(ctx: PartyContext, x: Shared, receiver: int, *, decode: bool = True
              ) -> Protocol[torch.Tensor | None]:
    """Open `x` to `receiver` only (direct messages); the others get None."""
    ctx.check_shared(x, "reveal_to")
    if not 0 <= receiver < ctx.n_parties:
        raise BadRequest("receiver index out of range")
    if ctx.party != receiver:
        yield Round("reveal_to", direct={receiver: {"x": x.share}})
        return None
    inbox = yield Round("reveal_to")
    total = x.share.clone()
    for t in collect(ctx, inbox, "x", x.share):
        total += t
    return FixedPoint(x.scale).decode(total) if decode else total


def input_shares(ctx: PartyContext, owner: int, value: torch.Tensor | None,
                 shape: Sequence[int], *, scale: int | None = None) -> Protocol[Shared]:
    """Party `owner` secret-shares its private `value` (float) with everyone; one round.

    Every party passes the public `shape`; only the owner passes `value`.
    """
    scale = ctx.config.frac_bits if scale is None else scale
    shape = tuple(shape)
    if ctx.party == owner:
        if value is None:
            raise BadRequest("the input owner must pass its value")
        ring = FixedPoint(scale).encode(value)
        if tuple(ring.shape) != shape:
            raise ShapeError(f"input has shape {list(ring.shape)}, announced {list(shape)}")
        shares = share(ring, ctx.n_parties, ctx.rng)
        yield Round("input", direct={p: {"x": shares[p]} for p in ctx.others})
        return ctx.wrap(shares[owner], scale)
    if value is not None:
        raise BadRequest("only the owner passes a value to input_shares")
    inbox = yield Round("input")
    (mine,) = collect(ctx, inbox, "x", torch.empty(shape, dtype=torch.int64), senders=[owner])
    return ctx.wrap(mine, scale)


def parallel(*protocols: Protocol[Any]) -> Protocol[list[Any]]:
    """Run protocols side by side; round k carries every still-running one's round k.

    Names are prefixed ``"<index>/"`` on the wire. Returns their results in order.
    """
    results: list[Any] = [None] * len(protocols)
    pending: dict[int, Round] = {}
    for i, proto in enumerate(protocols):
        try:
            pending[i] = next(proto)
        except StopIteration as done:
            results[i] = done.value
    while pending:
        broadcast: dict[str, torch.Tensor] = {}
        direct: dict[int, dict[str, torch.Tensor]] = {}
        for i, rnd in pending.items():
            for k, v in rnd.broadcast.items():
                broadcast[f"{i}/{k}"] = v
            for to, payload in rnd.direct.items():
                box = direct.setdefault(to, {})
                for k, v in payload.items():
                    box[f"{i}/{k}"] = v
        tag = "par(" + ",".join(f"{i}:{r.tag}" for i, r in pending.items()) + ")"
        inbox = yield Round(tag, broadcast, direct)
        nxt: dict[int, Round] = {}
        for i in pending:
            prefix = f"{i}/"
            sub: Inbox = {}
            for sender, payload in inbox.items():
                part = {k[len(prefix):]: v for k, v in payload.items() if k.startswith(prefix)}
                if part:
                    sub[sender] = part
            try:
                nxt[i] = protocols[i].send(sub)
            except StopIteration as done:
                results[i] = done.value
        pending = nxt
    return results
