"""Request handlers of the SMPC plugin: inputs, programs, rounds, dealing, models.

Checks happen before any round, identically on every party (each holds the same
rules), so a refused computation fails everywhere at once; if one party fails
alone it tells the others (``Abort``) so nobody waits.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Awaitable, Callable

import torch
import trio

from p2pgrid.errors import (BadRequest, Conflict, NotFound, P2PError, PeerUnavailable,
                            PermissionDenied, ShapeError)
from p2pgrid.handlers import may
from p2pgrid.messages import Ack
from p2pgrid.ratelimit import Limiter
from p2pgrid.router import Router
from p2pgrid.protocols.smpc.fixedpoint import FixedPoint
from p2pgrid.protocols.smpc.prg import Prg, new_seed
import p2pgrid.protocols.smpc.autograd as autograd
from p2pgrid.protocols.smpc.messages import RoundMessage
from p2pgrid.protocols.smpc.program import infer, leaf_ids, plan_signature, run_program

from . import active, active_sessions

from .aggregate import kept_aggregate, may_reveal_aggregate
from .dealer import ROLE
from .messages import (Abort, Deal, DealMask, DeleteShares, Predict, ProgramResult, RegisterModel,
                       RunProgram, ShareInput, ShareObject, SharedInfo, TakeMask, TrainStep)
from .session import _abort_others, run_session
from .state import Entry, Group, ModelRecord, ShareRules, SmpcState, check_requester

router = Router()

MAX_SHARE_ELEMENTS = 1 << 26


def state_of(peer) -> SmpcState:
    state = peer.extensions.get("smpc")
    if state is None:
        raise PeerUnavailable(f"{peer.name} has not started its SMPC service yet")
    return state


# ---------------------------------------------------------------- policy

def granted_dealer(peer, name: str) -> bool:
    """Whether this peer lets `name` deal for shares of its data. Only this peer's own
    config grants it (``crypto_providers``; itself when it runs a dealer): the role a peer
    announces in its directory record is its own claim, which anybody can make."""
    if name == peer.name:
        return ROLE in peer.config.roles
    return name in peer.config.crypto_providers


def approve_group(peer, group: Group, *, whose: str = "its data") -> None:
    """Refuse unless this peer trusts every party and the dealer of `group` (its config).

    Additive shares are safe only while the parties and the dealer do not collude, which
    no protocol can check: so the peer whose data is shared decides who holds the shares.
    A party must be this peer itself or in its ``smpc_parties``; the dealer must be in its
    ``crypto_providers`` (see :func:`granted_dealer`). A peer whose ``smpc_security`` is
    "active" refuses semi-honest groups."""
    require_security(peer, group, whose)
    strangers = [p for p in group.parties if p != peer.name and p not in peer.config.smpc_parties]
    if strangers:
        raise PermissionDenied(
            f"{peer.name} does not let {', '.join(strangers)} hold shares of {whose}: "
            "parties must be the owner's peer or in its smpc_parties", parties=strangers)
    if not granted_dealer(peer, group.dealer):
        raise PermissionDenied(
            f"{peer.name} does not let {group.dealer} deal for shares of {whose}: a dealer "
            "must be in the owner's crypto_providers (a role a peer announces does not count)",
            dealer=group.dealer)


def require_security(peer, group: Group, whose: str = "its data") -> None:
    """Refuse a semi-honest group if this peer's own config requires active security."""
    if peer.config.smpc_security == "active" and not group.active:
        raise PermissionDenied(
            f"{peer.name} requires smpc_security = \"active\" for {whose}: a semi-honest "
            "SMPC session is refused (share with security=\"active\")")


def check_holders(group: Group, requester: str, owner: str) -> None:
    """Additive sharing is only as safe as the parties' not colluding: a requester may
    not hold a share of data it does not own."""
    if requester != owner and requester in group.parties:
        raise PermissionDenied(f"{requester} may not be a party to shares of {owner}'s data: "
                               "the parties must not collude, so pick peers other than yourself")


async def deal_input(peer, group: Group, id: str, tensor: torch.Tensor, rules: ShareRules) -> list[int]:
    """Encode `tensor` and send each party its share (seeds to all but the last party;
    for an active group, the same masked value to every party: p2pgrid.smpc.active)."""
    if group.active:
        return await active.deal_input(peer, group, id, tensor, rules, gather=gather)
    msgs = await input_messages(group, id, tensor, rules)
    await gather([lambda m=m: peer.request(group.parties[m.party], m) for m in msgs])
    return list(tensor.shape)


async def input_messages(group: Group, id: str, tensor: torch.Tensor, rules: ShareRules
                         ) -> list[ShareInput]:
    """One ShareInput per party for `tensor` (seeds to all but the last party)."""
    if tensor.numel() > MAX_SHARE_ELEMENTS:
        raise BadRequest(f"at most {MAX_SHARE_ELEMENTS} elements per shared tensor")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise BadRequest(f"cannot share a {tensor.dtype} tensor")

    def split():
        ring = FixedPoint(group.frac_bits).encode(tensor)
        seeds = [new_seed() for _ in range(group.n - 1)]
        last = ring.clone()
        for s in seeds:
            last -= Prg(s).int64(ring.shape, stream=0)
        return seeds, last

    seeds, last = await trio.to_thread.run_sync(split)
    shape = list(tensor.shape)
    msgs = [ShareInput(id, group.to_wire(), p, group.frac_bits, shape, rules.to_wire(), seed=s)
            for p, s in enumerate(seeds)]
    msgs.append(ShareInput(id, group.to_wire(), group.n - 1, group.frac_bits, shape,
                           rules.to_wire(), share=last))
    return msgs


async def gather(fns: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run all, return results in order; the first error (PeerUnavailable first) is raised."""
    out: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    async def one(i, fn):
        try:
            out[i] = await fn()
        except P2PError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for i, fn in enumerate(fns):
            nursery.start_soon(one, i, fn)
    if errors:
        errors.sort(key=lambda e: (not isinstance(e, PeerUnavailable), "aborted" in str(e)))
        raise errors[0]
    return out


# ---------------------------------------------------------------- inputs

@router.on(ShareInput)
async def share_input(peer, caller, msg: ShareInput):
    state = state_of(peer)
    entry = _input_entry(peer, state, caller, msg, state.share_ttl)
    if entry.group.active:
        await active_sessions.authenticate(peer, state, entry, msg)
    state.shares[msg.id] = entry
    return Ack()



def _input_entry(peer, state: SmpcState, caller, msg: ShareInput, ttl: float) -> Entry:
    """This party's Entry for an input owner's ShareInput, checked."""
    group = Group.from_wire(msg.group)
    if group.index(peer.name) != msg.party:
        raise BadRequest(f"{peer.name} is party {group.index(peer.name)}, not {msg.party}")
    shape = tuple(msg.shape)
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ShapeError("bad shape")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_SHARE_ELEMENTS:
        raise BadRequest(f"at most {MAX_SHARE_ELEMENTS} elements per shared tensor")
    if group.active != bool(msg.mask):
        raise BadRequest("inputs to active groups (only) are masked by a dealer mask")
    if msg.share is not None:
        if tuple(msg.share.shape) != shape or msg.share.dtype != torch.int64:
            raise ShapeError(f"share has shape {list(msg.share.shape)}, announced {list(shape)}")
        share = msg.share
    elif msg.seed is not None and len(msg.seed) == 16:
        share = Prg(msg.seed).int64(shape, stream=0)
    else:
        raise BadRequest("a share input carries a share or a 16-byte seed")
    rules = ShareRules.from_wire(msg.rules)
    old = state.shares.get(msg.id)
    if old is not None and caller.name not in (old.rules.owner, old.rules.holder):
        raise Conflict(f"shared tensor {msg.id!r} exists and is not yours")
    if not 0 <= msg.scale <= 30:
        raise BadRequest("scale out of range")
    return Entry(share, msg.scale, group, msg.party, rules, time.time() + ttl)


@router.on(ShareObject)
async def share_object(peer, caller, msg: ShareObject):
    try:
        meta = await peer.meta(msg.obj)
    except NotFound:
        raise NotFound(f"no object {msg.obj} on {peer.name}") from None
    if not may(peer, caller, meta, "compute"):
        raise PermissionDenied(f"{caller.name} has no compute right on object {msg.obj}")
    group = Group.from_wire(msg.group)
    check_holders(group, caller.name, meta.owner)
    try:
        approve_group(peer, group, whose=f"object {msg.obj}")
    except PermissionDenied:
        peer.audit("smpc.share.refused", caller.name, obj=msg.obj, parties=list(group.parties),
                   dealer=group.dealer)
        raise
    reveal = list(meta.rules.get)
    # a result's level is set by the release gate (p2pgrid.release), which labels only
    # verified exact aggregates "aggregate"; "public" is no right any more (issue 12)
    if meta.level == "aggregate" and meta.derivation:
        reveal += list(meta.rules.aggregate)
    aggregate = list(meta.rules.aggregate)
    # what this peer lets the caller do with the object itself (its rules, governance
    # roles, approved requests) it lets the caller do with the shared copy
    if may(peer, caller, meta, "get"):
        reveal.append(caller.name)
    if may(peer, caller, meta, "aggregate"):
        aggregate.append(caller.name)
    rules = ShareRules(owner=meta.owner, compute=meta.rules.compute, reveal=reveal,
                       aggregate=aggregate, min_rows=meta.rules.min_rows,
                       holder=caller.name)
    tensor = await peer.load(msg.obj)
    shape = await deal_input(peer, group, msg.id, tensor, rules)
    peer.audit("smpc.share", caller.name, obj=msg.obj, parties=list(group.parties),
               dealer=group.dealer, shape=shape)
    return SharedInfo(msg.id, shape, group.frac_bits, group.to_wire())


@router.on(DeleteShares)
async def delete_shares(peer, caller, msg: DeleteShares):
    state = state_of(peer)
    for id_ in msg.ids:
        e = state.shares.get(id_)
        if e is None:
            continue
        if caller.name not in (e.rules.owner, e.rules.holder):
            raise PermissionDenied(f"{caller.name} may not delete shared tensor {id_!r}")
        state.shares.pop(id_, None)
    return Ack()


# ---------------------------------------------------------------- rounds and aborts

@router.on(RoundMessage)
async def round_message(peer, caller, msg: RoundMessage):
    """A party's round payload, pushed one way (see p2pgrid.push): kept for its session."""
    state_of(peer).mailbox(msg.session).deposit(msg.step, msg.sender, msg, caller.name)


@router.on(Abort)
async def abort(peer, caller, msg: Abort):
    state = state_of(peer)
    mb = state.mailboxes.get(msg.session)
    if mb is None:
        if msg.session in state.finished:
            return Ack()
        mb = state.mailbox(msg.session)
    allowed = mb.group is None or caller.name in mb.group.parties or caller.name == mb.requester
    if allowed:
        mb.abort(msg.reason if caller.name in msg.reason else f"{caller.name}: {msg.reason}")
    return Ack()


@router.on(DealMask)
async def deal_mask(peer, caller, msg: DealMask):
    state = state_of(peer)
    if state.dealer is None:
        raise PermissionDenied(f"{peer.name} is not a crypto provider")
    return await state.dealer.deal_mask(caller, msg)


@router.on(TakeMask)
async def take_mask(peer, caller, msg: TakeMask):
    state = state_of(peer)
    if state.dealer is None:
        raise PermissionDenied(f"{peer.name} is not a crypto provider")
    return state.dealer.take_mask(caller, msg)


@router.on(Deal)
async def deal(peer, caller, msg: Deal):
    state = state_of(peer)
    if state.dealer is None:
        raise PermissionDenied(f"{peer.name} is not a crypto provider")
    return await state.dealer.serve(caller, msg)


# ---------------------------------------------------------------- sessions

async def _in_nursery(state: SmpcState, afn: Callable[[], Awaitable[Any]]):
    """Run `afn` as a task of the peer's nursery and wait for its outcome."""
    done = trio.Event()
    box: dict[str, Any] = {}

    async def task():
        try:
            box["value"] = await afn()
        except Exception as e:  # noqa: BLE001 - handed to the waiting handler
            box["error"] = e
        finally:
            done.set()

    state.nursery.start_soon(task)
    await done.wait()
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise PeerUnavailable("the peer is shutting down")
    return box["value"]


async def _fail_early(peer, state: SmpcState, group: Group, party: int, session: str,
                      err: P2PError) -> None:
    state.mailbox(session).abort(f"party {peer.name} refused: {err.message}")
    state.close(session, f"{type(err).__name__}: {err.message}")
    state.nursery.start_soon(_abort_others, peer, group, party, session,
                             f"party {peer.name} refused: {err.message}")


def _dependencies(program) -> list[set[str]]:
    """For each output, the leaf ids it depends on."""
    nodes = program["nodes"]
    deps: list[set[str]] = []

    def refs(v, acc):
        if isinstance(v, dict):
            if set(v) == {"$"}:
                acc.add(v["$"])
            for x in v.values():
                refs(x, acc)
        elif isinstance(v, (list, tuple)):
            for x in v:
                refs(x, acc)

    for n in nodes:
        if n.get("op") == "leaf":
            deps.append({n.get("id")})
            continue
        acc: set = set()
        refs(n.get("args", []), acc)
        refs(n.get("kwargs", {}), acc)
        deps.append(set().union(*(deps[i] for i in acc if isinstance(i, int) and 0 <= i < len(deps))))
    return [deps[i] for i in program.get("outputs", [len(nodes) - 1])]


def _leaves(state, group, ids, caller: str) -> dict[str, Entry]:
    out = {}
    for id_ in ids:
        e = state.entry(id_, group)
        if not e.rules.allows("compute", caller):
            raise PermissionDenied(f"{caller} has no compute right on shared tensor {id_!r}")
        out[id_] = e
    return out


async def _start(peer, caller, msg, check: Callable[[SmpcState, Group, int], Any]):
    """Common start of a session handler: group, party index, checks (aborting on failure)."""
    state = state_of(peer)
    group = Group.from_wire(msg.group)
    party = group.index(peer.name)
    if not isinstance(msg.timeout, (int, float)) or not 0 < msg.timeout <= 3600:
        raise BadRequest("timeout must be in (0, 3600] seconds")
    try:
        check_requester(msg.group, caller.name)
        prepared = check(state, group, party)
    except P2PError as e:
        await _fail_early(peer, state, group, party, msg.session, e)
        raise
    return state, group, party, prepared


@router.on(RunProgram)
async def run(peer, caller, msg: RunProgram):
    def check(state, group, party):
        ids = leaf_ids(msg.program)
        leaves = _leaves(state, group, ids, caller.name)
        shapes = infer(msg.program, {i: tuple(e.share.shape) for i, e in leaves.items()})
        if len(msg.keep) != len(shapes) or len(msg.reveal) != len(shapes):
            raise BadRequest("keep and reveal need one entry per program output")
        deps = _dependencies(msg.program)
        rules = [ShareRules.derived([leaves[i].rules for i in dep], caller.name) for dep in deps]
        for i, (want, r) in enumerate(zip(msg.reveal, rules)):
            if want and not r.allows("reveal", caller.name) and not may_reveal_aggregate(
                    msg.program, i, leaves, caller.name):
                raise PermissionDenied(
                    f"{caller.name} may not reconstruct output {i}: the data it derives from "
                    "does not allow it (ask the owners); only a sum or mean over whole records, "
                    "the program's last op, goes to holders of the aggregate right")
        # a kept value may be reduced later: it keeps the aggregate right only while it is
        # one row per record (see p2pgrid.smpc.aggregate)
        rules = [dataclasses.replace(r, aggregate=kept_aggregate(msg.program, i, leaves, dep,
                                                                 caller.name))
                 for i, (r, dep) in enumerate(zip(rules, deps))]
        sig = plan_signature(msg.program, _scaled_shapes(leaves),
                            (group.n, group.frac_bits, msg.truncation))
        return leaves, rules, sig

    state, group, party, (leaves, rules, sig) = await _start(peer, caller, msg, check)
    if group.active:
        return await active_sessions.run_program(peer, caller, msg, state, group, party, leaves,
                                                 rules, sig)

    def protocol(ctx):
        return run_program(ctx, msg.program, {i: ctx.wrap(e.share, e.scale) for i, e in leaves.items()})

    stats: dict = {}
    outs = await _in_nursery(state, lambda: run_session(
        peer, state, session=msg.session, group=group, party=party, protocol=protocol,
        signature=sig, requester=caller.name, truncation=msg.truncation,
        next_session=msg.next_session, timeout=msg.timeout, stats=stats,
        input_elements=sum(e.share.numel() for e in leaves.values())))
    now = time.time()
    shares = []
    for out, keep, reveal, r in zip(outs, msg.keep, msg.reveal, rules):
        if keep:
            state.shares[keep] = Entry(out.share, out.scale, group, party, r, now + state.share_ttl)
        shares.append(out.share if reveal else None)
    return ProgramResult([list(o.shape) for o in outs], [o.scale for o in outs], shares,
                         _stat_values(stats))



def _stat_values(stats: dict) -> list[float]:
    """Session statistics for the caller: seconds, rounds, bytes sent to other parties,
    seconds spent planning, getting dealer material, computing and waiting for rounds, and
    bytes the dealer sent this party for the session."""
    return [float(stats.get(k, 0.0)) for k in
            ("seconds", "rounds", "bytes", "plan", "material", "compute", "wait", "dealt")]


# ---------------------------------------------------------------- models

@router.on(RegisterModel)
async def register_model(peer, caller, msg: RegisterModel):
    state = state_of(peer)
    group = Group.from_wire(msg.group)
    group.index(peer.name)
    layers = autograd.check_layers(msg.layers)
    for layer in layers:
        for key in ("weight", "bias"):
            id_ = layer.get(key)
            if id_:
                e = state.entry(id_, group)
                if e.rules.owner != caller.name:
                    raise PermissionDenied(f"parameter {id_!r} is not {caller.name}'s")
    old = state.models.get(msg.id)
    if old is not None and old.owner != caller.name:
        raise Conflict(f"model {msg.id!r} exists and is not yours")
    limiter, max_batch = _limits(msg.limits)
    state.models[msg.id] = ModelRecord(msg.id, group, layers, tuple(msg.users), caller.name,
                                       limiter, max_batch)
    return Ack()


def _limits(limits) -> tuple[Limiter, int | None]:
    if limits is None:
        return Limiter(), None
    if not isinstance(limits, dict) or set(limits) - {"rate_limit", "quota", "max_batch"}:
        raise BadRequest("limits: a map of rate_limit, quota and max_batch")
    rate, quota, max_batch = (limits.get(k) for k in ("rate_limit", "quota", "max_batch"))
    if max_batch is not None and (type(max_batch) is not int or max_batch < 1):
        raise BadRequest("limits: max_batch must be a positive int")
    return Limiter(rate, quota), max_batch


def _model(state, group, id_) -> ModelRecord:
    m = state.models.get(id_)
    if m is None:
        raise NotFound(f"no encrypted model {id_!r} on this party")
    if m.group != group:
        raise BadRequest(f"model {id_!r} is shared among other parties")
    return m


def _scaled_shapes(leaves: dict[str, Entry]) -> dict[str, tuple]:
    return {i: (tuple(e.share.shape), e.scale) for i, e in leaves.items()}


def _param_shapes(state, model: ModelRecord) -> dict[str, Entry]:
    return {i: state.entry(i, model.group) for i in model.param_ids()}


@router.on(TrainStep)
async def train(peer, caller, msg: TrainStep):
    def check(state, group, party):
        model = _model(state, group, msg.model)
        if caller.name != model.owner:
            raise PermissionDenied(f"only {model.owner} may train model {msg.model!r}")
        if msg.loss != "mse":
            raise BadRequest("loss must be 'mse'")
        if not (isinstance(msg.lr, float) and 0 < msg.lr < 1e3):
            raise BadRequest("the learning rate must be a positive number")
        params = _param_shapes(state, model)
        leaves = _leaves(state, group, leaf_ids(msg.program), caller.name)
        shapes = infer(msg.program, {i: tuple(e.share.shape) for i, e in leaves.items()})
        if len(shapes) != 2:
            raise BadRequest("a training program has two outputs: the batch and its targets")
        autograd.check_shapes(model.layers, {i: tuple(e.share.shape) for i, e in params.items()},
                              tuple(shapes[0]), tuple(shapes[1]))
        rows = shapes[0][0]
        rules = ShareRules.derived([e.rules for e in params.values()]
                                   + [e.rules for e in leaves.values()], model.owner,
                                   aggregate_rows=rows)
        sig = plan_signature(msg.program, _scaled_shapes(leaves),
                            ("train", group.n, group.frac_bits, msg.lr, msg.want_loss,
                             repr(model.layers), [tuple(e.share.shape) for e in params.values()]))
        return model, params, leaves, rules, sig

    state, group, party, (model, params, leaves, rules, sig) = await _start(peer, caller, msg, check)
    if group.active:
        return await active_sessions.train(peer, caller, msg, state, group, party, model, params,
                                           leaves, rules, sig)

    def protocol(ctx):
        x, y = yield from run_program(ctx, msg.program,
                                      {i: ctx.wrap(e.share, e.scale) for i, e in leaves.items()})
        net = autograd.build(model.layers, {i: ctx.wrap(e.share, e.scale) for i, e in params.items()})
        loss = yield from autograd.train_step(ctx, net, x, y, msg.lr, with_loss=msg.want_loss)
        return net, loss

    stats: dict = {}
    net, loss = await _in_nursery(state, lambda: run_session(
        peer, state, session=msg.session, group=group, party=party, protocol=protocol,
        signature=sig, requester=caller.name, truncation="dealer",
        next_session=msg.next_session, timeout=msg.timeout, stats=stats))
    now = time.time()
    for id_, p in zip(model.param_ids(), autograd.parameters(net)):
        state.shares[id_] = Entry(p.share, p.scale, group, party,
                                  ShareRules(**{**rules.__dict__, "owner": "", "holder": model.owner}),
                                  now + state.share_ttl)
    share = None
    if loss is not None and rules.allows("reveal", caller.name):
        share = loss.share
    return ProgramResult([[]], [group.frac_bits], [share], _stat_values(stats))


@router.on(Predict)
async def predict(peer, caller, msg: Predict):
    inline: list[str] = []
    if msg.inputs:
        state = state_of(peer)
        if len(msg.inputs) != 1 or not isinstance(msg.inputs[0], ShareInput):
            raise BadRequest("a prediction carries at most one input share")
        inp = msg.inputs[0]
        if inp.id in state.shares:
            raise Conflict(f"shared tensor {inp.id!r} exists already")
        if Group.from_wire(inp.group) != Group.from_wire(msg.group):
            raise BadRequest("the input is shared among another group than the model's")
        entry = _input_entry(peer, state, caller, inp, msg.timeout + 30)
        if entry.group.active:
            await active_sessions.authenticate(peer, state, entry, inp)
        state.shares[inp.id] = entry
        inline.append(inp.id)
    try:
        return await _predict(peer, caller, msg)
    finally:
        for id_ in inline:
            state.shares.pop(id_, None)


async def _predict(peer, caller, msg: Predict):
    from p2pgrid import governance
    # unregistered callers share one allowance, and those of one address a share of it
    pooled = governance.guest(peer, caller)

    def check(state, group, party):
        model = _model(state, group, msg.model)
        if caller.name != model.owner and caller.name not in model.users and "*" not in model.users:
            raise PermissionDenied(f"{caller.name} may not use model {msg.model!r}")
        params = _param_shapes(state, model)
        leaves = _leaves(state, group, leaf_ids(msg.program), caller.name)
        shapes = infer(msg.program, {i: tuple(e.share.shape) for i, e in leaves.items()})
        if len(shapes) != 1:
            raise BadRequest("an inference program has one output: the input batch")
        autograd.check_shapes(model.layers, {i: tuple(e.share.shape) for i, e in params.items()},
                              tuple(shapes[0]), None)
        if caller.name != model.owner:
            # Every party counts every call, so the parties agree on the count without a
            # round of their own; a call one party refuses runs nowhere.
            rows = int(shapes[0][0]) if shapes[0] else 1
            if model.max_batch is not None and rows > model.max_batch:
                raise BadRequest(f"batch of {rows} exceeds the limit of {model.max_batch}",
                                 batch=rows, max_batch=model.max_batch)
            model.limiter.admit(caller.name, pooled=pooled)
            model.limiter.charge(caller.name, rows, pooled=pooled)
        input_rules = ShareRules.derived([e.rules for e in leaves.values()], caller.name)
        if not msg.keep and not input_rules.allows("reveal", caller.name):
            raise PermissionDenied(f"{caller.name} may not reconstruct a prediction on data it "
                                   "may not reconstruct")
        sig = plan_signature(msg.program, _scaled_shapes(leaves),
                            ("predict", group.n, group.frac_bits, repr(model.layers),
                             [tuple(e.share.shape) for e in params.values()]))
        # the model's users may reconstruct its outputs on their own inputs; the model acts
        # row by row with fixed weights, so an output kept shared may be reduced over its
        # records later by holders of the aggregate right, if its input is one row per record
        aggregate = kept_aggregate(msg.program, 0, leaves, set(leaves), caller.name)
        out_rules = ShareRules("", input_rules.compute, input_rules.reveal, aggregate,
                               input_rules.min_rows, caller.name)
        return model, params, leaves, out_rules, sig

    state, group, party, (model, params, leaves, out_rules, sig) = await _start(peer, caller, msg, check)
    if group.active:
        return await active_sessions.predict(peer, caller, msg, state, group, party, model,
                                             params, leaves, out_rules, sig)

    def protocol(ctx):
        (x,) = yield from run_program(ctx, msg.program,
                                      {i: ctx.wrap(e.share, e.scale) for i, e in leaves.items()})
        net = autograd.build(model.layers, {i: ctx.wrap(e.share, e.scale) for i, e in params.items()})
        # an output the caller reconstructs keeps its product's scale: no truncation round
        return (yield from autograd.predict(ctx, net, x, raw_output=not msg.keep))

    stats: dict = {}
    out = await _in_nursery(state, lambda: run_session(
        peer, state, session=msg.session, group=group, party=party, protocol=protocol,
        signature=sig, requester=caller.name, truncation="auto",
        next_session=msg.next_session, timeout=msg.timeout, stats=stats))
    if msg.keep:
        state.shares[msg.keep] = Entry(out.share, out.scale, group, party, out_rules,
                                       time.time() + state.share_ttl)
        return ProgramResult([list(out.shape)], [out.scale], [None], _stat_values(stats))
    return ProgramResult([list(out.shape)], [out.scale], [out.share], _stat_values(stats))
