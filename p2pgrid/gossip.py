"""The gossip loop: the I/O edge of the directory (trio).

Every ``interval`` (with jitter) a peer re-issues its own record (the heartbeat),
expires dead peers, and runs one push-pull exchange with ``fanout`` random live peers
plus any seed address (from mDNS or ``--join``) it has not yet reached. Digest first,
deltas second (see docs/ARCHITECTURE.md, "Anti-entropy that scales")::

    initiator                                   responder
    GossipDigest(sender=own head, root)  ---->  handle_digest: merge sender
              <----  GossipReply()                  roots equal: done
              <----  GossipReply(level, summary)    else its bucket hashes
    GossipDigest(entries of differing buckets) ->
              <----  GossipReply(records newer than mine, want=[key ids], held)
    merge(records)
    GossipPush(records wanted)        ------->  handle_push: merge
              <-------  GossipAck

A directory of at most FULL_DIGEST records sends its whole digest in the first message
instead, and the root step is skipped.

The transport is injected: ``send(address, msg) -> reply`` raises
:class:`~p2pgrid.errors.PeerUnavailable` when the peer does not answer; a ``send``
that takes a ``key_id`` keyword gets the key of the record we meant to reach, so the
transport pins the exchange to it (a record claiming someone else's address then fails
instead of borrowing their liveness).

Partners are chosen by the directory's address book (:mod:`p2pgrid.addrbook`): part of
every fanout comes from the peers we recently reached ourselves, so records with dead
addresses cannot crowd them out, and each completed exchange we started renews that
protection for the partner's key. The exchanges
of a round run concurrently, each under its own deadline; one bad peer never stops the
loop. :class:`MemoryNetwork` is an in-memory ``send`` for tests and benchmarks.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from . import wire
from .directory import (FULL_DIGEST, MAX_DIGEST_ENTRIES, MAX_EXCHANGE_BYTES, Directory,
                        GossipDigest, GossipPush, GossipReply, PeerRecord, handle_gossip)
from .errors import P2PError, PeerUnavailable

__all__ = ["Send", "RoundStats", "Gossiper", "gossip_once", "gossip_loop", "wait_for",
           "MemoryNetwork"]

log = logging.getLogger("p2pgrid.gossip")

Send = Callable[[str, object], Awaitable[object]]


@dataclass
class RoundStats:
    contacted: int = 0  # exchanges that completed
    failed: int = 0  # unavailable, refused, malformed or timed out
    accepted: int = 0  # records this side accepted from replies
    pushed: int = 0  # records sent because the other side wanted them


def _takes_key_id(send) -> bool:
    try:
        return "key_id" in inspect.signature(send).parameters
    except (TypeError, ValueError):
        return False


class Gossiper:
    """One peer's gossip state (which seeds were reached) and its round."""

    @property
    def send(self) -> Send:
        return self._send

    @send.setter
    def send(self, fn: Send) -> None:
        self._send, self._keyed = fn, _takes_key_id(fn)

    def __init__(self, directory: Directory, send: Send, *, fanout: int = 2,
                 reissue: Callable[[], PeerRecord] | None = None,
                 seeds: Callable[[], Iterable[str]] | None = None,
                 clock: Callable[[], float] = trio.current_time,
                 rng: random.Random | None = None, timeout: float = 1.0):
        self.directory = directory
        self.send = send
        self.fanout = fanout
        self.reissue = reissue
        self.seeds = seeds
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.timeout = timeout
        self.reached_seeds: set[str] = set()

    def targets(self, own: PeerRecord) -> list[str]:
        """Addresses of :meth:`choose`'s partners."""
        return [address for address, _ in self.choose(own)]

    def choose(self, own: PeerRecord) -> list[tuple[str, str | None]]:
        """(address, key id) of `fanout` live peers chosen by the address book (part
        from the protected set), plus (seed, None) for seeds not reached yet.

        When we know no live peer at all (just started, or cut off long enough for
        everyone to expire) every seed counts as not reached, so a partition heals.
        """
        others = self.directory.partners()
        picked = self.directory.book.choose(others, self.fanout, self.clock(), self.rng)
        out = [(self.rng.choice(r.addresses), r.key_id) for r in picked]
        if self.seeds is not None:
            mine = set(own.addresses)
            chosen = {a for a, _ in out}
            for s in self.seeds():
                if s in mine or s in chosen:
                    continue
                if len(others) and s in self.reached_seeds:
                    continue
                out.append((s, None))
                chosen.add(s)
        return out

    async def round(self) -> RoundStats:
        """Heartbeat, expire, then exchange with every target concurrently."""
        own = self.reissue() if self.reissue is not None else self.directory.own
        if own is None:
            raise RuntimeError("the directory has no own record: issue one or pass reissue=")
        self.directory.expire(self.clock())
        stats = RoundStats()
        async with trio.open_nursery() as nursery:
            for address, key_id in self.choose(own):
                nursery.start_soon(self._exchange_within, address, own, stats, key_id)
        return stats

    async def _exchange_within(self, address: str, own: PeerRecord, stats: RoundStats,
                               key_id: str | None = None) -> None:
        ok = False
        with trio.move_on_after(self.timeout) as scope:
            try:
                await self.exchange(address, own, stats, key_id)
                ok = True
            except PeerUnavailable as e:
                log.debug("gossip with %s: unavailable (%s)", address, e.message)
            except OSError as e:  # a transport that let a socket error through
                log.debug("gossip with %s: unavailable (%s)", address, e)
            except P2PError as e:
                log.info("gossip with %s failed: %s %s", address, e.code, e.message)
            except Exception:  # a bug in one exchange must not end the peer's gossip
                log.exception("gossip with %s failed unexpectedly", address)
        if scope.cancelled_caught:
            log.debug("gossip with %s: timed out after %.1fs", address, self.timeout)
        if not ok:
            stats.failed += 1
            if key_id is not None:
                self.directory.book.failed(key_id, self.clock())

    async def _call(self, address: str, msg, key_id: str | None):
        if key_id is not None and self._keyed:
            return await self._send(address, msg, key_id=key_id)
        return await self._send(address, msg)

    async def exchange(self, address: str, own: PeerRecord, stats: RoundStats,
                       key_id: str | None = None) -> None:
        """One push-pull exchange with the peer at `address` (pinned to `key_id`
        when the transport can). Success protects `key_id` (see :mod:`p2pgrid.addrbook`).

        Digest first: a small directory sends its whole digest; a larger one sends the
        root of its :class:`~p2pgrid.summary.RangeSummary`, and if the responder's
        differs, the entries of the buckets that differ (at most MAX_DIGEST_ENTRIES,
        buckets drawn at random so that successive exchanges cover them all). Deltas
        second, each way under MAX_EXCHANGE_BYTES, heads alone where the other side
        holds the content."""
        d = self.directory
        head = own.head()
        if len(d) <= FULL_DIGEST:
            msg = GossipDigest(sender=head, digest=d.digest())
        else:
            msg = GossipDigest(sender=head, digest={}, root=d.summary.root())
        reply = await self._call(address, msg, key_id)
        if not isinstance(reply, GossipReply):
            raise PeerUnavailable(f"{address} answered a digest with {type(reply).__name__}")
        if reply.summary:
            try:
                differ = d.summary.differing(reply.level, reply.summary)
            except ValueError:
                raise PeerUnavailable(f"{address} answered with a malformed summary") from None
            self.rng.shuffle(differ)
            by_bucket = d.summary.keys_by_bucket(reply.level, differ)
            buckets, keys = [], []
            for b in differ:
                mine = by_bucket[b]
                if buckets and len(keys) + len(mine) > MAX_DIGEST_ENTRIES:
                    break
                buckets.append(b)
                keys += mine
            if buckets:
                reply = await self._call(address, GossipDigest(
                    sender=head, digest=d.digest(keys), root=d.summary.root(), level=reply.level,
                    buckets=sorted(buckets)), key_id)
                if not isinstance(reply, GossipReply) or reply.summary:
                    raise PeerUnavailable(f"{address} answered ranges with a summary")
        source = key_id if key_id is not None else address
        stats.accepted += len(d.merge(reply.records, self.clock(), source=source))
        if reply.want:
            records, _ = d.for_push(reply.want, reply.held, self.clock(),
                                    max_bytes=MAX_EXCHANGE_BYTES)
            if records:
                await self._call(address, GossipPush(records=records), key_id)
                stats.pushed += len(records)
        stats.contacted += 1
        self.reached_seeds.add(address)
        if key_id is not None and self._keyed:
            d.book.good(key_id, self.clock())


async def gossip_once(directory: Directory, send: Send, **kwargs) -> RoundStats:
    """One round with fresh state (every seed counts as not reached). See Gossiper."""
    return await Gossiper(directory, send, **kwargs).round()


async def gossip_loop(directory: Directory, send: Send, *, interval: float = 1.0,
                      fanout: int = 2, reissue: Callable[[], PeerRecord] | None = None,
                      seeds: Callable[[], Iterable[str]] | None = None,
                      clock: Callable[[], float] = trio.current_time,
                      rng: random.Random | None = None, timeout: float | None = None,
                      jitter: float = 0.2,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Gossip forever, one round every ``interval * U(1-jitter, 1+jitter)`` seconds.

    Reports started once the first heartbeat is issued (so ``directory.own`` is set).
    ``timeout`` bounds each exchange (default: ``interval``). ``clock`` is the
    directory's clock for liveness; sleeping always uses trio's clock.
    """
    rng = rng if rng is not None else random.Random()
    g = Gossiper(directory, send, fanout=fanout, reissue=reissue, seeds=seeds, clock=clock,
                 rng=rng, timeout=interval if timeout is None else timeout)
    if reissue is not None:
        reissue()
    elif directory.own is None:
        raise RuntimeError("the directory has no own record: issue one or pass reissue=")
    task_status.started()
    while True:
        start = trio.current_time()
        await g.round()
        await trio.sleep_until(start + interval * rng.uniform(1 - jitter, 1 + jitter))


async def wait_for(directories: Directory | Iterable[Directory],
                   predicate: Callable[[], bool]) -> None:
    """Return as soon as `predicate()` is true, re-checking after every change to any
    of `directories`. Put a deadline around it (``trio.fail_after``)."""
    dirs = [directories] if isinstance(directories, Directory) else list(directories)
    while not predicate():
        changed = trio.Event()
        removers = [d.add_listener(lambda kind, records: changed.set()) for d in dirs]
        try:
            await changed.wait()
        finally:
            for remove in removers:
                remove()


class MemoryNetwork:
    """An in-memory ``send`` between directories, for tests and benchmarks.

    ``net.add("a:1", directory)`` makes a directory answer at that address;
    ``net.kill(address)`` makes it unreachable (send raises PeerUnavailable). A send
    pinned to a key id fails unless that key answers there, as TLS pinning would. With
    ``roundtrip=True`` every request and reply goes through wire.encode/decode, so
    the cost is the real one and ``bytes_sent`` counts the bytes.
    """

    def __init__(self, *, clock: Callable[[], float] = trio.current_time,
                 roundtrip: bool = True):
        self.clock = clock
        self.roundtrip = roundtrip
        self.directories: dict[str, Directory] = {}
        self.down: set[str] = set()
        self.bytes_sent = 0
        self.messages = 0

    def add(self, address: str, directory: Directory) -> None:
        self.directories[address] = directory
        self.down.discard(address)

    def kill(self, address: str) -> None:
        self.down.add(address)

    def revive(self, address: str) -> None:
        self.down.discard(address)

    def _carry(self, msg):
        self.messages += 1
        if not self.roundtrip:
            return msg
        data = wire.encode(msg)
        self.bytes_sent += len(data)
        return wire.decode(data)

    async def send(self, address: str, msg, key_id: str | None = None):
        await trio.lowlevel.checkpoint()
        target = self.directories.get(address)
        if target is None or address in self.down:
            raise PeerUnavailable(f"no peer answers at {address}")
        if key_id is not None and target.key_id != key_id:
            raise PeerUnavailable(f"the peer at {address} is not {key_id}")
        reply = handle_gossip(target, self._carry(msg), self.clock())
        await trio.lowlevel.checkpoint()
        return self._carry(reply)
