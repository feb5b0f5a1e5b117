"""The crypto provider's dealer service: material for whole session plans, dealt ahead.

A peer configured with the role ``crypto-provider`` runs a :class:`DealerService`
(its record says so, but only the data owners' own ``crypto_providers`` make it a
trusted dealer for their shares: :func:`p2pgrid.smpc.handlers.approve_group`). Parties ask it for their material for a session's plan
(``Deal``), and for that of later sessions of the same plan in the same request (a
party fetching ahead): the first party to ask for a ``(session, plan)`` gets the
bundle dealt for every party, the others collect theirs; each party gets its own part
once, and only the party the group names at that index may take it. The dealer learns shapes
and the op sequence, never data or shares of data.

Ahead of use: after serving a plan for a group, the dealer deals another bundle for
the same (group, plan) in a worker thread, so the next session with that plan (the
next training step, the next inference batch) is served from the pool at once. The
crypto behind it is :class:`p2pgrid.protocols.smpc.LocalDealer` (PRG-seed compressed: all but
one party receive 16-byte seeds).
"""

from __future__ import annotations

import logging
import time

import trio

from p2pgrid.errors import BadRequest, Conflict, PermissionDenied, ProtocolError
from p2pgrid.protocols.smpc import mac_material
from p2pgrid.protocols.smpc.dealer import LocalDealer
from p2pgrid.protocols.smpc.messages import Material, Request

from .messages import Deal, Dealt, DealMask, MaskDealt, TakeMask
from .session import plan_hash
from .state import PROTOCOL, Group, _Lru, check_requester

log = logging.getLogger("p2pgrid.smpc.dealer")

ROLE = "crypto-provider"
BUNDLE_TTL = 120.0     # undelivered parts of a bundle are dropped after this
POOL_TTL = 600.0
POOL_DEPTH = 1         # bundles dealt ahead per (group, plan)
MAX_PLAN_ITEMS = 4096
MAX_SESSIONS = 32      # sessions one Deal may cover


MASK_TTL = 120.0
MASKS_PER_CALLER = 64  # masks dealt and not yet taken by every party, per requester


def deal_plan(plan: list[Request], n: int, key: "mac_material.MacKey | None" = None
              ) -> list[list[Material]]:
    """Material for every item of `plan`, per item one Material per party. Authenticated
    kinds (``a_*``, active groups) are dealt under the group's MAC `key`."""
    dealer = LocalDealer()  # fresh key from os.urandom; one per bundle, so threads share nothing
    balance = mac_material.Balance(n)   # spreads the authenticated corrections over parties
    out = []
    for req in plan:
        if req.kind in mac_material.AUTH_KINDS:
            if key is None:
                raise BadRequest("authenticated material is for active groups only")
            out.append(balance.deal(req, key))
        else:
            out.append(dealer.deal(req, n))
    return out


class _Bundle:
    def __init__(self, n: int):
        self.created = time.monotonic()
        self.ready = trio.Event()
        self.items: list[list[Material]] | None = None
        self.error: str | None = None
        self.taken = [False] * n


class DealerService:
    def __init__(self, peer, nursery: trio.Nursery):
        self.peer = peer
        self.nursery = nursery
        self.bundles: dict[tuple[str, str], _Bundle] = {}
        self.pool: _Lru = _Lru(16)            # (group key, plan hash) -> [(created, items)]
        self._refilling: set = set()
        self.dealt_items = 0
        self.served_from_pool = 0
        self.mac_keys: dict[str, mac_material.MacKey] = {}   # active group key -> MAC key
        self.masks: dict[str, dict] = {}                     # mask id -> parts per party

    def mac_key(self, group: Group) -> "mac_material.MacKey | None":
        """The group's MAC key (made on first use; kept while the dealer runs, so shares
        kept between sessions stay checkable). None for semi-honest groups."""
        if not group.active:
            return None
        key = self.mac_keys.get(group.key)
        if key is None:
            key = self.mac_keys[group.key] = mac_material.MacKey.new(group.n)
        return key

    async def deal_mask(self, caller, msg: DealMask) -> MaskDealt:
        """Masks for `caller` (clear) and the parties (authenticated shares, taken later)."""
        group = Group.from_wire(msg.group)
        check_requester(msg.group, caller.name)
        if group.dealer != self.peer.name or not group.active:
            raise BadRequest("masks are dealt for active groups of this dealer")
        if msg.id in self.masks:
            raise Conflict(f"mask {msg.id[:12]} exists")
        if not 1 <= len(msg.shapes) <= 16:
            raise BadRequest("1 to 16 masks per request")
        if sum(1 for m in self.masks.values() if m["owner"] == caller.name) >= MASKS_PER_CALLER:
            raise Conflict(f"{caller.name} has {MASKS_PER_CALLER} masks not yet taken")
        req = Request("a_mask", tuple(tuple(s) for s in msg.shapes))
        key = self.mac_key(group)
        clear: dict = {}
        parts = await trio.to_thread.run_sync(
            lambda: mac_material.deal(req, group.n, key, clear))
        keys = mac_material.key_material(key, group.n)
        self.masks[msg.id] = {"owner": caller.name, "group": group, "created": time.monotonic(),
                              "parts": [[k, m] for k, m in zip(keys, parts)],
                              "taken": [False] * group.n}
        from p2pgrid.protocols.smpc import mac
        return MaskDealt([mac._to_wire(clear[f"r{i}"][0]) for i in range(len(msg.shapes))])

    def take_mask(self, caller, msg: TakeMask) -> Dealt:
        group = Group.from_wire(msg.group)
        check_requester(msg.group, caller.name)
        if not 0 <= msg.party < group.n or group.parties[msg.party] != caller.name:
            raise PermissionDenied(f"{caller.name} is not party {msg.party} of this group")
        m = self.masks.get(msg.id)
        if m is None or m["group"] != group:
            raise BadRequest(f"no mask {msg.id[:12]} for this group (expired or never dealt)")
        if m["taken"][msg.party]:
            raise Conflict(f"party {msg.party} already took mask {msg.id[:12]}")
        m["taken"][msg.party] = True
        part = m["parts"][msg.party]
        m["parts"][msg.party] = None
        if all(m["taken"]):
            self.masks.pop(msg.id, None)
        return Dealt(part, protocol=PROTOCOL)

    async def serve(self, caller, msg: Deal) -> Dealt:
        group = Group.from_wire(msg.group)
        check_requester(msg.group, caller.name)
        if group.dealer != self.peer.name:
            raise PermissionDenied(f"this group's dealer is {group.dealer}, not {self.peer.name}")
        if not 0 <= msg.party < group.n or group.parties[msg.party] != caller.name:
            raise PermissionDenied(f"{caller.name} is not party {msg.party} of this group")
        if len(msg.requests) > MAX_PLAN_ITEMS:
            raise BadRequest(f"a plan has at most {MAX_PLAN_ITEMS} items")
        sessions = [msg.session, *msg.more]
        if len(sessions) > MAX_SESSIONS or len(set(sessions)) != len(sessions):
            raise BadRequest(f"a deal covers at most {MAX_SESSIONS} distinct sessions")
        plan = list(msg.requests)
        if plan_hash(plan) != msg.plan:
            raise BadRequest("the plan does not match its hash")
        bundles, new = [], []
        for s in sessions:
            bundle = self.bundles.get((s, msg.plan))
            if bundle is None:
                bundle = self.bundles[(s, msg.plan)] = _Bundle(group.n)
                new.append((s, bundle))
            bundles.append(bundle)
        if new:
            try:
                dealt = await self._take_or_deal(group, msg.plan, plan, len(new))
                for (_, bundle), items in zip(new, dealt):
                    bundle.items = items
            except Exception as e:
                for s, bundle in new:
                    bundle.error = f"{type(e).__name__}"
                    self.bundles.pop((s, msg.plan), None)
                raise ProtocolError(f"the dealer could not deal this plan ({type(e).__name__})") \
                    from None
            finally:
                for _, bundle in new:
                    bundle.ready.set()
        out = []
        for s, bundle in zip(sessions, bundles):
            await bundle.ready.wait()
            if bundle.items is None:
                raise ProtocolError(f"the dealer could not deal this plan ({bundle.error})")
            if bundle.taken[msg.party]:
                raise Conflict(f"party {msg.party} already took its material for session "
                               f"{s[:8]}")
        for s, bundle in zip(sessions, bundles):
            bundle.taken[msg.party] = True
            out.append([item[msg.party] for item in bundle.items])
            if all(bundle.taken):
                self.bundles.pop((s, msg.plan), None)
        return Dealt(out[0], out[1:], protocol=PROTOCOL)

    async def _take_or_deal(self, group: Group, ph: str, plan: list[Request], count: int):
        """`count` bundles for (group, plan): from the pool while it lasts, the rest dealt now."""
        pkey = (group.key, ph)
        stock = self.pool.get(pkey)
        now = time.monotonic()
        out = []
        while stock and len(out) < count:
            created, cand = stock.pop(0)
            if now - created < POOL_TTL:
                out.append(cand)
                self.served_from_pool += 1
        if len(out) < count:
            k = count - len(out)
            key = self.mac_key(group)
            out += await trio.to_thread.run_sync(
                lambda: [deal_plan(plan, group.n, key) for _ in range(k)])
        self.dealt_items += len(plan) * count
        if pkey not in self._refilling:
            self._refilling.add(pkey)
            self.nursery.start_soon(self._refill, pkey, plan, group.n, self.mac_key(group))
        return out

    async def _refill(self, pkey, plan, n, key=None) -> None:
        try:
            stock = self.pool.get(pkey) or []
            while len(stock) < POOL_DEPTH:
                items = await trio.to_thread.run_sync(deal_plan, plan, n, key)
                stock.append((time.monotonic(), items))
                self.pool.put(pkey, stock)
        finally:
            self._refilling.discard(pkey)

    def sweep(self, now_mono: float) -> None:
        for id_, m in list(self.masks.items()):
            if now_mono - m["created"] > MASK_TTL:
                self.masks.pop(id_, None)
        for key, b in list(self.bundles.items()):
            if now_mono - b.created > BUNDLE_TTL:
                self.bundles.pop(key, None)
        for key, stock in list(self.pool.items()):
            stock[:] = [(c, i) for c, i in stock if now_mono - c < POOL_TTL]
            if not stock:
                self.pool.pop(key, None)
