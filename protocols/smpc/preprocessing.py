"""Party-side access to dealer material, and an in-memory feed that batches it.

Each party's protocol code asks its :class:`Preprocessing` for the next item with
``take(request)``; all parties run the same program, so the k-th request of every
party names the same item (checked: a mismatch is a ProtocolError). A networked
party uses a :class:`MaterialQueue`: before running a protocol it obtains the plan
(the list of :class:`~.messages.Request`, from :func:`~.harness.plan_requests` or a
previous run's ``DealerFeed.log``), fetches that batch of its Materials from the
dealer peer, ``put``s them in the queue, then drives the protocol, which consumes
them synchronously.

:class:`DealerFeed` is the in-memory version: one :class:`~.dealer.Dealer` shared
by all parties of a run. Items are dealt on first request or ahead of time with
:meth:`DealerFeed.prefetch`; :attr:`DealerFeed.log` records the request sequence of
a run, so a workload's offline phase can be replayed in one batch before the next
run (``feed.prefetch(previous.log, expand=True)``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Iterable

import torch

from p2pgrid.errors import ProtocolError

from .dealer import Dealer
from .messages import Material, Request

__all__ = ["Preprocessing", "DealerFeed", "MaterialQueue"]


class Preprocessing(ABC):
    """One party's source of dealer material, consumed strictly in order."""

    @abstractmethod
    def take(self, request: Request) -> dict[str, torch.Tensor]:
        """The next item, expanded to its named component tensors."""


class _Item:
    __slots__ = ("request", "materials", "expanded")

    def __init__(self, request: Request, materials: list[Material]):
        self.request = request
        self.materials: list[Material | None] = list(materials)
        self.expanded: list[dict | None] = [None] * len(materials)


class DealerFeed:
    """Deals items from `dealer` for an `n_parties` run; hands party p its share of each."""

    def __init__(self, dealer: Dealer, n_parties: int):
        self.dealer = dealer
        self.n_parties = n_parties
        self._items: list[_Item] = []
        self._next = [0] * n_parties
        self.log: list[Request] = []          # requests in order of first use
        self.dealer_bytes = [0] * n_parties   # bytes the dealer sent to each party

    def prefetch(self, requests: Iterable[Request], *, expand: bool = False) -> None:
        """Deal `requests` now (the offline phase); with `expand`, pre-expand seeds too."""
        for req in requests:
            item = _Item(req, self.dealer.deal(req, self.n_parties))
            if expand:
                item.expanded = [m.expand() for m in item.materials]
            self._items.append(item)

    def for_party(self, party: int) -> "Preprocessing":
        if not 0 <= party < self.n_parties:
            raise ValueError("party index out of range")
        return _PartyFeed(self, party)

    @property
    def pending(self) -> int:
        """Items dealt but not yet taken by every party."""
        return len(self._items) - min(self._next)

    def _take(self, party: int, request: Request) -> dict[str, torch.Tensor]:
        k = self._next[party]
        if k == len(self._items):
            self.prefetch([request])
        item = self._items[k]
        if item.request != request:
            raise ProtocolError(f"party {party} asked for {request.kind} {request.shapes} "
                                f"but item {k} is {item.request.kind} {item.request.shapes}: "
                                "parties are running different programs")
        if k == len(self.log):
            self.log.append(request)
        mat = item.materials[party]
        if mat is None:
            raise ProtocolError(f"item {k} was already taken by party {party}")
        self.dealer_bytes[party] += mat.nbytes
        out = item.expanded[party] if item.expanded[party] is not None else mat.expand()
        item.materials[party] = None  # consumed: free memory, refuse reuse
        item.expanded[party] = None
        self._next[party] = k + 1
        return out


class _PartyFeed(Preprocessing):
    __slots__ = ("_feed", "_party")

    def __init__(self, feed: DealerFeed, party: int):
        self._feed = feed
        self._party = party

    def take(self, request: Request) -> dict[str, torch.Tensor]:
        return self._feed._take(self._party, request)


class MaterialQueue(Preprocessing):
    """A party's buffer of Materials received from a (remote) dealer, used in order."""

    def __init__(self, party: int):
        self.party = party
        self._queue: deque[tuple[Request, Material]] = deque()
        self.received_bytes = 0

    def put(self, request: Request, material: Material) -> None:
        if material.party != self.party:
            raise ProtocolError(f"material for party {material.party} given to party {self.party}")
        if material.kind != request.kind:
            raise ProtocolError(f"material of kind {material.kind} answers a {request.kind} request")
        self._queue.append((request, material))
        self.received_bytes += material.nbytes

    def __len__(self) -> int:
        return len(self._queue)

    def take(self, request: Request) -> dict[str, torch.Tensor]:
        if not self._queue:
            raise ProtocolError(f"party {self.party}: no dealer material buffered for "
                                f"{request.kind} {request.shapes}; fetch the plan's batch first")
        want, material = self._queue.popleft()
        if want != request:
            raise ProtocolError(f"party {self.party}: next buffered item is {want.kind} "
                                f"{want.shapes}, the protocol asked for {request.kind} {request.shapes}")
        return material.expand()
