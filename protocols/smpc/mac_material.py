"""Authenticated dealer material as it travels: requests, seed-compressed Materials, planning.

Active sessions over the network (p2pgrid.smpc, ``security="active"``) take their
material from the crypto provider's dealer service like semi-honest ones: one
:class:`~.messages.Request` per item of a plan found by a dry run, answered with one
:class:`~.messages.Material` per party. Here are the ``a_*`` kinds:

* every value the dealer authenticates travels as two components, ``NAME.v`` (the
  party's value share) and ``NAME.m`` (its MAC share): int64 tensors of shape S + (2,)
  whose memory is :mod:`.ring128`'s layout of the elements of Z_2^128, all low words
  then all high words (:func:`ring_component`, :func:`wire_component`: no copy either
  way, where interleaved word pairs cost a strided copy on both ends). Every party
  expands both from its 16-byte seed (AES-CTR, :mod:`.prg`) except the one party that
  receives the item's explicit corrections (as in semi-honest mode, where it is always the last party; here the
  dealer picks the party with the fewest correction bytes so far, :class:`Balance`, so
  the tens of MB a training step needs are not all decrypted and decoded by one party);
* ``a_key`` carries the party's share of the group's MAC key alpha and the key's id.
  The key is fixed per (dealer, group), so shares kept between sessions stay checkable;
* ``a_check`` carries the party's check seed, its nonce and the dealer's commitments to
  every party's seed (see :func:`.mac.mac_check`).

:class:`MacKey` is the dealer's key of one group (alpha from the OS CSPRNG).
:func:`deal` serves one request; :class:`NetworkFeed` turns a party's expanded
material back into what :mod:`.mac`'s protocols take; :func:`plan` finds a program's
requests with a dry run of one party.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError

from . import mac, mac_bits, mac_compare, mac_layers
from . import ring128 as R
from .dealer import linear_params
from .messages import Material, Request, expand_seed
from .prg import new_seed

__all__ = ["MacKey", "MaterialDealer", "Balance", "deal", "ring_component", "wire_component",
           "auth_spec", "to_request", "NetworkFeed", "plan", "MAX_ITEM_ELEMENTS", "key_material",
           "AUTH_KINDS"]

AUTH_KINDS = ("a_key", "a_triple", "a_mtriple", "a_trunc", "a_cmp", "a_relu", "a_outmask",
              "a_check", "a_mask", "a_input", "a_linear", "a_truncmul")
_CMP_KINDS = ("a_cmp", "a_relu")
MAX_ITEM_ELEMENTS = 1 << 24        # 128-bit elements of one item (before the MAC copy;
                                   # bit words with their MAC planes, two words each)


@dataclass
class MacKey:
    """A group's MAC key on the dealer: alpha uniform in Z_2^s, its shares, an id."""

    alpha: int
    shares: list[int]
    id: int

    @classmethod
    def new(cls, n: int) -> "MacKey":
        alpha = int.from_bytes(os.urandom(mac.S // 8), "little")
        shares = [int.from_bytes(os.urandom((mac.K + mac.S) // 8), "little") for _ in range(n - 1)]
        shares.append((alpha - sum(shares)) % mac.MOD)
        return cls(alpha, shares, int.from_bytes(os.urandom(8), "little") >> 1)


# ---------------------------------------------------------------- what each kind holds

def _shape(s) -> tuple[int, ...]:
    out = tuple(int(d) for d in s)
    if any(d < 0 for d in out):
        raise ShapeError("negative dimension")
    return out


def _auth_names(req: Request) -> list[tuple[str, tuple[int, ...]]]:
    """The authenticated values of one item, with their shapes."""
    k = req.kind
    if k in ("a_triple",):
        (s,) = [_shape(x) for x in req.shapes]
        return [("a", s), ("b", s), ("c", s)]
    if k == "a_mtriple":
        sa, sb = [_shape(x) for x in req.shapes]
        if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
            raise ShapeError(f"shapes {list(sa)} and {list(sb)} do not fit a matrix product")
        return [("a", sa), ("b", sb), ("c", (sa[0], sb[1]))]
    if k == "a_trunc":
        (s,) = [_shape(x) for x in req.shapes]
        return [("r", s), ("r_hi", s), ("r_msb", s)]
    if k == "a_truncmul":
        (s,) = [_shape(x) for x in req.shapes]
        return [(name, s) for name in ("r", "r_hi", "r_msb", "b", "r_hi_b", "r_msb_b")]
    if k == "a_linear":
        (m, kk), (k2, n) = [_shape(x) for x in req.shapes]
        if k2 != kk:
            raise ShapeError("a layer's shapes do not fit a matrix product")
        train, grad_x = linear_params(req.param)
        out = [("A", (m, kk)), ("B", (kk, n)), ("C", (m, n))]
        if train:
            out += [("G", (m, n)), ("D", (kk, n))] + ([("E", (m, kk))] if grad_x else [])
        return out
    if k in _CMP_KINDS:
        (s,) = [_shape(x) for x in req.shapes]
        return mac_compare.arith_shapes(s, k == "a_relu", relu_bits(req)[1])
    if k == "a_outmask":
        (s,) = [_shape(x) for x in req.shapes]
        return [("rho", s)]
    if k == "a_mask":
        return [(f"r{i}", _shape(s)) for i, s in enumerate(req.shapes)]
    if k == "a_input":
        (s,) = [_shape(x) for x in req.shapes]
        return [("r", s)]
    return []


def relu_bits(req: Request) -> tuple[int | None, int]:
    """A comparison item's (forward truncation bits or None for a sign test, backward
    truncation bits or 0), from its param (forward + 64 backward)."""
    if req.kind != "a_relu":
        return None, 0
    if not 0 <= req.param < 64 * mac_compare.CMP_BITS:
        raise BadRequest("bad relu material parameter")
    fwd, bwd = req.param % 64, req.param // 64
    if fwd >= mac_compare.CMP_BITS:
        raise BadRequest("truncation bits out of range")
    return fwd, bwd


def auth_spec(req: Request, n: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every component (name, int64 shape) a party receives for `req`."""
    if req.kind not in AUTH_KINDS:
        raise BadRequest(f"unknown authenticated material kind {req.kind!r}")
    if req.kind == "a_key":
        return [("alpha", (2,)), ("key", (1,))]
    if req.kind == "a_check":
        return [("seed", (4,)), ("commits", (4 * n,))]
    names, bits = _auth_names(req), _bit_names(req)
    # bit words count with their MAC planes, two words to a 128-bit element
    total = sum(int(np.prod(s, dtype=np.int64)) for _, s in names) + sum(
        int(np.prod(s, dtype=np.int64)) * (1 + mac_bits.PLANES) // 2 for _, s in bits)
    if total > MAX_ITEM_ELEMENTS:
        raise BadRequest(f"an authenticated item has at most {MAX_ITEM_ELEMENTS} elements")
    out = []
    for name, s in names:
        out += [(f"{name}.v", s + (2,)), (f"{name}.m", s + (2,))]
    for name, s in bits:                # authenticated bits: words, MAC planes, a key share
        out += [(f"{name}.b", s), (f"{name}.bm", (mac_bits.PLANES,) + s)]
    if req.kind in _CMP_KINDS:
        out.append(("delta", (1,)))
    return out


def _bit_names(req: Request) -> list[tuple[str, tuple[int, ...]]]:
    if req.kind in _CMP_KINDS:
        return mac_compare.bit_shapes(_shape(req.shapes[0]))
    return []


def to_request(key: tuple) -> Request:
    """The network request for one of :class:`.mac.ActiveParty`'s material keys."""
    kind = key[0]
    if kind == "triple":
        return Request("a_triple", (key[1],))
    if kind == "mtriple":
        return Request("a_mtriple", (key[1], key[2]))
    if kind == "trunc":
        return Request("a_trunc", (key[1],), int(key[2]))
    if kind == "linear":
        return Request("a_linear", (key[1], key[2]), int(key[3]))
    if kind == "truncmul":
        return Request("a_truncmul", (key[1],), int(key[2]))
    if kind in ("cmp", "outmask"):
        return Request("a_" + kind, (key[1],))
    if kind == "relu":      # forward truncation bits, backward ones (0: none) times 64
        return Request("a_relu", (key[1],), int(key[2]) + 64 * int(key[3] if len(key) > 3 else 0))
    if kind == "check":
        return Request("a_check", ())
    if kind == "key":
        return Request("a_key", ())
    if kind == "input":
        return Request("a_input", (key[2],), int(key[1]))
    raise ProtocolError(f"material {kind!r} is not dealt to network sessions")


# ---------------------------------------------------------------- dealing

def ring_component(t: torch.Tensor) -> np.ndarray:
    """A ``.v``/``.m`` component (int64, shape S + (2,)) as the ring array (2, *S) its
    memory holds: a view, no copy."""
    t = t.contiguous()
    return t.numpy().view(np.uint64).reshape((2,) + tuple(t.shape[:-1]))


def wire_component(a: np.ndarray) -> torch.Tensor:
    """A ring array (2, *S) as the component (int64, shape S + (2,)) that carries it."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int64).reshape(a.shape[1:] + (2,)))


def _words(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.int64).clone()


def key_material(key: MacKey, n: int) -> list[Material]:
    """Each party's alpha share and the key id (explicit: fixed across sessions)."""
    return [Material("a_key", p, new_seed(), (("alpha", (2,)), ("key", (1,))),
                     {"alpha": R.to_wire(R.from_ints([key.shares[p]])).reshape(2),
                      "key": torch.tensor([key.id], dtype=torch.int64)}) for p in range(n)]


def _clear_values(req: Request, uniform=R.uniform) -> dict[str, np.ndarray]:
    """The values the dealer authenticates for one item (uniform ones by `uniform`)."""
    names = dict(_auth_names(req))
    k = req.kind
    u = np.uint64
    if k == "a_triple":
        s = names["a"]
        a, b = uniform("a", s), uniform("b", s)
        return {"a": a, "b": b, "c": R.mul(a, b)}
    if k == "a_mtriple":
        a, b = uniform("a", names["a"]), uniform("b", names["b"])
        return {"a": a, "b": b, "c": R.matmul(a, b)}
    if k == "a_trunc":
        s, f = names["r"], req.param
        if not 0 < f < mac.K - 1:
            raise BadRequest("truncation bits out of range")
        r = uniform("r", s)    # the low k bits are the mask, the high ones hide carries
        return {"r": r, "r_hi": R.from_u64(r[0] >> u(f)), "r_msb": R.from_u64(r[0] >> u(mac.K - 1))}
    if k == "a_linear":
        return mac_layers.linear_values(names["A"], names["B"], req.param, uniform)
    if k == "a_truncmul":
        return mac_layers.truncmul_values(names["r"], req.param, uniform)
    if k == "a_outmask":
        return {"rho": R.lshift(R.rand(names["rho"], mac.S), mac.K)}
    if k in ("a_mask", "a_input"):
        return {name: R.rand(s, mac.K) for name, s in names.items()}
    raise BadRequest(f"unknown authenticated material kind {k!r}")


def deal(req: Request, n: int, key: MacKey, clear: dict | None = None,
         fixed: int | None = None) -> list[Material]:
    """One Material per party for `req` under the group's MAC key.

    `clear`, if given, receives the unshared values (the requester's output masks);
    `fixed` is the party that receives the corrections (default: the last)."""
    fixed = n - 1 if fixed is None else fixed
    if not 0 <= fixed < n:
        raise BadRequest("the corrected party is out of range")
    if req.kind == "a_key":
        return key_material(key, n)
    spec = auth_spec(req, n)
    seeds = [new_seed() for _ in range(n)]
    if req.kind == "a_check":
        ss = [os.urandom(16) for _ in range(n)]
        nonces = [os.urandom(mac._NONCE) for _ in range(n)]
        commits = b"".join(hashlib.sha256(s + c).digest() for s, c in zip(ss, nonces))
        return [Material(req.kind, p, seeds[p], tuple(spec),
                         {"seed": _words(ss[p] + nonces[p]), "commits": _words(commits)})
                for p in range(n)]
    spec_t = tuple(spec)
    names = frozenset(name for name, _ in spec_t)
    expanded: dict[int, dict[str, torch.Tensor]] = {}

    def share(p: int, comp: str) -> torch.Tensor:
        """Party p's expansion of `comp` (:func:`.messages.expand_seed`), each party's at
        once: all of it, as the dealer needs nearly all, but for the corrected party only
        its values (``.v``: the rest it gets as corrections)."""
        if p not in expanded:
            skip = {c for c in names if not c.endswith(".v")} if p == fixed else ()
            expanded[p] = expand_seed(seeds[p], spec_t, skip=skip)
        return expanded[p][comp]

    seeded: set[str] = set()

    def from_seeds(name: str, shape) -> np.ndarray:
        """A uniform value whose every share, the corrected party's too, is its seed's
        expansion: no correction to send (uniform to any n - 1 parties, who lack one
        seed)."""
        seeded.add(name)
        comp, total = f"{name}.v", R.zeros(shape)
        for p in range(n):
            total = R.add(total, ring_component(share(p, comp)))
        return total

    if req.kind in _CMP_KINDS:
        values, bits = mac_compare.compare_values(names_shape(req), *relu_bits(req),
                                                  uniform=from_seeds)
    else:
        values, bits = _clear_values(req, from_seeds), {}
    fixes: dict[str, torch.Tensor] = {}

    def others(comp):
        return [share(p, comp) for p in range(n) if p != fixed]

    for name, v in list(values.items()):
        if name not in seeded:
            v = values[name] = _low_correction(v, f"{name}.v", others, share(fixed, f"{name}.v"),
                                               fixes)
        target = R.mul_int(v, key.alpha)
        for part_p in others(f"{name}.m"):
            target = R.sub(target, ring_component(part_p))
        fixes[f"{name}.m"] = wire_component(target)
    if clear is not None:
        clear.update(values)
    if bits:                       # XOR shares: the corrected party's part is the rest
        delta = mac_bits.random_key()
        targets = {"delta": mac_bits.key_word(delta)}
        for name, words in bits.items():
            targets[f"{name}.b"] = words
            targets[f"{name}.bm"] = mac_bits.mac_planes(words, delta)
        for comp, target in targets.items():
            target = target.clone()
            for part_p in others(comp):
                target ^= part_p
            fixes[comp] = target
    out = [Material(req.kind, p, seeds[p], spec_t, fixes if p == fixed else {})
           for p in range(n)]
    if req.kind == "a_input":     # the input owner (harness inputs) learns its mask
        owner = req.param
        if not 0 <= owner < n:
            raise BadRequest("input owner out of range")
        m = out[owner]
        out[owner] = Material(m.kind, owner, m.seed, m.spec + (("r_clear", names_shape(req)),),
                              {**m.corrections, "r_clear": mac._to_wire(values["r"][0])})
    return out


def _low_correction(v: np.ndarray, comp: str, others, own: torch.Tensor,
                    fixes: dict) -> np.ndarray:
    """The corrected party's low words of `comp` (into `fixes`), its high words being its
    seed's: returns the value the shares then hold, v mod 2^64 with high words uniform.

    Values live mod 2^64 (:mod:`.mac`); the high words of a share only hide carries, and
    every opening masks them with a uniform dealt value, so they may be anything the MAC
    covers. A non-uniform value thus costs 8 + 16 bytes (low words, MAC), not 16 + 16."""
    parts = [ring_component(p).reshape(2, -1) for p in others(comp)]
    rest = parts[0] if len(parts) == 1 else R.sum_(np.stack(parts, 1), 0)
    v2 = v.reshape(2, -1)
    low = v2[0] - rest[0]                                   # uint64: wraps mod 2^64
    fixes[comp] = torch.from_numpy(low.view(np.int64).reshape(v.shape[1:]))
    out = np.empty_like(v2)          # low + rest: v's low words, and the high words' sum
    out[0] = v2[0]
    np.add(ring_component(own).reshape(2, -1)[1], rest[1], out=out[1])
    out[1] += v2[0] < rest[0]        # the carry out of the low words
    return out.reshape(v.shape)


def names_shape(req: Request) -> tuple[int, ...]:
    return _shape(req.shapes[0])


class Balance:
    """Which party receives the next item's corrections: the one with the fewest
    correction bytes so far (the network dealer keeps one per bundle)."""

    def __init__(self, n: int):
        self.bytes = [0] * n

    def deal(self, req: Request, key: MacKey) -> list[Material]:
        n = len(self.bytes)
        fixed = min(range(n), key=lambda p: (self.bytes[p], -p))    # ties: the last party
        out = deal(req, n, key, fixed=fixed)
        self.bytes[fixed] += out[fixed].nbytes
        return out


class MaterialDealer:
    """An in-memory dealer serving :class:`.mac.ActiveParty` with the network's material
    (seed-compressed Materials, expanded by each party): what the harness and the local
    benchmark use to measure what active sessions cost, dealer bytes included."""

    def __init__(self, n: int):
        self.n, self.key = n, MacKey.new(n)
        self._items: list[tuple[Request, list[Material]]] = []
        self.bytes_dealt = [0] * n
        self._balance = Balance(n)

    def take(self, party: int, index: int, key: tuple) -> dict:
        req = to_request(key)
        if index == len(self._items):
            self._items.append((req, self._balance.deal(req, self.key)))
        if index >= len(self._items) or self._items[index][0] != req:
            raise ProtocolError("parties asked the dealer for different material")
        m = self._items[index][1][party]
        self.bytes_dealt[party] += m.nbytes
        return NetworkFeed(lambda r: m.expand(), self.n).take(party, index, key)


# ---------------------------------------------------------------- the party's side

class NetworkFeed:
    """A party's material for :class:`.mac.ActiveParty` from expanded network Materials.

    `take_expanded(request)` returns the next expanded item (a dict of int64 tensors) and
    checks it is the one the plan has next (p2pgrid.smpc.session.BundleFeed does)."""

    def __init__(self, take_expanded: Callable[[Request], dict], n: int):
        self._take, self.n = take_expanded, n

    def take(self, party: int, index: int, key: tuple) -> dict:
        req = to_request(key)
        got = self._take(req)
        out: dict[str, Any] = {}
        if req.kind == "a_check":
            raw = got["seed"].numpy().tobytes()
            commits = got["commits"].numpy().tobytes()
            if len(raw) != 16 + mac._NONCE or len(commits) != 32 * self.n:
                raise ProtocolError("the dealer sent a malformed check item")
            out["seed"] = (raw[:16], raw[16:], [commits[32 * i:32 * i + 32] for i in range(self.n)])
            return out
        if req.kind == "a_key":
            out["alpha"] = R.to_int(R.from_wire(got["alpha"].reshape(1, 2)))
            out["key"] = int(got["key"][0])
            return out
        for comp, t in got.items():
            if comp == "delta":                        # a key share of authenticated bits
                out[comp] = int(t[0]) & mac_bits.MASK64
            elif "." not in comp:
                out[comp] = mac._from_wire(t)          # the input owner's clear mask
            elif comp.endswith(".v"):
                name = comp[:-2]
                out[name] = (ring_component(t), ring_component(got[f"{name}.m"]))
            elif comp.endswith(".b"):
                name = comp[:-2]
                out[name] = (t, got[f"{name}.bm"])
        return out


class _PlanFeed:
    """Records a dry run's requests and stands in zeros for their material."""

    def __init__(self, n: int):
        self.log: list[Request] = []
        self.n = n

    def take(self, party: int, index: int, key: tuple) -> dict:
        req = to_request(key)
        self.log.append(req)
        zeros = {name: torch.zeros(s, dtype=torch.int64) for name, s in auth_spec(req, self.n)}
        if req.kind == "a_check":
            return {"seed": (bytes(16), bytes(mac._NONCE), [bytes(32)] * self.n)}
        return NetworkFeed(lambda r: zeros, self.n).take(party, index, key)


def plan(party: int, n: int, program: Callable[["mac.ActiveParty"], Any], frac_bits: int,
         max_rounds: int = 100_000) -> list[Request]:
    """The requests `program` makes on `party`, by running that party alone on zeros.

    Every other party "answers" each round with what this party sent it, as
    :func:`.harness.plan_party` does for semi-honest programs; the MAC checks of the dry
    run verify nothing (``planning``)."""
    feed = _PlanFeed(n)
    ctx = mac.ActiveParty(party, n, feed, "plan", frac_bits, planning=True)
    gen = program(ctx)
    if not inspect.isgenerator(gen):
        return feed.log
    try:
        out = next(gen)
        rounds = 0
        while True:
            rounds += 1
            if rounds > max_rounds:
                raise ProtocolError(f"more than {max_rounds} rounds")
            inbox = {q: out.payload_for(q) for q in range(n) if q != party}
            out = gen.send({q: p for q, p in inbox.items() if p})
    except StopIteration:
        pass
    return feed.log
