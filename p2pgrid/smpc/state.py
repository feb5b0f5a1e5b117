"""What one peer keeps for SMPC: its shares, models, session mailboxes and plans.

Everything here lives in memory (``peer.extensions["smpc"]``); shares are never
written to disk or logged, and their ``repr`` shows shapes only.

* :class:`Group`: the parties (ordered: index = party number) and the dealer a shared
  tensor belongs to, with its fixed-point precision. Operands of one computation
  must have the same group.
* :class:`ShareRules`: who may compute on a shared tensor and who may reconstruct it.
  Derived results get the strictest rules of their inputs (as stored objects do).
* :class:`Mailbox`: the rounds of one session. A party's round message to a
  higher-numbered party travels as a request whose reply is that party's message
  for the same step, so each round costs one request per pair of parties.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import trio

from p2pgrid.errors import BadRequest, Conflict, PermissionDenied, ProtocolError
from p2pgrid.ratelimit import Limiter

__all__ = ["Group", "ShareRules", "Entry", "ModelRecord", "Mailbox", "SmpcState",
           "PROTOCOL", "check_protocol", "check_requester"]

MAX_PARTIES = 8
SECURITY_MODES = ("semi-honest", "active")
# What peers of one group must agree on beyond the messages' form: how dealt seeds expand
# (p2pgrid.protocols.smpc.messages.expand_seed), what each round holds. Peers that differ
# here decode each other's messages fine and compute garbage: wrong results, or in
# active mode a MAC check that blames a party. 1 stands for every release before the
# number travelled (their group maps have none); 2 lays a seed's components out along
# one stream; 3 sends an active item's non-uniform values as their low words only (the
# high ones from the seed: p2pgrid.protocols.smpc.mac_material._low_correction) and
# leaves a first layer's E out of its active layer item (param 1, as semi-honest).
PROTOCOL = 3


def check_protocol(theirs, who: str) -> None:
    """Conflict unless `theirs` (a group map's or a dealer reply's number) is ours."""
    if theirs != PROTOCOL:
        known = isinstance(theirs, int) and not isinstance(theirs, bool) and 0 < theirs < 1 << 16
        theirs = f"SMPC protocol {theirs}" if known else "an unknown SMPC protocol"
        raise Conflict(f"{who} runs {theirs}, this peer {PROTOCOL}: every peer "
                       f"of a group (parties, dealer, requester) needs a p2pgrid release with "
                       f"the same one; upgrade the older peer")


def check_requester(group_map: dict, requester: str) -> None:
    """:func:`check_protocol` for a group map a requester sent (none carried a number
    before it travelled: 1)."""
    check_protocol(group_map.get("protocol", 1), f"the requester {requester}")


@dataclass(frozen=True)
class Group:
    """Who holds the shares (in party order) and who deals; all must be distinct."""

    parties: tuple[str, ...]
    dealer: str
    frac_bits: int = 16
    security: str = "semi-honest"   # or "active": MAC-checked shares (p2pgrid.protocols.smpc.mac)

    def __post_init__(self):
        if self.security not in SECURITY_MODES:
            raise BadRequest(f"security must be one of {', '.join(SECURITY_MODES)}, not "
                             f"{self.security!r}")
        object.__setattr__(self, "parties", tuple(self.parties))
        if not 2 <= len(self.parties) <= MAX_PARTIES:
            raise BadRequest(f"SMPC needs 2 to {MAX_PARTIES} parties")
        if not all(isinstance(p, str) and p for p in self.parties) or len(set(self.parties)) != len(self.parties):
            raise BadRequest("parties must be distinct peer names")
        if not isinstance(self.dealer, str) or not self.dealer:
            raise BadRequest("a dealer (crypto provider) is required")
        if self.dealer in self.parties:
            raise BadRequest("the dealer must not be one of the parties (it must not collude "
                             "with any of them)")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 30:
            raise BadRequest("frac_bits must be an int in [0, 30]")

    @property
    def n(self) -> int:
        return len(self.parties)

    @property
    def key(self) -> str:
        key = ",".join(self.parties) + "|" + self.dealer + f"|{self.frac_bits}"
        return key + "|active" if self.active else key

    @property
    def active(self) -> bool:
        return self.security == "active"

    def index(self, name: str) -> int:
        try:
            return self.parties.index(name)
        except ValueError:
            raise BadRequest(f"{name!r} is not a party of this computation") from None

    def to_wire(self) -> dict:
        d = {"parties": list(self.parties), "dealer": self.dealer, "frac_bits": self.frac_bits,
             "protocol": PROTOCOL}
        if self.active:
            d["security"] = self.security
        return d

    @classmethod
    def from_wire(cls, d) -> "Group":
        if not isinstance(d, dict):
            raise BadRequest("group must be a map")
        try:
            return cls(tuple(d["parties"]), d["dealer"], int(d.get("frac_bits", 16)),
                       str(d.get("security", "semi-honest")))
        except (KeyError, TypeError, ValueError):
            raise BadRequest("group needs parties, dealer and frac_bits") from None


def _names(v) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, Iterable):
        raise BadRequest("rules list names (a list of strings)")
    out = tuple(dict.fromkeys(v))
    if not all(isinstance(n, str) and n for n in out):
        raise BadRequest("rules list names (a list of strings)")
    return out


@dataclass(frozen=True)
class ShareRules:
    """Rights on a shared tensor. `owner` (the data's owner, "" for derived values)
    holds every right; `holder` may delete it. "*" means anyone.

    - ``compute``: may use it in computations;
    - ``reveal``: may reconstruct it, and anything derived from it;
    - ``aggregate``: may reconstruct results of training on it (an aggregate over a
      batch of at least ``min_rows`` records).
    """

    owner: str = ""
    compute: tuple[str, ...] = ()
    reveal: tuple[str, ...] = ()
    aggregate: tuple[str, ...] = ()
    min_rows: int = 10
    holder: str = ""

    def __post_init__(self):
        for name in ("compute", "reveal", "aggregate"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        if not isinstance(self.min_rows, int) or self.min_rows < 0:
            raise BadRequest("min_rows must be a non-negative int")

    def allows(self, right: str, who: str) -> bool:
        if who and who == self.owner:
            return True
        names = {"compute": self.compute, "reveal": self.reveal, "aggregate": self.aggregate}[right]
        return "*" in names or who in names

    def grants(self, right: str) -> tuple[str, ...]:
        names = {"compute": self.compute, "reveal": self.reveal, "aggregate": self.aggregate}[right]
        return names if "*" in names or not self.owner else names + (self.owner,)

    def to_wire(self) -> dict:
        return {"owner": self.owner, "compute": list(self.compute), "reveal": list(self.reveal),
                "aggregate": list(self.aggregate), "min_rows": self.min_rows, "holder": self.holder}

    @classmethod
    def from_wire(cls, d) -> "ShareRules":
        if not isinstance(d, dict):
            raise BadRequest("rules must be a map")
        try:
            return cls(str(d.get("owner", "")), d.get("compute", ()), d.get("reveal", ()),
                       d.get("aggregate", ()), int(d.get("min_rows", 10)), str(d.get("holder", "")))
        except (TypeError, ValueError):
            raise BadRequest("malformed rules") from None

    @staticmethod
    def derived(inputs: Iterable["ShareRules"], holder: str, *, aggregate_rows: int | None = None
                ) -> "ShareRules":
        """Rules of a value computed from `inputs`: a name keeps a right only if every
        input grants it. With `aggregate_rows` (training on that many records), an
        input's ``aggregate`` names may also reconstruct the result when the batch
        spans at least its ``min_rows``."""
        inputs = list(inputs)
        if not inputs:
            return ShareRules(holder=holder)

        def meet(right: str) -> tuple[str, ...]:
            acc: set[str] | None = None
            for r in inputs:
                names = set(r.grants(right))
                if right == "reveal" and aggregate_rows is not None and aggregate_rows >= r.min_rows:
                    names |= set(r.grants("aggregate"))
                if "*" in names:
                    continue
                acc = names if acc is None else acc & names
            return ("*",) if acc is None else tuple(sorted(acc))

        return ShareRules("", meet("compute"), meet("reveal"), meet("aggregate"),
                          max(r.min_rows for r in inputs), holder)


@dataclass(eq=False)
class Entry:
    """This party's share of one shared tensor."""

    share: torch.Tensor
    scale: int
    group: Group
    party: int
    rules: ShareRules
    expires: float
    auth: Any = None        # active groups: p2pgrid.protocols.smpc.mac.AuthShared (value and MAC)
    key_id: int = 0         # the dealer's MAC key the auth shares are under

    def __repr__(self) -> str:  # never a share value
        return f"Entry(shape={list(self.share.shape)}, party={self.party}, scale={self.scale})"


@dataclass
class ModelRecord:
    """An encrypted model's layout: layers name their parameters' share ids."""

    id: str
    group: Group
    layers: list[dict]
    users: tuple[str, ...]
    owner: str
    limiter: Limiter = field(default_factory=Limiter)  # users' calls and rows, this party's count
    max_batch: int | None = None

    def param_ids(self) -> list[str]:
        out = []
        for layer in self.layers:
            if layer["kind"] == "linear":
                out.append(layer["weight"])
                if layer.get("bias"):
                    out.append(layer["bias"])
        return out


class Mailbox:
    """Round messages of one session as they arrive, with wake-ups for whoever waits."""

    def __init__(self, session: str, now: float):
        self.session = session
        self.created = now
        self.claimed = False
        self.group: Group | None = None
        self.requester: str | None = None
        self._in: dict[tuple[int, int], tuple[Any, str]] = {}   # (step, sender) -> (msg, caller)
        self.aborted: str | None = None
        self._changed = trio.Event()

    def _notify(self) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    def _check(self) -> None:
        if self.aborted is not None:
            raise ProtocolError(f"session {self.session[:8]} aborted: {self.aborted}")

    def deposit(self, step: int, sender: int, msg, caller: str) -> None:
        self._check()
        key = (step, sender)
        if key in self._in:
            raise ProtocolError(f"a second step-{step} message from party {sender}")
        self._in[key] = (msg, caller)
        self._notify()

    async def receive(self, step: int, sender: int):
        while True:
            self._check()
            item = self._in.pop((step, sender), None)
            if item is not None:
                return item
            await self._changed.wait()

    def abort(self, reason: str) -> None:
        if self.aborted is None:
            self.aborted = reason[:300]
            self._notify()


class _Lru(OrderedDict):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class SmpcState:
    """Per-peer SMPC state (``peer.extensions["smpc"]``), set up by the plugin's service."""

    nursery: trio.Nursery
    shares: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)
    mailboxes: dict[str, Mailbox] = field(default_factory=dict)
    plans: _Lru = field(default_factory=lambda: _Lru(64))
    prefetched: dict = field(default_factory=dict)       # (session, plan hash) -> _Pending
    material_bytes: _Lru = field(default_factory=lambda: _Lru(64))  # plan hash -> one session's
    next_session: dict[tuple, str] = field(default_factory=dict)  # (group key, chain) -> id
    finished: _Lru = field(default_factory=lambda: _Lru(256))  # session -> "ok" | error text
    mac_keys: dict = field(default_factory=dict)           # group key -> (key id, alpha share)
    dealer: Any = None                                     # DealerService on crypto providers
    share_ttl: float = 6 * 3600.0
    mailbox_ttl: float = 120.0

    def mailbox(self, session: str) -> Mailbox:
        mb = self.mailboxes.get(session)
        if mb is None:
            if session in self.finished:
                raise ProtocolError(f"session {session[:8]} is over")
            mb = self.mailboxes[session] = Mailbox(session, time.monotonic())
        return mb

    def peer_broke(self, name: str, why: str) -> None:
        """A push stream to or from `name` broke: sessions it takes part in cannot finish."""
        for mb in list(self.mailboxes.values()):
            if mb.claimed and mb.group is not None and name in mb.group.parties:
                mb.abort(f"party {name} is unreachable: {why}")

    def close(self, session: str, outcome: str) -> None:
        self.mailboxes.pop(session, None)
        self.finished.put(session, outcome)

    def entry(self, id: str, group: Group) -> Entry:
        e = self.shares.get(id)
        if e is None or e.expires < time.time():
            raise BadRequest(f"this party holds no shared tensor {id!r} (never shared here, "
                             "deleted or expired)")
        if e.group != group and e.group.parties == group.parties and \
                e.group.dealer == group.dealer and e.group.security != group.security:
            raise PermissionDenied(
                f"shared tensor {id!r} was shared with security={e.group.security!r} (its "
                f"owner's choice, or its peer's smpc_security); this session runs "
                f"security={group.security!r}: refused")
        if e.group != group:
            raise BadRequest(f"shared tensor {id!r} belongs to parties {list(e.group.parties)} "
                             f"dealt by {e.group.dealer}, not to this computation's group")
        return e

    def sweep(self, now_mono: float, now: float) -> None:
        for sid, mb in list(self.mailboxes.items()):
            if now_mono - mb.created > self.mailbox_ttl and not mb.claimed:
                mb.abort("nobody started this session")
                self.mailboxes.pop(sid, None)
        for id_, e in list(self.shares.items()):
            if e.expires < now:
                self.shares.pop(id_, None)
        for key, pending in list(self.prefetched.items()):
            if now_mono - pending.created > self.mailbox_ttl:
                self.prefetched.pop(key, None)
