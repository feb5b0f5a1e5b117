"""Clients that go away mid-request are reaped: their sockets are closed, so a peer under
a low RLIMIT_NOFILE keeps accepting a legitimate caller however many come and go.

Once, a connection cut mid-request kept its socket for good (its idle timer waited
for the connection to go idle, which a closed connection never reports): after a few
hundred the peer held every file descriptor it may open and answered nobody.
"""

import trio

from p2pgrid.identity import Identity

import _victim as V

NOFILE = 128


async def _cut_mid_request(v, ident, n):
    cut = 0
    for _ in range(n):
        try:
            a = await V.H2Attacker.open(v)
        except (trio.BrokenResourceError, OSError):
            continue  # refused: this address has as many connections open as it may
        await a.start_request(a.signed_headers(v, ident, "/rpc", 4096), b"x" * 100)
        await a.aclose()  # gone, the request's body never finished
        cut += 1
    return cut


async def _fds_settle(v, at_most, timeout):
    with trio.move_on_after(timeout):
        while v.fds() > at_most:
            await trio.sleep(0.2)
    return v.fds()


async def test_clients_cut_mid_request_are_reaped(tmp_path):
    # short timeouts so that the half-open clients below are reaped within the test
    v = V.start(tmp_path, nofile=NOFILE, peer={"read_timeout": 2.0, "idle_timeout": 2.0,
                                               "max_connections_per_address": 24})
    alice = V.Caller(v)
    try:
        await alice.ping()
        base = v.fds()
        ident = Identity.generate()
        cut = 0
        # more cut requests in all than the peer may open files; connections refused while
        # the peer is still reaping earlier ones do not count, so go on until enough got in
        for _ in range(10):
            cut += await _cut_mid_request(v, ident, NOFILE // 2)
            assert await alice.ping() < 15, "the legitimate caller must be answered"
            if cut > NOFILE:
                break
            await trio.sleep(0.5)
        assert cut > NOFILE, f"only {cut} requests were cut: too few to tell"
        assert await _fds_settle(v, base + 8, 20) <= base + 8, \
            f"{v.fds()} fds held after the clients left (started with {base})"

        # clients that stall mid-request and never close (a vanished host, say)
        stalled, refused = [], 0
        for _ in range(NOFILE // 4):
            try:
                a = await V.H2Attacker.open(v)
                await a.start_request(a.signed_headers(v, Identity.generate(), "/rpc", 4096),
                                      b"x")
                stalled.append(a)
            except (trio.BrokenResourceError, OSError):
                refused += 1  # over the peer's connections per address: fine
        assert stalled, "no stalled request got in: nothing was tested"
        assert await alice.ping() < 15
        settled = await _fds_settle(v, base + 8, 30)
        for a in stalled:
            await a.aclose()
        assert settled <= base + 8, f"{settled} fds held by stalled requests (base {base})"
        assert await alice.ping() < 15
        assert v.alive()
    finally:
        await alice.aclose()
        v.stop()
