"""Governance: users and roles, access requests, privacy budgets, the audit trail,
and the owner's web console (plugin; see docs/GOVERNANCE.md).

Scientist's side::

    req = await rec.request_access(reason="monthly statistics")
    await req.wait()                       # until the owner decides
    m = await rec[:, 0].mean().get(epsilon=0.1)   # Laplace noise, charged to the ledger

Owner's side: ``p2pgrid users|requests|budget|audit|web ...`` on the peer's data
directory, or the console page (its login link is printed when the peer starts).
"""

from __future__ import annotations

import logging
import sys

import trio

from ..lazy import lazy_exports
from .errors import PrivacyBudgetExceeded
from .roles import CAPABILITIES, ROLES

__all__ = ["AccessRequest", "Bounds", "Gate", "GovernanceStore", "Governance", "PrivacyBudgetExceeded",
           "Plan", "ROLES", "CAPABILITIES", "Verdict", "of", "request_access", "request_release",
           "private_get",
           "router", "service", "NetworkAPI", "add_cli", "authorize", "verdict", "require",
           "result_creator_only", "pooled", "guest"]

log = logging.getLogger("p2pgrid.governance")
FLUSH_INTERVAL = 0.5     # seconds between chaining queued audit entries
CHECKPOINT_INTERVAL = 60.0

# Loaded on first use: ``p2pgrid --help`` imports this package for its ``cli`` submodule,
# and must not pay for torch and the network stack.
_LAZY = {"Verdict": ".audit", "AccessRequest": ".client", "NetworkAPI": ".client",
         "private_get": ".client", "request_access": ".client", "request_release": ".client",
         "router": ".handlers", "Bounds": ".mechanism", "Plan": ".mechanism", "Gate": ".policy",
         "Governance": ".policy", "of": ".policy", "GovernanceStore": ".store"}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


def authorize(peer, caller) -> bool:
    """For ``Peer.authorize``: True if `caller` is a registered user with its registered
    key; False if the name is not pinned here (the runtime's binding decides);
    Unauthenticated if the name is registered with another key."""
    from .policy import of
    return of(peer).authorize(caller)


def verdict(peer, caller, meta, right: str) -> bool | None:
    """For ``p2pgrid.handlers.may``: True, False, or None (the object's rules decide)."""
    from .policy import of
    return of(peer).verdict(caller, meta, right)


def require(peer, caller, capability: str) -> None:
    """PermissionDenied unless `caller`'s role allows `capability` (for plugins)."""
    from .policy import of
    of(peer).require(caller, capability)


def pooled(peer, caller) -> bool:
    """Whether `caller` shares the allowance of all unregistered callers (budgets, rate
    limits): names are free, so an unvouched name gets no allowance of its own."""
    from .policy import of
    return of(peer).pooled(caller)


def guest(peer, caller):
    """None if `caller` has an allowance of its own here; else a
    :class:`p2pgrid.limits.Guest` (true): its address and the share of each pool that
    the unregistered callers of one address may take together (``pooled=`` of
    rate limiters and budgets takes it)."""
    from .policy import of
    return of(peer).guest(caller)


def result_creator_only(peer) -> bool:
    """Whether results must be bound to the user who computed them (roles in force)."""
    from .policy import of
    return of(peer).active


async def service(peer, task_status=trio.TASK_STATUS_IGNORED):
    """Open the governance store, serve the console, chain audit entries as they come."""
    from ..web import serve_console
    from .policy import of

    gov = of(peer)
    try:
        async with trio.open_nursery() as nursery:
            console = gov.store.setting("console", {}) or {}
            if console.get("enabled", True) and peer.config.console:
                try:
                    gov.console_url = await nursery.start(lambda task_status: serve_console(
                        peer, gov, host=console.get("host", "127.0.0.1"),
                        port=int(console.get("port", 0)), task_status=task_status))
                except OSError as e:
                    log.warning("%s: console not served: %s", peer.name, e)
                else:
                    print(f"p2pgrid: {peer.name} console: {gov.console_url}/  owner login: "
                          f"{gov.console_url}/login?token={gov.token}", file=sys.stderr, flush=True)
            task_status.started()
            last_checkpoint = trio.current_time()
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                await trio.to_thread.run_sync(gov.store.flush)
                if trio.current_time() - last_checkpoint > CHECKPOINT_INTERVAL:
                    await trio.to_thread.run_sync(gov.store.checkpoint)
                    last_checkpoint = trio.current_time()
    finally:
        gov.close()


def add_cli(subparsers):
    from .cli import add_cli as add
    return add(subparsers)
