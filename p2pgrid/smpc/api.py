"""The user's entry points: sharing tensors and pointers, encrypting models.

``Network`` gains (as a plugin mixin) :meth:`NetworkAPI.share`,
:meth:`NetworkAPI.encrypt_model` and :meth:`NetworkAPI.encrypted_model`;
``Pointer.share(*parties, dealer=...)`` lands in :func:`share_pointer`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from p2pgrid.errors import BadRequest, NotFound, P2PError

from .handlers import deal_input
from .messages import ShareObject, SharedInfo
from .model import SERVICE_KEY, EncryptedModel, encrypt
from .state import Group, ShareRules
from .tensor import SharedTensor, _Node, new_id

__all__ = ["NetworkAPI", "share_pointer", "make_group"]


def make_group(parties: Iterable[str], dealer: str, frac_bits: int = 16,
               security: str = "semi-honest") -> Group:
    if isinstance(parties, str):
        raise BadRequest("parties is a list of peer names")
    return Group(tuple(parties), dealer, frac_bits, security)


def _leaf(net, group: Group, id_: str, shape) -> SharedTensor:
    meta = torch.empty(tuple(shape), dtype=torch.float64, device="meta")
    return SharedTensor(net, group, _Node("leaf", leaf=id_), meta)


async def share_pointer(pointer, parties: Sequence[str], *, dealer: str, frac_bits: int = 16,
                        timeout: float = 60.0, security: str = "semi-honest") -> SharedTensor:
    """Have the peer holding `pointer`'s object secret-share it among `parties`.

    The holder checks that you may compute on the object, splits it, and sends each
    party its share; you get a :class:`SharedTensor` and never see the data. The
    shares keep the object's rules: who may compute, who may reconstruct (its
    ``get`` list) and who may reconstruct aggregates (training results). The holder
    refuses (``PermissionDenied``) unless its own config trusts every party and the
    dealer (``smpc_parties``, ``crypto_providers``): the owner decides who holds shares.
    ``security="active"`` shares with MACs (a cheating party is caught); a holder whose
    ``smpc_security`` is "active" refuses semi-honest sharing.
    """
    net = pointer._net
    group = make_group(parties, dealer, frac_bits, security)
    id_ = new_id()
    reply = await net._peer.request(pointer.peer, ShareObject(pointer.id, id_, group.to_wire()),
                                    timeout=timeout)
    if not isinstance(reply, SharedInfo) or reply.id != id_:
        raise P2PError(f"{pointer.peer} answered a share request with something else")
    return _leaf(net, group, id_, reply.shape)


class NetworkAPI:
    """Secret sharing and encrypted models (p2pgrid.smpc)."""

    async def share(self, tensor: torch.Tensor, *, parties: Sequence[str], dealer: str,
                    compute: Iterable[str] | None = None, reveal: Iterable[str] | None = None,
                    aggregate: Iterable[str] = (), frac_bits: int = 16,
                    security: str | None = None) -> SharedTensor:
        """Secret-share your own tensor among `parties` (fixed point, `frac_bits` bits).

        You own the shares: by default only you may compute on them and reconstruct
        them; widen with `compute=[...]`, `reveal=[...]` ("*": anyone). The parties and
        the dealer you name here are your choice for your own tensor: trust them not to
        collude (your peer's ``smpc_parties``/``crypto_providers`` are not consulted).
        `security`: "semi-honest" or "active" (MAC-checked: a party that deviates makes the
        computation fail with CheatingDetected instead of giving a wrong result); the
        default is your peer's ``smpc_security``, which, if "active", also refuses
        "semi-honest"."""
        if not isinstance(tensor, torch.Tensor):
            raise BadRequest("share() takes a torch tensor")
        security = security or self._peer.config.smpc_security
        group = make_group(parties, dealer, frac_bits, security)
        from .handlers import require_security
        require_security(self._peer, group, "its data")
        rules = ShareRules(owner=self.name, compute=tuple(compute or ()),
                           reveal=tuple(reveal or ()), aggregate=tuple(aggregate),
                           holder=self.name)
        id_ = new_id()
        shape = await deal_input(self._peer, group, id_, tensor.detach().cpu(), rules)
        return _leaf(self, group, id_, shape)

    async def encrypt_model(self, module: nn.Module, *, parties: Sequence[str], dealer: str,
                            requires_grad: bool = False, users: Iterable[str] = (),
                            name: str | None = None, publish: bool = False,
                            frac_bits: int = 16, limits: dict | None = None,
                            security: str | None = None) -> EncryptedModel:
        """Share a model's parameters among `parties`. `users` may run encrypted inference
        on it; with `publish` (and a `name`) it is announced in your directory record.
        `limits` (``{"rate_limit": "60/min", "quota": "10000/day", "max_batch": 64}``, each
        optional) bound the users' predictions; every party enforces them. The parties and
        dealer are your choice for your own model; a user's peer shares its inputs with
        them only if its own config trusts them too (see ``EncryptedModel.predict``).
        `security` as in :meth:`share` (training and inference then run MAC-checked)."""
        security = security or self._peer.config.smpc_security
        group = make_group(parties, dealer, frac_bits, security)
        if publish and not name:
            raise BadRequest("a published model needs a name")

        async def share(t):
            return await self.share(t, parties=group.parties, dealer=dealer, frac_bits=frac_bits,
                                    security=security)

        return await encrypt(self, module, group, requires_grad=requires_grad, users=tuple(users),
                             name=name, publish=publish, share=share, limits=limits)

    async def encrypted_model(self, owner: str, name: str) -> EncryptedModel:
        """A handle on an encrypted model `owner` published as `name` (for inference)."""
        try:
            rec = self._peer.record(owner)
        except P2PError:
            raise NotFound(f"no peer {owner!r} in the directory") from None
        models = (rec.services or {}).get(SERVICE_KEY) or {}
        d = models.get(f"{owner}/{name}")
        if d is None:
            raise NotFound(f"{owner} publishes no encrypted model {name!r}")
        return EncryptedModel.from_description(self, d)

    def shared(self, id: str, shape, *, parties: Sequence[str], dealer: str,
               frac_bits: int = 16, security: str = "semi-honest") -> SharedTensor:
        """A handle on shares someone else made and told you the id of."""
        return _leaf(self, make_group(parties, dealer, frac_bits, security), id, shape)

    async def _share_pointer(self, pointer, parties: Sequence[str], **options) -> SharedTensor:
        """What ``Pointer.share`` does (p2pgrid.pointer imports no plugin)."""
        return await share_pointer(pointer, parties, **options)
