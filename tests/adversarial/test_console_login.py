"""Failed console logins from one address never lock the owner out from another.

Once, one global counter of failures answered the owner's correct token 429 after
anyone's 20 wrong guesses. Now failures are counted per client address.
"""

import httpx

import _victim as V


async def _login(base: str, token: str, local: str) -> int:
    transport = httpx.AsyncHTTPTransport(local_address=local)
    async with httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=15) as c:
        r = await c.post(f"{base}/login", data={"token": token})
        return r.status_code


async def test_other_address_failures_do_not_lock_out_the_owner(tmp_path):
    v = V.start(tmp_path)
    try:
        assert v.console and v.token
        statuses = [await _login(v.console, "wrong-" + str(i), V.ATTACKER) for i in range(30)]
        assert statuses[0] == 403 and statuses[-1] == 429, statuses  # the guesser is throttled
        assert await _login(v.console, v.token, "127.0.0.1") == 303, \
            "the owner's correct token must log in"
        assert await _login(v.console, "wrong", "127.0.0.1") == 403  # counted apart
        alice = V.Caller(v)
        try:
            assert await alice.ping() < 15
        finally:
            await alice.aclose()
    finally:
        v.stop()
