"""Roles and what they allow (sans-IO).

Capabilities: ``search`` (list and describe published objects), ``compute`` (run
programs, store tensors, private releases, model calls, federated training),
``request`` (ask the owner for access or budget), ``admin`` (decide requests, and
everything else: the owner role is privileged on every object of its peer like the
peer itself). Object rules and grants still decide *which* objects a scientist may
compute on or download; a role is a ceiling, never a grant of data.

>>> allows("scientist", "compute"), allows("guest", "compute"), allows("owner", "admin")
(True, False, True)
>>> parse_key("z" * 3)
Traceback (most recent call last):
...
p2pgrid.errors.BadRequest: a public key is 32 bytes as 64 hex digits or 43 base64url characters
"""

from __future__ import annotations

import base64
import binascii
import re

from ..errors import BadRequest

ROLES = ("owner", "scientist", "guest")
CAPABILITIES = ("search", "compute", "request", "admin")
_ALLOWS = {
    "owner": frozenset(CAPABILITIES),
    "scientist": frozenset({"search", "compute", "request"}),
    "guest": frozenset({"search"}),
}
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def allows(role: str | None, capability: str) -> bool:
    return role is not None and capability in _ALLOWS.get(role, ())


def check_role(role: str) -> str:
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return role


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest("a user name is 1 to 64 letters, digits or _ . @ -")
    return name


def parse_key(text: str) -> bytes:
    """An Ed25519 public key as 64 hex digits or unpadded base64url (as `users key` prints)."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text) if re.fullmatch(r"[0-9a-fA-F]{64}", text) else \
            base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise BadRequest("a public key is 32 bytes as 64 hex digits or 43 base64url characters")
    return raw


def format_key(raw: bytes) -> str:
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
