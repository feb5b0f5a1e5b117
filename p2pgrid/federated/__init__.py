"""Federated learning over p2pgrid peers (plugin; see docs/FEDERATED.md).

    from p2pgrid.federated import SGD, ClientDP, FedAvg

    async with p2pgrid.connect("ai-company") as net:
        result = await net.federated_fit(model, data="#mnist #train", rounds=10,
                                         optimizer=SGD(lr=0.05), strategy=FedAvg(min_peers=2),
                                         secure_aggregation=True, dp=ClientDP(clip=1.0),
                                         evaluate="#mnist #test")

Data owners publish an ``#x``/``#y`` pair (``net.federated_publish``) and keep
control: the compute right decides who may train on it, an epsilon cap bounds
what it may spend, and only model updates leave their peer.

This module is imported while ``p2pgrid`` itself initialises (the Network class mixes
in :class:`NetworkAPI`), and ``p2pgrid.protocols.*`` import ``p2pgrid``: so nothing here
imports ``p2pgrid.protocols`` at import time. The handlers (``router``), the strategies and
the other names below load on first use.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import trio

from ..lazy import lazy_exports
from .cli import add_cli

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SGD", "Adam", "ClientDP", "LocalDP", "FedAvg", "FedProx", "FedAdam", "FedMedian", "DPFedAvg",
           "Strategy",
           "FitResult", "RoundRecord", "FitEvent", "PrivacyBudgetExceeded", "NetworkAPI", "router",
           "service", "add_cli", "save_model", "load_model", "state_of"]

# torch-free at import: ``p2pgrid --help`` imports this package for its ``cli`` submodule.
_LAZY = {"NetworkAPI": ".api",
         **{n: ".options" for n in ("SGD", "Adam", "ClientDP", "FitEvent", "FitResult", "LocalDP",
                                    "RoundRecord")},
         "router": ".owner", "state_of": ".owner", "PrivacyBudgetExceeded": ".ledger",
         **{name: "p2pgrid.protocols.fedavg" for name in (
             "FedAvg", "FedProx", "FedAdam", "DPFedAvg", "Strategy", "FedMedian")}}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


async def service(peer, task_status=trio.TASK_STATUS_IGNORED):
    """Load the privacy ledger at start-up, warm the training loop up in the background
    (torch loads parts of itself on the first optimizer step: seconds, once per process),
    then drop stale secure-aggregation sessions now and then."""
    from .owner import state_of, warm_up

    state = state_of(peer)
    task_status.started()
    await trio.to_thread.run_sync(warm_up, abandon_on_cancel=True)
    while True:
        await trio.sleep(60)
        state.prune()


def save_model(model: nn.Module, path: Path | str) -> None:
    """Write `model` as a p2pgrid model spec (CBOR: whitelisted layers, ops and weights)."""
    from .. import wire
    from ..modelgraph import export_model
    Path(path).write_bytes(wire.dumps(export_model(model)))


def load_model(path: Path | str) -> nn.Module:
    """Read a model spec written by :func:`save_model`; checked against the whitelist."""
    from .. import wire
    from ..modelgraph import import_model
    return import_model(wire.loads(Path(path).read_bytes()))
