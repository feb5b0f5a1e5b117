"""SMPC over the network: secret-shared tensors among peers, a crypto-provider dealer.

    async with p2pgrid.connect("ai-company") as net:
        x = await hits["hospital"][0].share("hospital", "clinic", dealer="university")
        w = await net.share(torch.randn(784, 128), parties=["hospital", "clinic"],
                            dealer="university")
        y = (x @ w).relu()                 # lazy
        out = await y.reveal()             # runs the rounds; reconstructed here, if allowed
        model = await net.encrypt_model(Net(), parties=[...], dealer="university",
                                        requires_grad=True)
        opt = p2pgrid.smpc.SGD(model, lr=0.1)
        loss = await model.fit_batch(xb, yb, loss="mse", optimizer=opt)

``security="active"`` on ``share``/``pointer.share``/``encrypt_model`` runs everything on
MAC-checked shares: a party that deviates makes the computation fail with
``CheatingDetected`` instead of giving a wrong result (:mod:`.active`, docs/SMPC.md).

The protocols (fixed point in Z_2^64, Beaver products, truncation, comparison, the
layers) live sans-IO in :mod:`p2pgrid.protocols.smpc`; this package carries their rounds
between peers (one ``peer.request`` per pair of parties per round), runs the
crypto provider's dealer service, keeps each party's shares, and checks who may
compute on and reconstruct what. See docs/SMPC.md for the threat model.

Plugin parts: :data:`router`, :func:`service` (every peer: share store, sessions,
and the dealer on peers with the ``crypto-provider`` role), :class:`NetworkAPI`.
"""

from __future__ import annotations

import time

import trio

from .api import NetworkAPI, make_group, share_pointer
from .dealer import ROLE, DealerService
from .handlers import router, state_of
from .model import SGD, EncryptedModel
from .state import Group, ShareRules, SmpcState
from .tensor import PrivateLoader, SharedTensor, cat, reveal, stack

__all__ = ["router", "service", "NetworkAPI", "share_pointer", "SharedTensor", "cat", "stack", "reveal",
           "EncryptedModel", "SGD", "PrivateLoader", "Group", "ShareRules", "make_group", "state_of", "ROLE"]

SWEEP_INTERVAL = 5.0


async def service(peer, task_status=trio.TASK_STATUS_IGNORED):
    """Every peer's SMPC state; a dealer too on crypto providers. Lives as long as the peer."""
    async with trio.open_nursery() as nursery:
        state = SmpcState(nursery)
        if ROLE in peer.config.roles:
            state.dealer = DealerService(peer, nursery)
        peer.extensions["smpc"] = state
        peer.push_listeners.append(state.peer_broke)
        task_status.started()
        try:
            while True:
                await trio.sleep(SWEEP_INTERVAL)
                state.sweep(time.monotonic(), time.time())
                if state.dealer is not None:
                    state.dealer.sweep(time.monotonic())
        finally:
            peer.extensions.pop("smpc", None)
            peer.push_listeners.remove(state.peer_broke)
            nursery.cancel_scope.cancel()
