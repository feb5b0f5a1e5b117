"""What a user holds: lazy expressions over secret-shared tensors.

A :class:`SharedTensor` names a tensor secret-shared among a group of parties. Ops
on it (``+ - * @ /``, ``relu``, comparisons, ``sum``/``mean``, reshape, indexing,
:func:`cat`...) touch no network: they build a program, checked for shapes right
away on ``meta`` tensors. The graph is :mod:`p2pgrid.expr`'s, the one plaintext
pointers build too; this module adds where it runs (the parties) and how. Then

* ``await y`` runs it on the parties and keeps the result shared (a new SharedTensor);
* ``await y.reveal()`` runs it and reconstructs the result here, for the requester
  only, if the inputs' rules allow it.

Every network round of the protocols behind these ops is awaited by the parties;
the requester sends one request per party per computation.
"""

from __future__ import annotations

import secrets
import time
from numbers import Real
from typing import Any, Sequence

import torch
import trio

from p2pgrid.errors import (BadRequest, CheatingDetected, P2PError, PeerUnavailable, ProtocolError,
                            ShapeError)
from p2pgrid.expr import LazyTensor, Node
from p2pgrid.protocols.smpc.fixedpoint import FixedPoint
from p2pgrid.protocols.smpc.program import OPS

from .messages import Abort, DeleteShares, ProgramResult, RunProgram
from .session import next_in_chain
from .state import Group

__all__ = ["SharedTensor", "cat", "stack", "reveal", "PrivateLoader", "new_id",
           "run_on_parties", "reconstruct_reply"]

DEFAULT_TIMEOUT = 60.0


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


_Node = Node   # the name smpc's modules build leaves with: _Node("leaf", leaf=id)


def _public_ok(v) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (Real, torch.Tensor))


class SharedTensor(LazyTensor):
    """A tensor secret-shared among `parties`, or a lazy expression over such tensors
    (``SharedTensor(net, group, node, meta)``; the graph itself: :class:`p2pgrid.expr.LazyTensor`)."""

    _OPS = {name: spec.meta for name, spec in OPS.items()}
    _UNARY = frozenset({"relu", "square"})
    _LEAF_KEY = "id"
    _KIND = "shared tensor"
    _HINT = "share it first: await pointer.share(*parties, dealer=...)"
    _NO_TRUTH = "a shared tensor has no truth value; reveal it or compare it in MPC"

    def _elsewhere(self, other: "SharedTensor", op: str) -> str:
        return (f"{op}: operands are shared among different groups ({list(self.parties)} / "
                f"{self.dealer} vs {list(other.parties)} / {other.dealer}); reshare one")

    def _place(self) -> str:
        return f"among {','.join(self.parties)} (dealer {self.dealer})"

    def _check_constant(self, value, op: str) -> None:
        if value is None or isinstance(value, (int, float, slice, str)) or value is Ellipsis:
            return
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bool:
                raise BadRequest(f"{op}: boolean tensors are not numbers here; convert explicitly")
            return
        raise BadRequest(f"{op}: cannot combine a shared tensor with {type(value).__name__}")

    def _constant(self, op: str, value, reflected: bool):
        if op == "div":
            if reflected or not isinstance(value, Real) or isinstance(value, bool):
                raise BadRequest("a shared tensor can only be divided by a public number")
            return float(value)
        if not isinstance(value, SharedTensor) and not _public_ok(value):
            self._check_operand(value, op)  # raises the clear error
        if isinstance(value, (int, float)):
            # fixed point: a public integer factor multiplies shares exactly, anything else is encoded
            value = float(value) if op != "mul" or isinstance(value, float) else value
        return value

    def _const_meta(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device="meta", dtype=torch.float64) if t.is_floating_point() else t.to("meta")

    # ------------------------------------------------------------ introspection
    @property
    def group(self) -> Group:
        """Who holds the shares and who deals."""
        return self._where

    @property
    def parties(self) -> tuple[str, ...]:
        return self.group.parties

    @property
    def dealer(self) -> str:
        return self.group.dealer

    @property
    def id(self) -> str | None:
        """The shared tensor's id on the parties (None for an expression not yet run)."""
        return self._node.leaf

    def __repr__(self) -> str:
        what = f"id={self.id}" if self.id else f"lazy {self._node.op}"
        return (f"<SharedTensor {what} {tuple(self.shape)} among {','.join(self.parties)} "
                f"(dealer {self.dealer})>")

    def _describe(self):
        return ("shared tensor" if self.id else "shared expression (lazy: .reveal() runs it)",
                ["parties", "dealer", "id" if self.id else "op", "shape"],
                [", ".join(self.parties), self.dealer, self.id or self._node.op, tuple(self.shape)])

    # ------------------------------------------------------------ ops whose SMPC form differs
    def __getitem__(self, index) -> "SharedTensor":
        if isinstance(index, SharedTensor):
            raise BadRequest("indexing by a shared index needs a protocol (one-hot and mul)")
        return super().__getitem__(index)

    def max(self, dim: int | None = None) -> "SharedTensor":
        return self._apply("max", **({} if dim is None else {"dim": dim}))

    def argmax(self, dim: int = -1, *, one_hot: bool = True) -> "SharedTensor":
        return self._apply("argmax", dim=dim, one_hot=one_hot)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "SharedTensor":
        return self._apply("flatten", start_dim, end_dim)

    def permute(self, *dims) -> "SharedTensor":
        return self._apply("permute", tuple(dims))

    # ------------------------------------------------------------ the wire form
    def program(self, outputs: Sequence["SharedTensor"] | None = None) -> dict:
        """The wire form (:mod:`p2pgrid.protocols.smpc.program`): nodes in dependency order;
        `outputs` (default: this one) are its results."""
        nodes, out = self._wire([self] if outputs is None else list(outputs))
        return {"nodes": nodes, "outputs": out}

    # ------------------------------------------------------------ running
    async def _run(self, *, keep: str = "", reveal: bool, truncation: str = "auto",
                   timeout: float = DEFAULT_TIMEOUT):
        program = self.program()
        mask, rs = await output_masks(self._net, self.group, [self.shape] if reveal else [])
        replies = await run_on_parties(
            self._net, self.group,
            lambda s, nxt: RunProgram(s, self.group.to_wire(), program, [keep], [reveal], nxt,
                                      truncation, timeout, mask), timeout=timeout)
        return replies, rs

    async def store(self, *, truncation: str = "auto", timeout: float = DEFAULT_TIMEOUT
                    ) -> "SharedTensor":
        """Run the expression; the result stays shared among the parties."""
        if self._node.leaf is not None:
            return self
        id_ = new_id()
        await self._run(keep=id_, reveal=False, truncation=truncation, timeout=timeout)
        return SharedTensor(self._net, self.group, Node("leaf", leaf=id_), self._meta)

    async def reveal(self, *, truncation: str = "auto", timeout: float = DEFAULT_TIMEOUT
                     ) -> torch.Tensor:
        """Run the expression and reconstruct it here (float64; 0/1 or integers for
        comparisons and argmax). PermissionDenied unless the inputs' rules allow it."""
        replies, rs = await self._run(reveal=True, truncation=truncation, timeout=timeout)
        return result_of(replies, 0, rs)

    get = reveal

    async def delete(self) -> None:
        """Forget the shares on every party (owner or the one who computed it)."""
        if self._node.leaf is None:
            return
        await run_simple(self._net, self.group, DeleteShares([self._node.leaf]))


async def output_masks(net, group: Group, shapes) -> tuple[str, list[torch.Tensor]]:
    """For an active group: the dealer's masks for outputs this requester reconstructs."""
    if not group.active or not shapes:
        return "", []
    from .active import request_masks
    return await request_masks(net._peer, group, [list(s) for s in shapes])


MASK_AHEAD_S = 60.0   # a mask asked for ahead is used within this (the dealer keeps it 120 s)


class MasksAhead:
    """A chain's next output masks, asked for from the dealer while the current step runs.

    An active session's outputs leave masked for the requester, with masks it asks the
    dealer for before the session (:func:`output_masks`). A chain of sessions (training
    steps, inference batches) asks for the next one's while this one runs
    (:meth:`beside`), so no step but the first waits for that round trip. A mask asked
    for ahead and not used within :data:`MASK_AHEAD_S` is left to expire on the dealer.
    One per chain (:meth:`EncryptedModel.fit_batch` keeps one per model): ``mask, rs =
    await ahead.take(net, group, shapes)``, then ``await ahead.beside(net, group, shapes,
    lambda: run_on_parties(...))``.
    """

    def __init__(self):
        self._ready: tuple[float, tuple, tuple[str, list[torch.Tensor]]] | None = None

    @staticmethod
    def _key(shapes) -> tuple:
        return tuple(tuple(int(d) for d in s) for s in shapes)

    async def take(self, net, group: Group, shapes) -> tuple[str, list[torch.Tensor]]:
        """Masks for this session: the ones asked for ahead if they fit, else asked now."""
        ready, self._ready = self._ready, None
        if ready is not None and ready[1] == self._key(shapes) \
                and time.monotonic() - ready[0] < MASK_AHEAD_S:
            return ready[2]
        return await output_masks(net, group, shapes)

    async def beside(self, net, group: Group, shapes, run):
        """``await run()`` (this session) while asking for the next one's masks (a task of
        the peer's, bounded by its own deadline: the session does not wait for it)."""
        if group.active and shapes:
            _smpc_state(net).nursery.start_soon(self._ahead, net, group, shapes)
        return await run()

    async def _ahead(self, net, group: Group, shapes) -> None:
        with trio.move_on_after(MASK_AHEAD_S / 4):
            try:
                got = await output_masks(net, group, shapes)
            except P2PError:
                return  # the next session asks again, and reports what goes wrong
            self._ready = (time.monotonic(), self._key(shapes), got)


def result_of(replies: list[ProgramResult], i: int, masks: list[torch.Tensor]) -> torch.Tensor:
    """Output i: summed shares (semi-honest) or the parties' agreed masked opening (active)."""
    if not masks:
        return reconstruct_reply(replies, i)
    from .active import unmask
    return unmask(replies, i, masks[i], replies[0].scales[i])


def reconstruct_reply(replies: list[ProgramResult], i: int) -> torch.Tensor:
    shares = [r.shares[i] for r in replies]
    if any(s is None for s in shares):
        raise ProtocolError("a party did not return its share")
    total = shares[0].clone()
    for s in shares[1:]:
        if s.shape != total.shape:
            raise ProtocolError("parties returned shares of different shapes")
        total += s
    scale = replies[0].scales[i]
    if scale == 0:
        return total
    return FixedPoint(scale).decode(total)


def _smpc_state(net):
    from .handlers import state_of
    return state_of(net._peer)


async def run_simple(net, group: Group, msg, *, timeout: float = 30.0) -> list:
    from .handlers import gather
    return await gather([lambda p=p: net._peer.request(p, msg, timeout=timeout)
                         for p in group.parties])


async def run_on_parties(net, group: Group, make_msg, *, timeout: float = DEFAULT_TIMEOUT,
                         per_party=None, chain: str = "") -> list:
    """Send one session's request to every party at once; return their replies in order.
    `per_party(i, msg)`, if given, makes party i's own version of the message. Sessions
    with the same `chain` (a training loop's steps, say) form a chain of ids the parties
    can fetch dealer material ahead for; give each kind of session its own. The
    requests go as calls on push streams (see :mod:`p2pgrid.calls`), whatever their size.

    If a party fails, the others are told to abort, and the root cause is raised
    (an unreachable peer first), within `timeout` plus a grace period.
    """
    state = _smpc_state(net)
    key = (group.key, chain)
    session = state.next_session.pop(key, None) or secrets.token_hex(16)
    nxt = state.next_session[key] = next_in_chain(session)
    msg = make_msg(session, nxt)
    replies: list[Any] = [None] * group.n
    errors: list[tuple[float, P2PError]] = []
    aborted = trio.Event()
    peer = net._peer

    async def abort_all(reason: str):
        if aborted.is_set():
            return
        aborted.set()

        async def one(p):
            with trio.move_on_after(3):
                try:
                    await peer.request(p, Abort(session, reason), timeout=3)
                except P2PError:
                    pass
        async with trio.open_nursery() as n:
            for p in group.parties:
                n.start_soon(one, p)

    async def one(i: int, name: str, nursery):
        try:
            mine = msg if per_party is None else per_party(i, msg)
            replies[i] = await peer.call(name, mine, timeout=timeout + 5)
        except P2PError as e:
            if isinstance(e, PeerUnavailable) and name not in e.message:
                e = PeerUnavailable(f"party {name} is unreachable: {e.message}")
            errors.append((trio.current_time(), e))
            nursery.start_soon(abort_all, f"the request to {name} failed: {e.message}")

    with trio.move_on_after(timeout + 15):
        async with trio.open_nursery() as nursery:
            for i, name in enumerate(group.parties):
                nursery.start_soon(one, i, name, nursery)
    if errors:
        errs = [e for _, e in sorted(errors, key=lambda t: t[0])]
        errs.sort(key=lambda e: (not isinstance(e, CheatingDetected),
                                 not isinstance(e, PeerUnavailable), "aborted" in e.message))
        raise errs[0]
    if any(r is None for r in replies):
        raise ProtocolError(f"parties did not answer within {timeout + 15:g} s")
    return replies


def cat(tensors: Sequence[SharedTensor], dim: int = 0) -> SharedTensor:
    """Concatenate shared tensors of one group (local on every party: no rounds)."""
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, SharedTensor) for t in tensors):
        raise BadRequest("cat: every operand must be a SharedTensor (share public tensors first)")
    return tensors[0]._op("cat", (tensors, dim))


def stack(tensors: Sequence[SharedTensor], dim: int = 0) -> SharedTensor:
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, SharedTensor) for t in tensors):
        raise BadRequest("stack: every operand must be a SharedTensor")
    return tensors[0]._op("stack", (tensors, dim))


async def reveal(*tensors: SharedTensor, truncation: str = "auto",
                 timeout: float = DEFAULT_TIMEOUT) -> list[torch.Tensor]:
    """Reconstruct several shared expressions in one session (their rounds run side by side)."""
    if not tensors or not all(isinstance(t, SharedTensor) for t in tensors):
        raise BadRequest("reveal takes SharedTensors")
    first = tensors[0]
    for t in tensors[1:]:
        first._check_operand(t, "reveal")
    program = first.program(list(tensors))
    k = len(tensors)
    mask, rs = await output_masks(first._net, first.group, [t.shape for t in tensors])
    replies = await run_on_parties(
        first._net, first.group,
        lambda s, nxt: RunProgram(s, first.group.to_wire(), program, [""] * k, [True] * k, nxt,
                                  truncation, timeout, mask), timeout=timeout)
    return [result_of(replies, i, rs) for i in range(k)]


class PrivateLoader:
    """Batches of shared data: ``async for xb, yb in PrivateLoader(X, Y, 64): ...``

    Each batch is a lazy slice of the shared tensors (no rounds, no request until a
    computation uses it). With `shuffle`, rows are visited in a fresh public random
    order every epoch (the order is public; the rows stay shared)."""

    def __init__(self, *tensors: SharedTensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None):
        if not tensors or not all(isinstance(t, SharedTensor) for t in tensors):
            raise BadRequest("PrivateLoader takes SharedTensors")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ShapeError("all tensors of a loader need the same number of rows")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise BadRequest("batch_size must be a positive int")
        self.tensors, self.batch_size = tensors, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self._gen = torch.Generator().manual_seed(secrets.randbits(62) if seed is None else seed)

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=self._gen) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            if self.drop_last and stop - start < self.batch_size:
                break
            index = slice(start, stop) if order is None else order[start:stop]
            batch = tuple(t[index] for t in self.tensors)
            yield batch if len(batch) > 1 else batch[0]

    async def __aiter__(self):
        for batch in self:
            yield batch
