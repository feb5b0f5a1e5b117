"""Actively secure arithmetic with a trusted dealer: SPDZ2k-style MACs, sans-IO.

Values are fixed-point numbers in Z_2^k (k = 64, as in semi-honest mode). Every
authenticated value [x] is held by party i as a pair (x_i, m_i) in Z_2^(k+s), s = 64,
with sum x_i = x (mod 2^k, any lift above) and sum m_i = alpha * (sum x_i) (mod 2^(k+s))
for a global MAC key alpha, uniform in Z_2^s and additively shared by the dealer.

Why the larger ring: mod 2^k alone, an error e = 2^(k-1) needs a MAC error alpha * e,
which depends on alpha's lowest bit only, so a cheater passes with probability 1/2.
With MACs mod 2^(k+s) and errors that matter (e != 0 mod 2^k, so e = 2^v u with v < k
and u odd), alpha * e mod 2^(k+s) depends on all s bits of alpha: a single forged
opening passes with probability 2^-s. As in SPDZ2k (Cramer, Damgard, Escudero,
Scholl, Xing, CRYPTO 2018), openings carry the full (k+s)-bit shares of values masked
uniformly in Z_2^(k+s) (outputs: x + 2^k rho), and one batched check with random
coefficients in Z_2^s covers every opening so far; it lets a deviation pass with
probability at most 2^(-s + log2(s + 1)) < 2^-57 (s = 64).

Every opening is recorded; :func:`mac_check` verifies all of a session's openings at
once, plus a hash of every broadcast the party received (so an input owner that told
parties different things is caught too). :func:`reveal` checks everything opened so
far before opening its outputs, then checks the output opening, and only then returns
it: a deviation raises :class:`~p2pgrid.errors.CheatingDetected` on every honest party,
never a wrong result.

The dealer (crypto provider) is trusted, as in semi-honest mode: it knows alpha and
every mask. Shares are uint64 limb pairs (:mod:`.ring128`: vectorized exact arithmetic
mod 2^128, matrix products in float64 BLAS on 16-bit limbs). Coverage: input, linear
ops, Beaver mul and matmul, fixed-point truncation with dealt authenticated pairs,
reveal; the comparison and ReLU (:mod:`.mac_compare`) add authenticated bits
(:mod:`.mac_bits`), whose openings the same check covers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from p2pgrid.errors import BadRequest, CheatingDetected, ProtocolError

from . import mac_bits
from . import ring128 as R
from .messages import Round
from .prg import Prg
from .runtime import collect

__all__ = ["K", "S", "AuthShared", "AuthDealer", "ActiveParty", "open_values", "mac_check",
           "input_value", "open_masked", "mul", "matmul", "truncate", "reveal", "run_active",
           "encode", "decode"]

K, S = 64, 64
MOD = 1 << (K + S)
MASK_K = (1 << K) - 1
_NONCE = 16


# ---------------------------------------------------------------- ring helpers

def _obj(a) -> np.ndarray:
    return np.asarray(a, dtype=object)


def _rand(shape, bits: int) -> np.ndarray:
    """Uniform ring elements below 2^bits (64 or 128) from the OS CSPRNG."""
    return R.rand(shape, bits)


def _to_wire(lo: np.ndarray) -> torch.Tensor:
    """Low words (a uint64 array) as int64 (what an input or an output sends)."""
    # np.array (not ascontiguousarray, which makes 0-d arrays 1-d) keeps scalars scalars
    return torch.from_numpy(np.array(lo, dtype=np.uint64).view(np.int64))


def _from_wire(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().view(np.uint64).copy()


def _to_wire128(a: np.ndarray) -> torch.Tensor:
    """Full (k+s)-bit elements as int64 pairs (lo, hi), last dimension 2."""
    return R.to_wire(a)


def _from_wire128(t: torch.Tensor) -> np.ndarray:
    return R.from_wire(t)


def ints(a: np.ndarray) -> np.ndarray:
    """Ring elements as exact Python ints (tests, reports)."""
    return R.to_ints(a)


def encode(x: torch.Tensor, frac_bits: int = 16) -> np.ndarray:
    """Fixed point: round(x * 2^f) as ring elements (negatives as their lifts mod 2^128)."""
    ints_ = torch.round(x.to(torch.float64) * (1 << frac_bits)).to(torch.int64)
    return R.from_signed(ints_)


def decode(opened: np.ndarray, frac_bits: int = 16) -> torch.Tensor:
    """Opened low words (uint64, values in [0, 2^k)) read as signed fixed point."""
    signed = np.asarray(opened, dtype=np.uint64).view(np.int64)
    return torch.from_numpy(np.asarray(signed.astype(np.float64) / (1 << frac_bits)))


# ---------------------------------------------------------------- shares

@dataclass
class AuthShared:
    """One party's share of an authenticated value: (x_i, m_i) mod 2^(k+s), elementwise
    (each a :mod:`.ring128` array: shape (2, *shape))."""

    value: np.ndarray
    mac: np.ndarray
    scale: int = 16

    @property
    def shape(self):
        return self.value.shape[1:]

    def __repr__(self):
        return f"AuthShared(shape={list(self.value.shape)}, scale={self.scale})"

    def moved(self, fn: Callable[[np.ndarray], np.ndarray]) -> "AuthShared":
        """`fn`, a map that only moves elements (reshape, index, transpose...), on the value
        and MAC shares alike (each limb): that keeps the MAC relation."""
        return AuthShared(R.apply(self.value, fn), R.apply(self.mac, fn), self.scale)


# ---------------------------------------------------------------- dealer

class AuthDealer:
    """Trusted dealer of authenticated material for one group and session (in memory).

    Items are dealt in request order; the first party to ask for item j deals it for
    everyone, the others pick up their part. Parties compare each request (kind,
    shapes) with what was dealt, so a party that runs another program fails loudly.
    """

    def __init__(self, n_parties: int):
        self.n = n_parties
        self.alpha = int.from_bytes(os.urandom(S // 8), "little")
        self.alpha_shares = [R.to_int(a) for a in self._split(R.from_ints(self.alpha))]
        self._items: list[tuple[tuple, list[dict]]] = []
        self.bytes_dealt = [0] * n_parties

    def _split(self, v: np.ndarray) -> list[np.ndarray]:
        parts = [_rand(R.shape(v), K + S) for _ in range(self.n - 1)]
        last = v
        for p in parts:
            last = R.sub(last, p)
        return parts + [last]

    def _auth(self, v: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(zip(self._split(v), self._split(R.mul_int(v, self.alpha))))

    def _deal(self, key: tuple) -> list[dict]:
        kind = key[0]
        out: list[dict] = [{} for _ in range(self.n)]

        def put(name, v):
            for p, (x, m) in enumerate(self._auth(v)):
                out[p][name] = (x, m)

        if kind == "input":
            _, owner, shape = key
            r = _rand(shape, K)
            put("r", r)
            out[owner]["r_clear"] = R.low(r)
        elif kind == "triple":
            _, shape = key
            a, b = _rand(shape, K + S), _rand(shape, K + S)
            put("a", a), put("b", b), put("c", R.mul(a, b))
        elif kind == "mtriple":
            _, sa, sb = key
            a, b = _rand(sa, K + S), _rand(sb, K + S)
            put("a", a), put("b", b), put("c", R.matmul(a, b))
        elif kind in ("linear", "truncmul"):
            from . import mac_layers    # layer material builds on this module
            values = mac_layers.linear_values(*key[1:]) if kind == "linear" else \
                mac_layers.truncmul_values(*key[1:])
            for name, v in values.items():
                put(name, v)
        elif kind == "trunc":
            _, shape, f = key
            r = _rand(shape, K + S)       # the low k bits are the mask, the rest hides carries
            put("r", r)
            put("r_hi", R.from_u64(r[0] >> np.uint64(f))), put("r_msb", R.from_u64(r[0] >> np.uint64(K - 1)))
        elif kind in ("cmp", "relu"):
            from . import mac_compare   # the comparison builds on this module
            arith, bits = mac_compare.compare_values(key[1],
                                                     key[2] if kind == "relu" else None,
                                                     *key[3:])
            for name, v in arith.items():
                put(name, v)
            for p, part in enumerate(mac_bits.share_bits(bits, self.n)):
                out[p].update(part)
        elif kind == "outmask":
            _, shape = key
            put("rho", R.lshift(_rand(shape, S), K))
        elif kind == "check":
            seeds = [os.urandom(16) for _ in range(self.n)]
            nonces = [os.urandom(_NONCE) for _ in range(self.n)]
            commits = [hashlib.sha256(s + c).digest() for s, c in zip(seeds, nonces)]
            for p in range(self.n):
                out[p]["seed"] = (seeds[p], nonces[p], commits)
        else:
            raise BadRequest(f"unknown material kind {kind!r}")
        return out

    def take(self, party: int, index: int, key: tuple) -> dict:
        while len(self._items) <= index:
            k = key if len(self._items) == index else None
            if k is None:
                raise ProtocolError("parties asked the dealer for material out of order")
            self._items.append((k, self._deal(k)))
        dealt_key, parts = self._items[index]
        if dealt_key != key:
            raise ProtocolError(f"party {party} asked for {key[0]!r} where the group dealt "
                                f"{dealt_key[0]!r}: the parties ran different programs")
        part = parts[party]
        parts[party] = {}   # each party gets its part once
        for v in part.values():      # (value, MAC) pairs: ring arrays, or bit words
            if isinstance(v, tuple) and isinstance(v[0], np.ndarray):
                self.bytes_dealt[party] += 16 * R.numel(v[0]) * 2
            elif isinstance(v, tuple) and isinstance(v[0], torch.Tensor):
                self.bytes_dealt[party] += 8 * (v[0].numel() + v[1].numel())
        return part


# ---------------------------------------------------------------- party state

@dataclass
class ActiveParty:
    """One party's view of an active session: key share, dealer, opening log."""

    party: int
    n_parties: int
    dealer: AuthDealer
    session: str = "session"
    frac_bits: int = 16
    alpha: int | None = None     # this party's share of the MAC key (else from the dealer)
    planning: bool = False       # a dry run on zeros: checks verify nothing
    key_id: int = 0
    _taken: int = 0
    _log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    _bit_log: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    _transcript: Any = None

    def __post_init__(self):
        self._transcript = hashlib.sha256(self.session.encode())
        if self.alpha is None:
            if hasattr(self.dealer, "alpha_shares"):      # the in-memory dealer
                self.alpha = int(self.dealer.alpha_shares[self.party])
            else:                                         # a network feed: its first item
                m = self.material("key")
                self.alpha, self.key_id = m["alpha"], m["key"]

    @property
    def others(self) -> list[int]:
        return [p for p in range(self.n_parties) if p != self.party]

    def material(self, *key) -> dict:
        part = self.dealer.take(self.party, self._taken, tuple(key))
        self._taken += 1
        return part

    def auth(self, pair, scale=None) -> AuthShared:
        return AuthShared(pair[0], pair[1], self.frac_bits if scale is None else scale)

    def check_shared(self, x, op: str, name: str = "operand") -> AuthShared:
        if not isinstance(x, AuthShared):
            raise BadRequest(f"{op}: {name} must be an authenticated share (got "
                             f"{type(x).__name__})")
        return x

    def cheating(self, what: str) -> CheatingDetected:
        return CheatingDetected(f"SMPC session {self.session}: {what}; a party deviated "
                                f"from the protocol, nothing was revealed")

    # linear operations: local, on values and MACs alike
    def add(self, x: AuthShared, y: AuthShared) -> AuthShared:
        return AuthShared(R.add(x.value, y.value), R.add(x.mac, y.mac), x.scale)

    def sub(self, x: AuthShared, y: AuthShared) -> AuthShared:
        return AuthShared(R.sub(x.value, y.value), R.sub(x.mac, y.mac), x.scale)

    def add_public(self, x: AuthShared, c) -> AuthShared:
        """x + c (c a ring array or an int): party 0 adds c to its value share, every party
        adds alpha_i c to its MAC share."""
        if isinstance(c, (int, np.integer)):
            c = int(c) % MOD
            value = R.add(x.value, c) if self.party == 0 else x.value
            return AuthShared(value, R.add(x.mac, (self.alpha * c) % MOD), x.scale)
        value = R.add(x.value, c) if self.party == 0 else R.add(x.value, R.zeros(R.shape(c)))
        return AuthShared(value, R.add(x.mac, R.mul_int(c, self.alpha)), x.scale)

    def mul_public(self, x: AuthShared, c) -> AuthShared:
        if isinstance(c, (int, np.integer)):
            return AuthShared(R.mul_int(x.value, int(c)), R.mul_int(x.mac, int(c)), x.scale)
        return AuthShared(R.mul(x.value, c), R.mul(x.mac, c), x.scale)

    def matmul_public(self, x: AuthShared, c, *, left: bool = False) -> AuthShared:
        """x @ c (or c @ x) on the value and MAC shares (:func:`.ring128.matmul_each`)."""
        value, mac = R.matmul_each([x.value, x.mac], c, left)
        return AuthShared(value, mac, x.scale)

    def record(self, opened: np.ndarray, share: AuthShared) -> None:
        self._log.append((opened.reshape(2, -1), share.value.reshape(2, -1),
                          share.mac.reshape(2, -1)))

    def record_bits(self, opened: torch.Tensor, share: "mac_bits.AuthBits") -> None:
        self._bit_log.append((opened, share.mac, share.key))

    def note(self, payload: bytes) -> None:
        self._transcript.update(len(payload).to_bytes(8, "little") + payload)


# ---------------------------------------------------------------- protocols

def open_values(ctx: ActiveParty, tag: str, values: dict[str, AuthShared]):
    """One round: open several authenticated values in full (k+s bits), recorded for the
    check. Callers open only values masked by a dealt mask uniform in Z_2^(k+s) (or, for
    outputs, masked by 2^k rho), so the upper s bits reveal nothing."""
    sent = {n: _to_wire128(v.value) for n, v in values.items()}
    inbox = yield Round(tag, broadcast=sent)
    out = {}
    for name, v in values.items():
        total = v.value
        for t in collect(ctx, inbox, name, sent[name]):
            total = R.add(total, _from_wire128(t))
        ctx.record(total, v)
        ctx.note(np.ascontiguousarray(total).tobytes())
        out[name] = total
    return out


def input_value(ctx: ActiveParty, owner: int, value: torch.Tensor | None, shape):
    """`owner` inputs `value`: it learns a dealt authenticated mask r and broadcasts x - r."""
    shape = tuple(shape)
    m = ctx.material("input", owner, shape)
    r = ctx.auth(m["r"])
    if ctx.party == owner:
        if value is None or tuple(value.shape) != shape:
            raise BadRequest("the input owner must pass a value of the announced shape")
        with np.errstate(over="ignore"):
            e = encode(value, ctx.frac_bits)[0] - m["r_clear"]
        yield Round("a/input", broadcast={"e": _to_wire(e)})
    else:
        inbox = yield Round("a/input")
        (t,) = collect(ctx, inbox, "e", torch.empty(shape, dtype=torch.int64), senders=[owner])
        e = _from_wire(t)
    ctx.note(np.ascontiguousarray(e).tobytes())
    return ctx.add_public(r, R.from_u64(e))


def mul(ctx: ActiveParty, x: AuthShared, y: AuthShared, tag: str = "a/mul"):
    """Elementwise product with a dealt authenticated triple; one round (no truncation)."""
    if x.shape != y.shape:
        raise BadRequest("mul needs operands of one shape")
    m = ctx.material("triple", x.shape)
    a, b, c = ctx.auth(m["a"]), ctx.auth(m["b"]), ctx.auth(m["c"])
    o = yield from open_values(ctx, tag, {"d": ctx.sub(x, a), "e": ctx.sub(y, b)})
    d, e = o["d"], o["e"]
    # xy = c + d b + e a + d e = c + d (b + e) + e a: the public d e folded into [b + e]
    z = ctx.add(c, ctx.add(ctx.mul_public(ctx.add_public(b, e), d), ctx.mul_public(a, e)))
    z.scale = x.scale + y.scale
    return z


def matmul(ctx: ActiveParty, x: AuthShared, y: AuthShared):
    """x @ y (2-D) with a dealt authenticated matrix triple; one round (no truncation)."""
    m = ctx.material("mtriple", x.shape, y.shape)
    a, b, c = ctx.auth(m["a"]), ctx.auth(m["b"]), ctx.auth(m["c"])
    o = yield from open_values(ctx, "a/matmul", {"d": ctx.sub(x, a), "e": ctx.sub(y, b)})
    d, e = o["d"], o["e"]
    # xy = c + d b + a e + d e = c + d (b + e) + a e: the public d e folded into [b + e]
    z = ctx.add(c, ctx.add(ctx.matmul_public(ctx.add_public(b, e), d, left=True),
                           ctx.matmul_public(a, e)))
    z.scale = x.scale + y.scale
    return z


def truncate(ctx: ActiveParty, x: AuthShared, bits: int | None = None):
    """x / 2^bits with a dealt authenticated pair ([r], [r >> bits], [msb r]); one round.

    Opens c = x + 2^(k-2) + r mod 2^k (uniform: hides x). With u = x + 2^(k-2) in
    [0, 2^(k-1)) for |x| < 2^(k-2), the wrap of u + r is msb(r) (1 - msb(c)), so
    u >> bits = (c >> bits) - (r >> bits) + wrap 2^(k-bits) - borrow, borrow in {0, 1}:
    within one unit of the exact result, never a wrong high part. Stays authenticated.
    """
    bits = ctx.frac_bits if bits is None else bits
    m = ctx.material("trunc", x.shape, bits)
    r, r_hi, r_msb = ctx.auth(m["r"]), ctx.auth(m["r_hi"]), ctx.auth(m["r_msb"])
    off = 1 << (K - 2)
    o = yield from open_values(ctx, "a/trunc", {"c": ctx.add_public(ctx.add(x, r), off)})
    c = o["c"][0]                                     # its low k bits
    not_msb_c = R.from_u64(np.uint64(1) - (c >> np.uint64(K - 1)))
    wrap = ctx.mul_public(r_msb, not_msb_c)
    z = ctx.sub(ctx.add_public(ctx.mul_public(wrap, 1 << (K - bits)),
                               R.from_u64(c >> np.uint64(bits))), r_hi)
    z = ctx.add_public(z, -(off >> bits) % MOD)
    z.scale = x.scale - bits
    return z


def _commit(data: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(_NONCE)
    return hashlib.sha256(nonce + data).digest(), nonce


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()


def _coefficients(seed: bytes, n: int) -> np.ndarray:
    """n coefficients uniform in Z_2^s (uint64), from the joint seed: AES-CTR keyed by it
    (:mod:`.prg`, stream 0; the bit openings' coefficients are stream 1)."""
    return Prg(seed).int64((n,), stream=0).numpy().view(np.uint64)


def mac_check(ctx: ActiveParty):
    """Batched MAC check of every opening so far; 3 rounds; raises CheatingDetected.

    1. open the dealt seed shares (the dealer committed to each, so nobody can pick its
       seed after seeing the others') and a hash of every broadcast received;
    2. chi = PRG(xor of seeds), uniform in Z_2^s; y = sum chi_j x_j (public); commit to
       sigma_i = sum chi_j m_ij - alpha_i y (mod 2^(k+s)), and to the bit openings'
       check words (:func:`.mac_bits.sigma`, from the same joint seed);
    3. open them; the sigmas must sum to 0 mod 2^(k+s), the bit words XOR to 0.
    """
    m = ctx.material("check")
    seed, nonce, commits = m["seed"]
    digest = ctx._transcript.digest()
    inbox = yield Round("a/check/seed", broadcast={"seed": _bytes_tensor(seed + nonce),
                                                   "transcript": _bytes_tensor(digest)})
    joint = bytearray(seed)
    for p in ([] if ctx.planning else ctx.others):
        got = inbox.get(p, {})
        s_n, tr = got.get("seed"), got.get("transcript")
        if s_n is None or tr is None or s_n.numel() != 16 + _NONCE or tr.numel() != 32:
            raise ctx.cheating(f"party {p} sent a malformed check message")
        s_n = bytes(s_n.tolist())
        if not hmac.compare_digest(hashlib.sha256(s_n).digest(), commits[p]):
            raise ctx.cheating(f"party {p} opened a seed it was not dealt")
        if not hmac.compare_digest(bytes(tr.tolist()), digest):
            raise ctx.cheating(f"party {p} saw other broadcasts than party {ctx.party}")
        joint = bytearray(a ^ b for a, b in zip(joint, s_n[:16]))
    if ctx._log:
        opened = np.concatenate([o for o, _, _ in ctx._log], 1)
        macs = np.concatenate([mc for _, _, mc in ctx._log], 1)
        chi = _coefficients(bytes(joint), opened.shape[1])
        y = R.to_int(R.sum_(R.mul_u64(opened, chi)))
        m_sh = R.to_int(R.sum_(R.mul_u64(macs, chi)))
    else:
        y = m_sh = 0
    sigma = (m_sh - ctx.alpha * y) % MOD
    sig = _to_wire128(R.from_ints([sigma]))
    bit_sig = torch.from_numpy(mac_bits.sigma(ctx._bit_log, bytes(joint)).view(np.int64))
    digest_s, nonce_s = _commit(sig.numpy().tobytes() + bit_sig.numpy().tobytes())
    inbox = yield Round("a/check/commit", broadcast={"c": _bytes_tensor(digest_s)})
    theirs = {}
    opening = {"s": sig, "b": bit_sig, "n": _bytes_tensor(nonce_s)}
    if ctx.planning:
        yield Round("a/check/open", broadcast=opening)
        return True
    for p in ctx.others:
        c = inbox.get(p, {}).get("c")
        if c is None or c.numel() != 32:
            raise ctx.cheating(f"party {p} sent a malformed commitment")
        theirs[p] = bytes(c.tolist())
    inbox = yield Round("a/check/open", broadcast=opening)
    acc, bits_acc = sigma, bit_sig.clone()
    for p in ctx.others:
        got = inbox.get(p, {})
        s, b, n = got.get("s"), got.get("b"), got.get("n")
        if s is None or b is None or n is None or tuple(s.shape) != (1, 2) \
                or s.dtype != torch.int64 or b.shape != bit_sig.shape \
                or b.dtype != torch.int64 or n.numel() != _NONCE:
            raise ctx.cheating(f"party {p} sent a malformed MAC opening")
        if not hmac.compare_digest(hashlib.sha256(bytes(n.tolist()) + s.numpy().tobytes()
                                                  + b.numpy().tobytes()).digest(), theirs[p]):
            raise ctx.cheating(f"party {p} opened another value than it committed to")
        acc += R.to_int(_from_wire128(s))
        bits_acc ^= b
    if acc % MOD or bool(bits_acc.any()):
        raise ctx.cheating("MAC check failed")
    ctx._log.clear()
    ctx._bit_log.clear()
    return True


def reveal(ctx: ActiveParty, *xs: AuthShared, decode_out: bool = True):
    """Open results to every party after checking all earlier openings, then check them."""
    yield from mac_check(ctx)
    masked = {}
    for i, x in enumerate(xs):
        # 2^k rho hides the upper s bits of the output's lift (carries of the shares)
        masked[str(i)] = ctx.add(x, ctx.auth(ctx.material("outmask", x.shape)["rho"]))
    opened = yield from open_values(ctx, "a/reveal", masked)
    yield from mac_check(ctx)
    outs = [opened[str(i)][0] for i in range(len(xs))]      # low k bits
    if decode_out:
        outs = [decode(o, x.scale) for o, x in zip(outs, xs)]
    return outs


def open_masked(ctx: ActiveParty, pairs: list[tuple[AuthShared, AuthShared]]):
    """Open x + r for each (x, r), r a mask only the requester knows, then check everything.

    The parties see x + r only (uniform: r is dealt uniformly in Z_2^k), so one batched
    check after the opening suffices (no check before it: nothing a tampered opening
    could make x depend on reaches anyone but the requester, and only after the check).
    The low k bits of each x + r come back; the requester subtracts r. 1 + 3 rounds."""
    masked = {}
    for i, (x, r) in enumerate(pairs):
        if x.shape != r.shape:
            raise BadRequest(f"output {i} has shape {list(x.shape)}, its mask {list(r.shape)}")
        rho = ctx.auth(ctx.material("outmask", x.shape)["rho"])
        masked[str(i)] = ctx.add(ctx.add(x, r), rho)
    opened = (yield from open_values(ctx, "a/output", masked)) if masked else {}
    yield from mac_check(ctx)
    return [opened[str(i)][0] for i in range(len(pairs))]   # low k bits (uint64)


def run_active(n_parties: int, program: Callable[[ActiveParty], Any], *, session: str = "test",
               dealer: AuthDealer | None = None, wrap: Callable | None = None, **kw):
    """Run `program(ctx)` for every party in the in-memory harness with a fresh dealer.

    `wrap(ctx, generator)` may replace a party's generator (adversary test doubles).
    """
    from .harness import run_parties
    dealer = dealer or AuthDealer(n_parties)

    def party_fn(pctx):
        ctx = ActiveParty(pctx.party, n_parties, dealer, session)
        gen = program(ctx)
        return wrap(ctx, gen) if wrap else gen

    res = run_parties(n_parties, party_fn, **kw)
    res.dealer_auth_bytes = list(dealer.bytes_dealt)
    return res
