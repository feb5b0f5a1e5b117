"""What one caller may make the peer's edge hold at once (sans-IO bookkeeping).

- :class:`ConnectionTable`: open connections, in all and per client address. A new
  connection over either limit first evicts an idle one (no open stream: a flood of
  idle connections only ever recycles itself), from the address holding the most;
  with none idle it is refused. Connections are counted from accept, TLS handshake
  included.
- :class:`InFlight`: requests and push streams open at once, per caller key and in
  all for keys not registered here (fresh keys cost nothing to make), and for those
  from one client address a share of that (:class:`Guest`).
- :class:`Guest`: an unregistered caller's place in the pools all such callers share
  (requests here, rate limits in :mod:`p2pgrid.ratelimit`, the privacy budget in
  :mod:`p2pgrid.governance`): its address (:func:`address_key`) and the share of each
  pool that callers from one address may take together.
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
import functools
import ipaddress
import itertools
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

from .errors import RateLimited

__all__ = ["EdgeLimits", "ConnectionTable", "Connection", "InFlight", "Throttle", "Guest",
           "address_key", "GUEST_ADDRESS_SHARE"]

# The most of each pool unregistered callers share that those from one address may take
# together: half, so that one address (whatever names it makes up) leaves the other half
# to strangers elsewhere. With the rate pool at two names' worth, that is one name's.
GUEST_ADDRESS_SHARE = 0.5


@functools.lru_cache(maxsize=4096)   # asked on every request of an unregistered caller
def address_key(address: str) -> str:
    """What counts as one address for per-address limits: an IPv4 address (an
    IPv4-mapped IPv6 one as IPv4), or an IPv6 address's /64 (one host is commonly given
    a whole /64, so its single addresses cost nothing). "" stays "" (no address).

    >>> address_key("10.0.0.7"), address_key("::ffff:10.0.0.7")
    ('10.0.0.7', '10.0.0.7')
    >>> address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    True
    """
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address   # not an IP (a unix socket's name): itself
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class Guest:
    """A caller the peer has not registered (its name vouches for nothing): it draws on
    the pools all such callers share, and with an ``address`` (see :func:`address_key`)
    its address's callers together take at most ``share`` of each. Always true, so that
    ``pooled=guest`` reads as ``pooled=True`` where only pooling matters.

    >>> Guest("10.0.0.7").cap(256), Guest("10.0.0.7", 0.1).cap(4), Guest().cap(256)
    (128.0, 0.4, 256)
    """

    address: str = ""
    share: float = GUEST_ADDRESS_SHARE

    def __post_init__(self):
        object.__setattr__(self, "address", address_key(self.address))
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"a per-address share is in (0, 1], not {self.share!r}")

    def cap(self, pool: float) -> float:
        """What one address may take of a pool of `pool` (all of it without an address)."""
        return pool * self.share if self.address else pool


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
    guest_address_share: float = GUEST_ADDRESS_SHARE  # of that, for those from one address

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
        address = address_key(address)   # an IPv6 host's whole /64 is one address
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
    """Requests open at once per caller key, in all for unregistered keys, and for the
    unregistered keys of one address a share of that (``guest.cap(unregistered)``).

    >>> f = InFlight(per_key=1, unregistered=1)
    >>> f.enter(b"k1", registered=False)
    >>> f.enter(b"k2", registered=True)          # registered keys do not share the pool
    >>> f.enter(b"k3", registered=False)
    Traceback (most recent call last):
    ...
    p2pgrid.errors.RateLimited: this peer is serving as many requests from unregistered callers as it takes (1); retry shortly
    >>> f.leave(b"k1", registered=False); f.enter(b"k3", registered=False)

    Fresh keys from one address fill only that address's share:

    >>> f = InFlight(per_key=8, unregistered=4)
    >>> for k in (b"s1", b"s2"): f.enter(k, registered=False, guest=Guest("10.0.0.6"))
    >>> f.enter(b"s3", registered=False, guest=Guest("10.0.0.6"))
    Traceback (most recent call last):
    ...
    p2pgrid.errors.RateLimited: this peer is serving as many requests from unregistered callers at this address as it takes (2); retry shortly
    >>> f.enter(b"k4", registered=False, guest=Guest("10.0.0.9"))
    """

    def __init__(self, per_key: int, unregistered: int):
        self.per_key, self.unregistered = per_key, unregistered
        self._open: dict[bytes, int] = {}
        self._unregistered = 0
        self._by_address: dict[str, int] = {}   # unregistered requests open per address

    def enter(self, key: bytes, *, registered: bool, guest: Guest | None = None) -> None:
        """Count one request of `key` (for an unregistered one, of its `guest` address
        too), or raise RateLimited and count nothing."""
        n = self._open.get(key, 0)
        if n >= self.per_key:
            raise RateLimited(f"this caller already has {n} requests open here (the limit); "
                              f"retry when one is done")
        address = guest.address if guest is not None and not registered else ""
        # at least one, so that a small pool still serves every address
        cap = max(1, math.floor(guest.cap(self.unregistered))) if address else 0
        if address and self._by_address.get(address, 0) >= cap:
            raise RateLimited(f"this peer is serving as many requests from unregistered "
                              f"callers at this address as it takes ({cap}); retry shortly")
        if not registered and self._unregistered >= self.unregistered:
            raise RateLimited(f"this peer is serving as many requests from unregistered "
                              f"callers as it takes ({self.unregistered}); retry shortly")
        self._open[key] = n + 1
        if not registered:
            self._unregistered += 1
        if address:
            self._by_address[address] = self._by_address.get(address, 0) + 1

    def leave(self, key: bytes, *, registered: bool, guest: Guest | None = None) -> None:
        """The request `enter` counted is done (the same arguments)."""
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)
        if not registered:
            self._unregistered = max(0, self._unregistered - 1)
            address = guest.address if guest is not None else ""
            if address:
                left = self._by_address.get(address, 0) - 1
                if left > 0:
                    self._by_address[address] = left
                else:
                    self._by_address.pop(address, None)


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
