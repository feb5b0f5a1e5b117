"""The active-security (MAC-checked) branches of the SMPC session handlers.

:mod:`.handlers` checks a request (rights, shapes, limits) identically in both modes and
hands an active group's session here: inputs authenticated with the dealer's masks, the
program, training step or inference run on :class:`p2pgrid.protocols.smpc.mac.AuthShared`
values, outputs opened only masked for the requester after the session's MAC check, and
nothing kept or updated unless the check passed (see :mod:`.active`).
"""

from __future__ import annotations

import time

import trio

from p2pgrid.errors import BadRequest, P2PError
import p2pgrid.protocols.smpc.mac_program as mac_nn
from p2pgrid.protocols.smpc import mac
from p2pgrid.protocols.smpc.mac_program import ACTIVE_OPS
from p2pgrid.protocols.smpc.program import run_program as run_dataflow

from . import active
from .messages import Predict, ProgramResult, RunProgram, ShareInput, TrainStep
from .session import run_session
from .state import Entry, ShareRules, SmpcState

__all__ = ["authenticate", "run_program", "train", "predict", "output_masks", "active_entry"]


def _h():
    from . import handlers   # the common parts (handlers imports this module)
    return handlers


async def authenticate(peer, state: SmpcState, entry: Entry, msg: ShareInput) -> None:
    """An active group's input: [x] = [r] + e with the dealer's mask r (p2pgrid.smpc.active)."""
    if not msg.mask or msg.share is None:
        raise BadRequest("an input to an active group carries x - r for a dealer mask")
    key_id, (r,) = await active.take_masks(peer, state, entry.group, entry.party, msg.mask)
    entry.auth = await trio.to_thread.run_sync(
        lambda: active.masked_input(state, entry.group, entry.party, r, msg.share, entry.scale))
    entry.key_id = key_id


async def output_masks(peer, state, group, party, session: str, mask: str, count: int
                       ) -> list:
    """This party's shares of the requester's output masks (active groups)."""
    if not count:
        return []
    try:
        if not mask:
            raise BadRequest("an active session reveals only through the requester's masks")
        _, masks = await active.take_masks(peer, state, group, party, mask)
        if len(masks) != count:
            raise BadRequest(f"{len(masks)} output masks for {count} revealed outputs")
    except P2PError as e:
        await _h()._fail_early(peer, state, group, party, session, e)
        raise
    return masks


def active_entry(out, group, party, rules, key_id, ttl) -> Entry:
    return Entry(active.low_words(out), out.scale, group, party, rules, time.time() + ttl,
                 auth=out, key_id=key_id)


async def run_program(peer, caller, msg: RunProgram, state, group, party, leaves, rules, sig):
    """RunProgram on MAC-checked shares: every opening checked before anything is returned."""
    masks = await output_masks(peer, state, group, party, msg.session, msg.mask,
                                sum(bool(r) for r in msg.reveal))

    def protocol(ctx):
        active.check_keys(ctx, leaves.values())
        outs = yield from run_dataflow(ctx, msg.program,
                                       {i: active.leaf(ctx, e) for i, e in leaves.items()},
                                       ops=ACTIVE_OPS, shared=mac.AuthShared)
        shown = [o for o, r in zip(outs, msg.reveal) if r]
        opened = yield from mac.open_masked(ctx, list(zip(shown, masks)))
        return outs, opened, ctx.key_id

    stats: dict = {}
    outs, opened, key_id = await _h()._in_nursery(state, lambda: run_session(
        peer, state, session=msg.session, group=group, party=party, protocol=protocol,
        signature=sig, requester=caller.name, next_session=msg.next_session,
        timeout=msg.timeout, stats=stats))
    shares, shown = [], iter(opened)
    for out, keep, reveal, r in zip(outs, msg.keep, msg.reveal, rules):
        if keep:
            state.shares[keep] = active_entry(out, group, party, r, key_id, state.share_ttl)
        shares.append(mac._to_wire(next(shown)) if reveal else None)
    return ProgramResult([list(o.shape) for o in outs], [o.scale for o in outs], shares,
                         _h()._stat_values(stats))


async def train(peer, caller, msg: TrainStep, state, group, party, model, params, leaves,
                        rules, sig):
    """One SGD step on MAC-checked shares; the parameters change only if the check passes."""
    show = msg.want_loss and rules.allows("reveal", caller.name)
    masks = await output_masks(peer, state, group, party, msg.session, msg.mask, int(show))

    def protocol(ctx):
        active.check_keys(ctx, [*params.values(), *leaves.values()])
        x, y = yield from run_dataflow(ctx, msg.program,
                                       {i: active.leaf(ctx, e) for i, e in leaves.items()},
                                       ops=ACTIVE_OPS, shared=mac.AuthShared)
        net = mac_nn.build(model.layers, {i: active.leaf(ctx, e) for i, e in params.items()})
        loss = yield from mac_nn.train_step(ctx, net, x, y, msg.lr, with_loss=show)
        opened = yield from mac.open_masked(ctx, [(loss, masks[0])] if show else [])
        return net, opened, ctx.key_id

    stats: dict = {}
    net, opened, key_id = await _h()._in_nursery(state, lambda: run_session(
        peer, state, session=msg.session, group=group, party=party, protocol=protocol,
        signature=sig, requester=caller.name, next_session=msg.next_session,
        timeout=msg.timeout, stats=stats))
    kept = ShareRules(**{**rules.__dict__, "owner": "", "holder": model.owner})
    for id_, p in zip(model.param_ids(), mac_nn.parameters(net)):
        state.shares[id_] = active_entry(p, group, party, kept, key_id, state.share_ttl)
    share = mac._to_wire(opened[0]) if show else None
    return ProgramResult([[]], [group.frac_bits], [share], _h()._stat_values(stats))


async def predict(peer, caller, msg: Predict, state, group, party, model, params, leaves,
                          out_rules, sig):
    """Encrypted inference on MAC-checked shares; the output leaves masked, after the check."""
    masks = await output_masks(peer, state, group, party, msg.session, msg.mask,
                                0 if msg.keep else 1)

    def protocol(ctx):
        active.check_keys(ctx, [*params.values(), *leaves.values()])
        (x,) = yield from run_dataflow(ctx, msg.program,
                                       {i: active.leaf(ctx, e) for i, e in leaves.items()},
                                       ops=ACTIVE_OPS, shared=mac.AuthShared)
        net = mac_nn.build(model.layers, {i: active.leaf(ctx, e) for i, e in params.items()})
        out = yield from mac_nn.forward(ctx, net, x, raw_output=not msg.keep)
        opened = yield from mac.open_masked(ctx, [] if msg.keep else [(out, masks[0])])
        return out, opened, ctx.key_id

    stats: dict = {}
    out, opened, key_id = await _h()._in_nursery(state, lambda: run_session(
        peer, state, session=msg.session, group=group, party=party, protocol=protocol,
        signature=sig, requester=caller.name, next_session=msg.next_session,
        timeout=msg.timeout, stats=stats))
    if msg.keep:
        state.shares[msg.keep] = active_entry(out, group, party, out_rules, key_id,
                                               state.share_ttl)
        return ProgramResult([list(out.shape)], [out.scale], [None], _h()._stat_values(stats))
    return ProgramResult([list(out.shape)], [out.scale], [mac._to_wire(opened[0])],
                         _h()._stat_values(stats))
