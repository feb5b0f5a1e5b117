"""Attack: make a peer dial an address of the attacker's choosing (issue 13, item 6).

A Call used to carry ``reply_to``, the address its reply should be pushed to; a callee
that did not know the caller (or whose record named another address) dialled it: three
TLS ClientHellos to wherever the message said. Now replies travel only on a link open
between the two, so a message naming an address makes the peer dial nothing. The test
listens with a raw TCP socket on loopback and asserts that no connection arrives, for a
stranger and for a known peer, while the legitimate caller is still answered.
"""

import time

import cbor2
import httpx
import trio

from p2pgrid import push, tls, wire
from p2pgrid.auth import sign_request
from p2pgrid.identity import Identity
from p2pgrid.messages import Ping, Pong
from p2pgrid.testing import open_network


def _call_naming(address: str, n: int) -> bytes:
    """A Call frame in the old wire form, with the address to dial in `reply_to`."""
    fields = {"id": n, "body": wire.encode(Ping()), "reply_to": address, "headers": {}}
    return push.encode_frame(cbor2.dumps(cbor2.CBORTag(27, ["rt.call", fields])))


async def _raw_push(victim, identity: Identity, name: str, body: bytes) -> int:
    headers = {"content-type": "application/cbor", "x-p2p-link": "0" * 24}
    headers.update(sign_request(identity, name, victim.key_id, "POST", push.PATH,
                                digest=push.STREAM_DIGEST, now=time.time()))
    async with httpx.AsyncClient(http2=True, http1=False, verify=tls.client_context(victim.cert),
                                 base_url=f"https://{victim.address}", timeout=10) as client:
        return (await client.post(push.PATH, content=body, headers=headers)).status_code


async def test_a_message_naming_an_address_makes_the_peer_dial_nothing(tmp_path):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    trap = listeners[0]
    address = "127.0.0.1:%d" % trap.socket.getsockname()[1]
    dialled = []

    async def watch():
        while True:
            stream = await trap.accept()
            dialled.append(stream)

    async with open_network(["victim", "a"], tmp_path) as grid:
        victim, a = grid["victim"], grid["a"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            # a stranger the victim has never heard of, and a peer it knows (whose
            # record names another address): each names the trap in its call
            await _raw_push(victim, Identity.generate(), "mallory", _call_naming(address, 1))
            await _raw_push(victim, a.identity, "a", _call_naming(address, 2))
            await trio.sleep(3)    # the old callee dialled within milliseconds, three times
            assert dialled == [], f"the peer dialled {address}, named in a message"
            # the peer keeps serving its legitimate caller
            assert isinstance(await a.call("victim", Ping()), Pong)
            nursery.cancel_scope.cancel()
    for stream in dialled:
        await stream.aclose()
    await trap.aclose()
