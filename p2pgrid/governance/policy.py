"""Governance of one running peer: who may do what, and wake-ups for decisions.

:func:`of` gives the peer's :class:`Governance` (made on first use, so it is in
place before the first request is dispatched: ``Peer.authorize`` asks it). It
opens ``governance.db``, adds the audit sink to ``peer.audit_sinks`` and wraps
``peer.router`` in a :class:`Gate` that checks roles for plugin messages.

Modes. With no registered users a peer behaves as it always did: names bound on
first use, object rules decide. Registered users get their role's ceiling (see
``roles.py``) and their name is pinned to their key. With the setting
``registered_only`` nobody else may do anything but gossip and ping; with
``releases_registered_only`` others may search and compute, but take nothing out.

Names are free, so a name the owner has not vouched for carries no allowance of its
own: unregistered callers (:meth:`Governance.pooled`) share one privacy budget and one
pool of each rate limit, whatever names they come under; addresses are not free, so
those from one client address take at most a share of each (:meth:`Governance.guest`).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import trio

from .. import wire
from ..auth import Caller
from ..errors import PermissionDenied, Unauthenticated
from ..limits import GUEST_ADDRESS_SHARE, Guest
from .roles import allows
from .store import GovernanceStore

log = logging.getLogger("p2pgrid.governance")

NAME = "governance"  # key in peer.extensions
_VERBS = {"search": "search", "compute": "compute", "request": "file requests",
          "admin": "administer this peer"}
_OPEN = ("rt.", "dir.", "gov.")  # core and governance handlers check for themselves


class Governance:
    def __init__(self, peer):
        self.peer = peer
        data = Path(peer.config.data_dir)
        self.store = GovernanceStore(data / "governance.db", sign=peer.identity.sign)
        self.token = console_token(data)
        self._changed = trio.Event()
        self.console_url: str | None = None  # set once the web console listens

    def __repr__(self) -> str:
        return f"Governance({self.peer.name!r}, users={len(self.store.users())})"

    # ------------------------------------------------------------ roles

    def is_self(self, caller: Caller) -> bool:
        return caller.name == self.peer.name and caller.public_key == self.peer.identity.public_bytes

    def role(self, caller: Caller) -> str | None:
        """'owner' for the peer itself; a registered user's role; None otherwise."""
        if self.is_self(caller):
            return "owner"
        user = self.store.user(caller.name)
        if user is None or user.public_key is not None and user.public_key != caller.public_key:
            return None
        return user.role

    @property
    def active(self) -> bool:
        """Whether roles are in force here (someone is registered, or registered_only)."""
        return bool(self.store.users()) or self.store.registered_only

    def capable(self, caller: Caller, capability: str) -> bool:
        role = self.role(caller)
        if role is not None:
            return allows(role, capability)
        # open mode: unregistered callers as before, but never an owner's powers
        return capability != "admin" and not self.store.registered_only

    def strangers_store(self) -> bool:
        """Whether callers not registered here may store objects (setting ``store_objects``:
        "registered", the default, or "anyone")."""
        return self.store.setting("store_objects", "registered") == "anyone"

    def pooled(self, caller: Caller) -> bool:
        """Whether `caller` spends from the allowance all unregistered callers share: not
        this peer, not a registered user (with its key), given no budget of its own by the
        owner, and not certified by the network's membership (when a peer has one: a
        ``peer.certified(caller)`` hook)."""
        if self.is_self(caller) or self.role(caller) is not None:
            return False
        if self.store.has_own_budget(caller.name):
            return False
        certified = getattr(self.peer, "certified", None)
        return not (callable(certified) and certified(caller))

    def guest(self, caller: Caller) -> Guest | None:
        """None for a caller with an allowance of its own (see :meth:`pooled`); else its
        place in the pools: its connection's address and the share of each pool that
        the peer's config (``guest_address_share``) lets one address take."""
        if not self.pooled(caller):
            return None
        share = getattr(self.peer.config, "guest_address_share", GUEST_ADDRESS_SHARE)
        return Guest(caller.address, share)

    def require_release(self, caller: Caller, what: str = "take results out") -> None:
        """PermissionDenied for a pooled caller when the owner requires registration
        for any release (``releases_registered_only``)."""
        if self.store.releases_registered_only and self.pooled(caller):
            raise PermissionDenied(f"{caller.name} (not registered here) may not {what} from "
                                   f"{self.peer.name}: its owner requires registration for "
                                   f"any release", capability="release")

    def require(self, caller: Caller, capability: str) -> None:
        if not self.capable(caller, capability):
            role = self.role(caller)
            who = f"{caller.name} ({role})" if role else f"{caller.name} (not registered here)"
            raise PermissionDenied(f"{who} may not {_VERBS[capability]} on {self.peer.name}",
                                   capability=capability)

    def verdict(self, caller: Caller, meta, right: str) -> bool | None:
        """Governance's say on `right` ("compute", "get", "aggregate") over an object:
        True (owner role, or an approved request), False (the role forbids it), or
        None (the object's rules decide)."""
        role = self.role(caller)
        if role == "owner":
            return True
        if not self.capable(caller, "compute"):
            return False
        if right in ("get", "aggregate") and meta.owner != caller.name \
                and self.store.releases_registered_only and self.pooled(caller):
            return False  # a release; their own uploads they may still take back
        if right == "get" and meta.id and self.store.has_grant(caller.name, meta.id, "get"):
            return True
        return None

    def authorize(self, caller: Caller) -> bool:
        """True: a registered name with its registered key (the runtime's first-use
        binding is not consulted). False: not pinned here. Unauthenticated: the name is
        registered with another key."""
        user = self.store.user(caller.name)
        if user is None or user.public_key is None:
            return False
        if user.public_key != caller.public_key:
            raise Unauthenticated(f"the name {caller.name!r} is registered on {self.peer.name} "
                                  f"with another key")
        return True

    def pin(self, caller: Caller) -> None:
        """A user registered without a key is bound to the first key that calls."""
        user = self.store.user(caller.name)
        if user is not None and user.public_key is None and not self.is_self(caller):
            self.store.pin_key(caller.name, caller.public_key)

    # ------------------------------------------------------------ request wake-ups

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_decided(self, rid: str, timeout: float) -> dict | None:
        """The request once decided, or as it is after `timeout` seconds. Decisions
        taken here wake it at once; those of another process (``p2pgrid requests
        approve``) within half a second."""
        deadline = trio.current_time() + timeout
        while True:
            req = self.store.request(rid)
            if req is None or req["status"] != "pending" or trio.current_time() >= deadline:
                return req
            with trio.move_on_at(min(deadline, trio.current_time() + 0.5)):
                await self._changed.wait()

    def close(self) -> None:
        try:
            self.store.close()
        except Exception:  # closing must not hide the reason the peer stops
            log.exception("closing the governance store")


class Gate:
    """``peer.router`` as governance sees it: plugin messages need the compute
    capability (model calls, training, secret sharing), and model calls and training
    are audited. Core (``rt.``), gossip (``dir.``) and governance (``gov.``) messages
    pass: their handlers check for themselves."""

    def __init__(self, inner, gov: Governance):
        self._inner, self._gov = inner, gov
        self._names: dict[type, str] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __contains__(self, msg_type) -> bool:
        return msg_type in self._inner

    def _name(self, cls: type) -> str:
        if cls not in self._names:
            self._names = {c: n for n, c in wire.registered().items()}
        return self._names.get(cls, "")

    async def dispatch(self, peer, caller: Caller, msg):
        gov = self._gov
        name = self._name(type(msg))
        if not gov.is_self(caller):
            gov.pin(caller)
            if not name.startswith(_OPEN):
                try:
                    gov.require(caller, "compute")
                    # model calls, training, reconstructions: each gives something out
                    gov.require_release(caller, "use plugin services")
                except PermissionDenied:
                    # plugins audit the calls they serve; a call refused here never reaches them
                    peer.audit("denied", caller.name, message=name, right="compute")
                    raise
        return await self._inner.dispatch(peer, caller, msg)


def of(peer) -> Governance:
    """The peer's governance, made on first use."""
    gov = peer.extensions.get(NAME)
    if gov is None:
        gov = peer.extensions[NAME] = Governance(peer)
        peer.audit_sinks.append(gov.store.record)
        if not isinstance(peer.router, Gate):
            peer.router = Gate(peer.router, gov)
    return gov


def console_token(data_dir: Path, *, rotate: bool = False) -> str:
    """The owner's login token for the web console (``DATA_DIR/console-token``, 0600)."""
    path = Path(data_dir) / "console-token"
    if not rotate:
        try:
            token = path.read_text().strip()
            if len(token) >= 24:
                return token
        except OSError:
            pass
    token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def uptime(peer) -> float:
    return time.time() - peer.started_at
