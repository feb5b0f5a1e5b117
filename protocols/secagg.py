"""Secure aggregation with pairwise masks (Bonawitz et al. 2017, simplified), sans-IO.

Each pair of selected peers (i, j) agrees on a seed s_ij: X25519 between their
keys, then HKDF-SHA256 bound to the round and the pair. A peer encodes its update
in fixed point in Z_2^64 (int64 with wraparound), pre-multiplied by its
num_examples, appends num_examples itself, and adds

    sum_{j after i} PRG(s_ij)  -  sum_{j before i} PRG(s_ij)      (peers in sorted order)

with ChaCha20 as the PRG. Each masked vector alone is uniformly distributed;
in the coordinator's sum the masks cancel, leaving sum_i n_i x_i and sum_i n_i.

Dropouts. When a selected peer d sends nothing, the survivors' vectors still carry
their masks with d. Each survivor reveals, for this round only, the seeds it
shared with d (:meth:`SecAggClient.reveal_seeds_for`), and the coordinator removes
them. This is secure against a *semi-honest* coordinator only: a coordinator that
claims d dropped after receiving d's masked vector would learn d's update from
the revealed seeds. :class:`DoubleMaskClient` / :class:`DoubleMaskServer` close that
gap with Bonawitz's double masking: a self-mask PRG(b_i), with b_i and the masking
key Shamir-shared among the peers, and each peer revealing for any other peer
either a share of b (it sent its vector) or a share of the key (it dropped),
never both.

Neither variant authenticates the public keys it is given: the transport must
(e.g. keys signed with the peers' Ed25519 identities), or a coordinator can stand
in the middle. Neither defends against peers that lie about their inputs.

>>> import torch
>>> peers = ["alice", "bob", "carol"]
>>> clients = {p: SecAggClient(p, peers) for p in peers}
>>> keys = {p: c.public_key() for p, c in clients.items()}
>>> xs = {p: torch.full((3,), float(i)) for i, p in enumerate(peers)}
>>> masked = {p: clients[p].masked_update(xs[p], keys, round_id=1) for p in ["alice", "carol"]}
>>> reveals = {p: clients[p].reveal_seeds_for(["bob"]) for p in masked}
>>> SecAggServer(peers).aggregate(masked, reveals)   # mean of alice (0) and carol (2)
tensor([1., 1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from p2pgrid.errors import BadRequest, ProtocolError, ShapeError

__all__ = ["SecAggClient", "SecAggServer", "DoubleMaskClient", "DoubleMaskServer", "encode_fixed",
           "decode_fixed", "prg", "pair_seed", "shamir_split", "shamir_combine"]

_DOMAIN = b"p2pgrid-secagg/1"
_SEED_BYTES = 32


# ------------------------------------------------------------------ primitives

def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _round_bytes(round_id) -> bytes:
    if isinstance(round_id, bool) or not isinstance(round_id, (int, str)):
        raise BadRequest("round_id must be an int or a str")
    return str(round_id).encode()


def pair_seed(private: X25519PrivateKey, peer_public: bytes, me: str, other: str, round_id,
              purpose: bytes = b"mask") -> bytes:
    """The 32-byte seed peers `me` and `other` share for `round_id` (symmetric in the pair)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:
        raise BadRequest(f"peer {other}: not a valid X25519 public key") from None
    a, b = sorted((me, other))
    info = b"|".join([_DOMAIN, purpose, _round_bytes(round_id), a.encode(), b.encode()])
    return HKDF(hashes.SHA256(), _SEED_BYTES, salt=_DOMAIN, info=info).derive(shared)


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint64s from a 32-byte seed (ChaCha20 keystream)."""
    if len(seed) != _SEED_BYTES:
        raise BadRequest("a PRG seed is 32 bytes")
    enc = Cipher(algorithms.ChaCha20(bytes(seed), b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * length)), dtype="<u8").astype(np.uint64, copy=False)


def encode_fixed(values: torch.Tensor, fractional_bits: int, bound_bits: int = 63) -> np.ndarray:
    """round(values * 2^f) as uint64 (two's complement); BadRequest past +-2^bound_bits."""
    v = values.detach().to(torch.float64).reshape(-1).numpy()
    if not np.all(np.isfinite(v)):
        raise BadRequest("update holds NaN or infinite values")
    scaled = np.rint(v * float(2 ** fractional_bits))
    if scaled.size and np.max(np.abs(scaled)) >= float(2 ** bound_bits):
        raise BadRequest(f"update too large for {fractional_bits} fractional bits "
                         f"(|value| * 2^{fractional_bits} must stay below 2^{bound_bits})")
    return scaled.astype(np.int64).view(np.uint64)


def decode_fixed(ring: np.ndarray, fractional_bits: int) -> torch.Tensor:
    """Inverse of :func:`encode_fixed` for a (summed) uint64 vector: float64 tensor."""
    return torch.from_numpy(ring.view(np.int64).astype(np.float64) / float(2 ** fractional_bits))


def _check_peers(peers: Iterable[str]) -> list[str]:
    peers = sorted(peers)
    if len(set(peers)) != len(peers) or not all(isinstance(p, str) and p for p in peers):
        raise BadRequest("peers must be distinct non-empty strings")
    if len(peers) < 2:
        raise BadRequest("secure aggregation needs at least two peers")
    return peers


def _check_bits(fractional_bits: int) -> int:
    if isinstance(fractional_bits, bool) or not isinstance(fractional_bits, int) \
            or not 0 <= fractional_bits <= 52:
        raise BadRequest("fractional_bits must be an int in [0, 52]")
    return fractional_bits


def _encode_weighted(flat: torch.Tensor, num_examples: int, fractional_bits: int, n_peers: int):
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ShapeError("masked_update takes a flat (1-d) tensor")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise BadRequest("num_examples must be a positive int")
    # the sum of n_peers values must not wrap: each stays below 2^63 / n_peers
    bound = 63 - math.ceil(math.log2(n_peers))
    body = encode_fixed(flat.to(torch.float64) * num_examples, fractional_bits, bound)
    if num_examples >= 2 ** bound:
        raise BadRequest("num_examples too large")
    return np.concatenate([body, np.array([num_examples], dtype=np.uint64)])


def _as_ring(t, length: int | None, who: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        raise ShapeError(f"peer {who}: a masked update is a 1-d int64 tensor")
    if length is not None and t.numel() != length:
        raise ShapeError(f"peer {who}: masked update has {t.numel()} entries, others {length}")
    return t.contiguous().numpy().view(np.uint64)


def _finish(total: np.ndarray, fractional_bits: int) -> tuple[torch.Tensor, int]:
    weight = int(total[-1:].view(np.int64)[0])
    if weight <= 0:
        raise ProtocolError("unmasked total weight is not positive: masks did not cancel")
    return decode_fixed(total[:-1], fractional_bits), weight


# ------------------------------------------------------------------ semi-honest variant

class SecAggClient:
    """One peer's side: a key pair, masked updates, and seed reveals for dropped peers.

    `min_survivors` (>= 2) is the fewest peers whose sum this client will help
    unmask: revealing seeds so that the coordinator could unmask a lone update
    would publish it.
    """

    def __init__(self, peer_id: str, peers: Iterable[str], fractional_bits: int = 24, *,
                 private_key: X25519PrivateKey | None = None, min_survivors: int = 2):
        self.peer_id = peer_id
        self.peers = _check_peers(peers)
        if peer_id not in self.peers:
            raise BadRequest(f"{peer_id} is not among the peers")
        self.fractional_bits = _check_bits(fractional_bits)
        self.min_survivors = max(2, int(min_survivors))
        self._key = private_key or X25519PrivateKey.generate()
        self._seeds: dict[str, bytes] = {}
        self._round = None
        self._revealed: frozenset[str] | None = None

    def __repr__(self) -> str:
        return f"SecAggClient({self.peer_id!r}, {len(self.peers)} peers)"

    def public_key(self) -> bytes:
        return _raw_public(self._key)

    def _pair_masks(self, length: int) -> np.ndarray:
        total = np.zeros(length, dtype=np.uint64)
        for other, seed in self._seeds.items():
            if other > self.peer_id:
                total += prg(seed, length)
            else:
                total -= prg(seed, length)
        return total

    def masked_update(self, flat_tensor: torch.Tensor, peer_public_keys: Mapping[str, bytes], round_id,
                      num_examples: int = 1) -> torch.Tensor:
        """[num_examples * flat_tensor, num_examples] in fixed point, masked; int64 tensor."""
        missing = set(self.peers) - set(peer_public_keys)
        if missing:
            raise ProtocolError(f"no public key for peers {sorted(missing)}")
        body = _encode_weighted(flat_tensor, num_examples, self.fractional_bits, len(self.peers))
        self._round, self._revealed = round_id, None
        self._seeds = {p: pair_seed(self._key, peer_public_keys[p], self.peer_id, p, round_id)
                       for p in self.peers if p != self.peer_id}
        return torch.from_numpy((body + self._pair_masks(len(body))).view(np.int64))

    def reveal_seeds_for(self, dropped: Iterable[str]) -> dict[str, bytes]:
        """This round's seeds shared with `dropped` peers; once per round, never for oneself."""
        dropped = frozenset(dropped)
        if self._round is None:
            raise ProtocolError("no masked update was made this round")
        if self.peer_id in dropped or not dropped <= set(self.peers):
            raise ProtocolError("can only reveal seeds shared with other selected peers")
        if self._revealed is not None and dropped != self._revealed:
            raise ProtocolError("seeds for this round were already revealed for another set of peers")
        if len(self.peers) - len(dropped) < self.min_survivors:
            raise ProtocolError(f"only {len(self.peers) - len(dropped)} peers would remain; "
                                f"this client needs {self.min_survivors}")
        self._revealed = dropped
        return {p: self._seeds[p] for p in sorted(dropped)}


class SecAggServer:
    """The coordinator's side: sums masked vectors and removes dropped peers' masks."""

    def __init__(self, peers: Iterable[str], fractional_bits: int = 24, *, min_survivors: int = 2):
        self.peers = _check_peers(peers)
        self.fractional_bits = _check_bits(fractional_bits)
        self.min_survivors = max(2, int(min_survivors))

    def unmask(self, masked: Mapping[str, torch.Tensor],
               dropped_reveals: Mapping[str, Mapping[str, bytes]] | None = None) -> tuple[torch.Tensor, int]:
        """(sum of num_examples * update over the survivors, sum of their num_examples)."""
        unknown = set(masked) - set(self.peers)
        if unknown:
            raise ProtocolError(f"masked updates from unselected peers {sorted(unknown)}")
        survivors = sorted(masked)
        dropped = [p for p in self.peers if p not in masked]
        if len(survivors) < self.min_survivors:
            raise ProtocolError(f"{len(survivors)} masked updates, need {self.min_survivors}")
        length = None
        total = None
        for p in survivors:
            ring = _as_ring(masked[p], length, p)
            length = ring.size
            total = ring.copy() if total is None else total + ring
        reveals = dropped_reveals or {}
        for i in survivors if dropped else ():
            got = reveals.get(i)
            if not isinstance(got, Mapping):
                raise ProtocolError(f"survivor {i} revealed no seeds for the dropped peers")
            for d in dropped:
                seed = got.get(d)
                if not isinstance(seed, (bytes, bytearray)) or len(seed) != _SEED_BYTES:
                    raise ProtocolError(f"survivor {i} did not reveal its seed with dropped peer {d}")
                mask = prg(bytes(seed), length)
                if d > i:      # i added PRG(s_id)
                    total -= mask
                else:          # i subtracted it
                    total += mask
        return _finish(total, self.fractional_bits)

    def aggregate(self, masked: Mapping[str, torch.Tensor],
                  dropped_reveals: Mapping[str, Mapping[str, bytes]] | None = None) -> torch.Tensor:
        """The survivors' num_examples-weighted mean update (float64)."""
        total, weight = self.unmask(masked, dropped_reveals)
        return total / weight


# ------------------------------------------------------------------ Shamir sharing over GF(2^521 - 1)

_P = 2 ** 521 - 1  # a Mersenne prime, room for any 256-bit secret
_SHARE_BYTES = 66


def shamir_split(secret: int, n: int, threshold: int) -> list[tuple[int, int]]:
    """`n` shares (x = 1..n, y) of `secret`; any `threshold` of them recover it, fewer reveal nothing."""
    if not 1 <= threshold <= n or not 0 <= secret < _P:
        raise BadRequest("need 1 <= threshold <= n and a secret below 2^521 - 1")
    coeffs = [secret] + [secrets.randbelow(_P) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % _P
        shares.append((x, y))
    return shares


def shamir_combine(shares: Iterable[tuple[int, int]]) -> int:
    """Lagrange interpolation at 0 of distinct shares (enough of them, or the result is noise)."""
    shares = list(shares)
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or not all(0 < x < _P for x in xs):
        raise ProtocolError("shares must have distinct, non-zero x")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % _P
                den = den * (xj - xi) % _P
        secret = (secret + yi * num * pow(den, -1, _P)) % _P
    return secret


# ------------------------------------------------------------------ double masking

def _nonce(sender: str, recipient: str) -> bytes:
    # both directions of a pair share one key per round: the direction picks the nonce
    return bytes(11) + (b"\x01" if sender < recipient else b"\x02")


def _aad(round_id, sender: str, recipient: str) -> bytes:
    return b"|".join([_DOMAIN, b"shares", _round_bytes(round_id), sender.encode(), recipient.encode()])


class DoubleMaskClient:
    """A peer in Bonawitz et al.'s protocol with double masking (semi-honest, no signatures).

    Rounds, each a method: advertise :meth:`public_keys`; :meth:`share_keys` returns
    encrypted Shamir shares of this round's self-mask seed b and masking key, one
    per peer, for the coordinator to route; :meth:`masked_update` adds PRG(b) and
    the pairwise masks with every peer that shared keys; :meth:`unmask_shares`
    answers once per round with, for each peer, a share of b (it is a survivor)
    or of its masking key (it dropped), never both. Create one client per round.
    """

    def __init__(self, peer_id: str, peers: Iterable[str], fractional_bits: int = 24, *,
                 threshold: int | None = None):
        self.peer_id = peer_id
        self.peers = _check_peers(peers)
        if peer_id not in self.peers:
            raise BadRequest(f"{peer_id} is not among the peers")
        self.fractional_bits = _check_bits(fractional_bits)
        n = len(self.peers)
        self.threshold = threshold if threshold is not None else n // 2 + 1
        if not 2 <= self.threshold <= n:
            raise BadRequest(f"threshold must be in [2, {n}]")
        self._ckey, self._skey = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._b = secrets.token_bytes(_SEED_BYTES)
        self._state = "new"
        self._round = None
        self._keys: dict[str, dict[str, bytes]] = {}
        self._inbox: dict[str, bytes] = {}
        self._own_share: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"DoubleMaskClient({self.peer_id!r}, {self._state})"

    @property
    def state(self) -> str:
        """"new", "shared" (keys shared), "masked" (update sent) or "done" (unmasking answered)."""
        return self._state

    def public_keys(self) -> dict[str, bytes]:
        """{"c": channel key, "s": masking key}, both raw X25519 public keys."""
        return {"c": _raw_public(self._ckey), "s": _raw_public(self._skey)}

    def _channel(self, other: str) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(pair_seed(self._ckey, self._keys[other]["c"], self.peer_id, other,
                                          self._round, purpose=b"channel"))

    def share_keys(self, public_keys: Mapping[str, Mapping[str, bytes]], round_id, *,
                   allow_missing: bool = False) -> dict[str, bytes]:
        """Encrypted shares for each other peer: {recipient: ciphertext}.

        With `allow_missing`, peers that advertised no keys (they dropped before this
        step) leave the round: the peers become those with keys, who must still be at
        least the threshold, and the server must be made for that same list.
        """
        if self._state != "new":
            raise ProtocolError(f"share_keys in state {self._state}")
        missing = set(self.peers) - set(public_keys)
        if missing and not allow_missing:
            raise ProtocolError(f"no public keys for {sorted(missing)}")
        if missing:
            if self.peer_id in missing:
                raise ProtocolError("this peer's own keys are missing")
            remaining = [p for p in self.peers if p not in missing]
            if len(remaining) < self.threshold:
                raise ProtocolError(f"{len(remaining)} peers advertised keys, need {self.threshold}")
            self.peers = remaining
        self._round = round_id
        self._keys = {p: {"c": bytes(public_keys[p]["c"]), "s": bytes(public_keys[p]["s"])}
                      for p in self.peers}
        n = len(self.peers)
        b_shares = shamir_split(int.from_bytes(self._b, "big"), n, self.threshold)
        s_shares = shamir_split(int.from_bytes(_raw_private(self._skey), "big"), n, self.threshold)
        out = {}
        for k, p in enumerate(self.peers):
            plain = b_shares[k][1].to_bytes(_SHARE_BYTES, "big") + s_shares[k][1].to_bytes(_SHARE_BYTES, "big")
            if p == self.peer_id:
                self._inbox[p] = plain
            else:
                out[p] = self._channel(p).encrypt(_nonce(self.peer_id, p), plain,
                                                  _aad(round_id, self.peer_id, p))
        self._state = "shared"
        return out

    def masked_update(self, flat_tensor: torch.Tensor, ciphertexts: Mapping[str, bytes],
                      num_examples: int = 1) -> torch.Tensor:
        """Masked [n * x, n] given the shares routed to this peer ({sender: ciphertext})."""
        if self._state != "shared":
            raise ProtocolError(f"masked_update in state {self._state}")
        for sender, ct in ciphertexts.items():
            if sender not in self._keys or sender == self.peer_id:
                raise ProtocolError(f"shares from unknown peer {sender}")
            try:
                self._inbox[sender] = self._channel(sender).decrypt(
                    _nonce(sender, self.peer_id), bytes(ct), _aad(self._round, sender, self.peer_id))
            except Exception:
                raise ProtocolError(f"shares from {sender} do not decrypt") from None
        if len(self._inbox) < self.threshold:
            raise ProtocolError(f"only {len(self._inbox)} peers shared keys, need {self.threshold}")
        body = _encode_weighted(flat_tensor, num_examples, self.fractional_bits, len(self.peers))
        total = body + prg(self._b, len(body))
        for other in self._inbox:
            if other == self.peer_id:
                continue
            mask = prg(pair_seed(self._skey, self._keys[other]["s"], self.peer_id, other, self._round),
                       len(body))
            if other > self.peer_id:
                total += mask
            else:
                total -= mask
        self._state = "masked"
        return torch.from_numpy(total.view(np.int64))

    def unmask_shares(self, survivors: Iterable[str]) -> dict[str, dict[str, bytes]]:
        """For each peer that shared keys: {"b": share} if it survived, else {"s": share}. Once."""
        if self._state != "masked":
            raise ProtocolError(f"unmask_shares in state {self._state} (answers once per round)")
        survivors = set(survivors)
        if self.peer_id not in survivors or not survivors <= set(self._inbox):
            raise ProtocolError("survivors must include this peer and only peers that shared keys")
        if len(survivors) < self.threshold:
            raise ProtocolError(f"{len(survivors)} survivors, need {self.threshold}")
        self._state = "done"
        out = {}
        for p, plain in self._inbox.items():
            kind, part = ("b", plain[:_SHARE_BYTES]) if p in survivors else ("s", plain[_SHARE_BYTES:])
            out[p] = {kind: part}
        return out


class DoubleMaskServer:
    """The coordinator for :class:`DoubleMaskClient`: routes shares, then unmasks the sum."""

    def __init__(self, peers: Iterable[str], fractional_bits: int = 24, *, threshold: int | None = None):
        self.peers = _check_peers(peers)
        self.fractional_bits = _check_bits(fractional_bits)
        n = len(self.peers)
        self.threshold = threshold if threshold is not None else n // 2 + 1
        self.shared: list[str] = []

    def route_shares(self, outboxes: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """{sender: {recipient: ct}} from the peers that answered -> {recipient: {sender: ct}}."""
        self.shared = sorted(p for p in outboxes if p in self.peers)
        if len(self.shared) < self.threshold:
            raise ProtocolError(f"{len(self.shared)} peers shared keys, need {self.threshold}")
        inboxes: dict[str, dict[str, bytes]] = {p: {} for p in self.shared}
        for sender in self.shared:
            for recipient, ct in outboxes[sender].items():
                if recipient in inboxes and recipient != sender:
                    inboxes[recipient][sender] = ct
        return inboxes

    def _recover(self, who: str, kind: str, responses: Mapping[str, Mapping[str, Mapping[str, bytes]]]) -> bytes:
        shares = []
        for responder, answer in responses.items():
            part = answer.get(who, {}).get(kind)
            if isinstance(part, (bytes, bytearray)) and len(part) == _SHARE_BYTES:
                shares.append((self.peers.index(responder) + 1, int.from_bytes(part, "big")))
        if len(shares) < self.threshold:
            raise ProtocolError(f"{len(shares)} shares of {who}'s {kind}, need {self.threshold}")
        secret = shamir_combine(shares[:self.threshold])
        if secret >= 1 << 256:
            raise ProtocolError(f"shares of {who}'s {kind} are inconsistent")
        return secret.to_bytes(_SEED_BYTES, "big")

    def unmask(self, masked: Mapping[str, torch.Tensor], responses: Mapping[str, Mapping[str, Mapping[str, bytes]]],
               public_keys: Mapping[str, Mapping[str, bytes]], round_id) -> tuple[torch.Tensor, int]:
        """(sum of n_i * x_i over survivors, sum of n_i) from their vectors and unmasking answers."""
        survivors = sorted(masked)
        if not set(survivors) <= set(self.shared):
            raise ProtocolError("masked updates from peers that did not share keys")
        if len(survivors) < self.threshold:
            raise ProtocolError(f"{len(survivors)} masked updates, need {self.threshold}")
        if not set(responses) <= set(survivors):
            raise ProtocolError("unmasking answers from peers that are not survivors")
        dropped = [p for p in self.shared if p not in masked]
        if any(not isinstance(public_keys.get(j), Mapping) or "s" not in public_keys[j] for j in survivors):
            raise ProtocolError("unmasking needs every survivor's masking public key")
        length, total = None, None
        for p in survivors:
            ring = _as_ring(masked[p], length, p)
            length = ring.size
            total = ring.copy() if total is None else total + ring
        for j in survivors:
            total -= prg(self._recover(j, "b", responses), length)
        for d in dropped:
            key = X25519PrivateKey.from_private_bytes(self._recover(d, "s", responses))
            for j in survivors:
                mask = prg(pair_seed(key, public_keys[j]["s"], d, j, round_id), length)
                if d > j:
                    total -= mask
                else:
                    total += mask
        return _finish(total, self.fractional_bits)

    def aggregate(self, masked, responses, public_keys, round_id) -> torch.Tensor:
        total, weight = self.unmask(masked, responses, public_keys, round_id)
        return total / weight
