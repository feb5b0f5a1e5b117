"""The owner's channel to its own running peer: publish data, change rules.

A running peer holds its store open (one process at a time), so ``p2pgrid publish``
and ``p2pgrid data ...`` from another terminal do not open it: they read the peer's
identity key from its data directory and send signed requests to the peer's own
address. Holding that key is what makes the caller the owner; the handlers here
accept nothing else (a name alone proves nothing, see ``is_owner``).

The running peer writes where it listens to ``DATA_DIR/endpoint.json`` when it
starts; the owner's commands read it with the key and the pinned certificate.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from .auth import Caller
from .errors import BadRequest, PeerUnavailable, PermissionDenied
from .messages import ObjectInfo, PublishData, SetRules
from .router import Router
from .store import RIGHTS, Rules

log = logging.getLogger("p2pgrid.owner")
router = Router()
ENDPOINT = "endpoint.json"


def is_owner(peer, caller: Caller) -> bool:
    """Whether `caller` signed with this peer's own identity key."""
    return bytes(caller.public_key) == peer.identity.public_bytes


def _require_owner(peer, caller: Caller, what: str) -> None:
    if not is_owner(peer, caller):
        peer.audit("denied", caller.name, message=what, right="owner")
        raise PermissionDenied(f"only {peer.name}'s owner (its own key) may {what}")


def edit_rules(rules: Rules, edits: dict, min_rows: int | None = None) -> Rules:
    """`rules` changed by `edits` ({right: names}): plain names replace the list,
    "+name" adds and "-name" removes. BadRequest on a right that does not exist or
    a list mixing both forms.

    >>> r = edit_rules(Rules(compute=("bob",), get=("ana",)), {"compute": ["+carol"], "get": ["-ana"]})
    >>> r.compute, r.get
    (('bob', 'carol'), ())
    """
    if not isinstance(edits, dict):
        raise BadRequest("edits must be a map of right -> names")
    changed = {r: list(getattr(rules, r)) for r in RIGHTS}
    for right, names in edits.items():
        if right not in RIGHTS:
            raise BadRequest(f"unknown right {right!r} (one of {', '.join(RIGHTS)})")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip("+-")
                                                           for n in names):
            raise BadRequest(f"{right}: give names, '+name' or '-name'")
        signed = [n[0] in "+-" for n in names]
        if any(signed) and not all(signed):
            raise BadRequest(f"{right}: either names (to set the list) or +name/-name (to "
                             "change it), not both")
        if not any(signed):
            changed[right] = list(names)
            continue
        for n in names:
            who = n[1:]
            if n[0] == "+" and who not in changed[right]:
                changed[right].append(who)
            elif n[0] == "-" and who in changed[right]:
                changed[right].remove(who)
    return Rules(**changed, min_rows=rules.min_rows if min_rows is None else min_rows)


@router.on(PublishData)
async def publish(peer, caller, msg: PublishData):
    from .handlers import info

    _require_owner(peer, caller, "publish")
    rules = Rules.from_dict(msg.rules) if msg.rules is not None else Rules()
    meta = await peer.publish(msg.tensor, tags=msg.tags, description=msg.description,
                              compute=rules.compute, get=rules.get, aggregate=rules.aggregate,
                              min_rows=rules.min_rows, id=msg.id or None, bounds=msg.bounds,
                              epsilon=msg.epsilon, columns=msg.columns)
    peer.audit("publish", caller.name, object=meta.id, shape=list(meta.shape), dtype=meta.dtype,
               rules=meta.rules.to_dict())
    log.info("%s: published %s %s", peer.name, meta.id, tuple(meta.shape))
    return ObjectInfo(info(peer, meta))


@router.on(SetRules)
async def set_rules(peer, caller, msg: SetRules):
    from .handlers import info

    _require_owner(peer, caller, "change rules")
    meta = await change_rules(peer, msg.id, msg.edits, msg.min_rows, by=caller.name)
    return ObjectInfo(info(peer, meta))


async def change_rules(peer, id: str, edits: dict, min_rows: int | None = None, *, by: str):
    """Apply `edits` (see :func:`edit_rules`) to object `id` on the running peer now,
    audited as done `by`: what ``p2pgrid data rules`` and the console's form both do."""
    if min_rows is not None and (isinstance(min_rows, bool) or not isinstance(min_rows, int)
                                 or min_rows < 0):
        raise BadRequest("min_rows must be a non-negative integer")
    return await peer.set_rules(id, lambda old: edit_rules(old, edits, min_rows), by=by)


# ------------------------------------------------------------------ the owner's side

def write_endpoint(data_dir: Path, name: str, address: str, insecure: bool) -> None:
    """Where the running peer listens, for the owner's commands (see module doc)."""
    path = Path(data_dir) / ENDPOINT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": name, "address": address, "insecure": insecure}))
    tmp.replace(path)


@asynccontextmanager
async def owner_session(data_dir: Path) -> AsyncIterator:
    """A ``request(msg)`` function speaking to the peer running on `data_dir`, as its owner."""
    from . import tls
    from .client import Target, Transport
    from .identity import Identity

    data_dir = Path(data_dir)
    key = data_dir / "identity.key"
    if not key.exists():
        raise PeerUnavailable(f"no peer identity at {key}; start the peer first")
    try:
        where = json.loads((data_dir / ENDPOINT).read_text())
        address, insecure = str(where["address"]), bool(where["insecure"])
        name = str(where.get("name") or data_dir.name)
    except (OSError, ValueError, KeyError, TypeError):
        raise PeerUnavailable(f"the peer at {data_dir} has not run yet; start it with "
                              "`p2pgrid peer`") from None
    ident = Identity.load_or_create(key)
    cert = None if insecure else (data_dir / "tls-cert.der").read_bytes()
    if cert is not None and tls.cert_public_key(cert) != ident.public_bytes:
        raise PeerUnavailable(f"{data_dir}: the certificate is not the peer's own")
    transport = Transport(ident, name, insecure=insecure, timeout=60.0)
    target = Target(address, ident.key_id, cert)

    async def request(msg):
        try:
            return await transport.request(target, msg)
        except (PeerUnavailable, OSError, trio.BrokenResourceError) as e:
            why = e.message if isinstance(e, PeerUnavailable) else str(e)
            raise PeerUnavailable(f"{why}; is the peer {name} running? (`p2pgrid peer`)") from None
    try:
        yield request
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()
