"""Running one SMPC session on a party: material from the dealer, rounds over HTTP/2.

A session is one computation (a program, a training step, an inference) among the
parties of a :class:`~.state.Group`. Each party runs :func:`run_session` as a task in
its peer's nursery:

1. **Plan.** The dealer requests of a protocol depend on shapes only, so the party
   finds them with a dry run of its own part (:func:`p2pgrid.protocols.smpc.plan_party`) the
   first time it meets a program signature, and remembers them.
2. **Material.** It asks the dealer for the whole plan in one request (``Deal``), or
   takes the bundle it prefetched while running an earlier session: the requester
   names the next session's id in advance (``next_session``) so a party fetches the
   next step's material while this one runs. A requester that runs a chain of sessions
   (training steps, inference batches) derives each id from the last
   (:func:`next_in_chain`), so a party fetches several sessions ahead in one request.
3. **Rounds.** The party's protocol generator yields one :class:`Round` per step.
   Every party pushes its step-k payload to every other party (``peer.push``: one
   long-lived HTTP/2 stream per pair and direction, opened with a signed request,
   pinned TLS) and waits for theirs. A round costs one one-way trip instead of a
   request and its reply. Heavy steps run in a worker thread.
4. **Failure.** Every wait has a deadline. A party whose session fails (a peer
   unreachable, a deadline passed, a protocol check) tells the others with ``Abort``
   so they fail at once with a :class:`ProtocolError` instead of waiting; a push
   stream to or from a party that breaks aborts that party's sessions; errors name
   parties, steps and shapes, never values.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable

import torch
import trio

from p2pgrid.errors import BadRequest, CheatingDetected, P2PError, PeerUnavailable, ProtocolError
from p2pgrid.protocols.smpc import mac, mac_material
from p2pgrid.protocols.smpc.prg import Prg
from p2pgrid.protocols.smpc.runtime import PartyContext, SmpcConfig
from p2pgrid.protocols.smpc.harness import plan_party
from p2pgrid.protocols.smpc.messages import Material, Request, Round, RoundMessage, payload_nbytes
from p2pgrid.protocols.smpc.preprocessing import Preprocessing

from .messages import Abort, Deal, Dealt
from .state import Group, Mailbox, SmpcState, check_protocol

log = logging.getLogger("p2pgrid.smpc")

HEAVY_ELEMENTS = 1 << 15      # inbox size from which a step runs in a worker thread
ABORT_TIMEOUT = 3.0
LOOKAHEAD = 16                # sessions of a chain whose material a party fetches ahead
LOOKAHEAD_BYTES = 32 << 20    # at most this much expanded material held ahead per plan

__all__ = ["run_session", "plan_hash", "BundleFeed", "fetch_bundle", "fetch_bundles",
           "next_in_chain"]


def plan_hash(plan: list[Request]) -> str:
    h = hashlib.sha256()
    for r in plan:
        h.update(repr((r.kind, r.shapes, r.param)).encode())
    return h.hexdigest()[:32]


class BundleFeed(Preprocessing):
    """A session's dealer material, expanded, consumed in plan order."""

    def __init__(self, plan: list[Request], expanded: list[dict]):
        self._items = list(zip(plan, expanded))
        self._next = 0

    def take(self, request: Request) -> dict:
        if self._next >= len(self._items):
            raise ProtocolError(f"no dealer material left for {request.kind} {list(request.shapes)}")
        want, mat = self._items[self._next]
        if want != request:
            raise ProtocolError(f"the protocol asked for {request.kind} {list(request.shapes)} but "
                                f"the plan has {want.kind} {list(want.shapes)} next")
        self._items[self._next] = (want, None)
        self._next += 1
        return mat


class Expanded(list):
    """A session's material, expanded (one dict per plan item), and the bytes the dealer
    sent for it (seeds and corrections: :attr:`.Material.nbytes`)."""

    dealt = 0


def _expand(materials: list[Material]) -> Expanded:
    out = Expanded(m.expand() for m in materials)
    out.dealt = sum(m.nbytes for m in materials)
    return out


async def fetch_bundle(peer, group: Group, session: str, party: int, plan: list[Request],
                       ph: str, timeout: float) -> Expanded:
    """This party's expanded material for `session` from the dealer (one request)."""
    return (await fetch_bundles(peer, group, [session], party, plan, ph, timeout))[0]


async def fetch_bundles(peer, group: Group, sessions: list[str], party: int,
                        plan: list[Request], ph: str, timeout: float) -> list[Expanded]:
    """This party's expanded material for each of `sessions` (one plan), in one request."""
    if not plan:
        return [Expanded() for _ in sessions]
    try:
        reply = await peer.request(
            group.dealer, Deal(sessions[0], group.to_wire(), party, ph, plan, sessions[1:]),
            timeout=timeout)
    except PeerUnavailable as e:
        raise PeerUnavailable(f"the dealer {group.dealer} is unreachable: {e.message}") from None
    except P2PError as e:
        if e.status == 404 and "no peer" in e.message.lower():
            raise PeerUnavailable(f"the dealer {group.dealer} is not in the directory") from None
        raise
    if isinstance(reply, Dealt):
        check_protocol(reply.protocol, f"the dealer {group.dealer}")
    bundles = [reply.materials, *reply.more] if isinstance(reply, Dealt) else []
    if len(bundles) != len(sessions) or any(len(b) != len(plan) for b in bundles):
        raise ProtocolError(f"the dealer {group.dealer} answered with the wrong material")
    for bundle in bundles:
        for req, mat in zip(plan, bundle):
            if mat.kind != req.kind or mat.party != party:
                raise ProtocolError(f"the dealer {group.dealer} sent material for another request")
    return await trio.to_thread.run_sync(lambda: [_expand(b) for b in bundles])


def next_in_chain(session: str) -> str:
    """The session id a requester uses after `session` when it runs a chain of sessions.

    Parties may then fetch material several sessions ahead, one request for many. Ids
    stay unguessable to anyone who never saw one of the chain (they travel only to the
    parties and the dealer, over TLS); those who did could have stalled the session
    anyway.
    """
    return hashlib.sha256(b"p2pgrid-next-session:" + session.encode()).hexdigest()[:32]


class _Pending:
    def __init__(self):
        self.created = time.monotonic()
        self.done = trio.Event()
        self.value: list[dict] | None = None
        self.error: BaseException | None = None


async def _prefetch(peer, state: SmpcState, sessions: list[str], group, party, plan, ph,
                    timeout) -> None:
    pendings = [state.prefetched[(s, ph)] for s in sessions]
    try:
        bundles = await fetch_bundles(peer, group, sessions, party, plan, ph, timeout)
        for pending, bundle in zip(pendings, bundles):
            pending.value = bundle
    except Exception as e:  # the session that needs it will fetch again and report
        for pending in pendings:
            pending.error = e
    finally:
        for pending in pendings:
            pending.done.set()


def _nbytes(expanded: list[dict]) -> int:
    return sum(getattr(v, "nbytes", 0) for item in expanded for v in item.values())


def _prefetch_ahead(peer, state: SmpcState, group, session: str, next_session: str, party: int,
                    plan, ph: str, timeout: float) -> None:
    """Fetch the material of the sessions the requester will run next, if not fetched yet.

    One session ahead, or, when the requester runs a chain (:func:`next_in_chain`), up to
    :data:`LOOKAHEAD` sessions (fewer for large material, :data:`LOOKAHEAD_BYTES` in all):
    a request once half of those are used, for all the missing ones at once.
    """
    ahead = [next_session]
    if next_session == next_in_chain(session):
        size = state.material_bytes.get(ph, 0)
        depth = max(1, min(LOOKAHEAD, LOOKAHEAD_BYTES // size if size else LOOKAHEAD))
        while len(ahead) < depth:
            ahead.append(next_in_chain(ahead[-1]))
    missing = [s for s in ahead if (s, ph) not in state.prefetched]
    if not missing or len(ahead) - len(missing) > len(ahead) // 2:
        return
    for s in missing:
        state.prefetched[(s, ph)] = _Pending()
    state.nursery.start_soon(_prefetch, peer, state, missing, group, party, plan, ph, timeout)


async def _materials(peer, state: SmpcState, group, session, party, plan, ph, timeout):
    pending = state.prefetched.pop((session, ph), None)
    if pending is not None:
        await pending.done.wait()
        if pending.value is not None:
            return pending.value
    return await fetch_bundle(peer, group, session, party, plan, ph, timeout)


def _inbox_elements(inbox) -> int:
    return sum(t.numel() for payload in inbox.values() for t in payload.values())


def _advance(gen, inbox):
    try:
        out = next(gen) if inbox is None else gen.send(inbox)
    except StopIteration as done:
        return "done", done.value
    if not isinstance(out, Round):
        raise ProtocolError(f"a protocol yielded {type(out).__name__}, not a Round")
    return "round", out


def _deviate(payload: dict) -> dict:
    """The test-only deviation (PeerConfig.smpc_test_cheat = "add1"): 1 added to the first
    element of the first int64 tensor this party sends in an active session's round."""
    out = dict(payload)
    for name in sorted(out):
        t = out[name]
        if t.dtype == torch.int64 and t.numel():
            t = t.clone()
            t.view(-1)[0] += 1
            out[name] = t
            break
    return out


async def _exchange(peer, mb: Mailbox, group: Group, party: int, session: str, step: int,
                    rnd: Round, timeout: float, stats: dict) -> dict:
    """Push this party's step payload to every other party, then wait for theirs."""
    got: dict[int, RoundMessage] = {}
    cheat = group.active and peer.config.smpc_test_cheat == "add1" and not stats.get("cheated")
    cheat = cheat and any(t.dtype == torch.int64 for t in rnd.broadcast.values())
    try:
        with trio.fail_after(timeout):
            for q in range(group.n):
                if q == party:
                    continue
                payload = rnd.payload_for(q)
                if cheat:
                    payload = _deviate(payload)
                    stats["cheated"] = True
                msg = RoundMessage(session, step, rnd.tag, party, payload)
                stats["bytes"] = stats.get("bytes", 0) + payload_nbytes(msg.tensors)
                name = group.parties[q]
                try:
                    await peer.push(name, msg)
                except P2PError as e:
                    raise PeerUnavailable(f"party {name} is unreachable at step {step}: "
                                          f"{e.message}") from None
            for q in range(group.n):
                if q == party:
                    continue
                msg, caller = await mb.receive(step, q)
                if caller != group.parties[q]:
                    raise ProtocolError(f"a step-{step} message claiming to be party {q} came "
                                        f"from {caller}")
                got[q] = msg
    except trio.TooSlowError:
        missing = [group.parties[q] for q in range(group.n) if q != party and q not in got]
        raise ProtocolError(f"no step-{step} message from {', '.join(missing)} within "
                            f"{timeout:g} s") from None
    inbox = {}
    for q, msg in got.items():
        if msg.tag != rnd.tag:
            raise ProtocolError(f"step {step}: party {group.parties[q]} is at {msg.tag!r}, this "
                                f"party at {rnd.tag!r} (different programs)")
        if msg.tensors:
            inbox[q] = msg.tensors
    return inbox


async def _abort_others(peer, group: Group, party: int, session: str, reason: str) -> None:
    async def one(name):
        with trio.move_on_after(ABORT_TIMEOUT):
            try:
                await peer.request(name, Abort(session, reason), timeout=ABORT_TIMEOUT)
            except P2PError:
                pass
    async with trio.open_nursery() as nursery:
        for q, name in enumerate(group.parties):
            if q != party:
                nursery.start_soon(one, name)


async def run_session(peer, state: SmpcState, *, session: str, group: Group, party: int,
                      protocol: Callable[[PartyContext], Any], signature: str,
                      requester: str, truncation: str = "auto", next_session: str = "",
                      timeout: float = 60.0, stats: dict | None = None,
                      input_elements: int | None = None) -> Any:
    """Run this party's `protocol` for `session`; returns what the protocol returns.

    Raises ProtocolError / PeerUnavailable on failure, after telling the other parties.
    `input_elements` (the size of the session's inputs, if known) lets a small first step
    run on the loop instead of a worker thread, like the steps after it.
    `stats` (if given) receives seconds, rounds and payload bytes sent to other parties,
    where the time went: plan, material (dealer), compute, wait (rounds on the wire and
    the other parties' compute), and the bytes the dealer sent this party for the session
    (dealt).
    """
    stats = {} if stats is None else stats
    stats.update(seconds=0.0, rounds=0, bytes=0, plan=0.0, material=0.0, compute=0.0, wait=0.0,
                 dealt=0)
    started = clock = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stats[key] += now - clock
        clock = now

    config = SmpcConfig(group.frac_bits, truncation)
    mb = state.mailbox(session)
    if mb.claimed:
        raise BadRequest(f"session {session[:8]} is already running here")
    mb.claimed, mb.group, mb.requester = True, group, requester
    outcome = "ok"
    try:
        if mb.aborted is not None:   # another party refused before this one started
            raise ProtocolError(f"session {session[:8]} aborted: {mb.aborted}")
        plan = state.plans.get((signature, group.security))
        if plan is None:
            if group.active:
                plan = await trio.to_thread.run_sync(
                    lambda: mac_material.plan(party, group.n, protocol, group.frac_bits))
            else:
                plan = await trio.to_thread.run_sync(
                    lambda: plan_party(party, group.n, protocol, config=config))
            state.plans.put((signature, group.security), plan)
        ph = plan_hash(plan)
        lap("plan")
        expanded = await _materials(peer, state, group, session, party, plan, ph, timeout)
        state.material_bytes.put(ph, _nbytes(expanded))
        stats["dealt"] = expanded.dealt
        lap("material")
        if next_session and plan:
            _prefetch_ahead(peer, state, group, session, next_session, party, plan, ph, timeout)
        if group.active:
            feed = mac_material.NetworkFeed(BundleFeed(plan, expanded).take, group.n)
            ctx = mac.ActiveParty(party, group.n, feed, session, group.frac_bits)
        else:
            ctx = PartyContext(party, group.n, BundleFeed(plan, expanded), config,
                               Prg.from_entropy())
        gen = protocol(ctx)
        if input_elements is not None and input_elements < HEAVY_ELEMENTS and not group.active:
            kind, out = _advance(gen, None)
        else:
            kind, out = await trio.to_thread.run_sync(_advance, gen, None)
        lap("compute")
        step = 0
        while kind == "round":
            inbox = await _exchange(peer, mb, group, party, session, step, out, timeout, stats)
            lap("wait")
            if group.active or _inbox_elements(inbox) >= HEAVY_ELEMENTS:
                kind, out = await trio.to_thread.run_sync(_advance, gen, inbox)
            else:
                kind, out = _advance(gen, inbox)
            lap("compute")
            step += 1
        stats["rounds"] = step
        return out
    except Exception as e:  # noqa: BLE001 - reported typed, without values, to everyone
        if isinstance(e, P2PError):
            err = e
            if group.active and isinstance(e, ProtocolError) and mb.aborted \
                    and "deviated from the protocol" in mb.aborted:
                # another party caught the cheater first: fail as it did (an abort either way)
                err = CheatingDetected(f"SMPC session {session[:8]} aborted: {mb.aborted}")
        else:
            log.warning("smpc session %s failed: %s", session[:8], type(e).__name__)
            err = ProtocolError(f"party {group.parties[party]}: {type(e).__name__} in the protocol")
        outcome = f"{type(err).__name__}: {err.message}"
        if mb.aborted is None:  # we fail first: tell the others so they do not wait
            mb.abort(f"party {group.parties[party]} failed: {err.message}")
            state.nursery.start_soon(_abort_others, peer, group, party, session,
                                     f"party {group.parties[party]} failed: {err.message}")
        raise err from None
    finally:
        stats["seconds"] = time.perf_counter() - started
        state.close(session, outcome)
