"""The peer directory: signed peer records, reconciled by push-pull anti-entropy (sans-IO).

Each peer signs a :class:`PeerRecord` (addresses, TLS certificate, roles, published
objects, services) and re-issues it with a higher ``version`` on every heartbeat. The
signature covers a small head (:class:`RecordHead`: version, times, ``content_version``
and a hash of the content), so a heartbeat that changes nothing else travels as a head
alone. A :class:`Directory` keeps the newest verified record per key and answers the
questions gossip needs: what do I have (:meth:`Directory.digest`, summarised by
:attr:`Directory.summary`, see :mod:`p2pgrid.summary`), what does the other side lack
(:meth:`Directory.delta`, most needed first under a byte cap), what does it have that I
lack (:meth:`Directory.wanted`). No sockets, no trio, no clock: every method that needs
the time takes ``now``; the I/O loop lives in :mod:`p2pgrid.gossip`.

Liveness is judged by *receive* time, never by the owner's clock: a record is live
while a newer version of it arrived less than ``ttl`` ago. When a record expires we
keep a tombstone (key id, version) for a while so that peers which have not expired
it yet cannot gossip the same dead version back to us.

Bounds (see :mod:`p2pgrid.addrbook`): at most ``max_records`` records, each gossip
partner introducing at most so many new keys per round, a fair eviction when full, and a
protected set of peers we reached ourselves that gossip always draws from. A record's
ttl is honoured up to our own ``max_ttl`` (a record saying ``ttl=inf`` lives no longer
than any other).

Listings are the owner's: a record may list only objects whose ``owner`` is the
record's own name (see :func:`listing_problem`); one that claims another owner's data
is dropped whole. Search lists a record's objects only under a name bound to its key.

Names are labels bound to keys, trust on first use. The first key seen with a name owns
it, for good (across expiry; :meth:`Directory.bindings` exports the bindings so a peer
can save them). A record from another key claiming a bound name is still *kept* and
gossiped, so that every directory converges on the same set of records whatever order
they arrive in, but it is reachable by key id only: :meth:`Directory.lookup` by name
never returns it and :meth:`Directory.search` lists it under its key id, never under the
contested name. Each such claim is recorded once in ``Directory.conflicts`` and logged.

>>> from p2pgrid.identity import Identity
>>> a, b = Directory(Identity.generate()), Directory(Identity.generate())
>>> rec = a.issue(1.0, name="alice", addresses=["127.0.0.1:7001"], cert=b"", roles=[],
...               objects=[ObjectSummary("o1", ["Birth-Records"], "", [3], "float32", "alice")],
...               services={})
>>> reply = handle_digest(b, GossipDigest(sender=rec, digest=a.digest()), now=1.0)
>>> sorted(b.search("#birth-records"))
['alice']
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import cbor2

from . import identity as _identity
from .addrbook import AddrBook, BookLimits
from .errors import BadRequest, Conflict, NotFound
from .records import (HEAD_BYTES, HEAD_FIELDS, MAX_NAME, MAX_OBJECTS, ObjectSummary, PeerRecord,
                      RecordHead, check_name, listing_problem, normalize_tags, sign_record)
from .summary import MAX_LEVEL, RangeSummary, bucket_of, level_for
from .wire import message

__all__ = [
    "ObjectSummary", "PeerRecord", "sign_record", "NameConflict", "Directory",
    "RecordHead", "GossipDigest", "GossipReply", "GossipPush", "GossipAck", "HEAD_FIELDS",
    "MAX_EXCHANGE_BYTES", "FULL_DIGEST", "MAX_DIGEST_ENTRIES",
    "handle_digest", "handle_push", "handle_gossip", "normalize_tags", "check_name",
    "listing_problem", "MAX_OBJECTS",
]

log = logging.getLogger("p2pgrid.directory")

_VERIFY_CACHE = 8192  # heads whose signature check we remember
# Heartbeat heads a peer should receive per second, whatever the network's size. Every
# peer must hear each other peer within ttl, so at N peers re-signing every ttl/3 a peer
# receives 3N/ttl heads a second: a fixed ttl makes that grow linearly with N. The ttl a
# record states grows with the directory instead (see Directory.record_ttl).
HEARTBEAT_HEADS_PER_S = 16.0


def _column_tags(o: ObjectSummary) -> set[str]:
    # a table is found by its column names too ("#weight_kg")
    cols = o.columns if isinstance(o.columns, (list, tuple)) else ()
    return set(normalize_tags([c for c in cols if isinstance(c, str)]))


@dataclass(frozen=True)
class NameConflict:
    """A key claimed a name already bound to another key. ``first_seen`` is None for
    conflicts found while loading saved bindings."""

    name: str
    bound_key_id: str
    claimed_key_id: str
    first_seen: float | None


# ---------------------------------------------------------------- the directory

class Partners(Sequence):
    """A live view of a directory's gossip partners (see :meth:`Directory.partners`):
    index i is a record, ``get(key_id)`` the record if it is a partner."""

    def __init__(self, directory: Directory):
        self._d = directory

    def __len__(self) -> int:
        return len(self._d._pool)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._d._records[k] for k in self._d._pool[i]]
        return self._d._records[self._d._pool[i]]

    def get(self, key_id: str) -> PeerRecord | None:
        return self._d._records.get(key_id) if key_id in self._d._pool_at else None


Listener = Callable[[str, list[PeerRecord]], None]


class Directory:
    """Newest verified record per key, with name bindings and liveness by receive time.

    ``now`` arguments to merge/expire/handle_* may come from any monotonic clock (the
    gossip loop's), as long as it is the same one throughout; ``issue``'s ``now`` is
    written into ``issued_at`` and should be unix time.
    """

    def __init__(self, identity: _identity.Identity, *, ttl: float = 30.0,
                 tombstone_ttl: float | None = None, max_ttl: float | None = None,
                 limits: BookLimits | None = None,
                 heads_per_s: float = HEARTBEAT_HEADS_PER_S,
                 admit: Callable[[PeerRecord], str | None] | None = None):
        # admit(record): why a verified record may not be kept (None: it may), e.g. it
        # lacks a valid network membership certificate; the peer's policy, not ours
        self.admit = admit
        self._refused: set[str] = set()  # key ids whose refusal was logged
        self.identity = identity
        self.key_id = identity.key_id
        self.ttl = float(ttl)
        # our cap on a record's stated ttl; 4 * record_ttl() lifts it in a large network
        self.max_ttl = 4 * self.ttl if max_ttl is None else max(float(max_ttl), self.ttl)
        self.tombstone_ttl = 4 * self.ttl if tombstone_ttl is None else float(tombstone_ttl)
        self.heads_per_s = float(heads_per_s)
        self.book = AddrBook(limits)
        self.own: PeerRecord | None = None
        self.conflicts: list[NameConflict] = []
        self.rejected = 0  # records dropped for a bad signature or an unusable name
        self._records: dict[str, PeerRecord] = {}
        self._last_seen: dict[str, float] = {}
        self._tombstones: dict[str, tuple[int, float]] = {}  # key id -> (version, expired at)
        self._names: dict[str, bytes] = {}  # name -> public key (TOFU bindings)
        self._conflict_seen: set[tuple[str, str]] = set()
        self._own_version_seen = 0  # highest version of our own key seen from others
        self._listeners: list[Listener] = []
        self.summary = RangeSummary()  # of digest(): what an exchange compares first
        self._need_content: set[str] = set()  # heads whose content we lack: digest says 0
        self._checked: dict[tuple, bool] = {}  # head -> signature valid (verify once)
        # Per-round work must not grow with the directory: records expire off a heap of
        # deadlines (lazily pruned), and partners are drawn from an indexable pool.
        self._deadlines: list[tuple[float, str, float]] = []  # (expires at, key id, seen)
        self._accepts: list[tuple[float, int]] = []  # (now, versions accepted): recent ones
        self._pool: list[str] = []  # key ids of gossip partners: not ours, with addresses
        self._pool_at: dict[str, int] = {}
        self.verified = 0  # signature checks done (tests and benchmarks count them)

    # ------------------------------------------------------------ own record

    def issue(self, now: float, *, name: str, addresses: list[str], cert: bytes,
              roles: list[str], objects: list[ObjectSummary], services: dict,
              membership: bytes = b"", revocations: bytes = b"") -> PeerRecord:
        """(Re)issue and store our own record with a version above any seen for our key."""
        why = check_name(name)
        if why:
            raise BadRequest(why, name=name)
        bound = self._names.get(name)
        if bound is not None and bytes(bound) != self.identity.public_bytes:
            raise Conflict(f"the name {name!r} is bound to key {_identity.key_id(bound)}, "
                           f"not to this peer's key {self.key_id}", name=name)
        foreign = [o.id for o in objects if o.owner != name]
        if foreign:
            raise ValueError(f"a record lists only its owner's objects; not {foreign[:3]}")
        version = max(self.own.version if self.own else 0, self._own_version_seen) + 1
        fields = dict(name=name, addresses=list(addresses), cert=bytes(cert), roles=list(roles),
                      objects=list(objects), services=dict(services), issued_at=float(now),
                      ttl=self.record_ttl(), membership=bytes(membership),
                      revocations=bytes(revocations))
        rec = sign_record(self.identity, version=version, **fields)
        if self.own is not None and self.own.content_hash == rec.content_hash:
            # A heartbeat: same content, so its version stays and peers holding it
            # get the new head alone.
            rec = sign_record(self.identity, version=version,
                              content_version=self.own.content_version, **fields)
        self.own = rec
        self._put(rec.key_id, rec)
        self._tombstones.pop(rec.key_id, None)
        self._names.setdefault(name, rec.public_key)
        self._notify("issued", [rec])
        return rec

    # ------------------------------------------------------------ gossip state

    def merge(self, records: Iterable[PeerRecord], now: float,
              source: str | None = None) -> list[PeerRecord]:
        """Keep each record that is the newest version seen for its key and verifies.

        `source` is who handed us the records (the authenticated key id of a gossip
        partner, or the address we pulled from; None for local merges): it may
        introduce only so many new keys per round (:class:`~p2pgrid.addrbook.AddrBook`).
        Returns the accepted records, in the order given. Stale versions and new keys
        over the source's limit are skipped without verifying; bad signatures, unusable
        names and listings of another owner's objects count in ``rejected``.
        """
        accepted = []
        for rec in records:
            if not isinstance(rec, (PeerRecord, RecordHead)):
                self.rejected += 1
                continue
            try:
                kid = rec.key_id
            except TypeError:
                self.rejected += 1
                continue
            if not isinstance(rec.version, int) or isinstance(rec.version, bool):
                self.rejected += 1
                continue
            if kid == self.key_id:
                # Our own key, relayed back. Never stored; but if it is ahead of us (we
                # restarted and lost our counter), our next issue must outrank it.
                top = max(self.own.version if self.own else 0, self._own_version_seen)
                if rec.version > top and self._signed(rec):
                    self._own_version_seen = rec.version
                continue
            cur = self._records.get(kid)
            if cur is not None and rec.version <= cur.version:
                continue
            tomb = self._tombstones.get(kid)
            if tomb is not None and rec.version <= tomb[0]:
                continue
            if isinstance(rec, RecordHead):
                # A head alone: usable only with the content we hold for this key.
                if cur is None:
                    continue
                if cur.content_hash != rec.content_hash:
                    self._want_content(kid)
                    continue
                rec = cur.with_head(rec)
            elif cur is None and not self.book.may_introduce(source, now):
                continue
            why = check_name(rec.name) or listing_problem(rec)
            if why is not None or not self._signed(rec):
                self.rejected += 1
                log.debug("dropped record for %s: %s", kid, why or "bad signature")
                continue
            why = self.admit(rec) if self.admit is not None else None
            if why is not None:
                self.rejected += 1
                if kid not in self._refused and len(self._refused) < 4096:
                    self._refused.add(kid)
                    log.warning("refused the record of %r (key %s): %s", rec.name, kid, why)
                if cur is None:   # not asked for again until a newer version comes
                    self._tombstone(kid, rec.version, now)
                continue
            if cur is None and not self._make_room(now):
                self.book.refused += 1
                continue
            self._need_content.discard(kid)
            self._put(kid, rec)
            self._last_seen[kid] = now
            heapq.heappush(self._deadlines, (now + self.lifetime(rec), kid, now))
            self._tombstones.pop(kid, None)
            if cur is None:
                self.book.added(kid, source)
            self._bind(rec.name, rec.public_key, now)
            accepted.append(rec)
        if accepted:
            self._accepts.append((now, len(accepted)))
            if len(self._accepts) > 256:
                del self._accepts[:128]
            self._notify("accepted", accepted)
        return accepted

    def recent_changes(self, now: float) -> int:
        """Versions accepted over the last few gossip rounds (``3 * window``): about how
        many keys a partner's digest differs from ours in, while changes spread."""
        since = now - 3 * self.book.limits.window
        return sum(k for t, k in self._accepts if t > since)

    def _signed(self, rec: PeerRecord | RecordHead) -> bool:
        """Whether `rec`'s signature is valid, checked once per distinct head: a version
        offered again (valid or not) by every partner is not verified again. The cache
        key is every signed field and the signature, so a forged copy of a head cannot
        stand in for the real one."""
        try:
            head = rec.head() if isinstance(rec, PeerRecord) else rec
            key = head.cache_key()
            hash(key)
        except (TypeError, ValueError, cbor2.CBOREncodeError):
            return False
        ok = self._checked.get(key)
        if ok is None:
            ok = head.verify()
            self.verified += 1
            self._checked[key] = ok
            if len(self._checked) > _VERIFY_CACHE:
                for k in list(self._checked)[:len(self._checked) // 4]:  # oldest first
                    del self._checked[k]
        return ok

    def _put(self, kid: str, rec: PeerRecord) -> None:
        self._records[kid] = rec
        self.summary.set(kid, 0 if kid in self._need_content else rec.version)
        self._pool_set(kid, kid != self.key_id and bool(rec.addresses))

    def _drop(self, kid: str) -> PeerRecord:
        rec = self._records.pop(kid)
        self._need_content.discard(kid)
        self.summary.set(kid, None)
        self._pool_set(kid, False)
        return rec

    def _pool_set(self, kid: str, member: bool) -> None:
        at = self._pool_at.get(kid)
        if member and at is None:
            self._pool_at[kid] = len(self._pool)
            self._pool.append(kid)
        elif not member and at is not None:
            last = self._pool.pop()  # swap-remove: O(1), order does not matter
            if last != kid:
                self._pool[at] = last
                self._pool_at[last] = at
            del self._pool_at[kid]

    def partners(self) -> Partners:
        """The records gossip may pick partners from (every live record but ours that
        has an address), as a sequence indexable in O(1), for drawing at random
        without listing the directory every round."""
        return Partners(self)

    def _want_content(self, kid: str) -> None:
        # The head names content we do not hold (its owner changed it without moving
        # content_version): our digest says 0 for this key until a whole record comes,
        # so partners send the whole record rather than the head again.
        if kid not in self._need_content and kid in self._records:
            self._need_content.add(kid)
            self.summary.set(kid, 0)

    def _make_room(self, now: float) -> bool:
        """Evict one record if the table is full; False if nothing may be evicted."""
        if len(self._records) < self.book.limits.max_records:
            return True
        victim = self.book.victim(self._last_seen, now, keep=self.key_id)
        if victim is None:
            return False
        rec = self._drop(victim)
        self._last_seen.pop(victim, None)
        self.book.removed(victim)
        self.book.evicted += 1
        # A tombstone, so that the same version relayed again does not evict in turn.
        self._tombstone(victim, rec.version, now)
        self._notify("expired", [rec])
        return True

    def _tombstone(self, kid: str, version: int, now: float) -> None:
        # re-inserted, so the dict's order stays the order of `now` (expire sweeps the front)
        self._tombstones.pop(kid, None)
        self._tombstones[kid] = (version, now)
        excess = len(self._tombstones) - 2 * self.book.limits.max_records
        if excess > 0:  # bounded like the records: the oldest go first
            for k in sorted(self._tombstones, key=lambda k: self._tombstones[k][1])[:excess]:
                del self._tombstones[k]

    def lifetime(self, rec: PeerRecord) -> float:
        """How long `rec` stays live after its newest version arrived: its own promise
        (``ttl``) if longer than ours, but never more than our ``max_ttl`` (or four
        times :meth:`record_ttl`, if longer, in a large network)."""
        stated = rec.ttl if isinstance(rec.ttl, (int, float)) and not math.isnan(rec.ttl) else 0.0
        return min(max(self.ttl, float(stated)), self.max_lifetime())

    def max_lifetime(self) -> float:
        """The longest any record stays live here after its newest version arrived:
        ``max_ttl``, or 4 * :meth:`record_ttl` in a large network. Records themselves
        raise it (more records, longer ttl), but only up to 4 * 3 * ``max_records`` /
        ``heads_per_s`` (7,500 s at 10,000 records): a flood of records stating
        ``ttl=inf`` still expires."""
        return max(self.max_ttl, 4 * self.record_ttl())

    def record_ttl(self) -> float:
        """The ttl our record states (its owner re-signs it every third of that): our
        ``ttl``, or longer in a large network, so that every peer re-signing every
        ttl/3 sends each peer at most ``heads_per_s`` heads a second (3N/ttl); a
        10,000-peer directory gets about 31 minutes at 16 a second. The price: a
        silent peer's record lingers that long (a peer that cannot reach it marks it
        failed at once, and gossip avoids it). Records are honoured for up to 4 times
        this, so peers whose view of N differs do not expire each other."""
        return max(self.ttl, 3.0 * len(self._records) / self.heads_per_s)

    def digest(self, key_ids: Iterable[str] | None = None) -> dict[str, int]:
        """key id -> version, for every record held (ours included), or for those of
        `key_ids` held. A key whose newest head came without content we hold says 0."""
        keys = self._records if key_ids is None else [k for k in key_ids if k in self._records]
        need = self._need_content
        return {kid: 0 if kid in need else self._records[kid].version for kid in keys}

    def __len__(self) -> int:
        return len(self._records)

    def key_ids(self) -> list[str]:
        return list(self._records)

    def newer_than(self, remote_digest: dict[str, int]) -> list[PeerRecord]:
        """Records the remote side lacks or holds an older version of."""
        return [r for kid, r in self._records.items()
                if remote_digest.get(kid, -1) < r.version]

    def delta(self, remote_digest: dict[str, int], now: float, *,
              key_ids: Iterable[str] | None = None, max_bytes: int = 0,
              max_new: int | None = None) -> tuple[list[PeerRecord | RecordHead], bool]:
        """What the remote side lacks, most needed first, within `max_bytes` (0: no cap).

        Among our records (or those of `key_ids`) newer than `remote_digest`'s: a head
        alone where the remote holds a version at or above the record's
        ``content_version`` (it has that content), else the whole record. Order:
        records of peers we protect (verified contact), then updates of keys the remote
        listed, then keys it lacks, newest received first; at most `max_new` keys it
        lacks (its per-source limit would refuse more). Returns (items, cut): `cut` is
        True when something was left for a later exchange."""
        keys = self._records if key_ids is None else [k for k in key_ids if k in self._records]
        protected = self.book.protected(now)
        picks = []
        for kid in keys:
            rec = self._records[kid]
            theirs = remote_digest.get(kid, -1)
            if not isinstance(theirs, int) or theirs >= rec.version:
                continue
            picks.append((kid not in protected, theirs < 0,
                          -self._last_seen.get(kid, now), kid, theirs))
        picks.sort()
        max_new = self.book.limits.new_per_source if max_new is None else max_new
        out, used, new, cut = [], 0, 0, False
        for _, lacks, _, kid, theirs in picks:
            rec = self._records[kid]
            if lacks:
                new += 1
                if new > max_new:
                    cut = True
                    break
            head_only = theirs >= max(1, rec.content_version) and rec.content_version <= rec.version
            item = rec.head() if head_only else rec
            size = HEAD_BYTES if head_only else rec.wire_size
            if max_bytes and out and used + size > max_bytes:
                cut = True
                continue  # a smaller head or record later may still fit
            out.append(item)
            used += size
        return out, cut

    def wanted(self, remote_digest: dict[str, int], *, with_held: bool = False):
        """Key ids the remote side holds a newer version of (never our own key): every
        update of a key we hold, and at most one round's worth (``new_per_source``) of
        keys we do not, so a digest listing a million keys costs one round's worth.
        With `with_held`, (key ids, the version we hold of each: -1 none, 0 a head
        whose content we lack), for :meth:`for_push` on the other side."""
        out, held, new = [], [], 0
        for kid, version in remote_digest.items():
            if kid == self.key_id or not isinstance(version, int):
                continue
            cur = self._records.get(kid)
            have = cur.version if cur is not None else self._tombstones.get(kid, (-1,))[0]
            if version > have:
                if cur is None:
                    new += 1
                    if new > self.book.limits.new_per_source:
                        continue
                out.append(kid)
                held.append(-1 if cur is None else 0 if kid in self._need_content else have)
        return (out, held) if with_held else out

    def for_push(self, key_ids: Iterable[str], held: Iterable[int], now: float,
                 max_bytes: int = 0) -> tuple[list[PeerRecord | RecordHead], bool]:
        """The records a partner asked for (`key_ids`, with the versions it `held` of
        each, -1 for none), as heads where it holds their content, within `max_bytes`."""
        keys = list(key_ids)
        held = list(held)
        remote = {k: (held[i] if i < len(held) and isinstance(held[i], int) else -1)
                  for i, k in enumerate(keys)}
        return self.delta(remote, now, key_ids=keys, max_bytes=max_bytes,
                          max_new=len(keys))

    def records_for(self, key_ids: Iterable[str]) -> list[PeerRecord]:
        return [self._records[k] for k in key_ids if k in self._records]

    def expire(self, now: float) -> list[PeerRecord]:
        """Drop records whose newest version arrived more than ``ttl`` ago (never ours)."""
        # A record promises a heartbeat within its own ttl; honour the longer of that
        # promise and ours (so peers configured differently do not expire each other),
        # up to our own maximum (so no record outlives it by saying ttl=inf).
        # Every accepted version pushed a deadline; an entry whose `seen` is no longer
        # the key's last receive time was superseded. Cost: the entries due, not the table.
        heap, dropped, keep = self._deadlines, [], []
        while heap and heap[0][0] < now:
            entry = heapq.heappop(heap)
            _, kid, seen = entry
            if self._last_seen.get(kid) != seen or kid == self.key_id:
                continue
            rec = self._records[kid]
            if now - seen <= self.lifetime(rec):
                keep.append((seen + self.lifetime(rec), kid, seen))  # its lifetime grew
                continue
            self._drop(kid)
            del self._last_seen[kid]
            self.book.removed(kid)
            self._tombstone(kid, rec.version, now)
            dropped.append(rec)
        for entry in keep:
            heapq.heappush(heap, entry)
        if len(heap) > 4 * len(self._last_seen) + 64:  # superseded entries pile up: rebuild
            self._deadlines = [(s + self.lifetime(self._records[k]), k, s)
                               for k, s in self._last_seen.items()]
            heapq.heapify(self._deadlines)
        tombs = self._tombstones
        while tombs:
            kid = next(iter(tombs))
            if now - tombs[kid][1] <= self.tombstone_ttl:
                break
            del tombs[kid]
        if dropped:
            log.info("expired %s", ", ".join(f"{r.name} ({r.key_id})" for r in dropped))
            self._notify("expired", dropped)
        return dropped

    def drop(self, key_ids: Iterable[str], now: float) -> list[PeerRecord]:
        """Forget these records now (their membership was revoked or ran out), and the
        names they held, so that a newly certified key can take them."""
        dropped = []
        for kid in key_ids:
            rec = self._records.get(kid)
            if rec is None or kid == self.key_id:
                continue
            self._drop(kid)
            self._last_seen.pop(kid, None)
            self.book.removed(kid)
            self._tombstone(kid, rec.version, now)
            if self._names.get(rec.name) == rec.public_key:
                del self._names[rec.name]
            dropped.append(rec)
        if dropped:
            self._notify("expired", dropped)
        return dropped

    # ------------------------------------------------------------ queries

    def lookup(self, name_or_key_id: str) -> PeerRecord:
        """The live record with this key id, or bound to this name (never an impostor's)."""
        rec = self._records.get(name_or_key_id)
        if rec is not None:
            return rec
        pub = self._names.get(name_or_key_id)
        if pub is not None:
            rec = self._records.get(_identity.key_id(pub))
            if rec is not None and rec.name == name_or_key_id:
                return rec
        raise NotFound(f"no live peer named or keyed {name_or_key_id!r}")

    def peers(self, *, include_self: bool = True) -> list[PeerRecord]:
        """Every live record, sorted by name then key id."""
        return sorted((r for r in self._records.values()
                       if include_self or r.key_id != self.key_id),
                      key=lambda r: (r.name, r.key_id))

    def _repr_html_(self) -> str:
        from .display import table
        return table(["peer", "key id", "addresses", "roles", "objects", "tags"],
                     [[self.label(r), r.key_id, r.addresses, r.roles, len(r.objects),
                       " ".join(sorted({"#" + t for o in r.objects for t in o.tags}))]
                      for r in self.peers()], caption="directory")

    def label(self, rec: PeerRecord) -> str:
        """The name a record answers to here: its name if bound to its key, else its key id."""
        return rec.name if self._names.get(rec.name) == rec.public_key else rec.key_id

    def search(self, query: str | Iterable[str]) -> dict[str, list[ObjectSummary]]:
        """Objects carrying every tag in `query` ('#a #b', '#' optional, any case),
        by peer name. Only records whose name is bound to their key are searched (an
        impostor's listing would claim another owner). An empty query lists every object."""
        want = set(normalize_tags(query))
        out: dict[str, list[ObjectSummary]] = {}
        for rec in self.peers():
            if self.label(rec) != rec.name:
                continue  # its name is another key's: its objects would claim that owner
            hits = [o for o in rec.objects if want <= set(normalize_tags(o.tags)) | _column_tags(o)]
            if hits:
                out[self.label(rec)] = hits
        return out

    # ------------------------------------------------------------ name bindings

    def bindings(self) -> dict[str, bytes]:
        """name -> public key, for every name ever bound here (live or not)."""
        return dict(self._names)

    def load_bindings(self, saved: dict[str, bytes]) -> None:
        """Restore saved bindings. A name already bound here keeps its key; a clash
        with the saved key is recorded as a conflict."""
        for name, pub in saved.items():
            self.bind_name(name, pub, None)

    def name_key(self, name: str) -> bytes | None:
        """The public key `name` is bound to, or None if it is not bound."""
        return self._names.get(name)

    def bind_name(self, name: str, public_key: bytes, now: float | None) -> bool:
        """Bind `name` to `public_key` if it is unbound (trust on first use), e.g. when an
        authenticated caller first shows up. True iff the name is now bound to that key;
        a clash is recorded in ``conflicts``; an unusable name binds nothing."""
        if check_name(name) is not None or not isinstance(public_key, (bytes, bytearray)):
            return False
        return self._bind(name, bytes(public_key), now)

    def _bind(self, name: str, pub: bytes, now: float | None) -> bool:
        bound = self._names.setdefault(name, pub)
        if bound == pub:
            return True
        claimed = _identity.key_id(pub)
        if (name, claimed) in self._conflict_seen:
            return False
        self._conflict_seen.add((name, claimed))
        c = NameConflict(name, _identity.key_id(bound), claimed, now)
        self.conflicts.append(c)
        log.warning("key %s claims the name %r, which is bound to key %s; "
                    "it is reachable by key id only", claimed, name, c.bound_key_id)
        return False

    # ------------------------------------------------------------ change listeners

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Call fn(kind, records) after each change ('issued', 'accepted', 'expired').
        Returns a function that removes the listener."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _notify(self, kind: str, records: list[PeerRecord]) -> None:
        for fn in list(self._listeners):
            fn(kind, records)

    def __repr__(self) -> str:
        return f"Directory(key_id={self.key_id}, records={len(self._records)})"


# ---------------------------------------------------------------- the exchange

def _sender_key(rec) -> str | None:
    try:
        return rec.key_id
    except (AttributeError, TypeError):
        return None


@message("dir.gossip.digest")
@dataclass(frozen=True)
class GossipDigest:
    """Initiator -> responder: who I am (my record's head, or the whole record), and
    what I hold.

    Three forms. *Complete*: ``digest`` is key id -> version of all I hold (small
    directories). *Root*: ``digest`` empty, ``root`` the hash of all I hold
    (:class:`~p2pgrid.summary.RangeSummary`); equal roots end the exchange. *Ranges*:
    ``digest`` holds only my entries in ``buckets`` at ``level`` (those whose hash
    differed from the responder's summary)."""

    sender: PeerRecord | RecordHead
    digest: dict[str, int]
    root: bytes = b""
    level: int = -1
    buckets: list[int] = ()


@message("dir.gossip.reply")
@dataclass(frozen=True)
class GossipReply:
    """Responder -> initiator: records (whole, or heads where the initiator holds
    their content) newer than the initiator's, most needed first under a byte cap,
    and the key ids it wants with the version it ``held`` of each (-1: none). Or,
    answering a root that differs, its bucket hashes at ``level`` (``summary``)."""

    records: list[PeerRecord | RecordHead]
    want: list[str]
    held: list[int] = ()
    level: int = -1
    summary: bytes = b""
    more: bool = False  # records were left out for the byte cap


@message("dir.gossip.push")
@dataclass(frozen=True)
class GossipPush:
    """Initiator -> responder: the records the responder asked for."""

    records: list[PeerRecord | RecordHead]


@message("dir.gossip.ack")
@dataclass(frozen=True)
class GossipAck:
    accepted: int


# records in one reply or push: a joiner catches up over rounds, about 100 records of
# 1.2 KB per exchange (a 1,000-peer directory in about 5 rounds at fanout 2; 64 KiB took 10-11),
# while one exchange stays a few ms of signature checks for the side that takes it
MAX_EXCHANGE_BYTES = 128 * 1024
FULL_DIGEST = 64  # a directory this small sends its whole digest at once
MAX_DIGEST_ENTRIES = 1024  # entries in a ranges digest (the initiator picks buckets up to it)


def handle_digest(directory: Directory, msg: GossipDigest, now: float,
                  source: str | None = None) -> GossipReply:
    """Responder side of an exchange: learn the sender, answer with the difference
    (see :class:`GossipDigest`). `source` defaults to the sender's key id (the
    transport checks it is the caller's)."""
    limit = 2 * directory.book.limits.max_records
    if not isinstance(msg.digest, dict) or len(msg.digest) > limit:
        raise BadRequest(f"a gossip digest lists at most {limit} records")
    directory.merge([msg.sender], now, source=source or _sender_key(msg.sender))
    scope = None
    if msg.level >= 0:
        if msg.level > MAX_LEVEL or not isinstance(msg.buckets, list) or any(
                not isinstance(b, int) or not 0 <= b < (1 << msg.level) for b in msg.buckets):
            raise BadRequest("a ranges digest names buckets of its level")
        scope = directory.summary.keys_in(msg.level, set(msg.buckets))
        buckets = set(msg.buckets)
        if any(bucket_of(k, msg.level) not in buckets for k in msg.digest):
            raise BadRequest("a ranges digest lists only keys in its buckets")
    elif msg.root:
        if msg.root == directory.summary.root():
            return GossipReply(records=[], want=[])
        level = level_for(len(directory), directory.recent_changes(now))
        return GossipReply(records=[], want=[], level=level,
                           summary=directory.summary.buckets(level))
    records, cut = directory.delta(msg.digest, now, key_ids=scope, max_bytes=MAX_EXCHANGE_BYTES)
    want, held = directory.wanted(msg.digest, with_held=True)
    return GossipReply(records=records, want=want, held=held, more=cut)


def handle_push(directory: Directory, msg: GossipPush, now: float,
                source: str | None = "?") -> GossipAck:
    """Responder side, second step: take the records we asked for. `source`: the
    caller's key id (a push with no known source shares one limited bucket)."""
    return GossipAck(accepted=len(directory.merge(msg.records, now, source=source)))


def handle_gossip(directory: Directory, msg, now: float, source: str | None = None):
    """Answer any gossip request (for the transport's route). `source`: the
    authenticated caller's key id, which every new record it brings is counted against."""
    if isinstance(msg, GossipDigest):
        return handle_digest(directory, msg, now, source)
    if isinstance(msg, GossipPush):
        return handle_push(directory, msg, now, source or "?")
    raise BadRequest(f"{type(msg).__name__} is not a gossip request")
