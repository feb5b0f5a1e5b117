"""A flood of idle TLS connections does not lock legitimate callers out.

Once, 998 idle connections against a peer allowed 1,024 files left new callers timing
out (the peer could accept nothing), and for minutes after the flood ended. Now the
peer counts connections per address and in all, under its open-file limit, and a
new connection first evicts an idle one (oldest, from the address holding most).
"""

import trio

import _victim as V

NOFILE = 256
ADDRESSES = [f"127.0.0.{i}" for i in range(2, 12)]   # the attacker's, none the caller's
PER_ADDRESS = 32                                     # 320 connections: more than NOFILE


async def _flood(v):
    held, refused = [], 0
    for address in ADDRESSES:
        for _ in range(PER_ADDRESS):
            try:
                held.append(await V.tls_connect(v, local=address))
            except (trio.BrokenResourceError, OSError):
                refused += 1   # closed at once: this one was not let in
            except trio.TooSlowError:
                return held, refused   # the peer accepts nothing more: the flood has won
    return held, refused


async def test_idle_connection_flood(tmp_path):
    v = V.start(tmp_path, nofile=NOFILE)
    try:
        await (first := V.Caller(v)).ping()
        await first.aclose()
        held, _ = await _flood(v)
        # during: a new caller (a new connection, a TLS handshake) is answered
        for _ in range(3):
            alice = V.Caller(v)
            try:
                assert await alice.ping() < 15, "the legitimate caller must be answered"
            finally:
                await alice.aclose()
        assert v.fds() < NOFILE - 16, f"{v.fds()} of {NOFILE} file descriptors in use"
        more, _ = await _flood(v)   # a second wave churns only the idle connections
        alice = V.Caller(v)
        try:
            assert await alice.ping() < 15
        finally:
            await alice.aclose()
        for s in held + more:
            await trio.aclose_forcefully(s)
        # after: answered at once
        bob = V.Caller(v)
        try:
            assert await bob.ping() < 15
        finally:
            await bob.aclose()
        assert v.alive()
    finally:
        v.stop()
