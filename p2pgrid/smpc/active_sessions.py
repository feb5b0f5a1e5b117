"""The active-security (MAC-checked) branches of the SMPC session handlers.

:mod:`.handlers` checks a request (rights, shapes, limits) identically in both modes and
hands an active group's session here: inputs authenticated with the dealer's masks, the
program, training step or inference run on :class:`p2pgrid.protocols.smpc.mac.AuthShared`
values, outputs opened only masked for the requester after the session's MAC check, and
nothing kept or updated unless the check passed (see :mod:`.active`).
"""

from __future__ import annotations

import threading
import time

import trio

from p2pgrid.errors import BadRequest, P2PError, ProtocolError
import p2pgrid.protocols.smpc.mac_program as mac_nn
from p2pgrid.protocols.smpc import mac
from p2pgrid.protocols.smpc.mac_program import ACTIVE_OPS
from p2pgrid.protocols.smpc.program import run_program as run_dataflow

from . import active
from .messages import Predict, ProgramResult, RunProgram, ShareInput, TrainStep
from .session import run_session
from .state import Entry, ShareRules, SmpcState

__all__ = ["authenticate", "run_program", "train", "predict", "OutputMasks", "active_entry"]


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


class OutputMasks:
    """This party's shares of the requester's output masks, taken from the dealer while the
    session runs.

    Only a session's last opening uses them, so the party asks the dealer beside its
    session (:meth:`beside`) instead of before it: one round trip to the dealer off every
    active step's critical path. The protocol waits for them with :meth:`get` in its worker
    thread (an active session's steps always run in one), bounded by the session's timeout.
    """

    def __init__(self, mask: str, count: int, timeout: float):
        self.mask, self.count, self.timeout = mask, count, timeout
        self._done = threading.Event()
        self._masks: list | None = [] if not count else None
        self._error: P2PError | None = None
        if not count:
            self._done.set()

    def check(self) -> None:
        """What can be refused before the session: a reveal without masks."""
        if self.count and not self.mask:
            raise BadRequest("an active session reveals only through the requester's masks")

    async def _take(self, peer, state, group, party) -> None:
        try:
            _, masks = await active.take_masks(peer, state, group, party, self.mask)
            if len(masks) != self.count:
                raise BadRequest(f"{len(masks)} output masks for {self.count} revealed outputs")
            self._masks = masks
        except P2PError as e:
            self._error = e
        except Exception as e:  # noqa: BLE001 - reported typed to the protocol, which fails
            self._error = ProtocolError(f"taking the output masks failed: {type(e).__name__}")
        finally:
            if self._masks is None and self._error is None:  # cancelled: the session ended
                self._error = ProtocolError("the session ended before its output masks came")
            self._done.set()

    async def beside(self, peer, state, group, party, run):
        """``await run()`` (the session) while this party takes its masks; the taking
        stops when the session ends."""
        out: dict = {}
        async with trio.open_nursery() as nursery:
            if self.count:
                nursery.start_soon(self._take, peer, state, group, party)
            try:
                out["value"] = await run()
            except Exception as e:  # noqa: BLE001 - re-raised as is, not in a group
                out["error"] = e
            finally:
                nursery.cancel_scope.cancel()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def get(self) -> list:
        """The masks (from the protocol's worker thread): waits for them if need be."""
        if not self._done.wait(self.timeout):
            raise ProtocolError(f"the dealer gave no output masks within {self.timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._masks


async def _session_with_masks(peer, caller, msg, state, group, party, sig, masks: OutputMasks,
                              protocol, stats: dict):
    """`msg`'s session of `protocol` in the peer's nursery, its output masks taken beside it."""
    try:
        masks.check()
    except P2PError as e:
        await _h()._fail_early(peer, state, group, party, msg.session, e)
        raise
    return await _h()._in_nursery(state, lambda: masks.beside(
        peer, state, group, party, lambda: run_session(
            peer, state, session=msg.session, group=group, party=party, protocol=protocol,
            signature=sig, requester=caller.name, next_session=msg.next_session,
            timeout=msg.timeout, stats=stats)))


def active_entry(out, group, party, rules, key_id, ttl) -> Entry:
    return Entry(active.low_words(out), out.scale, group, party, rules, time.time() + ttl,
                 auth=out, key_id=key_id)


async def run_program(peer, caller, msg: RunProgram, state, group, party, leaves, rules, sig):
    """RunProgram on MAC-checked shares: every opening checked before anything is returned."""
    masks = OutputMasks(msg.mask, sum(bool(r) for r in msg.reveal), msg.timeout)

    def protocol(ctx):
        active.check_keys(ctx, leaves.values())
        outs = yield from run_dataflow(ctx, msg.program,
                                       {i: active.leaf(ctx, e) for i, e in leaves.items()},
                                       ops=ACTIVE_OPS, shared=mac.AuthShared)
        shown = [o for o, r in zip(outs, msg.reveal) if r]
        opened = yield from mac.open_masked(ctx, list(zip(shown, masks.get())))
        return outs, opened, ctx.key_id

    stats: dict = {}
    outs, opened, key_id = await _session_with_masks(
        peer, caller, msg, state, group, party, sig, masks, protocol, stats)
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
    masks = OutputMasks(msg.mask, int(show), msg.timeout)

    def protocol(ctx):
        active.check_keys(ctx, [*params.values(), *leaves.values()])
        x, y = yield from run_dataflow(ctx, msg.program,
                                       {i: active.leaf(ctx, e) for i, e in leaves.items()},
                                       ops=ACTIVE_OPS, shared=mac.AuthShared)
        net = mac_nn.build(model.layers, {i: active.leaf(ctx, e) for i, e in params.items()})
        loss = yield from mac_nn.train_step(ctx, net, x, y, msg.lr, with_loss=show)
        opened = yield from mac.open_masked(ctx, [(loss, masks.get()[0])] if show else [])
        return net, opened, ctx.key_id

    stats: dict = {}
    net, opened, key_id = await _session_with_masks(
        peer, caller, msg, state, group, party, sig, masks, protocol, stats)
    kept = ShareRules(**{**rules.__dict__, "owner": "", "holder": model.owner})
    for id_, p in zip(model.param_ids(), mac_nn.parameters(net)):
        state.shares[id_] = active_entry(p, group, party, kept, key_id, state.share_ttl)
    share = mac._to_wire(opened[0]) if show else None
    return ProgramResult([[]], [group.frac_bits], [share], _h()._stat_values(stats))


async def predict(peer, caller, msg: Predict, state, group, party, model, params, leaves,
                          out_rules, sig):
    """Encrypted inference on MAC-checked shares; the output leaves masked, after the check."""
    masks = OutputMasks(msg.mask, 0 if msg.keep else 1, msg.timeout)

    def protocol(ctx):
        active.check_keys(ctx, [*params.values(), *leaves.values()])
        (x,) = yield from run_dataflow(ctx, msg.program,
                                       {i: active.leaf(ctx, e) for i, e in leaves.items()},
                                       ops=ACTIVE_OPS, shared=mac.AuthShared)
        net = mac_nn.build(model.layers, {i: active.leaf(ctx, e) for i, e in params.items()})
        out = yield from mac_nn.forward(ctx, net, x, raw_output=not msg.keep)
        opened = yield from mac.open_masked(ctx, [] if msg.keep else [(out, masks.get()[0])])
        return out, opened, ctx.key_id

    stats: dict = {}
    out, opened, key_id = await _session_with_masks(
        peer, caller, msg, state, group, party, sig, masks, protocol, stats)
    if msg.keep:
        state.shares[msg.keep] = active_entry(out, group, party, out_rules, key_id,
                                               state.share_ttl)
        return ProgramResult([list(out.shape)], [out.scale], [None], _h()._stat_values(stats))
    return ProgramResult([list(out.shape)], [out.scale], [mac._to_wire(opened[0])],
                         _h()._stat_values(stats))
