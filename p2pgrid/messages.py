"""The runtime's request and reply messages (one registry: p2pgrid.wire)."""

from __future__ import annotations

from typing import Any

import torch

from .wire import dataclass, message


@message("rt.ping")
@dataclass(frozen=True)
class Ping:
    pass


@message("rt.pong")
@dataclass(frozen=True)
class Pong:
    name: str
    key_id: str
    time: float


@message("rt.ack")
@dataclass(frozen=True)
class Ack:
    pass


@message("rt.put")
@dataclass(frozen=True)
class PutObject:
    """Store a tensor on the receiving peer, owned by the caller (``x.send(peer)``)."""
    tensor: torch.Tensor
    tags: list[str] = ()
    description: str = ""
    rules: dict | None = None  # Rules.to_dict(); None: only the caller may compute and get


@message("rt.info")
@dataclass(frozen=True)
class ObjectInfo:
    meta: dict  # ObjectMeta.to_dict() plus "peer"


@message("rt.infos")
@dataclass(frozen=True)
class ObjectInfos:
    items: list[dict]


@message("rt.list")
@dataclass(frozen=True)
class ListObjects:
    tags: list[str] = ()


@message("rt.describe")
@dataclass(frozen=True)
class DescribeObject:
    id: str


@message("rt.exec")
@dataclass(frozen=True)
class Execute:
    """Run an op program on the owner. ``fetch``: return the value, if the rules allow;
    otherwise keep it as a new object and return its pointer info."""
    program: dict
    fetch: bool = False
    tags: list[str] = ()
    description: str = ""


@message("rt.value")
@dataclass(frozen=True)
class Value:
    value: Any  # a tensor, usually
    meta: dict | None = None


@message("rt.get")
@dataclass(frozen=True)
class GetObject:
    id: str


@message("rt.delete")
@dataclass(frozen=True)
class DeleteObject:
    id: str


@message("rt.publish")
@dataclass(frozen=True)
class PublishData:
    """The owner publishes data on its running peer (``p2pgrid publish``); only a caller
    holding the peer's own key may send it (see p2pgrid/owner.py)."""
    tensor: torch.Tensor
    id: str = ""
    tags: list[str] = ()
    description: str = ""
    columns: list[str] = ()
    rules: dict | None = None  # Rules.to_dict()
    bounds: list | None = None
    epsilon: float | None = None


@message("rt.rules")
@dataclass(frozen=True)
class SetRules:
    """The owner changes an object's rules on its running peer. ``edits`` maps a right
    to names: ["a", "b"] sets the list, ["+a", "-b"] adds and removes."""
    id: str
    edits: dict
    min_rows: int | None = None
