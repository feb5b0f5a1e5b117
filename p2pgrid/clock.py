"""Is this machine's clock close enough to the others'? (checked once, at start)

Signed requests more than :data:`p2pgrid.auth.WINDOW` seconds off the receiver's clock
are refused, so a peer whose clock is wrong drops out of the network. The receiver
logs each such caller (see :class:`p2pgrid.auth.Verifier`); this module tells the
skewed peer itself: shortly after start it asks the first peers it knows (directory
records, else seed addresses) for the time, and warns once when the median offset
exceeds half the window. A peer that refuses us for skew answers with the offset it
saw (``clock_offset`` in its error), so even a badly skewed peer learns by how much.
"""

from __future__ import annotations

import logging
import time

import trio

from .auth import WINDOW
from .errors import P2PError, ReplayDetected
from .messages import Ping, Pong

log = logging.getLogger("p2pgrid.peer")

PROBES = 5  # peers asked, at most, of records and of seeds each


async def check_clock(peer, *, attempts: tuple[float, ...] = (1.0, 3.0, 10.0),
                      timeout: float = 5.0) -> float | None:
    """Measure the peers' clocks minus ours after each delay in `attempts` until some
    peer answers; warn (WARNING, one line) beyond half the window. Sets and returns
    ``peer.clock_offset`` (the median), or None if nobody answered."""
    for delay in attempts:
        await trio.sleep(delay)
        offsets = await measure(peer, timeout)
        if offsets:
            break
    else:
        return None
    ordered = sorted(offsets.values())
    median = ordered[len(ordered) // 2]
    peer.clock_offset = median
    if abs(median) > WINDOW / 2:
        log.warning("this machine's clock is %.0f s %s %s; peers refuse requests more than "
                    "%.0f s off, so this peer will drop out: fix the clock (NTP)",
                    abs(median), "behind" if median > 0 else "ahead of",
                    ", ".join(f"{k} ({v:+.0f} s)" for k, v in sorted(offsets.items())[:PROBES]),
                    WINDOW)
    return median


async def measure(peer, timeout: float) -> dict[str, float]:
    """Peer label or address -> its clock minus ours, for the peers that answered."""
    offsets: dict[str, float] = {}

    async def probe(label: str, send) -> None:
        t0 = time.time()
        try:
            with trio.move_on_after(timeout):
                reply = await send(Ping())
                if isinstance(reply, Pong):
                    offsets[label] = reply.time - (t0 + time.time()) / 2
        except ReplayDetected as e:   # refused for skew: it says by how much
            off = e.details.get("clock_offset")
            if isinstance(off, (int, float)):
                offsets[label] = float(off)
        except (P2PError, OSError) as e:
            log.debug("clock check with %s: %s", label, e)

    recs = [r for r in peer.directory.peers(include_self=False) if r.addresses][:PROBES]
    known = {a for r in recs for a in r.addresses}
    seeds = [a for a in peer._seeds if a not in known][:PROBES]
    async with trio.open_nursery() as nursery:
        for rec in recs:   # gossip with them worked, so a call (the usual way) will do
            nursery.start_soon(probe, peer.directory.label(rec),
                               lambda m, rec=rec: peer.request(rec, m, timeout=timeout))
        for address in seeds:   # a request, whose refusal for skew says the offset
            nursery.start_soon(probe, address, lambda m, a=address: peer._gossip_send(a, m))
    return offsets
