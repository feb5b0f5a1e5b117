"""Deterministic in-memory harness: run n parties' protocol generators in lockstep.

No sockets, no threads: each step every party yields its :class:`~.messages.Round`,
the harness checks that the tags agree, delivers every payload to its recipients
and resumes each party with its inbox. It counts rounds, messages and payload bytes
per party (a broadcast to n-1 parties counts n-1 times, as point-to-point links
would carry it), plus the bytes each party received from the dealer.

>>> import torch
>>> from p2pgrid.protocols.smpc import beaver, share_float, reconstruct_float
>>> xs = share_float(torch.tensor([1.5, -2.0]), 2, Prg(bytes(16)))
>>> ys = share_float(torch.tensor([2.0, 0.25]), 2, Prg(bytes(range(16))))
>>> res = run_parties(2, lambda ctx: beaver.mul(ctx, ctx.wrap(xs[ctx.party]),
...                                             ctx.wrap(ys[ctx.party])), seed=1)
>>> reconstruct_float([z.share for z in res.outputs]).round(decimals=3).tolist(), res.stats.rounds
([3.0, -0.5], 1)
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from p2pgrid.errors import ProtocolError

from .dealer import Dealer, LocalDealer, component_shapes
from .messages import Inbox, Request, Round, payload_nbytes
from .preprocessing import DealerFeed, Preprocessing
from .prg import Prg, SEED_BYTES
from .runtime import PartyContext, SmpcConfig

__all__ = ["run_parties", "RunResult", "RunStats", "make_contexts", "plan_requests", "plan_party",
           "ZeroFeed"]


@dataclass
class RunStats:
    rounds: int = 0
    tags: list[str] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)     # payload bytes per party
    messages_sent: list[int] = field(default_factory=list)
    dealer_bytes: list[int] = field(default_factory=list)   # seeds + corrections received
    bytes_by_tag: dict[str, int] = field(default_factory=dict)  # all parties' payload per round tag

    def summary(self) -> dict:
        return {"rounds": self.rounds, "bytes_sent_per_party": list(self.bytes_sent),
                "messages_sent_per_party": list(self.messages_sent),
                "dealer_bytes_per_party": list(self.dealer_bytes)}


@dataclass
class RunResult:
    outputs: list[Any]
    stats: RunStats


def _seed_bytes(seed, label: str) -> bytes:
    return hashlib.sha256(f"p2pgrid-smpc/{label}/{seed!r}".encode()).digest()[:SEED_BYTES]


def make_contexts(n_parties: int, feed: DealerFeed, config: SmpcConfig | None = None,
                  seed=None) -> list[PartyContext]:
    config = config or SmpcConfig()
    return [PartyContext(p, n_parties, feed.for_party(p), config,
                         Prg.from_entropy() if seed is None else Prg(_seed_bytes(seed, f"party{p}")))
            for p in range(n_parties)]


def _advance(gen, inbox: Inbox | None):
    """Resume a party; returns ('round', Round) or ('done', value)."""
    try:
        out = next(gen) if inbox is None else gen.send(inbox)
    except StopIteration as done:
        return "done", done.value
    if not isinstance(out, Round):
        raise ProtocolError(f"a protocol yielded {type(out).__name__}, not a Round")
    return "round", out


def run_parties(n_parties: int, party_fn: Callable[[PartyContext], Any], *,
                dealer: Dealer | None = None, feed: DealerFeed | None = None,
                config: SmpcConfig | None = None, seed=None,
                max_rounds: int = 100_000) -> RunResult:
    """Run ``party_fn(ctx)`` for every party and shuttle their rounds until all return.

    `party_fn` returns a protocol generator (or a plain value for purely local code).
    `seed` (any repr-able value) makes the dealer and the parties' PRGs reproducible;
    give `feed` to reuse prefetched material, or `dealer` to pick the dealer.
    """
    if feed is None:
        dealer = dealer or LocalDealer(None if seed is None else _seed_bytes(seed, "dealer"))
        feed = DealerFeed(dealer, n_parties)
    elif feed.n_parties != n_parties:
        raise ProtocolError("the feed was made for another number of parties")
    dealer_before = list(feed.dealer_bytes)
    ctxs = make_contexts(n_parties, feed, config, seed)
    stats = RunStats(bytes_sent=[0] * n_parties, messages_sent=[0] * n_parties)
    gens = []
    outputs: list[Any] = [None] * n_parties
    state: list[tuple[str, Any]] = []
    for ctx in ctxs:
        g = party_fn(ctx)
        gens.append(g)
        state.append(_advance(g, None) if inspect.isgenerator(g) else ("done", g))
    while True:
        kinds = {k for k, _ in state}
        if kinds == {"done"}:
            break
        if len(kinds) > 1:
            finished = [p for p, (k, _) in enumerate(state) if k == "done"]
            raise ProtocolError(f"parties {finished} finished while others still send "
                                f"(step {stats.rounds}): the parties ran different programs")
        rounds: list[Round] = [r for _, r in state]
        tags = {r.tag for r in rounds}
        if len(tags) != 1:
            raise ProtocolError(f"step {stats.rounds}: parties are at different steps {sorted(tags)}")
        if stats.rounds >= max_rounds:
            raise ProtocolError(f"more than {max_rounds} rounds")
        stats.rounds += 1
        stats.tags.append(rounds[0].tag)
        inboxes: list[Inbox] = [{} for _ in range(n_parties)]
        for p, rnd in enumerate(rounds):
            for to in rnd.direct:
                if not (0 <= to < n_parties) or to == p:
                    raise ProtocolError(f"party {p} addressed a message to party {to}")
            for q in range(n_parties):
                if q == p:
                    continue
                payload = rnd.payload_for(q)
                if payload:
                    inboxes[q][p] = payload
                    stats.bytes_sent[p] += payload_nbytes(payload)
                    stats.bytes_by_tag[rnd.tag] = (stats.bytes_by_tag.get(rnd.tag, 0)
                                                   + payload_nbytes(payload))
                    stats.messages_sent[p] += 1
        state = [_advance(gens[p], inboxes[p]) for p in range(n_parties)]
    for p, (_, value) in enumerate(state):
        outputs[p] = value
    stats.dealer_bytes = [after - before for after, before in zip(feed.dealer_bytes, dealer_before)]
    return RunResult(outputs, stats)


def plan_requests(n_parties: int, party_fn: Callable[[PartyContext], Any], *,
                  config: SmpcConfig | None = None) -> list:
    """The dealer requests `party_fn` makes, in order, found by a dry run in memory.

    Protocol control flow depends on shapes only, never on values, so a dry run on
    dummy shares of the right shapes gives the exact plan a real run will consume.
    """
    feed = DealerFeed(LocalDealer(), n_parties)
    run_parties(n_parties, party_fn, feed=feed, config=config, seed="plan")
    return list(feed.log)


class ZeroFeed(Preprocessing):
    """Records the requests of a dry run and stands in zeros for their material."""

    def __init__(self):
        self.log: list[Request] = []

    def take(self, request: Request) -> dict:
        self.log.append(request)
        return {name: torch.zeros(shape, dtype=torch.int64)
                for name, shape in component_shapes(request)}


def plan_party(party: int, n_parties: int, party_fn: Callable[[PartyContext], Any], *,
               config: SmpcConfig | None = None, max_rounds: int = 100_000) -> list[Request]:
    """The dealer requests one party's program makes, by running that party alone.

    Zeros stand in for dealer material and every other party "answers" each round with
    what this party sent it (same names and shapes), which is exactly what a protocol
    made of broadcast rounds expects. Costs one party's compute; no other party runs.
    """
    feed = ZeroFeed()
    ctx = PartyContext(party, n_parties, feed, config or SmpcConfig(), Prg(bytes(SEED_BYTES)))
    gen = party_fn(ctx)
    if not inspect.isgenerator(gen):
        return feed.log
    kind, out = _advance(gen, None)
    rounds = 0
    while kind == "round":
        rounds += 1
        if rounds > max_rounds:
            raise ProtocolError(f"more than {max_rounds} rounds")
        inbox = {q: out.payload_for(q) for q in range(n_parties) if q != party}
        kind, out = _advance(gen, {q: p for q, p in inbox.items() if p})
    return feed.log
