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

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .lazy import lazy_exports


def _checkout_protocols() -> None:
    """In a source checkout the protocol logic is the repository's top-level ``protocols/``
    folder; give it its installed name, ``p2pgrid.protocols`` (a wheel has it in place)."""
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parent / "protocols" / "__init__.py"
    if "p2pgrid.protocols" in sys.modules or (here / "protocols").is_dir() or not src.is_file():
        return
    spec = importlib.util.spec_from_file_location("p2pgrid.protocols", src,
                                                  submodule_search_locations=[str(src.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["protocols"] = module  # as an import of the subpackage would


_checkout_protocols()

# Every public name loads on first use (PEP 562): ``import p2pgrid`` and the CLI's
# parser stay free of torch, numpy, hypercorn and httpx, so ``p2pgrid --help`` answers at once.
_LAZY = {
    "PeerConfig": ".config", "load_profile": ".config",
    **{name: ".errors" for name in (
        "BadRequest", "CheatingDetected", "Conflict", "InsufficientStorage", "MalformedMessage",
        "NotFound", "P2PError", "PayloadTooLarge", "PeerUnavailable", "PermissionDenied",
        "ProtocolError", "RateLimited", "ReplayDetected", "RequestTimeout", "RoundFailed",
        "ShapeError", "Unauthenticated", "UnknownOp")},
    "Identity": ".identity",
    "Network": ".network", "RemotePeer": ".network", "connect": ".network",
    "Peer": ".peer", "open_peer": ".peer",
    "Expr": ".pointer", "Pointer": ".pointer",
    "ObjectMeta": ".store", "Rules": ".store",
    "connect_asyncio": ".sync", "connect_sync": ".sync",
}

if TYPE_CHECKING:
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


# ``import p2pgrid`` used to load most submodules as a side effect; code that relies on
# ``p2pgrid.wire`` and the like after a bare ``import p2pgrid`` keeps working.
__getattr__, __dir__ = lazy_exports(globals(), _LAZY, submodules=True)


__all__ = [
    "connect", "connect_sync", "connect_asyncio", "open_peer", "Network", "RemotePeer", "Peer", "PeerConfig", "load_profile",
    "Pointer", "Expr", "Rules", "ObjectMeta", "Identity",
    "P2PError", "BadRequest", "MalformedMessage", "UnknownOp", "ShapeError", "Unauthenticated",
    "ReplayDetected", "PermissionDenied", "NotFound", "Conflict", "PayloadTooLarge",
    "RateLimited", "PeerUnavailable", "ProtocolError", "RoundFailed", "CheatingDetected",
    "RequestTimeout", "InsufficientStorage",
]
__version__ = "0.1.0"
