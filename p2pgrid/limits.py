"""What one caller may make the peer's edge hold at once (sans-IO bookkeeping).

- :class:`ConnectionTable`: open connections, in all and per client address. A new
  connection over either limit first evicts an idle one (no open stream: a flood of
  idle connections only ever recycles itself), from the address holding the most;
  with none idle it is refused. Connections are counted from accept, TLS handshake
  included.
- :class:`InFlight`: requests and push streams open at once, per caller key and in
  all for keys not registered here (fresh keys cost nothing to make).
- :class:`Throttle`: failures per client address in a sliding window (console logins),
  so that one address's failures never lock out another's.

The glue lives in :mod:`p2pgrid.transport.hypercorn` (connections) and
:mod:`p2pgrid.server` (requests); sizes come from :class:`EdgeLimits`.

>>> t = ConnectionTable(total=2, per_address=2)
>>> a, b = t.admit("10.0.0.1", lambda: True), t.admit("10.0.0.1", lambda: False)
>>> c = t.admit("10.0.0.2", lambda: False)   # full: the idle one from the fuller address goes
>>> a.evicted, b.evicted, c is not None, len(t)
(True, False, True, 2)
>>> t.admit("10.0.0.3", lambda: False) is None   # nothing idle to make room
True
"""

from __future__ import annotations

import collections
import itertools
import resource
import time
from dataclasses import dataclass
from typing import Callable

from .errors import RateLimited

__all__ = ["EdgeLimits", "ConnectionTable", "Connection", "InFlight", "Throttle"]


@dataclass(frozen=True)
class EdgeLimits:
    """Bounds and timeouts of one HTTP/2 listener (see PeerConfig for the peer's own)."""

    max_connections: int | None = None     # None: sized from RLIMIT_NOFILE
    max_connections_per_address: int | None = None  # None: an eighth of max_connections
    max_streams: int = 100                 # concurrent streams per connection
    handshake_timeout: float = 10.0        # TLS handshake
    idle_timeout: float = 30.0             # a connection without an open stream
    read_timeout: float = 45.0             # a request body (push stream) without bytes
    write_timeout: float = 60.0            # a write the client does not take
    requests_per_key: int = 32             # requests and push streams at once, per caller key
    requests_unregistered: int = 256       # the same, all unregistered keys together

    def connections(self) -> tuple[int, int]:
        """(total, per address): the default total leaves a quarter of the open-file
        limit (and 32) for the store, the databases and the peer's own dials."""
        total = self.max_connections
        if total is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            soft = 65536 if soft == resource.RLIM_INFINITY else soft
            total = max(8, min(4096, soft - soft // 4 - 32))
        per = self.max_connections_per_address or max(4, total // 8)
        return total, min(per, total)


class Connection:
    __slots__ = ("address", "idle", "close", "evicted", "order")

    def __init__(self, address: str, idle: Callable[[], bool], close: Callable[[], None] | None,
                 order: int):
        self.address, self.idle, self.close, self.order = address, idle, close, order
        self.evicted = False


class ConnectionTable:
    """Open connections of one listener; see the module docstring."""

    def __init__(self, total: int, per_address: int):
        self.total, self.per_address = total, per_address
        self._by_address: dict[str, dict[int, Connection]] = {}
        self._count = 0
        self._order = itertools.count()
        self.refused = self.evictions = 0

    def __len__(self) -> int:
        return self._count

    def admit(self, address: str, idle: Callable[[], bool],
              close: Callable[[], None] | None = None) -> Connection | None:
        """Register a new connection, evicting an idle one if a limit is reached;
        None (refuse it) if no room can be made. `close` is called on eviction."""
        mine = self._by_address.get(address, {})
        if len(mine) >= self.per_address and not self._evict(mine.values()):
            self.refused += 1
            return None
        if self._count >= self.total:
            crowded = sorted(self._by_address.values(), key=len, reverse=True)
            if not any(self._evict(conns.values()) for conns in crowded):
                self.refused += 1
                return None
        conn = Connection(address, idle, close, next(self._order))
        self._by_address.setdefault(address, {})[conn.order] = conn
        self._count += 1
        return conn

    def release(self, conn: Connection) -> None:
        """The connection is closed (idempotent)."""
        mine = self._by_address.get(conn.address)
        if mine is not None and mine.pop(conn.order, None) is not None:
            self._count -= 1
            if not mine:
                del self._by_address[conn.address]

    def _evict(self, conns) -> bool:
        for conn in sorted(conns, key=lambda c: c.order):  # oldest first
            if conn.idle():
                conn.evicted = True
                self.release(conn)
                self.evictions += 1
                if conn.close is not None:
                    conn.close()
                return True
        return False


class InFlight:
    """Requests open at once per caller key, and in all for unregistered keys.

    >>> f = InFlight(per_key=1, unregistered=1)
    >>> f.enter(b"k1", registered=False)
    >>> f.enter(b"k2", registered=True)          # registered keys do not share the pool
    >>> f.enter(b"k3", registered=False)
    Traceback (most recent call last):
    ...
    p2pgrid.errors.RateLimited: this peer is serving as many requests from unregistered callers as it takes (1); retry shortly
    >>> f.leave(b"k1", registered=False); f.enter(b"k3", registered=False)
    """

    def __init__(self, per_key: int, unregistered: int):
        self.per_key, self.unregistered = per_key, unregistered
        self._open: dict[bytes, int] = {}
        self._unregistered = 0

    def enter(self, key: bytes, *, registered: bool) -> None:
        n = self._open.get(key, 0)
        if n >= self.per_key:
            raise RateLimited(f"this caller already has {n} requests open here (the limit); "
                              f"retry when one is done")
        if not registered and self._unregistered >= self.unregistered:
            raise RateLimited(f"this peer is serving as many requests from unregistered "
                              f"callers as it takes ({self.unregistered}); retry shortly")
        self._open[key] = n + 1
        if not registered:
            self._unregistered += 1

    def leave(self, key: bytes, *, registered: bool) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)
        if not registered:
            self._unregistered = max(0, self._unregistered - 1)


class Throttle:
    """At most `limit` failures per key (a client address) in `window` seconds.

    >>> t = Throttle(2, 60.0, clock=lambda: 0.0)
    >>> t.fail("a"); t.fail("a"); t.blocked("a"), t.blocked("b")
    (True, False)
    """

    def __init__(self, limit: int, window: float, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.max_keys, self._clock = limit, window, max_keys, clock
        self._failures: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def _recent(self, key: str) -> collections.deque | None:
        q = self._failures.get(key)
        if q is None:
            return None
        now = self._clock()
        while q and now - q[0] > self.window:
            q.popleft()
        if not q:
            del self._failures[key]
            return None
        return q

    def blocked(self, key: str) -> bool:
        q = self._recent(key)
        return q is not None and len(q) >= self.limit

    def fail(self, key: str) -> None:
        q = self._recent(key)
        if q is None:
            if len(self._failures) >= self.max_keys:  # bounded: forget the stalest address
                self._failures.popitem(last=False)
            q = self._failures[key] = collections.deque()
        self._failures.move_to_end(key)
        q.append(self._clock())
