"""The owner's changes to users, budgets, bounds and grants, from text as people type it.

One implementation for both doors: ``p2pgrid users|budget|requests`` (governance/cli.py)
and the console's forms (p2pgrid/console) call these, so a value the CLI refuses the
console refuses with the same message, and every change lands in the audit trail
with `by` naming the door it came through. Rule changes live with the peer's objects
(:func:`p2pgrid.owner.change_rules`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import BadRequest, NotFound
from .roles import check_name, parse_key

if TYPE_CHECKING:  # the CLI imports this module for --help: nothing heavy at import time
    from .mechanism import Bounds
    from .store import GovernanceStore, User

MODES = {"open": "open", "registered": "registered users only",
         "releases": "open, releases to registered users only"}
STORAGE = ("registered", "anyone")


def number(text, what: str = "epsilon") -> float:
    """A finite non-negative number from text; BadRequest naming `what` otherwise."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise BadRequest(f"{what} must be a number, got {str(text)[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{what} must be a finite number >= 0")
    return value


def parse_bounds(items: list[str] | str) -> Bounds:
    """Column bounds from ``LO:HI`` items (a list, or one string separated by spaces)."""
    from .mechanism import Bounds

    if isinstance(items, str):
        items = items.replace(",", " ").split()
    if not items:
        raise BadRequest("give bounds as LO:HI, one, or one per column")
    pairs = []
    for item in items:
        lo, sep, hi = item.partition(":")
        try:
            pairs.append([float(lo), float(hi)])
        except ValueError:
            raise BadRequest(f"a bound is LO:HI, got {item!r}") from None
        if not sep:
            raise BadRequest(f"a bound is LO:HI, got {item!r}")
    return Bounds.parse(pairs)


def add_user(store: GovernanceStore, name: str, role: str, key: str | None, *, by: str) -> User:
    """Register `name` with `role`; `key` as ``p2pgrid users key`` prints it, or None/empty
    to bind the name to the first key that calls with it."""
    key = (key or "").strip()
    return store.add_user(name.strip(), role, parse_key(key) if key else None, by=by)


def remove_user(store: GovernanceStore, name: str, *, by: str) -> None:
    if not store.remove_user(name, by=by):
        raise NotFound(f"no user {name}")


def set_mode(store: GovernanceStore, mode: str, *, by: str) -> None:
    """open, registered (registered users only) or releases (see ``p2pgrid users mode``)."""
    if mode not in MODES:
        raise BadRequest(f"mode is one of {', '.join(MODES)}")
    store.set_setting("registered_only", mode == "registered", by=by)
    store.set_setting("releases_registered_only", mode == "releases", by=by)


def mode(store: GovernanceStore) -> str:
    return ("registered" if store.registered_only else
            "releases" if store.releases_registered_only else "open")


def set_storage(store: GovernanceStore, who: str, *, by: str) -> None:
    if who not in STORAGE:
        raise BadRequest(f"storage is one of {', '.join(STORAGE)}")
    store.set_setting("store_objects", who, by=by)


def set_budget(store: GovernanceStore, user: str, epsilon, dataset: str | None = None, *,
               by: str) -> float:
    """`user`'s total epsilon here, or their cap on `dataset`; returns the number set."""
    check_name(user.strip())
    value = number(epsilon)
    store.set_budget(user.strip(), value, (dataset or "").strip() or "*", by=by)
    return value


def set_default_budget(store: GovernanceStore, epsilon, *, by: str) -> float:
    value = number(epsilon)
    store.set_default_budget(value, by=by)
    return value


def set_guest_budget(store: GovernanceStore, epsilon, *, by: str) -> float | None:
    """All unregistered callers' shared epsilon; None or empty text: the default budget."""
    value = None if epsilon is None or str(epsilon).strip() == "" else number(epsilon)
    store.set_guest_budget(value, by=by)
    return value


def set_bounds(store: GovernanceStore, dataset: str, bounds: list[str] | str, total=None, *,
               by: str) -> tuple[Bounds, float | None]:
    """Declare `dataset`'s column bounds and, optionally, its total epsilon (empty: none)."""
    if not dataset or not dataset.strip():
        raise BadRequest("name the dataset")
    parsed = parse_bounds(bounds)
    cap = None if total is None or str(total).strip() == "" else number(total, "total epsilon")
    store.set_dataset(dataset.strip(), parsed, cap, by=by)
    return parsed, cap


def revoke_grant(store: GovernanceStore, user: str, object_id: str, right: str = "get", *,
                 by: str) -> None:
    """Take back ``get`` on an object (or a program's ``release``) granted by a request."""
    if right not in ("get", "release"):
        raise BadRequest("a grant is for 'get' or 'release'")
    if not store.revoke_grant(user, object_id, right, by=by):
        raise NotFound(f"{user} holds no {right} grant on {object_id}")
