"""Active security over the network: authenticated inputs, masked outputs, MAC keys.

A group with ``security="active"`` computes on MAC-checked shares
(:mod:`p2pgrid.protocols.smpc.mac`): a party that deviates makes every honest party raise
:class:`~p2pgrid.errors.CheatingDetected` (409) and nothing is released. What that
needs besides the rounds (which :func:`p2pgrid.smpc.session.run_session` runs as in
semi-honest mode, with authenticated dealer material):

* **Inputs.** The owner of a tensor x does not know the MAC key, so it asks the dealer
  for a random mask r (``DealMask``: r in the clear for the owner, authenticated shares
  of r for each party) and sends every party the same e = x - r. Each party takes its
  shares of r (``TakeMask``) and holds [x] = [r] + e. An owner that sent different e to
  different parties breaks the MAC relation: the first check fails.
* **Outputs.** The requester asks the dealer for a mask s per output it may reconstruct;
  the parties open x + s (uniform to them) and run one batched MAC check over the whole
  session before answering; the requester takes the opened value from every party,
  raises CheatingDetected unless all agree (one honest party suffices), and subtracts s.
* **MAC keys.** The dealer keeps one key per active group, so shares kept between
  sessions (models, stored results) stay checkable; each share records the key's id.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import torch
import trio

from p2pgrid.errors import BadRequest, CheatingDetected, PeerUnavailable, ProtocolError
from p2pgrid.protocols.smpc import mac, mac_material
from p2pgrid.protocols.smpc import ring128 as R
from p2pgrid.protocols.smpc.fixedpoint import FixedPoint

from .messages import DealMask, Dealt, MaskDealt, TakeMask
from .state import Group, SmpcState, check_protocol

__all__ = ["request_masks", "take_masks", "unmask", "masked_input", "mask_id"]


def mask_id() -> str:
    return f"k-{secrets.token_hex(12)}"


async def request_masks(peer, group: Group, shapes: Sequence[Sequence[int]], *,
                        timeout: float = 30.0) -> tuple[str, list[torch.Tensor]]:
    """A fresh mask id and, per shape, a mask r (int64 ring words) only this peer knows."""
    id_ = mask_id()
    try:
        reply = await peer.request(group.dealer, DealMask(id_, group.to_wire(),
                                                          [list(s) for s in shapes]),
                                   timeout=timeout)
    except PeerUnavailable as e:
        raise PeerUnavailable(f"the dealer {group.dealer} is unreachable: {e.message}") from None
    if not isinstance(reply, MaskDealt) or len(reply.masks) != len(shapes) or any(
            tuple(m.shape) != tuple(s) or m.dtype != torch.int64
            for m, s in zip(reply.masks, shapes)):
        raise ProtocolError(f"the dealer {group.dealer} answered a mask request wrongly")
    return id_, list(reply.masks)


async def take_masks(peer, state: SmpcState, group: Group, party: int, id_: str, *,
                     timeout: float = 30.0) -> tuple[int, list[mac.AuthShared]]:
    """This party's authenticated shares of mask `id_` and the MAC key id they are under."""
    try:
        reply = await peer.request(group.dealer, TakeMask(id_, group.to_wire(), party),
                                   timeout=timeout)
    except PeerUnavailable as e:
        raise PeerUnavailable(f"the dealer {group.dealer} is unreachable: {e.message}") from None
    if isinstance(reply, Dealt):
        check_protocol(reply.protocol, f"the dealer {group.dealer}")
    if not isinstance(reply, Dealt) or len(reply.materials) != 2 \
            or reply.materials[0].kind != "a_key" or reply.materials[1].kind != "a_mask":
        raise ProtocolError(f"the dealer {group.dealer} answered a mask request wrongly")
    key, masks = await trio.to_thread.run_sync(
        lambda: [m.expand() for m in reply.materials])
    alpha = R.to_int(R.from_wire(key["alpha"].reshape(1, 2)))
    key_id = int(key["key"][0])
    remember_key(state, group, key_id, alpha)
    out = []
    for i in range(len(masks) // 2):
        out.append(mac.AuthShared(mac_material.ring_component(masks[f"r{i}.v"]),
                                  mac_material.ring_component(masks[f"r{i}.m"]), 0))
    return key_id, out


def remember_key(state: SmpcState, group: Group, key_id: int, alpha: int) -> None:
    state.mac_keys[group.key] = (key_id, alpha)


def masked_input(state: SmpcState, group: Group, party: int, r: mac.AuthShared,
                 e: torch.Tensor, scale: int) -> mac.AuthShared:
    """[x] = [r] + e for the public e = x - r an input owner sent."""
    _, alpha = state.mac_keys[group.key]
    if tuple(e.shape) != tuple(r.shape) or e.dtype != torch.int64:
        raise BadRequest(f"masked input has shape {list(e.shape)}, its mask {list(r.shape)}")
    ev = R.from_u64(mac._from_wire(e))
    value = R.add(r.value, ev) if party == 0 else r.value
    return mac.AuthShared(value, R.add(r.mac, R.mul_int(ev, alpha)), scale)


def low_words(x: mac.AuthShared) -> torch.Tensor:
    """The low 64 bits of a party's value share (its shape stands for the tensor's)."""
    return mac._to_wire(x.value[0])


def unmask(replies, i: int, r: torch.Tensor, scale: int, what: str = "output") -> torch.Tensor:
    """The requester's result from every party's opened x + r: all must agree."""
    vals = [rep.shares[i] for rep in replies]
    if any(v is None for v in vals):
        raise ProtocolError("a party did not return the opened result")
    first = vals[0]
    for v in vals[1:]:
        if v.shape != first.shape or v.dtype != first.dtype or not torch.equal(v, first):
            raise CheatingDetected(f"the parties returned different results for the {what}: a "
                                   "party deviated from the protocol; nothing was revealed")
    if tuple(first.shape) != tuple(r.shape):
        raise ProtocolError("the parties returned a result of another shape")
    ring = first - r          # int64 arithmetic wraps: mod 2^64
    return ring if scale == 0 else FixedPoint(scale).decode(ring)


async def deal_input(peer, group: Group, id_: str, tensor: torch.Tensor, rules, *,
                     gather, timeout: float = 60.0) -> list[int]:
    """Share `tensor` as an authenticated input among `group` (see the module doc)."""
    msgs = await input_messages(peer, group, id_, tensor, rules, timeout=timeout)
    await gather([lambda m=m: peer.request(group.parties[m.party], m) for m in msgs])
    return list(tensor.shape)


async def input_messages(peer, group: Group, id_: str, tensor: torch.Tensor, rules, *,
                         timeout: float = 60.0) -> list:
    """One ShareInput per party carrying e = x - r for a fresh dealer mask r."""
    from .handlers import MAX_SHARE_ELEMENTS
    from .messages import ShareInput
    if tensor.numel() > MAX_SHARE_ELEMENTS:
        raise BadRequest(f"at most {MAX_SHARE_ELEMENTS} elements per shared tensor")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise BadRequest(f"cannot share a {tensor.dtype} tensor")
    mid, (r,) = await request_masks(peer, group, [list(tensor.shape)], timeout=timeout)
    e = FixedPoint(group.frac_bits).encode(tensor) - r
    shape = list(tensor.shape)
    return [ShareInput(id_, group.to_wire(), p, group.frac_bits, shape, rules.to_wire(),
                       share=e, mask=mid) for p in range(group.n)]


def check_keys(ctx: mac.ActiveParty, entries) -> None:
    """Every operand's MAC shares must be under this session's key."""
    if ctx.planning:
        return
    for e in entries:
        if e.auth is None:
            raise BadRequest("an operand was shared without MACs (semi-honest)")
        if e.key_id != ctx.key_id:
            raise ProtocolError("an operand's MAC shares are under another key than this "
                                "session's (did the dealer restart?); share it again")


def leaf(ctx: mac.ActiveParty, e) -> mac.AuthShared:
    return mac.AuthShared(e.auth.value, e.auth.mac, e.scale)


__all__ += ["deal_input", "input_messages", "check_keys", "leaf", "low_words", "remember_key",
            "masked_input"]
