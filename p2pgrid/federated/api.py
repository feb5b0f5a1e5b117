"""Federated learning as methods of :class:`p2pgrid.network.Network`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
from torch import nn

from ..errors import BadRequest
from .data import ROLE_X, ROLE_Y, query_tags
from .options import SGD, ClientDP, FitEvent, FitResult, LocalDP, optimizer_config

# protocols.* import p2pgrid, which imports this module while it initialises: the
# modules that need protocols load inside the methods (see the package docstring).

__all__ = ["NetworkAPI"]


def _split_dp(dp) -> tuple[ClientDP | None, LocalDP | None]:
    items = [] if dp is None else list(dp) if isinstance(dp, (list, tuple)) else [dp]
    client = [d for d in items if isinstance(d, ClientDP)]
    local = [d for d in items if isinstance(d, LocalDP)]
    if len(client) + len(local) != len(items) or len(client) > 1 or len(local) > 1:
        raise BadRequest("dp must be ClientDP(...), LocalDP(...), or one of each")
    return (client[0] if client else None), (local[0] if local else None)


class NetworkAPI:
    """Federated training over the network's data owners (mixed into Network)."""

    async def federated_fit(
            self, model: nn.Module, data: str, *, rounds: int = 10, local_epochs: int = 1,
            batch_size: int = 32, optimizer: Any = SGD(lr=0.05), loss: str = "cross_entropy",
            strategy=None, secure_aggregation: bool = False,
            dp: ClientDP | LocalDP | Sequence | None = None,
            evaluate: str | tuple[torch.Tensor, torch.Tensor] | None = None, evaluate_every: int = 1,
            resume: bool = False, job: str | None = None, seed: int = 0, progress: bool = True,
            on_event: Callable[[FitEvent], Any] | None = None,
            discover_timeout: float = 10.0, clip_grad_norm: float | None = None,
            wait_for: Sequence[str] | int | None = None, wait_timeout: float = 60.0) -> FitResult:
        """Train `model` on every peer whose published data matches `data`, FedAvg-style.

        `data` is a tag query ("#mnist #train"): each matching peer holds an ``#x`` and a
        ``#y`` object with those tags (see :meth:`federated_publish`) and must give you
        the compute right on both. Each round the global model travels to the sampled
        peers as a checked op graph plus weights; each trains it with its own loop
        (`local_epochs`, `batch_size`, `optimizer`, `loss`) and sends back an update.

        `strategy`: FedAvg (default ``FedAvg(min_peers=2, round_timeout=60)``), FedProx or
        FedAdam; a round closes when every sampled peer answered or at `round_timeout`,
        and fails (ProtocolError naming every failure) with fewer than `min_peers`
        updates. `secure_aggregation`: only the sum of the updates is ever unmasked
        (Bonawitz et al. with double masking; keys signed with peers' identities).
        `dp`: ``ClientDP(...)`` (client-level DP-FedAvg; ``history[i].epsilon``) and/or
        ``LocalDP(...)`` (per-example DP-SGD on each peer; ``history[i].local_epsilon``).
        `evaluate`: a tag query for held-out data on peers, or an ``(x, y)`` pair held here.
        The coordinator checkpoints every round in its data dir under `job` (default:
        derived from the model's structure and `data`); ``resume=True`` continues from
        the checkpoint. `on_event` is called with each :class:`FitEvent`. A round that
        sees fewer than `min_peers` data holders in the directory waits up to
        `discover_timeout` seconds for gossip to bring more. `wait_for` (peer names, or a
        number of data holders) makes round 1 wait up to `wait_timeout` seconds until those
        are visible, so a run launched as peers start does not begin short-handed; each
        round's ``unused`` names every peer holding matching data that the round did not
        use, and why. `clip_grad_norm` clips each local step's gradient to that L2 norm
        (``torch.nn.utils.clip_grad_norm_``; e.g. 5 for an LSTM).
        """
        from p2pgrid.protocols.fedavg import DPFedAvg, FedAvg

        from ..modelgraph import export_model
        from .checkpoint import Checkpoints, check_job
        from .coordinator import Coordinator, PeerLink, Plan, job_id, structure_of

        strategy = strategy if strategy is not None else FedAvg(min_peers=2, round_timeout=60)
        client_dp, local_dp = _split_dp(dp)
        if isinstance(strategy, DPFedAvg) and client_dp is None:
            client_dp = ClientDP(clip=strategy.clip, noise_multiplier=strategy.noise_multiplier)
        if not isinstance(data, str) or not query_tags(data):
            raise BadRequest("data must be a tag query such as '#mnist #train'")
        if not isinstance(model, nn.Module):
            raise BadRequest("model must be a torch.nn.Module")
        from ..torchscript import from_torchscript
        model = from_torchscript(model)   # traced/scripted: rebuilt from whitelisted layers
        structure = structure_of(export_model(model))
        job = check_job(job) if job is not None else job_id(structure, data)
        plan = Plan(job=job, data=data, rounds=rounds, strategy=strategy, local_epochs=local_epochs,
                    batch_size=batch_size, optimizer=optimizer_config(optimizer), loss=loss,
                    secure=bool(secure_aggregation), client_dp=client_dp, local_dp=local_dp,
                    evaluate=evaluate, evaluate_every=evaluate_every, seed=seed,
                    discover_timeout=discover_timeout, clip_grad_norm=clip_grad_norm,
                    wait_for=wait_for, wait_timeout=wait_timeout)
        checkpoints = Checkpoints(self._peer.config.data_dir / "federated" / "jobs")
        coordinator = Coordinator(PeerLink(self._peer), plan, model, checkpoints=checkpoints,
                                  resume=resume, progress=progress, on_event=on_event)
        from .owner import state_of
        # the peer's page draws this run's curves from its live history
        state_of(self._peer).runs[plan.job] = {"job": plan.job, "history": coordinator.history}
        return await coordinator.run()

    async def federated_publish(self, x: torch.Tensor, y: torch.Tensor, *, tags: Iterable[str],
                                compute: Iterable[str] = (), description: str = "",
                                epsilon_cap: float | None = None, delta: float = 1e-5):
        """Publish a training set on this peer as the ``#x``/``#y`` pair federated_fit finds.

        `compute` names who may train on it (and nobody may download it). With
        `epsilon_cap`, training on it needs differential privacy and stops once the
        epsilon spent (at `delta`) would pass the cap. Returns (x pointer, y pointer).
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or not x.dim() \
                or not y.dim() or len(x) != len(y):
            raise BadRequest("x and y must be tensors with the same first dimension")
        tags = tags.split() if isinstance(tags, str) else list(tags)
        tags = [t for t in tags if t.strip("# ").lower() not in (ROLE_X, ROLE_Y)]
        if not query_tags(tags):
            raise BadRequest("give at least one tag (besides x/y)")
        compute = list(compute)
        px = await self.publish(x, tags=[*tags, ROLE_X], description=description or "features",
                                compute=compute, get=(), aggregate=())
        py = await self.publish(y, tags=[*tags, ROLE_Y], description=description or "labels",
                                compute=compute, get=(), aggregate=())
        if epsilon_cap is not None:
            await self.federated_privacy_cap(epsilon_cap, delta=delta, objects=[px.id, py.id])
        return px, py

    async def federated_privacy_cap(self, epsilon: float | None, *, delta: float = 1e-5,
                                    objects: Iterable | None = None,
                                    trust_client_dp: bool | None = None) -> None:
        """Cap the epsilon (at `delta`) federated training may spend on `objects` (pointers
        or ids; default: every object of this peer). None lifts the cap. With
        ``trust_client_dp=False`` only per-example DP-SGD on this peer counts."""
        import trio

        from .owner import state_of

        ids = None if objects is None else [getattr(o, "id", o) for o in objects]
        ledger = state_of(self._peer).ledger
        await trio.to_thread.run_sync(lambda: ledger.set_cap(
            epsilon, delta=delta, objects=ids, trust_client_dp=trust_client_dp))

    def federated_privacy_spent(self, objects: Iterable | None = None) -> dict[str, dict]:
        """{object id: {"cap", "delta", "spent", "releases"}} from this peer's ledger."""
        from .owner import state_of

        ids = None if objects is None else [getattr(o, "id", o) for o in objects]
        return state_of(self._peer).ledger.report(ids)
