"""Message types: what a party sends per round, and what the dealer hands out.

Round structure (for the network layer)
---------------------------------------
A protocol is a Python generator per party (see :mod:`p2pgrid.protocols.smpc.runtime`).
Every round, each party yields one :class:`Round`:

* ``tag``: names the step (``"mul/open"``, ``"cmp/and/s4"``...). All parties of a
  session yield the same tag in the same step; a mismatch is a ProtocolError.
* ``broadcast``: tensors sent to *every* other party.
* ``direct``: ``{party: {name: tensor}}``, tensors for one party only.

The generator is then resumed with an :data:`Inbox`: ``{sender: {name: tensor}}``
holding, for every other party that sent this party something this round, its
broadcast merged with what it addressed directly to this party. Rounds are
synchronous: a party must wait for all expected senders before resuming.

On the wire, one party's round to one recipient is a :class:`RoundMessage`
(registered with :mod:`p2pgrid.wire`): ``session``, ``step`` (0, 1, 2... per
session), ``tag``, ``sender`` and the ``tensors``. The dealer's material is a
:class:`Material` (seed plus, for the last party, correction tensors) answering a
:class:`Request`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from p2pgrid.errors import ProtocolError
from p2pgrid.wire import message

from .prg import Prg

__all__ = ["Round", "Inbox", "RoundMessage", "Request", "Material", "expand_seed",
           "payload_nbytes", "REQUEST_KINDS"]

Payload = Mapping[str, torch.Tensor]
Inbox = dict[int, dict[str, torch.Tensor]]


def payload_nbytes(payload: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


@dataclass(frozen=True)
class Round:
    """One party's outbound messages for one round."""

    tag: str
    broadcast: Mapping[str, torch.Tensor] = field(default_factory=dict)
    direct: Mapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)

    def payload_for(self, party: int) -> dict[str, torch.Tensor]:
        """What `party` receives from the sender of this round (may be empty)."""
        out = dict(self.broadcast)
        mine = self.direct.get(party)
        if mine:
            clash = set(out) & set(mine)
            if clash:
                raise ProtocolError(f"round {self.tag!r}: names both broadcast and direct: "
                                    f"{sorted(clash)}")
            out.update(mine)
        return out

    def nbytes_to(self, party: int) -> int:
        return payload_nbytes(self.broadcast) + payload_nbytes(self.direct.get(party, {}))


@message("smpc.round")
@dataclass(frozen=True)
class RoundMessage:
    """One round's payload from `sender` to one recipient, as it travels."""

    session: str
    step: int
    tag: str
    sender: int
    tensors: dict[str, torch.Tensor]


# ---------------------------------------------------------------- dealer material

REQUEST_KINDS = ("triple", "matmul_triple", "binary_triple", "trunc_pair", "edabit", "dabit", "cmp",
                 "relu", "linear",
                 # authenticated material of active sessions (p2pgrid.protocols.smpc.mac_material)
                 "a_key", "a_triple", "a_mtriple", "a_trunc", "a_cmp", "a_relu", "a_outmask",
                 "a_check", "a_mask", "a_input", "a_linear", "a_truncmul")


@message("smpc.request")
@dataclass(frozen=True)
class Request:
    """What a protocol step needs from the dealer: kind, operand shapes, one int param.

    kinds: ``triple`` (shapes a, b; c = a*b broadcast), ``matmul_triple`` (c = a@b),
    ``binary_triple`` (XOR-shared words, c = a & b), ``trunc_pair`` (r, r>>param, msb(r)),
    ``edabit`` (r arithmetic + its bits XOR-shared), ``dabit`` (a random bit both ways).
    """

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    param: int = 0

    def __post_init__(self):
        if self.kind not in REQUEST_KINDS:
            raise ProtocolError(f"unknown preprocessing kind {self.kind!r}")
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))


Spec = tuple[tuple[str, tuple[int, ...]], ...]


def expand_seed(seed: bytes, spec: Spec, skip=frozenset()) -> dict[str, torch.Tensor]:
    """The uniform int64 tensors a seed expands to, for every component of `spec` but
    those in `skip`.

    The components lie along one AES-CTR stream of the seed, in spec order, each from the
    16-byte block after the previous one's last: a component's words depend on the spec
    before it, never on `skip`, so the dealer and every party expand the same ones. Each
    run of components not skipped is one AES call (a cipher context costs about as much
    as 100 KB of keystream, and an item has up to a hundred components).

    >>> spec = (("a", (2, 3)), ("b", (5,)))
    >>> out = expand_seed(bytes(16), spec)
    >>> out["b"].equal(expand_seed(bytes(16), spec, skip={"a"})["b"]), sorted(out)
    (True, ['a', 'b'])
    """
    prg = Prg(seed)
    out: dict[str, torch.Tensor] = {}
    run: list[tuple[str, tuple[int, ...], int, int]] = []   # name, shape, first block, words

    def flush():
        if not run:
            return
        first = run[0][2]
        buf = prg.blocks(first, run[-1][2] + (8 * run[-1][3] + 15) // 16 - first)
        for name, shape, block, words in run:
            out[name] = (torch.frombuffer(buf, dtype=torch.int64, count=words,
                                          offset=16 * (block - first)).reshape(shape)
                         if words else torch.zeros(shape, dtype=torch.int64))
        run.clear()

    block = 0
    for name, shape in spec:
        shape = tuple(int(d) for d in shape)
        words = math.prod(shape)
        if name in skip:
            flush()
        else:
            run.append((name, shape, block, words))
        block += (8 * words + 15) // 16
    flush()
    return out


@message("smpc.material")
@dataclass(frozen=True)
class Material:
    """One party's share of one dealt item, compressed.

    ``spec`` lists the named components and their shapes in a fixed order; the party
    expands those that ``corrections`` does not hold from its seed (:func:`expand_seed`).
    Parties 0..n-2 get a seed only; the last party gets a seed plus the corrections that
    make the shares sum (or XOR) to a valid item. A seed is 16 bytes, so all but one party
    receive 16 bytes per item. A correction of a component shaped ``S + (2,)`` may be
    shaped ``S``: it replaces the first half of the component's words, the rest coming from
    the seed (a Z_2^128 component's low words: :func:`.mac_material.deal`).
    """

    kind: str
    party: int
    seed: bytes
    spec: tuple[tuple[str, tuple[int, ...]], ...]
    corrections: dict[str, torch.Tensor] = field(default_factory=dict)

    def expand(self) -> dict[str, torch.Tensor]:
        halves = set()
        for name, shape in self.spec:
            fix = self.corrections.get(name)
            if fix is None:
                continue
            if fix.dtype == torch.int64 and tuple(fix.shape) == tuple(shape):
                continue
            if fix.dtype == torch.int64 and shape and shape[-1] == 2 \
                    and tuple(fix.shape) == tuple(shape[:-1]):
                halves.add(name)
                continue
            raise ProtocolError(f"dealer correction {name!r} has the wrong shape or dtype")
        seeded = expand_seed(self.seed, self.spec, skip=set(self.corrections) - halves)
        for name in halves:        # the first half of the words is corrected, the rest seeded
            fix = self.corrections[name].reshape(-1)
            seeded[name].view(-1)[:fix.numel()] = fix
        return {name: self.corrections[name] if name in self.corrections and name not in halves
                else seeded[name] for name, _ in self.spec}

    @property
    def nbytes(self) -> int:
        """Bytes the dealer sends for this item (seed + corrections)."""
        return len(self.seed) + payload_nbytes(self.corrections)
