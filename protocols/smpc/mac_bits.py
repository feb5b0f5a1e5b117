"""Authenticated bits: XOR shares with binary MACs under a dealt key Delta, sans-IO.

Why: opened as Z_2^128 elements (16 bytes each), the bits of a comparison made it about
1 KB per compared element; opened as bits, a comparison's gates cost a few bytes.

A bit b is held by party i as b_i (XOR shares) and MAC shares m_i in {0,1}^64 with
XOR_i m_i = b Delta: Delta uniform in {0,1}^64, dealt (XOR-shared, from the OS CSPRNG)
with each item of material that has bits, never opened. Bits are bit-sliced as in
:mod:`.gates`: int64 words (..., W), bit e of word w is element 64 w + e; MAC shares are
64 planes (64, ..., W), plane t holding the shares of b Delta_t. XOR, XOR with public
words and AND with public words act on value words and MAC planes alike; the public
constant 1 is party 0's all-ones word and, in MACs, every party's Delta_i planes
(:func:`key_planes`, the `one` of :meth:`.gates.Gate.evaluate`). That is every operation
a masked gate does.

Openings (:func:`open_bits`) are recorded for :func:`.mac.mac_check`, which checks them
in the same rounds as the arithmetic ones (:func:`sigma`): for rho = 64 random GF(2)
combinations chi_r of all opened bit positions and each plane t, party i computes
sigma_(r,t) = chi_r . (m_(i,t) XOR b Delta_(i,t)); the sigmas must XOR to 0. A wrong
opened bit passes only if no chi_r covers the errors with odd parity (2^-64) or a cheater
matches all 64 bits of the unknown Delta (2^-64): below 2^-63 per check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from . import ring128 as R
from .messages import Round
from .prg import Prg
from .runtime import collect

__all__ = ["PLANES", "AuthBits", "open_bits", "sigma", "key_planes", "mac_planes",
           "random_words", "random_key", "key_word", "xor_split", "share_bits", "MASK64"]

PLANES = 64          # bits of Delta: MAC planes per bit
ROWS = 64            # random combinations in the check
MASK64 = (1 << 64) - 1


def random_words(shape) -> torch.Tensor:
    """Uniform int64 words from the OS CSPRNG."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return torch.zeros(shape, dtype=torch.int64)
    return torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64).reshape(shape)


def random_key() -> int:
    """A fresh key Delta (an item's), uniform in {0,1}^64 from the OS CSPRNG."""
    return int.from_bytes(os.urandom(8), "little")


def key_planes(key: int) -> torch.Tensor:
    """All-ones or zero word per bit of a key share: shape (PLANES, 1)."""
    bits = [-((key >> t) & 1) for t in range(PLANES)]
    return torch.tensor(bits, dtype=torch.int64).view(PLANES, 1)


def mac_planes(words: torch.Tensor, key: int) -> torch.Tensor:
    """The full MACs of bit-sliced words under `key`: (PLANES, *words.shape)."""
    return words.unsqueeze(0) & key_planes(key).view((PLANES,) + (1,) * words.dim())


def key_word(key: int) -> torch.Tensor:
    """A key (share) as the one int64 word it travels as."""
    return torch.tensor([key - ((key >> 63) << 64)], dtype=torch.int64)


def xor_split(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n uniform XOR shares of `t` (words)."""
    parts = [random_words(t.shape) for _ in range(n - 1)]
    last = t.clone()
    for p in parts:
        last ^= p
    return parts + [last]


def share_bits(bits: dict[str, torch.Tensor], n: int) -> list[dict]:
    """Each party's authenticated shares of `bits` (name -> words) under a fresh key:
    name -> (value words, MAC planes), and ``delta``, its key share."""
    key = random_key()
    out: list[dict] = [{} for _ in range(n)]
    for name, words in bits.items():
        pairs = zip(xor_split(words, n), xor_split(mac_planes(words, key), n))
        for p, pair in enumerate(pairs):
            out[p][name] = pair
    for p, k in enumerate(xor_split(key_word(key), n)):
        out[p]["delta"] = int(k[0]) & MASK64
    return out


@dataclass
class AuthBits:
    """One party's shares of bit-sliced authenticated bits: value words (..., W), MAC
    planes (PLANES, ..., W), and its share of the item's key Delta."""

    value: torch.Tensor
    mac: torch.Tensor
    key: int

    def __xor__(self, other: "AuthBits") -> "AuthBits":
        return AuthBits(self.value ^ other.value, self.mac ^ other.mac, self.key)


def open_bits(ctx, tag: str, values: dict[str, AuthBits]):
    """One round: open bit-sliced authenticated bits (8 bytes per 64 bits), recorded for
    the check like every arithmetic opening."""
    sent = {n: v.value.contiguous() for n, v in values.items()}
    inbox = yield Round(tag, broadcast=sent)
    out = {}
    for name, v in values.items():
        total = sent[name].clone()
        for t in collect(ctx, inbox, name, sent[name]):
            total ^= t
        ctx.record_bits(total, v)
        ctx.note(total.numpy().tobytes())
        out[name] = total
    return out


def _parity(words: np.ndarray) -> np.ndarray:
    w = words.copy()
    for s in (32, 16, 8, 4, 2, 1):
        w ^= w >> np.uint64(s)
    return w & np.uint64(1)


def sigma(log: list[tuple[torch.Tensor, torch.Tensor, int]], seed: bytes) -> np.ndarray:
    """This party's check words for every recorded bit opening: ROWS uint64, bit t of
    word r = chi_r . (m_t XOR b Delta_i,t) over all opened positions (chi: AES-CTR keyed
    by the check's joint seed, stream 1)."""
    if not log:
        return np.zeros(ROWS, np.uint64)
    z = np.concatenate([(m.reshape(PLANES, -1) ^ (o.reshape(1, -1) & key_planes(k))).numpy()
                        for o, m, k in log], 1).view(np.uint64)          # (PLANES, words)
    chi = Prg(seed).int64((ROWS, z.shape[1]), stream=1).numpy().view(np.uint64)
    kernels = R.kernels()
    if kernels is not None:
        out = np.empty(ROWS, np.uint64)
        kernels.gf2_check(chi, np.ascontiguousarray(z), out, ROWS, PLANES, z.shape[1])
        return out
    out = np.zeros(ROWS, np.uint64)
    for r in range(ROWS):
        folded = np.bitwise_xor.reduce(chi[r] & z, axis=1)              # (PLANES,)
        out[r] = np.bitwise_or.reduce(_parity(folded) << np.arange(PLANES, dtype=np.uint64))
    return out
