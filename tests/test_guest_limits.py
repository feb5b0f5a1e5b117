"""The pools unregistered callers share, and one address's share of each (sans-IO):
p2pgrid.limits (Guest, address_key, InFlight) and p2pgrid.ratelimit (Limiter)."""

from __future__ import annotations

import doctest

import pytest

import p2pgrid.limits
import p2pgrid.ratelimit
from p2pgrid.config import PeerConfig
from p2pgrid.errors import RateLimited
from p2pgrid.limits import Guest, InFlight, address_key
from p2pgrid.ratelimit import Limiter


def test_doctests():
    for module in (p2pgrid.limits, p2pgrid.ratelimit):
        assert doctest.testmod(module).failed == 0, module.__name__


@pytest.mark.parametrize("raw, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),                     # IPv4-mapped: the IPv4 host
    ("2001:db8:0:1:ffff::1", "2001:db8:0:1::/64"),          # one IPv6 host's /64
    ("2001:db8:0:1::2", "2001:db8:0:1::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("", ""),
])
def test_one_address_is_an_ipv4_host_or_an_ipv6_64(raw, key):
    assert address_key(raw) == key


def test_a_quota_counts_rows_per_address_too_and_a_refusal_counts_nothing():
    t = [0.0]
    lim = Limiter(quota="10/day", clock=lambda: t[0], guest_pool=2)   # pool: 20 rows
    here, there = Guest("10.0.0.6"), Guest("10.0.0.9")                # 10 rows per address
    lim.charge("s1", 6, pooled=here)
    with pytest.raises(RateLimited, match="from this address together would exceed") as e:
        lim.charge("s2", 5, pooled=here)       # a fresh name: its own 10 are untouched
    assert e.value.details["used"] == 6
    lim.charge("s2", 4, pooled=here)           # exactly what is left of the address's share
    lim.charge("s3", 10, pooled=there)
    with pytest.raises(RateLimited, match="unregistered callers together would exceed"):
        lim.charge("s4", 1, pooled=Guest("10.0.0.7"))   # the pool: 20 used
    lim.charge("bob", 10)                      # registered: a quota of its own
    t[0] = 86400.0                             # the next window
    lim.charge("s5", 10, pooled=here)


def test_a_call_refused_by_any_bucket_takes_no_token():
    lim = Limiter("2/min", clock=lambda: 0.0, guest_pool=2)
    here = Guest("10.0.0.6")
    lim.admit("s1", pooled=here)
    lim.admit("s1", pooled=here)
    with pytest.raises(RateLimited, match="s1 exceeded 2/min"):
        lim.admit("s1", pooled=here)           # its own bucket is empty ...
    lim.admit("s2", pooled=Guest("10.0.0.9"))  # ... and took nothing from the pool
    lim.admit("s3", pooled=Guest("10.0.0.9"))


def test_requests_in_flight_per_address_are_given_back():
    f = InFlight(per_key=8, unregistered=4)
    here = Guest("10.0.0.6")
    for k in (b"a", b"b"):
        f.enter(k, registered=False, guest=here)
    with pytest.raises(RateLimited, match="at this address"):
        f.enter(b"c", registered=False, guest=here)
    f.enter(b"c", registered=True, guest=here)   # a registered caller is in no pool
    f.leave(b"a", registered=False, guest=here)
    f.enter(b"d", registered=False, guest=Guest("::ffff:10.0.0.6"))   # the same host
    with pytest.raises(RateLimited, match="at this address"):
        f.enter(b"e", registered=False, guest=here)
    tiny = InFlight(per_key=8, unregistered=1)   # a pool too small to halve: one each
    tiny.enter(b"x", registered=False, guest=here)


def test_the_share_is_a_fraction_of_the_pool():
    assert PeerConfig(name="p").guest_address_share == 0.5
    assert PeerConfig(name="p", guest_address_share=1).edge_limits().guest_address_share == 1
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="guest_address_share"):
            PeerConfig(name="p", guest_address_share=bad)
    with pytest.raises(ValueError):
        Guest("10.0.0.6", 0.0)
