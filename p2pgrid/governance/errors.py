"""Governance's typed errors (registered with p2pgrid.errors, so they cross the wire)."""

from __future__ import annotations

from ..errors import PermissionDenied, register_error


@register_error
class PrivacyBudgetExceeded(PermissionDenied):
    """A private release would spend more epsilon than is left. ``details``:
    ``requested``, ``remaining`` (the tightest limit) and each limit that applies
    (``user``, ``user_dataset``, ``dataset``) as ``{"limit": .., "spent": .., "left": ..}``."""
    status, code = 403, "privacy_budget_exceeded"

    @property
    def remaining(self) -> float:
        return float(self.details.get("remaining", 0.0))
