"""Per-user call rates and row quotas (sans-IO): what serving hosts and SMPC parties
enforce on each caller.

>>> lim = Limiter("2/s", "10/day", clock=lambda: 0.0)
>>> lim.admit("bob"); lim.admit("bob")
>>> lim.admit("bob")
Traceback (most recent call last):
...
p2pgrid.errors.RateLimited: bob exceeded 2/s; retry in 0.5 s
>>> lim.charge("bob", 8); lim.charge("bob", 3)
Traceback (most recent call last):
...
p2pgrid.errors.RateLimited: bob would exceed the quota of 10/day input rows (8 used); the window resets in 86400 s
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable

from .errors import BadRequest, RateLimited

__all__ = ["Limiter", "parse_rate"]

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
            "hour": 3600.0, "day": 86400.0, "d": 86400.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*([a-z]+)\s*")


def parse_rate(text: str) -> tuple[int, float]:
    """'60/min' -> (60, 60.0): that many events per that many seconds."""
    m = _RATE.fullmatch(text.lower()) if isinstance(text, str) else None
    if not m or m.group(2) not in _PERIODS or int(m.group(1)) < 1:
        raise BadRequest(f"a rate is 'N/s', 'N/min', 'N/hour' or 'N/day' with N >= 1, not {text!r}")
    return int(m.group(1)), _PERIODS[m.group(2)]


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float):
        self.tokens, self.at = tokens, at


class Limiter:
    """A token bucket of calls per user (``rate_limit``) and a count of input rows per
    user per fixed window (``quota``); either may be None (no limit)."""

    def __init__(self, rate_limit: str | None = None, quota: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self._rate = None if rate_limit is None else parse_rate(rate_limit)
        self._quota = None if quota is None else parse_rate(quota)
        self.rate_limit, self.quota, self.clock = rate_limit, quota, clock
        self._buckets: dict[str, _Bucket] = {}
        self._usage: dict[str, tuple[int, int]] = {}  # user -> (window, rows)

    def admit(self, user: str) -> None:
        """Take one call token or raise RateLimited."""
        if self._rate is None:
            return
        n, period = self._rate
        now = self.clock()
        b = self._buckets.get(user)
        if b is None:
            b = self._buckets[user] = _Bucket(float(n), now)
        b.tokens = min(float(n), b.tokens + (now - b.at) * n / period)
        b.at = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) * period / n
            raise RateLimited(f"{user} exceeded {self.rate_limit}; retry in {wait:.1f} s",
                              retry_after=round(wait, 3))
        b.tokens -= 1.0
        if len(self._buckets) > 100_000:  # forget full buckets: they carry no state
            self._buckets = {u: v for u, v in self._buckets.items() if v.tokens < n}

    def charge(self, user: str, rows: int) -> None:
        """Count `rows` against the user's quota for the current window, or raise RateLimited."""
        if self._quota is None:
            return
        n, period = self._quota
        window = math.floor(self.clock() / period)
        w, used = self._usage.get(user, (window, 0))
        if w != window:
            used = 0
        if used + rows > n:
            wait = (window + 1) * period - self.clock()
            raise RateLimited(f"{user} would exceed the quota of {self.quota} input rows "
                              f"({used} used); the window resets in {wait:.0f} s",
                              retry_after=round(wait, 3), used=used)
        self._usage[user] = (window, used + rows)
