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

Names are free, so callers the peer has not registered (``pooled=True``) also draw on
one shared allowance: ``guest_pool`` times one name's limit for all of them together.
Thirty fresh names get what two names would, not thirty times the limit:

>>> lim = Limiter("2/min", clock=lambda: 0.0, guest_pool=2)
>>> for name in ("s1", "s2", "s3", "s4"): lim.admit(name, pooled=True)
>>> lim.admit("s5", pooled=True)
Traceback (most recent call last):
...
p2pgrid.errors.RateLimited: unregistered callers together exceeded 4/min; retry in 15.0 s
>>> lim.admit("bob")  # a registered caller keeps a limit of its own

Names are free but addresses are not: a pooled caller that comes with its address
(:class:`p2pgrid.limits.Guest`) is also held, with every other pooled caller from that
address, to the address's share of the pool (half by default: one name's worth here),
so that one address cannot use up the pool for strangers elsewhere:

>>> lim = Limiter("2/min", clock=lambda: 0.0, guest_pool=2)
>>> for name in ("s1", "s2"): lim.admit(name, pooled=Guest("10.0.0.6"))
>>> lim.admit("s3", pooled=Guest("10.0.0.6"))
Traceback (most recent call last):
...
p2pgrid.errors.RateLimited: unregistered callers from this address together exceeded 2/min; retry in 30.0 s
>>> lim.admit("s4", pooled=Guest("10.0.0.9"))
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable

from .errors import BadRequest, RateLimited
from .limits import Guest

__all__ = ["Limiter", "parse_rate", "POOL", "Guest"]

POOL = "\0unregistered"  # the shared bucket's key: no peer name can be it
_AT = "\0at "            # + an address: the bucket of that address's pooled callers

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
    __slots__ = ("tokens", "at", "cap")

    def __init__(self, tokens: float, at: float):
        self.tokens, self.at, self.cap = tokens, at, tokens


class Limiter:
    """A token bucket of calls per user (``rate_limit``) and a count of input rows per
    user per fixed window (``quota``); either may be None (no limit).

    ``pooled=True`` marks a caller whose name vouches for nothing (not registered on this
    peer): it is held to its own limit *and* to the pool that all such callers share,
    ``guest_pool`` times one name's limit (at least one name's worth).
    """

    def __init__(self, rate_limit: str | None = None, quota: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic, guest_pool: float = 2.0):
        self._rate = None if rate_limit is None else parse_rate(rate_limit)
        self._quota = None if quota is None else parse_rate(quota)
        self.rate_limit, self.quota, self.clock = rate_limit, quota, clock
        self.guest_pool = max(1.0, float(guest_pool))
        self._buckets: dict[str, _Bucket] = {}
        self._usage: dict[str, tuple[int, int]] = {}  # user -> (window, rows)

    def admit(self, user: str, *, pooled: bool | Guest | None = False) -> None:
        """Take one call token (and, for a pooled caller, one of the pool's and one of
        its address's share) or raise RateLimited; nothing is taken when any is empty."""
        if self._rate is None:
            return
        n, period = self._rate
        now = self.clock()
        buckets = [(self._refill(user, n, period, now), n, None)]
        if pooled:
            pool = n * self.guest_pool
            address = pooled.address if isinstance(pooled, Guest) else ""
            if address:
                cap = max(1.0, pooled.cap(pool))
                buckets.append((self._refill(_AT + address, cap, period, now), cap,
                                "unregistered callers from this address together"))
            buckets.append((self._refill(POOL, pool, period, now), pool,
                            "unregistered callers together"))
        for bucket, cap, who in buckets:
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) * period / cap
                if who is None:
                    raise RateLimited(f"{user} exceeded {self.rate_limit}; retry in {wait:.1f} s",
                                      retry_after=round(wait, 3))
                raise RateLimited(f"{who} exceeded {self._rate_of(cap)}; retry in {wait:.1f} s",
                                  retry_after=round(wait, 3), pooled=True)
        for bucket, _, _ in buckets:
            bucket.tokens -= 1.0
        if len(self._buckets) > 100_000:  # forget full buckets: they carry no state
            self._buckets = {k: b for k, b in self._buckets.items() if b.tokens < b.cap}

    def _refill(self, key: str, cap: float, period: float, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(cap), now)
        b.cap = float(cap)
        b.tokens = min(b.cap, b.tokens + (now - b.at) * cap / period)
        b.at = now
        return b

    def _rate_of(self, count: float) -> str:
        unit = self.rate_limit.split("/", 1)[1].strip()
        return f"{count:g}/{unit}"

    def charge(self, user: str, rows: int, *, pooled: bool | Guest | None = False) -> None:
        """Count `rows` against the user's quota for the current window (and, for a pooled
        caller, against the pool's and its address's share of it), or raise RateLimited
        and count nothing."""
        if self._quota is None:
            return
        n, period = self._quota
        now = self.clock()
        window = math.floor(now / period)
        wait = (window + 1) * period - now
        used = self._used(user, window)
        if used + rows > n:
            raise RateLimited(f"{user} would exceed the quota of {self.quota} input rows "
                              f"({used} used); the window resets in {wait:.0f} s",
                              retry_after=round(wait, 3), used=used)
        counts = [(user, used)]
        if pooled:
            pool = n * self.guest_pool
            shares = [(POOL, pool, "unregistered callers together")]
            address = pooled.address if isinstance(pooled, Guest) else ""
            if address:
                shares.insert(0, (_AT + address, max(1.0, pooled.cap(pool)),
                                  "unregistered callers from this address together"))
            for key, cap, who in shares:
                shared = self._used(key, window)
                if shared + rows > cap:
                    raise RateLimited(f"{who} would exceed the quota of {cap:g} input rows "
                                      f"({shared} used); the window resets in {wait:.0f} s",
                                      retry_after=round(wait, 3), used=shared, pooled=True)
                counts.append((key, shared))
        for key, before in counts:
            self._usage[key] = (window, before + rows)
        if len(self._usage) > 100_000:   # past windows carry no state
            self._usage = {k: v for k, v in self._usage.items() if v[0] == window}

    def _used(self, key: str, window: int) -> int:
        w, used = self._usage.get(key, (window, 0))
        return used if w == window else 0
