"""A hash-range summary of a directory's digest, for anti-entropy that costs little when
nothing changed (sans-IO).

A directory's digest is key id -> version, one entry per record; at 10,000 records it
is about 200 KB, too much to send on every exchange. Instead each (key id, version)
pair hashes to 64 bits and the summary keeps XORs of those hashes over *ranges* of the
key space: the key ids whose first 10 bits fall in bucket ``j`` of ``2**level`` equal
buckets, for every level 0..10. Level 0 is one bucket: the *root*, one hash of the
whole digest. XOR makes every update O(levels): adding, removing or re-versioning a
key flips its hash in one bucket per level.

The exchange (:mod:`p2pgrid.directory`, :mod:`p2pgrid.gossip`) sends the root first;
equal roots mean equal digests (up to a 2**-64 collision) and the exchange ends there.
Otherwise the responder answers with its buckets at a level chosen for about
:data:`PER_BUCKET` keys each (4 bytes a bucket), and the initiator lists its digest
entries only for the buckets that differ. Key ids are hashes of public keys, so
buckets fill evenly; someone grinding keys into one bucket only makes that bucket's
entries longer, and the number of entries per exchange is capped anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

__all__ = ["RangeSummary", "MAX_LEVEL", "PER_BUCKET", "bucket_of", "level_for"]

MAX_LEVEL = 10  # 1,024 buckets: about 10 keys each at 10,000 records
PER_BUCKET = 16  # keys per bucket the responder aims for when it picks a level
BUCKET_BYTES = 4  # a bucket's hash on the wire (the root travels with 8)


def bucket_of(key_id: str, level: int) -> int:
    """The bucket of `key_id` at `level` (its first `level` bits)."""
    try:
        top = int(key_id[:3], 16)  # 12 bits, of which we use MAX_LEVEL
    except (ValueError, TypeError):
        top = 0  # not hex: never a key id we derived; lands in bucket 0
    return (top >> (12 - MAX_LEVEL)) >> (MAX_LEVEL - level)


ENTRY_BYTES = 22  # a digest entry on the wire (16-character key id, version)


def level_for(count: int, differences: int = 0) -> int:
    """The level whose buckets hold about PER_BUCKET of `count` keys, or finer when
    about `differences` keys are expected to differ: B buckets cost 4B bytes and the
    entries of the differing ones about ENTRY_BYTES * count * differences / B, least
    at B = sqrt(ENTRY_BYTES / BUCKET_BYTES * count * differences). (While heartbeats
    flow, a coarse level makes most buckets differ and the entries cost more than the
    whole digest.)"""
    if count <= PER_BUCKET:
        return 0
    level = math.ceil(math.log2(count / PER_BUCKET))
    if differences > 0:
        best = math.sqrt(ENTRY_BYTES / BUCKET_BYTES * count * differences)
        level = max(level, round(math.log2(best)))
    return min(MAX_LEVEL, level)


def _pair_hash(key_id: str, version: int) -> int:
    h = hashlib.blake2b(f"{key_id}:{version}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


class RangeSummary:
    """XOR hashes of (key id, version) over key ranges, every level kept up to date."""

    def __init__(self):
        self._levels = [[0] * (1 << lv) for lv in range(MAX_LEVEL + 1)]
        self._held: dict[str, int] = {}  # key id -> its pair hash now in the summary
        self._keys: dict[int, set[str]] = {}  # finest bucket -> key ids in it
        self._fine: dict[str, int] = {}  # key id -> its finest bucket

    def set(self, key_id: str, version: int | None) -> None:
        """Make the summary hold (key_id, version); None removes key_id."""
        old = self._held.pop(key_id, None)
        new = None if version is None else _pair_hash(key_id, version)
        top = bucket_of(key_id, MAX_LEVEL)
        if new is not None:
            self._held[key_id] = new
            self._fine[key_id] = top
            self._keys.setdefault(top, set()).add(key_id)
        elif old is not None:
            self._fine.pop(key_id, None)
            held = self._keys.get(top)
            if held is not None:
                held.discard(key_id)
                if not held:
                    del self._keys[top]
        flip = (old or 0) ^ (new or 0)
        if not flip:
            return
        for lv in range(MAX_LEVEL + 1):
            self._levels[lv][top >> (MAX_LEVEL - lv)] ^= flip

    def root(self) -> bytes:
        """8 bytes that equal another summary's root iff (almost surely) same digest."""
        return self._levels[0][0].to_bytes(8, "big")

    def buckets(self, level: int) -> bytes:
        """Every bucket's hash at `level`, BUCKET_BYTES each, in order."""
        mask = (1 << (8 * BUCKET_BYTES)) - 1
        return b"".join((h & mask).to_bytes(BUCKET_BYTES, "big") for h in self._levels[level])

    def differing(self, level: int, remote: bytes) -> list[int]:
        """Buckets at `level` whose hash differs from `remote`'s (as :meth:`buckets`)."""
        if not 0 <= level <= MAX_LEVEL or len(remote) != BUCKET_BYTES * (1 << level):
            raise ValueError("a summary's size does not match its level")
        mine = self.buckets(level)
        n = BUCKET_BYTES
        return [j for j in range(1 << level) if mine[j * n:(j + 1) * n] != remote[j * n:(j + 1) * n]]

    def keys_in(self, level: int, buckets: Iterable[int]) -> list[str]:
        """The key ids held in `buckets` at `level`."""
        return [k for keys in self.keys_by_bucket(level, buckets).values() for k in keys]

    def keys_by_bucket(self, level: int, buckets: Iterable[int]) -> dict[int, list[str]]:
        """bucket -> the key ids held in it, for each of `buckets` at `level`: from the
        index of the finest buckets, or by one pass over the keys when that is less."""
        out: dict[int, list[str]] = {b: [] for b in buckets}
        span = 1 << (MAX_LEVEL - level)
        if span * len(out) <= len(self._held):
            for b, got in out.items():
                for fine in range(b * span, (b + 1) * span):
                    got.extend(self._keys.get(fine, ()))
        else:
            shift = MAX_LEVEL - level
            for k, fine in self._fine.items():
                got = out.get(fine >> shift)
                if got is not None:
                    got.append(k)
        return out

    def __len__(self) -> int:
        return len(self._held)

    @staticmethod
    def in_buckets(key_ids: Iterable[str], level: int, buckets: Iterable[int]) -> list[str]:
        """The key ids among `key_ids` that fall in `buckets` at `level`."""
        want = set(buckets)
        return [k for k in key_ids if bucket_of(k, level) in want]
