"""Counter-mode PRG: AES-128-CTR keystream read as uniform int64 words.

Why AES-CTR (via ``cryptography``) and not numpy's Philox or ``torch.Generator``:
the dealer's seed compression is only secure if a party cannot tell the expanded
shares from uniform, which needs a cryptographic PRG. AES-128 keyed with the seed is
a PRF; CTR mode turns it into a PRG that fills a whole tensor in one call (AES-NI:
several GB/s, far faster than the protocol arithmetic that follows). Philox is
counter-based and fast but its designers do not claim cryptographic security, and
``torch.Generator`` (Mersenne twister) is predictable from its output.

A :class:`Prg` is keyed by a 16-byte seed. Each call draws from a fresh *stream*
(the 16-byte CTR nonce holds the stream number in its first 8 bytes and the block
counter in the last 8), so outputs never overlap. ``int64(shape, stream=i)`` reads
stream ``i`` directly; :meth:`Prg.blocks` reads stream 0 from any block, which is how a
dealt item's seed expands to its named tensors, laid out one after the other along that
stream, no matter which of them a party actually needs
(:func:`p2pgrid.protocols.smpc.messages.expand_seed`).

>>> p = Prg(bytes(16))
>>> p.int64((2, 3), stream=7).equal(Prg(bytes(16)).int64((2, 3), stream=7))
True
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["Prg", "SEED_BYTES", "new_seed"]

SEED_BYTES = 16
_DERIVE_STREAM_BASE = 1 << 62  # streams used by bytes()/child(); far from int64() streams
_ZEROS = memoryview(bytes(1 << 20))  # the plaintext of every keystream, read in chunks


def new_seed() -> bytes:
    """A fresh seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


class Prg:
    """AES-128-CTR keyed by a 16-byte seed. Holds only its key and a stream counter."""

    __slots__ = ("_key", "_next_stream")

    def __init__(self, seed: bytes):
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed is {SEED_BYTES} bytes")
        self._key = bytes(seed)
        self._next_stream = 0

    @classmethod
    def from_entropy(cls) -> "Prg":
        return cls(new_seed())

    def _keystream(self, nbytes: int, stream: int, block: int = 0) -> np.ndarray:
        """AES-CTR(zeros) into uninitialized memory, from one shared MiB of zeros read in
        chunks: zero-filling a fresh output and a fresh input cost 4x the AES itself.
        `block`: the first counter block (the stream's 16-byte block number)."""
        nonce = stream.to_bytes(8, "little") + block.to_bytes(8, "big")
        enc = Cipher(algorithms.AES(self._key), modes.CTR(nonce)).encryptor()
        out = np.empty(nbytes + 16, np.uint8)  # update_into wants up to a block of slack
        view, at = memoryview(out), 0
        while at < nbytes:
            step = min(len(_ZEROS), nbytes - at)
            enc.update_into(_ZEROS[:step], view[at:at + step + 15])
            at += step
        return out

    def _take_stream(self, stream: int | None) -> int:
        if stream is None:
            stream = self._next_stream
            self._next_stream += 1
        if not 0 <= stream < 1 << 64:
            raise ValueError("stream number out of range")
        return stream

    def int64(self, shape, stream: int | None = None) -> torch.Tensor:
        """A tensor of uniform int64 (uniform over Z_2^64) of `shape`."""
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        buf = self._keystream(8 * n, self._take_stream(stream))
        if n == 0:
            return torch.zeros(shape, dtype=torch.int64)
        return torch.frombuffer(buf, dtype=torch.int64, count=n).reshape(shape)

    def blocks(self, first: int, count: int) -> np.ndarray:
        """Blocks `first` .. `first + count - 1` of stream 0 (16 bytes each, uint8): one
        AES-CTR call for many tensors laid out along one stream (see
        :func:`p2pgrid.protocols.smpc.messages.expand_seed`)."""
        if not (0 <= first and 0 <= count and first + count < 1 << 64):
            raise ValueError("block range out of the stream")
        return self._keystream(16 * count, 0, first)[:16 * count]

    def bytes(self, n: int) -> bytes:
        """`n` pseudorandom bytes (e.g. child seeds)."""
        stream = _DERIVE_STREAM_BASE + self._take_stream(None)
        return bytes(self._keystream(n, stream)[:n])

    def child(self) -> "Prg":
        """An independent PRG keyed from this one's output."""
        return Prg(self.bytes(SEED_BYTES))
