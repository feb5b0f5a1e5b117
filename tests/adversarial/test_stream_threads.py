"""Streams that only declare a large body cost the peer no thread.

Once, each request declaring a body over 1 MiB started a hashing thread of its own
before any byte arrived: 4 connections of 256 header-only streams made 1,027 OS
threads. Now bodies are hashed on a small shared pool once their bytes come, and a
stream whose body never comes is answered 408 after read_timeout.
"""

import trio

from p2pgrid.identity import Identity

import _victim as V

CONNECTIONS, STREAMS = 4, 48   # under the peer's 100 streams per connection
DECLARED = 16 << 20            # over the 1 MiB from which bodies were hashed in a thread


async def test_header_only_streams_start_no_threads(tmp_path):
    v = V.start(tmp_path, peer={"read_timeout": 5.0})
    alice = V.Caller(v)
    attackers = []
    try:
        await alice.ping()
        await trio.sleep(1.0)
        before = v.threads()
        for _ in range(CONNECTIONS):
            a = await V.H2Attacker.open(v)
            for _ in range(STREAMS):  # a key each: no per-key limit is what stops them
                await a.start_request(a.signed_headers(v, Identity.generate(), "/rpc", DECLARED))
            attackers.append(a)
        await trio.sleep(1.0)
        during = v.threads()
        assert during - before <= 4, f"{during - before} threads for header-only streams"
        assert await alice.ping() < 15, "the legitimate caller must be answered"

        # and bodies that do arrive share the pool: at most 4 hashing threads
        a = attackers[0]
        await a.pump()  # the peer's settings: its larger windows
        for sid in range(1, 2 * STREAMS, 2):
            a.conn.send_data(sid, b"x" * 65536)
        await a.flush()
        await trio.sleep(1.0)
        assert v.threads() - before <= 4 + 2, f"{v.threads() - before} threads once bodies came"

        # streams whose bodies never finish are answered (408) and closed
        reset = 0
        with trio.move_on_after(30):
            while reset < STREAMS:
                events = await attackers[1].pump(1.0)
                reset += sum(type(ev).__name__ in ("ResponseReceived", "StreamReset")
                             for ev in events)
        assert reset == STREAMS, f"only {reset} of {STREAMS} stalled streams were answered"
        assert await alice.ping() < 15
        assert v.alive()
    finally:
        for a in attackers:
            await a.aclose()
        await alice.aclose()
        v.stop()
