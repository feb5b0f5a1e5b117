"""Encrypted serving on :mod:`p2pgrid.smpc`: the owner's weights are secret-shared among
parties, the caller shares its input among the same parties, they compute, and only the
caller reconstructs the output.

The serving layer adds the catalog entry (flags, policy summary, parties, dealer), the
caller-side input checks (the policy's shape, dtype, range and batch: only the caller
can check values it alone can see) and the cleanup of input shares. Who may call, how
often and how many rows is enforced by every party (the policy's ``users`` become the
smpc model's users, its ``rate_limit``, ``quota`` and ``max_batch`` the model's limits):
each party sees every call, so their counts agree. Supported models are what :mod:`p2pgrid.smpc` evaluates:
``nn.Sequential`` of Linear, ReLU and Flatten.
"""

from __future__ import annotations

from typing import Sequence

import torch
import trio
from torch import nn

from ..errors import BadRequest, P2PError
from .catalog import find
from .host import Terms
from .policy import Policy

SMPC_SERVICE_KEY = "smpc-models"  # where p2pgrid.smpc announces published models


async def encrypt(net, model: nn.Module, name: str, terms: Terms, *, replicas: int,
                  parties: Sequence[str] | None, dealer: str | None, frac_bits: int):
    """Share the model's weights among `parties` through p2pgrid.smpc; return its handle."""
    if not hasattr(net, "encrypt_model"):
        raise BadRequest("encrypted serving needs the p2pgrid.smpc plugin, which this peer "
                         "does not load")
    if isinstance(parties, str) or not parties or len(set(parties)) < 2 or not dealer:
        raise BadRequest("mpc=True needs parties=[two or more peers] and dealer=<a crypto "
                         "provider>")
    if terms.allow_download or terms.allow_remote_inference:
        raise BadRequest("a model served with mpc=True is served encrypted only: "
                         "allow_download and allow_remote_inference must be False")
    if replicas:
        raise BadRequest("an encrypted model's parties already hold it: replicas must be 0")
    policy = terms.policy
    limits = {"rate_limit": policy.rate_limit, "quota": policy.quota,
              "max_batch": policy.max_batch}
    return await net.encrypt_model(model, parties=list(parties), dealer=dealer,
                                   users=("*",) if policy.users is None else policy.users,
                                   name=name, publish=True, frac_bits=frac_bits, limits=limits)


def summary(handle) -> dict:
    """What the catalog says about an encrypted model."""
    return {"id": handle.id, "parties": list(handle.parties), "dealer": handle.dealer,
            "frac_bits": handle.group.frac_bits}


async def forget(net, handle) -> None:
    """Delete the weights' shares on the parties and stop announcing the model."""
    with trio.move_on_after(30):
        for p in handle.parameters():
            try:
                await p.delete()
            except P2PError:
                pass
    peer = net._peer
    models = dict(peer.services.get(SMPC_SERVICE_KEY) or {})
    if models.pop(handle.id, None) is not None:
        peer.services[SMPC_SERVICE_KEY] = models
        peer.reissue()


async def infer(net, name: str, x: torch.Tensor, *, owner: str | None, timeout: float
                ) -> torch.Tensor:
    info = find(net._peer.directory, name, owner)
    if not info.mpc:
        raise BadRequest(f"{info.owner}/{info.name} is not served encrypted: use run_inference",
                         model=info.name)
    policy = Policy.from_dict(info.policy)
    model = f"{info.owner}/{info.name}"
    policy.check_caller(net.name, info.owner, model)  # the parties check it too
    policy.check_meta(x)
    await trio.to_thread.run_sync(policy.check_values, x)
    if not hasattr(net, "encrypted_model"):
        raise BadRequest("encrypted inference needs the p2pgrid.smpc plugin")
    handle = await net.encrypted_model(info.owner, info.name)
    # the input's shares travel with the call and are dropped after it
    y = await handle.predict(x.detach().to(torch.float64), timeout=timeout)
    return y.to(x.dtype) if x.dtype.is_floating_point else y
