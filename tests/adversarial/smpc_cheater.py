"""A party that follows the active SMPC protocol except for one chosen deviation.

Wraps a party's protocol generator (see :func:`p2pgrid.protocols.smpc.mac.run_active`'s `wrap`)
and changes what it sends in the first round whose tag is `target`:

* ``add1``: adds 1 to one element of its opened share (a bit opening, ``a/bit/...``:
  flips the lowest bit of one word, i.e. adds 1 mod 2 to one opened bit);
* ``flip``: flips one random bit of one element of its opened share;
* ``replay``: sends the payload it sent in the same round of an earlier session;
* ``mac``: opens honestly but uses a wrong MAC share for that opening in the check (a bit
  opening: one wrong bit in one MAC plane);
* ``equivocate``: sends party 1 something else than the others (needs >= 3 parties).

Every other party is wrapped by :func:`catching`, so each run returns, per party, its
output or the exception it raised.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from p2pgrid.protocols.smpc import mac
from p2pgrid.protocols.smpc import ring128 as R
from p2pgrid.protocols.smpc.messages import Round

DEVIATIONS = ("add1", "flip", "replay", "mac", "equivocate")


def _binary(tag: str) -> bool:
    """Bit openings (mac_bits.open_bits) travel as bit-sliced words, XOR-shared."""
    return tag.startswith("a/bit/")


def _shift(theirs, sent, honest, binary=False):
    """`theirs` + (sent - honest) in Z_2^128 (int64 word pairs), or XOR for bits."""
    if binary:
        return theirs ^ sent ^ honest
    val = R.sub(R.add(R.from_wire(theirs), R.from_wire(sent)), R.from_wire(honest))
    return R.to_wire(val)


def catching(gen):
    """Run `gen`, returning its exception instead of raising (to see every party's fate)."""
    try:
        return (yield from gen)
    except Exception as exc:   # noqa: BLE001 - the test inspects it
        return exc


class Cheater:
    def __init__(self, party: int, target: str, deviation: str):
        if deviation not in DEVIATIONS:
            raise ValueError(deviation)
        self.party, self.target, self.deviation = party, target, deviation
        self.old: dict[str, torch.Tensor] | None = None   # last session's payload (replay)
        self.deviated = False

    def _tamper(self, payload: dict[str, torch.Tensor], binary=False) -> dict[str, torch.Tensor]:
        out = {k: v.clone() for k, v in payload.items()}
        name = sorted(out)[0]
        if binary:
            flat = out[name].view(-1)
            i = secrets.randbelow(flat.numel())
            flat[i] ^= 1 if self.deviation == "add1" else 1 << secrets.randbelow(64)
            return out
        # openings travel as (low, high) int64 words of Z_2^128 elements: change the low
        # word, the part every later step uses (the high one is masking)
        flat = out[name].view(-1, 2)[:, 0]
        i = secrets.randbelow(flat.numel())
        if self.deviation == "add1":
            flat[i] += 1
        elif self.deviation == "flip":
            flat[i] ^= 1 << secrets.randbelow(64)
        return out

    def wrap(self, ctx, gen):
        """The generator this party runs instead of `gen`."""
        self.deviated = False
        seen = False
        inbox = None
        try:
            while True:
                rnd = gen.send(inbox) if inbox is not None else next(gen)
                if rnd.tag == self.target and not seen:
                    seen = self.deviated = True
                    honest = dict(rnd.broadcast)
                    binary = _binary(rnd.tag)
                    if self.deviation in ("add1", "flip"):
                        rnd = Round(rnd.tag, self._tamper(honest, binary), rnd.direct)
                    elif self.deviation == "replay":
                        if self.old is not None:
                            rnd = Round(rnd.tag, self.old, rnd.direct)
                        else:
                            self.deviated = False   # first session: only record
                        self.old = honest
                    elif self.deviation == "equivocate":
                        others = [p for p in range(ctx.n_parties) if p != ctx.party]
                        rnd = Round(rnd.tag, {}, {p: (self._with("add1", honest, binary)
                                                      if p == others[0] else honest)
                                                  for p in others})
                    if self.deviation in ("add1", "flip", "replay") and self.deviated:
                        # Keep its own view consistent with what it sent, as a careful
                        # cheater would: only the MAC check can catch it then.
                        sent = rnd.broadcast
                        inbox = yield rnd
                        first = min(inbox)
                        inbox[first] = {k: (_shift(v, sent[k], honest[k], binary)
                                            if k in honest else v)
                                        for k, v in inbox[first].items()}
                        continue
                    if self.deviation == "mac" and binary:
                        mark = len(ctx._bit_log)
                        inbox = yield rnd
                        rnd = gen.send(inbox)
                        for j in range(mark, len(ctx._bit_log)):
                            o, m, key = ctx._bit_log[j]
                            m = m.clone().view(-1)   # one wrong bit in one MAC plane
                            m[secrets.randbelow(m.numel())] ^= 1 << secrets.randbelow(64)
                            ctx._bit_log[j] = (o, m.view(ctx._bit_log[j][1].shape), key)
                        inbox = yield rnd
                        continue
                    if self.deviation == "mac":
                        mark = len(ctx._log)
                        inbox = yield rnd
                        rnd = gen.send(inbox)
                        for j in range(mark, len(ctx._log)):
                            o, v, m = ctx._log[j]
                            m = m.copy()   # 2 limbs x openings: change one low word
                            with np.errstate(over="ignore"):
                                m[0, secrets.randbelow(m.shape[1])] += np.uint64(
                                    1 + secrets.randbelow(1 << 62))
                            ctx._log[j] = (o, v, m)
                        inbox = yield rnd
                        continue
                inbox = yield rnd
        except StopIteration as done:
            return done.value
        except Exception as exc:   # noqa: BLE001
            return exc

    def _with(self, deviation, payload, binary=False):
        saved, self.deviation = self.deviation, deviation
        try:
            return self._tamper(payload, binary)
        finally:
            self.deviation = saved
