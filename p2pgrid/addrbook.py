"""Who the directory keeps and whom gossip talks to: a bounded, fair address book (sans-IO).

A peer learns records from whoever gossips with it, and keys cost nothing, so a
single attacker can hand it any number of signed records ("Sybils"). Three rules keep
such a flood from taking over a :class:`~p2pgrid.directory.Directory`:

* **Per-source admission.** Each gossip partner (the authenticated key that sent the
  records, or the address we pulled them from) may introduce at most
  ``new_per_source`` *new* keys per ``window`` seconds (one gossip round). Updates of
  keys already held are not limited: their number is bounded by what we hold. Records
  over the limit are skipped before their signature is checked, so the limit bounds our
  verification work too; anti-entropy offers them again next round.
* **A bounded table, evicted fairly.** At most ``max_records`` records. When a new key
  arrives at a full table, the victim is the least recently refreshed record of the
  source that introduced the most records still held; protected records are never
  victims. A flood therefore first evicts its own records.
* **Protected partners.** A key becomes *protected* when an exchange that we started
  with it succeeded (we reached it at its advertised address, pinned to its key, and it
  answered): verified contact, not a claim. Part of every gossip fanout is drawn from the
  protected set, so records with dead or unreachable addresses, however many, cannot
  crowd the peers we know to be real out of our gossip. Protection lapses after
  ``protected_ttl`` without a new success, and at most ``max_protected`` keys hold it
  (the least recently confirmed lose it first).

This is the tried/new split of Bitcoin Core's address manager reduced to what a
directory of signed records needs: the source of a record stands in for the source
group, the table is one bucket, and "tried" is a successful outbound exchange.

What it does not do: a Sybil that runs real, reachable peers can earn protection like
anyone else (each costs a listening server, not just a key), and it does not bucket
sources by network prefix (every test network is on 127.0.0.1).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["AddrBook", "BookLimits"]


@dataclass(frozen=True)
class BookLimits:
    """The address book's bounds (see the module docstring)."""

    max_records: int = 10_000  # issue 21 sizes the directory for 10,000 peers
    new_per_source: int = 256
    window: float = 1.0  # seconds of the directory's clock: one gossip round
    max_protected: int = 64
    protected_ttl: float = 120.0
    protected_share: float = 0.5  # of each fanout drawn from the protected set

    def __post_init__(self):
        if self.max_records < 1 or self.new_per_source < 1 or self.max_protected < 0:
            raise ValueError("address book limits must be positive")
        if not 0.0 <= self.protected_share <= 1.0:
            raise ValueError("protected_share is a fraction of the fanout")


class _Keyed(Protocol):
    @property
    def key_id(self) -> str: ...


@dataclass
class _Source:
    window_start: float = float("-inf")
    introduced: int = 0  # new keys attempted in the current window
    held: set[str] = field(default_factory=set)  # keys it introduced that we still hold


class AddrBook:
    """Admission, eviction and partner choice for one directory. Holds key ids only;
    the records themselves stay in the directory."""

    def __init__(self, limits: BookLimits | None = None):
        self.limits = limits or BookLimits()
        self.refused = 0  # new keys skipped for a source over its limit
        self.evicted = 0  # records dropped to make room
        self._sources: dict[str, _Source] = {}
        self._source_of: dict[str, str] = {}  # key id -> source that introduced it
        self._good: dict[str, float] = {}  # key id -> last successful outbound exchange
        self._failed: dict[str, float] = {}  # key id -> last failed outbound exchange

    # ------------------------------------------------------------ admission

    def may_introduce(self, source: str | None, now: float) -> bool:
        """Count one new key from `source` against its window; False once over the limit.
        ``None`` is the local side (our own merges, tests): never limited."""
        if source is None:
            return True
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = _Source()
            self._forget_idle_sources(now)
        if now - s.window_start >= self.limits.window:
            s.window_start, s.introduced = now, 0
        if s.introduced >= self.limits.new_per_source:
            self.refused += 1
            return False
        s.introduced += 1
        return True

    def added(self, key_id: str, source: str | None) -> None:
        """A new key is now held; remember who introduced it."""
        src = source if source is not None else ""
        self._source_of[key_id] = src
        self._sources.setdefault(src, _Source()).held.add(key_id)

    def removed(self, key_id: str) -> None:
        """A key is no longer held (expired or evicted)."""
        src = self._source_of.pop(key_id, None)
        if src is not None and src in self._sources:
            self._sources[src].held.discard(key_id)
        self._good.pop(key_id, None)
        self._failed.pop(key_id, None)

    def victim(self, last_seen: dict[str, float], now: float, *, keep: str) -> str | None:
        """The key to evict so that a new one fits, or None if every held key is
        protected (then the new key is refused). `keep` is our own key."""
        protected = self.protected(now)
        best: tuple[int, str] | None = None
        for name, s in self._sources.items():
            n = sum(1 for k in s.held if k not in protected and k != keep)
            if n and (best is None or n > best[0]):
                best = (n, name)
        if best is not None:
            # within that source: records we failed to reach first, then the stalest
            held = self._sources[best[1]].held
            return min((k for k in held if k not in protected and k != keep),
                       key=lambda k: (k not in self._failed, last_seen.get(k, float("-inf"))))
        # keys held but introduced before this book knew them (none in practice)
        rest = [k for k in last_seen if k not in protected and k != keep]
        return min(rest, key=lambda k: last_seen[k]) if rest else None

    def _forget_idle_sources(self, now: float) -> None:
        # Sources are keys and keys are free: forget those that hold nothing and
        # whose window has passed, so this table stays as small as the directory.
        if len(self._sources) > 2 * self.limits.max_records:
            self._sources = {n: s for n, s in self._sources.items()
                             if s.held or now - s.window_start < self.limits.window}

    # ------------------------------------------------------------ verified contact

    def good(self, key_id: str, now: float) -> None:
        """An exchange we started with `key_id` succeeded."""
        self._good[key_id] = now
        self._failed.pop(key_id, None)
        if len(self._good) > self.limits.max_protected:
            for k in sorted(self._good, key=self._good.__getitem__)[
                    :len(self._good) - self.limits.max_protected]:
                del self._good[k]

    def failed(self, key_id: str, now: float) -> None:
        """An exchange we started with `key_id` failed (unreachable, refused, timed out)."""
        self._failed[key_id] = now

    def protected(self, now: float) -> set[str]:
        """Keys with a successful outbound exchange within ``protected_ttl``."""
        ttl = self.limits.protected_ttl
        return {k for k, t in self._good.items() if now - t <= ttl}

    def is_protected(self, key_id: str, now: float) -> bool:
        t = self._good.get(key_id)
        return t is not None and now - t <= self.limits.protected_ttl

    # ------------------------------------------------------------ partner choice

    def choose(self, candidates: Sequence[_Keyed], fanout: int, now: float,
               rng: random.Random) -> list:
        """`fanout` distinct candidates: a share drawn from the protected ones, the rest
        uniformly from all, preferring those whose last exchange did not fail.

        Costs O(fanout) draws, not a pass over `candidates`, when it is large and has a
        ``get(key_id)`` (:class:`~p2pgrid.directory.Partners`): a peer of a 10,000-peer
        network picks its partners every round."""
        if fanout <= 0 or not candidates:
            return []
        protected = self.protected(now)
        get = getattr(candidates, "get", None)
        if get is not None:
            prot = [c for c in (get(k) for k in sorted(protected)) if c is not None]
        else:
            prot = [c for c in candidates if c.key_id in protected]
        # fanout * share slots, the fraction drawn at random (a fanout of 1 still explores)
        want = fanout * self.limits.protected_share
        k = int(want) + (rng.random() < want - int(want))
        k = min(len(prot), k)
        picked = rng.sample(prot, k)
        chosen = {c.key_id for c in picked}
        n = len(candidates)
        if n > 8 * (fanout + len(chosen)):
            # Uniform draws, rejecting those already chosen or whose last exchange
            # failed: uniform over the rest, as the pass below. Few tries are enough
            # unless most candidates failed; then the pass decides.
            for _ in range(8 * fanout):
                if len(picked) >= fanout:
                    return picked
                c = candidates[rng.randrange(n)]
                if c.key_id not in chosen and c.key_id not in self._failed:
                    picked.append(c)
                    chosen.add(c.key_id)
        rest = [c for c in candidates if c.key_id not in chosen]
        fresh = [c for c in rest if c.key_id not in self._failed]
        for pool in (fresh, [c for c in rest if c.key_id in self._failed]):
            need = fanout - len(picked)
            if need <= 0:
                break
            picked += rng.sample(pool, min(need, len(pool)))
        return picked

    def sources(self) -> dict[str, int]:
        """source -> number of held keys it introduced (for status pages and tests)."""
        return {n: len(s.held) for n, s in self._sources.items() if s.held}

    def stats(self, now: float) -> dict:
        return {"protected": len(self.protected(now)), "refused": self.refused,
                "evicted": self.evicted, "sources": len(self.sources())}

    def known(self, key_ids: Iterable[str]) -> None:
        """Adopt keys already held (e.g. merged before the book existed) as local."""
        for k in key_ids:
            if k not in self._source_of:
                self.added(k, None)
