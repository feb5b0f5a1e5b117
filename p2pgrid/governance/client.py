"""The scientist's and the owner's side: access requests, private releases, budgets.

    req = await rec.request_access(reason="monthly statistics")   # Pointer method
    await req.wait()                  # returns once the owner decides
    if req.approved:
        rows = await rec.get()
    mean = await rec[:, 0].mean().get(epsilon=0.1)                 # Expr.get(epsilon=)
"""

from __future__ import annotations

import math
import os

import torch
import trio

from ..errors import BadRequest, PeerUnavailable
from .messages import (BudgetInfo, BudgetQuery, DecideRequest, ListRequests, PrivateQuery,
                       Release, RequestAccess, RequestInfo, RequestInfos, WaitRequest)

__all__ = ["AccessRequest", "request_access", "request_release", "private_get", "NetworkAPI"]


class AccessRequest:
    """A request filed with a peer's owner. ``status``: pending, approved or denied;
    ``why``: the owner's words with the decision."""

    def __init__(self, net, peer: str, item: dict):
        self._net, self.peer = net, peer
        self._update(item)

    def _update(self, item: dict) -> None:
        self.item = dict(item)
        self.id: str = item["id"]
        self.status: str = item["status"]
        self.why: str = item.get("why", "")
        self.object_id: str = item["object_id"]
        self.epsilon: float | None = item.get("epsilon")

    @property
    def decided(self) -> bool:
        return self.status != "pending"

    @property
    def approved(self) -> bool:
        return self.status == "approved"

    def __repr__(self) -> str:
        what = f"epsilon={self.epsilon:g}" if self.epsilon is not None else "get"
        return f"<AccessRequest {self.id} on {self.peer}/{self.object_id} ({what}): {self.status}>"

    async def refresh(self) -> "AccessRequest":
        reply = await self._net._request(self.peer, WaitRequest(self.id, 0.0))
        self._update(reply.item)
        return self

    async def wait(self, timeout: float | None = None, *, poll: float = 20.0) -> "AccessRequest":
        """Until the owner decides (then returns this request, its ``status`` set).
        Rides out the owner's peer restarting; ``timeout`` (seconds, None: forever)
        raises trio.TooSlowError."""
        with trio.fail_after(math.inf if timeout is None else timeout):
            while not self.decided:
                try:
                    reply = await self._net._request(self.peer, WaitRequest(self.id, poll))
                except PeerUnavailable:
                    await trio.sleep(0.5)  # the owner's peer may be restarting
                    continue
                self._update(reply.item)
        return self


async def request_access(pointer, *, reason: str, epsilon: float | None = None,
                         **options) -> AccessRequest:
    """Ask `pointer`'s owner for ``get`` on it, or (with `epsilon`) for that much more
    privacy budget on it."""
    if options:
        raise BadRequest(f"unknown options {sorted(options)}")
    net = pointer._net
    msg = RequestAccess(pointer.id, reason, None if epsilon is None else float(epsilon))
    reply: RequestInfo = await net._request(pointer.peer, msg)
    return AccessRequest(net, pointer.peer, reply.item)


async def request_release(expr, *, reason: str) -> AccessRequest:
    """Ask the owner of `expr`'s data to approve the release of this exact program's
    result to you (the gate's rule (d)); once approved, ``await expr.get()`` works for
    that program, constants and all, and for nothing else."""
    program = expr.program()
    leaves = [n["obj"] for n in program["nodes"] if n["op"] == "leaf"]
    if not leaves:
        raise BadRequest("the expression reads no stored object")
    net = expr._net
    reply: RequestInfo = await net._request(expr.peer, RequestAccess(leaves[0], reason, None,
                                                                     program))
    return AccessRequest(net, expr.peer, reply.item)


async def private_get(expr, *, epsilon: float, details: bool = False, retries: int = 2):
    """A differentially private release of `expr`, charged to your budget on its
    dataset (see governance/mechanism.py for the queries it takes). A lost reply is
    retried with the same release id, so it is charged once. With ``details=True``
    returns ``(value, info)``: mechanism, sensitivity, noise scale, budget left."""
    release_id = os.urandom(16).hex()
    msg = PrivateQuery(expr.program(), float(epsilon), release_id)
    for attempt in range(retries + 1):
        try:
            reply: Release = await expr._net._request(expr.peer, msg)
            break
        except PeerUnavailable:
            if attempt == retries:
                raise
            await trio.sleep(0.5)
    value = reply.value if isinstance(reply.value, torch.Tensor) else torch.as_tensor(reply.value)
    return (value, reply.info) if details else value


class NetworkAPI:
    """Governance methods of :class:`p2pgrid.network.Network`."""

    async def access_requests(self, peer: str, status: str | None = "pending") -> list[dict]:
        """Requests on `peer`: all of them if you are its owner, else your own."""
        reply: RequestInfos = await self._request(peer, ListRequests(status))
        return reply.items

    async def access_request(self, peer: str, request_id: str) -> AccessRequest:
        reply = await self._request(peer, WaitRequest(request_id, 0.0))
        return AccessRequest(self, peer, reply.item)

    async def decide_request(self, peer: str, request_id: str, *, approve: bool,
                             why: str = "") -> dict:
        """Approve or deny a request (owners only)."""
        reply: RequestInfo = await self._request(peer, DecideRequest(request_id, approve, why))
        return reply.item

    async def privacy_budget(self, peer: str, object_id: str | None = None) -> dict:
        """Your privacy budget on `peer` (and on one of its datasets): each limit that
        applies, and ``remaining``, the tightest."""
        reply: BudgetInfo = await self._request(peer, BudgetQuery(object_id))
        return reply.info

    # Reached from pointers and expressions (p2pgrid.pointer imports no plugin).

    async def _private_get(self, expr, **options):
        return await private_get(expr, **options)

    async def _request_release(self, expr, *, reason: str) -> AccessRequest:
        return await request_release(expr, reason=reason)

    async def _request_access(self, pointer, **options) -> AccessRequest:
        return await request_access(pointer, **options)
