"""A multi-peer harness: real peers on 127.0.0.1, real HTTP/2 over TLS, real gossip.

    async with open_network(["hospital", "clinic", "bob"], tmp_path) as grid:
        net = grid.net("bob")
        hits = await net.search("#birth-records")

Peers find each other through ``--join`` seeds (all join the first) and, with
``mdns=True``, through mDNS bound to loopback. The block starts once every
peer's directory holds every other peer.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Iterable

import trio

from .config import PeerConfig
from .network import Network
from .peer import Peer, open_peer
from .router import Router


class Grid:
    """Running peers, each in its own task under the harness's nursery."""

    def __init__(self, nursery: trio.Nursery):
        self._nursery = nursery
        self.peers: dict[str, Peer] = {}
        self.configs: dict[str, PeerConfig] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._done: dict[str, trio.Event] = {}

    def net(self, name: str) -> Network:
        return Network(self.peers[name])

    def __getitem__(self, name: str) -> Peer:
        return self.peers[name]

    async def start(self, config: PeerConfig, routers: Iterable[Router] = ()) -> Peer:
        async def run(task_status=trio.TASK_STATUS_IGNORED):
            done = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    async with open_peer(config, routers=routers) as peer:
                        self._scopes[config.name] = scope
                        self._done[config.name] = done
                        task_status.started(peer)
                        await trio.sleep_forever()
            finally:
                done.set()

        peer = await self._nursery.start(run)
        self.peers[config.name] = peer
        self.configs[config.name] = config
        return peer

    async def stop(self, name: str) -> None:
        """Stop one peer (as if its process ended); the others keep running."""
        self.peers.pop(name)
        self._scopes.pop(name).cancel()
        await self._done.pop(name).wait()

    async def restart(self, name: str, routers: Iterable[Router] = ()) -> Peer:
        await self.stop(name)
        return await self.start(self.configs[name], routers)

    async def wait_converged(self, timeout: float = 20.0) -> None:
        """Until every peer knows every other peer's current record."""
        with trio.fail_after(timeout):
            while True:
                wanted = {p.key_id for p in self.peers.values()}
                if all(wanted <= set(p.directory.digest()) for p in self.peers.values()):
                    return
                await trio.sleep(0.05)

    async def wait_searchable(self, query: str, *, timeout: float = 20.0) -> None:
        """Until `query` matches something in every peer's directory."""
        with trio.fail_after(timeout):
            while not all(any(p.directory.search(query).values()) for p in self.peers.values()):
                await trio.sleep(0.05)


@asynccontextmanager
async def open_network(names: Iterable[str | PeerConfig], tmp_path: Path | str | None = None, *,
                       mdns: bool = False, join: bool = True,
                       gossip_interval: float = 0.2, ttl: float = 5.0,
                       insecure: bool = False, routers: Iterable[Router] = (),
                       timeout: float = 30.0, strangers_store: bool = True,
                       guest_address_share: float | None = 1.0
                       ) -> AsyncIterator[Grid]:
    """Start the named peers (or configs), wait for their directories to agree, yield a Grid.

    ``strangers_store`` sets each peer's owner setting ``store_objects`` to "anyone", so
    that unregistered users of a test network may send tensors to its peers (a real
    peer's default is registered users only).

    ``guest_address_share`` sets each peer's ``guest_address_share``: every peer of a
    test network dials from one address (loopback), so by default one address may take
    all of each pool unregistered callers share, as each user of the network would from
    an address of its own (a real peer's default is half); None keeps each config's.

    Peers find each other by joining the first one (``join=True``) and/or by mDNS
    bound to 127.0.0.1 (``mdns=True``); with ``join=False, mdns=True`` discovery is
    mDNS alone."""
    routers = tuple(routers)
    with tempfile.TemporaryDirectory(prefix="p2pgrid-") as tmp:
        root = Path(tmp_path or tmp)
        async with trio.open_nursery() as nursery:
            grid = Grid(nursery)
            seed = None
            for item in names:
                cfg = item if isinstance(item, PeerConfig) else PeerConfig(name=item)
                cfg = PeerConfig(**{**cfg.__dict__,
                                    "data_dir": cfg.data_dir if isinstance(item, PeerConfig)
                                    else root / cfg.name,
                                    "mdns": mdns, "mdns_interfaces": ("127.0.0.1",),
                                    "gossip_interval": gossip_interval, "ttl": ttl,
                                    "insecure": insecure,
                                    "guest_address_share": cfg.guest_address_share
                                    if guest_address_share is None else guest_address_share,
                                    "join": tuple(cfg.join) + ((seed,) if seed and join else ())})
                peer = await grid.start(cfg, routers)
                if strangers_store:
                    from .governance import policy
                    policy.of(peer).store.set_setting("store_objects", "anyone", by="test network")
                seed = seed or f"{peer.key_id}@{peer.address}"
            await grid.wait_converged(timeout)
            try:
                yield grid
            finally:
                nursery.cancel_scope.cancel()


def member_config(name: str, root: Path | str, network, *, days: float = 1.0,
                  **options) -> PeerConfig:
    """A config for peer `name` (data in ``root/name``) certified by the network key
    `network` (an Identity): its identity is created now so that the certificate can
    name its key. Pass the result to :func:`open_network` like any config."""
    from . import membership
    from .identity import Identity

    data = Path(root) / name
    ident = Identity.load_or_create(data / "identity.key")
    cert = membership.issue(network, name, ident.public_bytes, days=days, now=time.time())
    path = data / "member.cert"
    membership.write_certificate(path, cert)
    return PeerConfig(name=name, data_dir=data, network_key=network.public_bytes.hex(),
                      cert=path, **options)
