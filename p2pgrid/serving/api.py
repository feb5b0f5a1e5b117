"""Model serving as methods of :class:`p2pgrid.network.Network`.

    await net.serve_model(model, "digits", policy=Policy(...), replicas=2)
    y = await net.run_inference("digits", x)
    lm = await net.download_model("tiny-gpt")
    await net.serve_model(mlp, "digits-encrypted", mpc=True, parties=["hospital", "clinic"],
                          dealer="university")
    y = await net.run_encrypted_inference("digits-encrypted", x)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import trio
from torch import nn

from ..errors import BadRequest
from . import client, encrypted as encrypted_serving, owner
from .catalog import ModelInfo, catalog, find
from .host import HostingPolicy, Serving, Terms, state
from .policy import Policy
from .transfer import TransferReport


class NetworkAPI:
    """Serve models, run inference on served ones, download the downloadable ones."""

    def _serving(self) -> Serving:
        return state(self._peer)

    async def serve_model(self, model: nn.Module, name: str, *, allow_download: bool = False,
                          allow_remote_inference: bool | None = None, policy: Policy | None = None,
                          replicas: int = 0, hosts: Iterable[str] | None = None,
                          description: str = "", mpc: bool = False,
                          parties: Sequence[str] | None = None, dealer: str | None = None,
                          frac_bits: int = 16) -> ModelInfo:
        """Serve `model` under `name` from this peer, announced in the directory.

        ``allow_download``: anyone allowed by the policy's ``users`` may fetch the weights
        (otherwise only this owner can, through any API). ``allow_remote_inference``
        (default: True, False with ``mpc``): allowed users may run it on their inputs.
        ``policy``: input checks, rate limit, quota and users (see :class:`Policy`).
        ``replicas``: copies placed on other peers that agree to host them (``hosts`` to
        name them); replica hosts hold the weights, to compute. ``mpc=True``: encrypted
        serving: the weights are secret-shared among ``parties`` (``dealer``: a crypto
        provider) through :mod:`p2pgrid.smpc`; callers use :meth:`run_encrypted_inference`.
        Serving a name again replaces the model. The module is served as is (put in eval
        mode): do not change it while it is served.
        """
        if allow_remote_inference is None:
            allow_remote_inference = not mpc
        from ..torchscript import from_torchscript
        model = from_torchscript(model)   # traced/scripted: rebuilt from whitelisted layers
        policy = policy or Policy()
        terms = Terms(allow_download, allow_remote_inference, policy, description)
        s = self._serving()
        encrypted = None
        if mpc:
            encrypted = await encrypted_serving.encrypt(self, model, name, terms, replicas=replicas,
                                                        parties=parties, dealer=dealer,
                                                        frac_bits=frac_bits)
        elif parties is not None or dealer is not None:
            raise BadRequest("parties and dealer are for encrypted serving: pass mpc=True")
        try:
            hm = await owner.serve(s, model, name, terms, replicas=replicas,
                                   hosts=None if hosts is None else list(hosts),
                                   mpc=None if encrypted is None else encrypted_serving.summary(encrypted))
        except BaseException:
            if encrypted is not None:
                with trio.CancelScope(shield=True):
                    await encrypted_serving.forget(self, encrypted)
            raise
        hm.encrypted = encrypted
        return self._info(hm.name, hm.owner)

    async def run_encrypted_inference(self, name: str, x: torch.Tensor, *,
                                      owner: str | None = None, timeout: float = 120.0
                                      ) -> torch.Tensor:
        """The output of a model served with ``mpc=True`` on `x`, computed by its parties
        on secret shares: `x` is shared from here, only this peer reconstructs the output
        (within fixed-point precision), and no party sees `x`, the output or the weights."""
        return await encrypted_serving.infer(self, name, x, owner=owner, timeout=timeout)

    async def unserve_model(self, name: str) -> None:
        """Stop serving a model of ours, here and on its replicas (or its parties)."""
        s = self._serving()
        hm = s.models.get((self.name, name))
        await owner.unserve(s, name)
        if hm is not None and hm.encrypted is not None:
            await encrypted_serving.forget(self, hm.encrypted)

    async def replicate_model(self, name: str, *, count: int = 1, hosts: Iterable[str] | None = None,
                              on_chunk=None) -> list[TransferReport]:
        """Place more replicas of a model we serve (resuming any upload that broke before).
        The peer keeps the model at its new replica count from then on."""
        s = self._serving()
        hm = s.get(self.name, name)
        hosts = None if hosts is None else list(hosts)
        reports = await owner.place(s, hm, len(hosts) if hosts else count, hosts,
                                    on_chunk=on_chunk)
        hm.target = max(hm.target, len(hm.replicas))
        owner.widen_pool(hm, hosts)
        s.save()
        return reports

    async def run_inference(self, name: str, x: torch.Tensor, *, owner: str | None = None,
                            timeout: float | None = None):
        """The model's output on `x`, computed by the live host expected to answer first
        (another one if it fails). `name` may be 'owner/name'."""
        return await client.run_inference(self._serving(), name, x, owner=owner, timeout=timeout)

    async def download_model(self, name: str, *, owner: str | None = None, attempts: int = 6,
                             on_chunk=None, progress: bool = True) -> nn.Module:
        """The model as an nn.Module, built from its package after checking every chunk's,
        the package's and the model's hash. A broken download resumes on the next call.
        `progress`: a progress bar (tqdm: a widget in Jupyter, text in a terminal)."""
        module, report = await client.download_model(self._serving(), name, owner=owner,
                                                     attempts=attempts, on_chunk=on_chunk,
                                                     progress=progress)
        self._serving().last_download = report
        return module

    def models(self) -> list[ModelInfo]:
        """Every model the network announces, with its flags, policy and hosts."""
        return catalog(self._peer.directory)

    def model_info(self, name: str, *, owner: str | None = None) -> ModelInfo:
        return find(self._peer.directory, name, owner)

    async def set_hosting(self, policy: HostingPolicy) -> None:
        """Whose replicas this peer hosts (saved; default: anyone's, see HostingPolicy)."""
        s = self._serving()
        s.hosting = policy
        s.save_hosting()
        s.announce()

    def _info(self, name: str, owner: str) -> ModelInfo:
        hm = self._serving().get(owner, name)
        return ModelInfo(owner, name, hm.hash, hm.digests.size, hm.terms.to_dict(),
                         {self._peer.key_id: self.name, **hm.replicas}, True, hm.mpc)
