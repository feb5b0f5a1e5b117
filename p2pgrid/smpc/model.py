"""Encrypted models: weights secret-shared among parties, trained and used in MPC.

    model = await net.encrypt_model(nn.Sequential(nn.Linear(784, 128), nn.ReLU(), ...),
                                    parties=["hospital", "clinic"], dealer="university",
                                    requires_grad=True)
    opt = p2pgrid.smpc.SGD(model, lr=0.1)
    loss = await model.fit_batch(xb, yb, loss="mse", optimizer=opt)   # all shared
    probs = await model.predict(xs)        # encrypted inference, revealed to the caller only
    trained = await model.decrypt()        # an nn.Module, if the data's rules allow it

Supported layers: ``nn.Linear``, ``nn.ReLU``, ``nn.Flatten`` in an ``nn.Sequential``.
A model owner may let others run inference (``users=[...]``) and announce the model
in its directory record (``publish=True``); a client then gets a handle with
``await net.encrypted_model(owner, name)``, shares its input among the same parties
and calls :meth:`EncryptedModel.predict`.
"""

from __future__ import annotations

import dataclasses

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from p2pgrid.errors import BadRequest, NotFound

from .handlers import approve_group, input_messages
from .messages import Predict, RegisterModel, TrainStep
from .state import Group, ShareRules
from .tensor import (DEFAULT_TIMEOUT, MasksAhead, SharedTensor, _Node, new_id, result_of,
                     run_on_parties)

if TYPE_CHECKING:  # pragma: no cover
    from p2pgrid.network import Network

__all__ = ["EncryptedModel", "SGD", "layout_of", "SERVICE_KEY"]

SERVICE_KEY = "smpc-models"


def layout_of(module: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """(kind, module) per layer of a Sequential (or a single Linear)."""
    mods = list(module) if isinstance(module, nn.Sequential) else [module]
    out = []
    for m in mods:
        if isinstance(m, nn.Linear):
            out.append(("linear", m))
        elif isinstance(m, nn.ReLU):
            out.append(("relu", None))
        elif isinstance(m, nn.Flatten):
            out.append(("flatten", None))
        else:
            raise BadRequest(f"encrypted models support Linear, ReLU and Flatten, not "
                             f"{type(m).__name__}")
    return out


class SGD:
    """Plain SGD with a public learning rate; the update runs on the parties, in MPC."""

    def __init__(self, model: "EncryptedModel", lr: float = 0.01):
        if not isinstance(model, EncryptedModel):
            raise BadRequest("SGD takes an EncryptedModel")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise BadRequest("the learning rate must be a positive number")
        self.model, self.lr = model, float(lr)


class EncryptedModel:
    """A handle on a model whose parameters are shared among `group`'s parties."""

    def __init__(self, net: "Network", group: Group, id: str, spec: list[dict],
                 shapes: dict[str, list[int]], owner: str, requires_grad: bool = False):
        self._net, self.group, self.id, self.spec = net, group, id, spec
        self.shapes, self.owner, self.requires_grad = shapes, owner, requires_grad
        self.steps = 0
        # output masks asked for one step ahead (active groups): training, inference
        self._masks = {"fit": MasksAhead(), "predict": MasksAhead()}

    def __repr__(self) -> str:
        kinds = "-".join(layer["kind"] for layer in self.spec)
        return f"<EncryptedModel {self.id} {kinds} among {','.join(self.group.parties)}>"

    @property
    def parties(self) -> tuple[str, ...]:
        return self.group.parties

    @property
    def dealer(self) -> str:
        return self.group.dealer

    def parameters(self) -> list[SharedTensor]:
        out = []
        for layer in self.spec:
            for key in ("weight", "bias"):
                id_ = layer.get(key)
                if id_:
                    meta = torch.empty(self.shapes[id_], dtype=torch.float64, device="meta")
                    out.append(SharedTensor(self._net, self.group, _Node("leaf", leaf=id_), meta))
        return out

    def _inputs(self, *xs: SharedTensor) -> dict:
        for x in xs:
            if not isinstance(x, SharedTensor):
                raise BadRequest("model inputs must be SharedTensors (share the batch first: "
                                 "await net.share(...) or await pointer.share(...))")
            if x.group != self.group:
                raise BadRequest(f"the batch is shared among {list(x.parties)} / {x.dealer}, the "
                                 f"model among {list(self.parties)} / {self.dealer}")
        return xs[0].program(list(xs))

    async def fit_batch(self, x: SharedTensor, y: SharedTensor, *, loss: str = "mse",
                        optimizer: SGD, want_loss: bool = True,
                        timeout: float = DEFAULT_TIMEOUT) -> float | None:
        """One training step (forward, loss, backward, SGD) on a shared batch; returns the
        loss if the data's rules let you reconstruct it (an aggregate over the batch)."""
        if not self.requires_grad:
            raise BadRequest("this model was encrypted without requires_grad=True")
        if not isinstance(optimizer, SGD) or optimizer.model is not self:
            raise BadRequest("pass optimizer=p2pgrid.smpc.SGD(this model, lr=...)")
        program = self._inputs(x, y)
        shapes = [[]] if want_loss else []
        ahead = self._masks["fit"]
        mask, rs = await ahead.take(self._net, self.group, shapes)
        replies = await ahead.beside(self._net, self.group, shapes, lambda: run_on_parties(
            self._net, self.group,
            lambda s, nxt: TrainStep(s, self.group.to_wire(), self.id, program, optimizer.lr,
                                     loss, want_loss, nxt, timeout, mask), timeout=timeout,
            chain=f"train:{self.id}"))
        self.steps += 1
        if not want_loss or any(r.shares[0] is None for r in replies):
            return None
        return float(result_of(replies, 0, rs))

    async def predict(self, x: SharedTensor | torch.Tensor, *,
                      timeout: float = DEFAULT_TIMEOUT) -> torch.Tensor:
        """Encrypted inference; only the caller reconstructs the output. `x` is a shared
        batch, or a plaintext tensor of yours: then it is secret-shared here and each party
        gets its share (a seed for all but one) with the call itself, used for that call
        only (one request per party instead of two, and nothing left to delete). The
        model's owner chose its parties and dealer; your peer shares your input with them
        only if its own config trusts them (``smpc_parties``, ``crypto_providers``),
        else ``PermissionDenied``."""
        per_party = None
        if isinstance(x, torch.Tensor):
            if self.owner != self._net.name:
                approve_group(self._net._peer, self.group, whose="your input")
            id_ = new_id()
            rules = ShareRules(owner=self._net.name, holder=self._net.name)
            if self.group.active:
                from .active import input_messages as masked_inputs
                shares = await masked_inputs(self._net._peer, self.group, id_, x.detach().cpu(),
                                             rules, timeout=timeout)
            else:
                shares = await input_messages(self.group, id_, x.detach().cpu(), rules)
            program = {"nodes": [{"op": "leaf", "id": id_}], "outputs": [0]}
            per_party = lambda i, msg: dataclasses.replace(msg, inputs=[shares[i]])  # noqa: E731
        else:
            program = self._inputs(x)
        shapes = [self._output_shape(x.shape)]
        ahead = self._masks["predict"]
        mask, rs = await ahead.take(self._net, self.group, shapes)
        replies = await ahead.beside(self._net, self.group, shapes, lambda: run_on_parties(
            self._net, self.group,
            lambda s, nxt: Predict(s, self.group.to_wire(), self.id, program, "", nxt, timeout,
                                   mask=mask),
            timeout=timeout, per_party=per_party,
            chain=f"predict:{self.id}:{'input' if per_party else 'shared'}"))
        return result_of(replies, 0, rs)

    def _output_shape(self, x_shape) -> list[int]:
        """The model's output shape on a batch of `x_shape` (its last linear layer's width)."""
        width = None
        for layer in self.spec:
            if layer["kind"] == "linear":
                width = self.shapes[layer["weight"]][1]
        if width is None:
            n = 1
            for d in x_shape[1:]:
                n *= d
            flat = any(layer["kind"] == "flatten" for layer in self.spec)
            return [x_shape[0], n] if flat else list(x_shape)
        return [x_shape[0], width]

    async def forward(self, x: SharedTensor, *, timeout: float = DEFAULT_TIMEOUT) -> SharedTensor:
        """The model's output on a shared batch, kept shared (a new SharedTensor)."""
        program = self._inputs(x)
        id_ = new_id()
        replies = await run_on_parties(
            self._net, self.group,
            lambda s, nxt: Predict(s, self.group.to_wire(), self.id, program, id_, nxt, timeout),
            timeout=timeout, chain=f"forward:{self.id}")
        meta = torch.empty(replies[0].shapes[0], dtype=torch.float64, device="meta")
        return SharedTensor(self._net, self.group, _Node("leaf", leaf=id_), meta)

    async def decrypt(self) -> nn.Sequential:
        """Reconstruct the parameters here, as a plaintext nn.Sequential (if allowed)."""
        layers: list[nn.Module] = []
        for layer in self.spec:
            if layer["kind"] == "relu":
                layers.append(nn.ReLU())
            elif layer["kind"] == "flatten":
                layers.append(nn.Flatten())
            else:
                w_shape = self.shapes[layer["weight"]]
                lin = nn.Linear(w_shape[0], w_shape[1], bias=bool(layer.get("bias")))
                w = await self._leaf(layer["weight"]).reveal()
                with torch.no_grad():
                    lin.weight.copy_(w.T.to(lin.weight.dtype))
                    if layer.get("bias"):
                        lin.bias.copy_((await self._leaf(layer["bias"]).reveal()).to(lin.bias.dtype))
                layers.append(lin)
        return nn.Sequential(*layers)

    def _leaf(self, id_: str) -> SharedTensor:
        meta = torch.empty(self.shapes[id_], dtype=torch.float64, device="meta")
        return SharedTensor(self._net, self.group, _Node("leaf", leaf=id_), meta)

    def describe(self) -> dict:
        return {"id": self.id, "group": self.group.to_wire(), "layers": self.spec,
                "shapes": self.shapes, "owner": self.owner}

    @classmethod
    def from_description(cls, net, d: dict) -> "EncryptedModel":
        try:
            return cls(net, Group.from_wire(d["group"]), d["id"], list(d["layers"]),
                       {k: list(v) for k, v in d["shapes"].items()}, d["owner"])
        except (KeyError, TypeError, AttributeError):
            raise NotFound("malformed encrypted model description") from None


async def encrypt(net, module: nn.Module, group: Group, *, requires_grad: bool,
                  users: Sequence[str], name: str | None, publish: bool,
                  share, limits: dict | None = None) -> EncryptedModel:
    """Share `module`'s parameters and register the layout on every party."""
    from p2pgrid.torchscript import from_torchscript
    module = from_torchscript(module)   # traced/scripted Sequentials: rebuilt, never run
    layout = layout_of(module)
    model_id = f"{net.name}/{name}" if name else new_id("m")
    spec, shapes = [], {}
    for kind, m in layout:
        if kind != "linear":
            spec.append({"kind": kind})
            continue
        w = await share(m.weight.detach().T.contiguous().to(torch.float64))
        b = await share(m.bias.detach().to(torch.float64)) if m.bias is not None else None
        spec.append({"kind": "linear", "weight": w.id, "bias": b.id if b is not None else None})
        shapes[w.id] = list(w.shape)
        if b is not None:
            shapes[b.id] = list(b.shape)
    from .tensor import run_simple
    await run_simple(net, group, RegisterModel(model_id, group.to_wire(), spec, list(users),
                                               limits))
    model = EncryptedModel(net, group, model_id, spec, shapes, net.name, requires_grad)
    if publish:
        peer = net._peer
        models = dict(peer.services.get(SERVICE_KEY, {}))
        models[model_id] = model.describe()
        peer.services[SERVICE_KEY] = models
        peer.reissue()
    return model
