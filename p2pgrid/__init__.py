"""p2pgrid: a peer-to-peer network for private machine learning.

    import trio, p2pgrid

    async def main():
        async with p2pgrid.connect("bob") as net:
            hits = await net.search("#birth-records")
            rec = hits["hospital"][0]
            print(await (rec[:, 0].sum() / rec.shape[0]).get())

    trio.run(main)

Without trio (Jupyter, scripts, asyncio programs): ``p2pgrid.connect_sync`` and
``p2pgrid.connect_asyncio`` (see :mod:`p2pgrid.sync`).
"""

from .config import PeerConfig, load_profile
from .errors import (BadRequest, CheatingDetected, Conflict, InsufficientStorage, MalformedMessage,
                     NotFound, P2PError, PayloadTooLarge, PeerUnavailable, PermissionDenied,
                     ProtocolError, RateLimited, ReplayDetected, RequestTimeout, RoundFailed,
                     ShapeError, Unauthenticated, UnknownOp)
from .identity import Identity
from .network import Network, RemotePeer, connect
from .peer import Peer, open_peer
from .pointer import Expr, Pointer
from .store import ObjectMeta, Rules
from .sync import connect_asyncio, connect_sync

__all__ = [
    "connect", "connect_sync", "connect_asyncio", "open_peer", "Network", "RemotePeer", "Peer", "PeerConfig", "load_profile",
    "Pointer", "Expr", "Rules", "ObjectMeta", "Identity",
    "P2PError", "BadRequest", "MalformedMessage", "UnknownOp", "ShapeError", "Unauthenticated",
    "ReplayDetected", "PermissionDenied", "NotFound", "Conflict", "PayloadTooLarge",
    "RateLimited", "PeerUnavailable", "ProtocolError", "RoundFailed", "CheatingDetected",
    "RequestTimeout", "InsufficientStorage",
]
__version__ = "0.1.0"
