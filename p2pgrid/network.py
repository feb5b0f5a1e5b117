"""What a data scientist holds: a running peer of their own, seen as the network.

    async with p2pgrid.connect("bob") as net:
        hits = await net.search("#birth-records")
        rec = hits["hospital"][0]
        avg = await (rec[:, 0].sum() / rec.shape[0]).get()
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable

import torch
import trio

from .config import PeerConfig
from .display import dtype_name, table
from .errors import NotFound, PeerUnavailable
from .messages import (DeleteObject, DescribeObject, Execute, GetObject, ListObjects, ObjectInfo,
                       Ping, PutObject, Value)
from .peer import Peer, open_peer
from .pointer import Pointer
from .store import Rules

log = logging.getLogger("p2pgrid.network")


class SearchResult(dict):
    """What :meth:`Network.search` returns: {peer name: [Pointer, ...]}, a dict that
    displays as a table in a notebook."""

    def _repr_html_(self) -> str:
        return table(["peer", "id", "shape", "dtype", "tags", "description"],
                     [[peer, p.id, tuple(p.shape), dtype_name(p.dtype),
                       " ".join("#" + t for t in p.tags), p.description]
                      for peer, ptrs in self.items() for p in ptrs],
                     caption=f"{sum(map(len, self.values()))} object(s) on {len(self)} peer(s)")


class _NetworkCore:
    """The network as seen from one peer. Get one from :func:`connect`."""

    def __init__(self, peer: Peer):
        self._peer = peer

    @property
    def me(self) -> Peer:
        return self._peer

    @property
    def name(self) -> str:
        return self._peer.name

    def peers(self) -> list[str]:
        """Names of the live peers in the directory, this one included."""
        return sorted(self._peer.directory.label(r) for r in self._peer.directory.peers())

    async def wait_for_peers(self, names: Iterable[str] | int, *, timeout: float = 30.0) -> None:
        """Wait until the directory knows these peers (or this many others)."""
        def ready():
            known = set(self.peers()) - {self.name}
            return len(known) >= names if isinstance(names, int) else set(names) <= known
        with trio.fail_after(timeout):
            while not ready():
                await trio.sleep(0.05)

    async def search(self, query: str | Iterable[str], *, wait: float = 0.0) -> dict[str, list[Pointer]]:
        """Pointers to published objects having all the tags, by peer name.

        Answers from the local directory; with ``wait`` > 0 it keeps looking for
        up to that many seconds while nothing matches.
        """
        deadline = time.monotonic() + wait
        while True:
            found = self._peer.directory.search(query)
            if any(found.values()) or time.monotonic() >= deadline:
                return SearchResult({peer: [Pointer(self, peer, _summary_meta(s)) for s in items]
                                     for peer, items in found.items() if items})
            await trio.sleep(0.05)

    async def publish(self, tensor: torch.Tensor, *, tags: Iterable[str], description: str = "",
                      compute: Iterable[str] = (), get: Iterable[str] = (),
                      aggregate: Iterable[str] = (), min_rows: int | None = None,
                      bounds=None, epsilon: float | None = None) -> Pointer:
        """Publish data on this peer. `compute`: who may run programs on it; `get`: who
        may download it (and results derived only from what they may get); `aggregate`:
        who may download exact aggregates (of the forms p2pgrid.release verifies) over at
        least `min_rows` records; names with `compute` only get DP releases, under their
        privacy budget, once `bounds` (per-column [lo, hi]) are declared. "*" means anyone."""
        if not self._peer.config.listen:
            log.warning("%s does not listen: other peers cannot reach what it publishes (use "
                        "connect(..., listen=True) or `p2pgrid peer` to serve data)", self.name)
        meta = await self._peer.publish(tensor, tags=tags, description=description, compute=compute,
                                        get=get, aggregate=aggregate, min_rows=min_rows,
                                        bounds=bounds, epsilon=epsilon)
        return Pointer(self, self.name, _with_peer(meta.to_dict(), self.name))

    def peer(self, name: str) -> "RemotePeer":
        return RemotePeer(self, name)

    # ------------------------------------------------------------ used by pointers

    async def _request(self, peer: str, msg):
        return await self._peer.request(peer, msg)

    async def _execute(self, peer: str, program: dict, *, fetch: bool, tags=(), description=""):
        reply = await self._request(peer, Execute(program, fetch, list(tags), description))
        if fetch:
            return _tensor(reply)
        return Pointer(self, peer, reply.meta)

    async def _get(self, peer: str, id: str) -> torch.Tensor:
        return _tensor(await self._request(peer, GetObject(id)))

    async def _delete(self, peer: str, id: str) -> None:
        await self._request(peer, DeleteObject(id))

    async def _describe(self, peer: str, id: str) -> dict:
        return (await self._request(peer, DescribeObject(id))).meta


from . import plugins as _plugins  # noqa: E402  (mixins need _NetworkCore defined)


class Network(*_plugins.network_mixins(), _NetworkCore):
    """The network as seen from one peer: search, publish, remote compute, and every
    plugin's API (secret sharing, federated learning, serving, governance)."""


class RemotePeer:
    """A named peer: send it tensors, list its objects, ping it."""

    def __init__(self, net: Network, name: str):
        self._net, self.name = net, name

    async def send(self, tensor: torch.Tensor, *, tags: Iterable[str] = (), description: str = "",
                   compute: Iterable[str] | None = None, get: Iterable[str] | None = None) -> Pointer:
        """Store `tensor` on this peer, owned by you (PySyft's ``x.send(worker)``)."""
        rules = None
        if compute is not None or get is not None:
            compute = tuple(compute or ())
            rules = Rules(compute=compute, get=tuple(get or ())).to_dict()
        reply: ObjectInfo = await self._net._request(
            self.name, PutObject(tensor, list(tags), description, rules))
        return Pointer(self._net, self.name, reply.meta)

    async def objects(self, tags: Iterable[str] = ()) -> list[Pointer]:
        reply = await self._net._request(self.name, ListObjects(list(tags)))
        return [Pointer(self._net, self.name, m) for m in reply.items]

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        t0 = time.perf_counter()
        await self._net._request(self.name, Ping())
        return time.perf_counter() - t0


def _tensor(reply) -> torch.Tensor:
    if not isinstance(reply, Value) or not isinstance(reply.value, torch.Tensor):
        raise PeerUnavailable("peer answered with something other than a tensor")
    return reply.value


def _summary_meta(s) -> dict:
    return {"id": s.id, "tags": list(s.tags), "description": s.description, "shape": list(s.shape),
            "dtype": s.dtype, "owner": s.owner, "level": s.level, "columns": list(s.columns)}


def _with_peer(meta: dict, peer: str) -> dict:
    return dict(meta, peer=peer)


@asynccontextmanager
async def connect(name: str, *, join: Iterable[str] = (), data_dir=None, mdns: bool = True,
                  interfaces: Iterable[str] | None = None, insecure: bool = False,
                  listen: bool | None = None, host: str | None = None, port: int = 0,
                  wait: float = 10.0, **options) -> AsyncIterator[Network]:
    """Start your own peer named `name`, join the network, and yield it as a Network.

    Peers are found by mDNS (on `interfaces`, default all) and by `join` seeds
    ("host:port" or "KEYID@host:port"). Waits up to `wait` seconds for a first
    other peer to appear when there is any way to find one.

    By default your peer does not listen: it opens no port and only dials out, and
    every reply comes back on the connections it opened, so it works behind NAT and
    firewalls (search, compute, federated training, SMPC, model downloads). Pass
    ``listen=True`` (with `host`, `port`) for a peer others must reach: one that
    serves data, models or SMPC shares; giving `host` or `port` implies it.
    """
    if listen is None:   # a script that names where to listen means to be reached there
        listen = host is not None or port != 0
    host = host or "127.0.0.1"
    config = PeerConfig(name=name, data_dir=data_dir, host=host, port=port, insecure=insecure,
                        join=tuple(join), mdns=mdns, listen=listen,
                        mdns_interfaces=tuple(interfaces) if interfaces else None, **options)
    async with open_peer(config) as peer:
        net = Network(peer)
        if wait and (config.join or mdns):
            with trio.move_on_after(wait):
                await net.wait_for_peers(1, timeout=wait)
        yield net


__all__ = ["Network", "RemotePeer", "SearchResult", "connect", "NotFound"]
