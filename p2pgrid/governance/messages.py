"""Governance's wire messages (``gov.*``)."""

from __future__ import annotations

from typing import Any

from ..wire import dataclass, message


@message("gov.request")
@dataclass(frozen=True)
class RequestAccess:
    """Ask the owner for ``get`` on an object, or (with epsilon) for privacy budget, or
    (with program) for the release of that exact program's result to you."""
    object_id: str
    reason: str
    epsilon: float | None = None
    program: dict | None = None


@message("gov.request.info")
@dataclass(frozen=True)
class RequestInfo:
    item: dict  # id, user, object_id, right, epsilon, reason, status, why, created, decided...


@message("gov.request.wait")
@dataclass(frozen=True)
class WaitRequest:
    """Answer once the request is decided, or after `timeout` seconds (at most 30)."""
    id: str
    timeout: float = 20.0


@message("gov.requests")
@dataclass(frozen=True)
class ListRequests:
    status: str | None = "pending"  # None: all


@message("gov.requests.info")
@dataclass(frozen=True)
class RequestInfos:
    items: list[dict]


@message("gov.decide")
@dataclass(frozen=True)
class DecideRequest:
    id: str
    approve: bool
    why: str = ""


@message("gov.dp.query")
@dataclass(frozen=True)
class PrivateQuery:
    """A differentially private release of `program` (see governance/mechanism.py).
    `release_id` (random, 16 to 64 characters) makes a retry return the same release
    without a second charge."""
    program: dict
    epsilon: float
    release_id: str


@message("gov.dp.release")
@dataclass(frozen=True)
class Release:
    value: Any   # the noisy tensor
    info: dict   # epsilon, mechanism, sensitivity, scale, rows, kind, remaining, replayed


@message("gov.budget")
@dataclass(frozen=True)
class BudgetQuery:
    object_id: str | None = None


@message("gov.budget.info")
@dataclass(frozen=True)
class BudgetInfo:
    info: dict
