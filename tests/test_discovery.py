"""mDNS discovery on loopback (multicast is only allowed on 127.0.0.1 here)."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from p2pgrid.discovery import instance_name, run_discovery

MDNS_GROUP = "224.0.0.251"


def _loopback_multicast_problem() -> str | None:
    """None if multicast datagrams are delivered over 127.0.0.1, else why not."""
    rx = tx = None
    try:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                      struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton("127.0.0.1")))
        rx.settimeout(1.0)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        tx.sendto(b"p2pgrid-probe", (MDNS_GROUP, port))
        data, _ = rx.recvfrom(64)
        if data != b"p2pgrid-probe":
            return "multicast probe over 127.0.0.1 came back altered"
    except OSError as e:
        return f"multicast over 127.0.0.1 unavailable: {type(e).__name__}: {e}"
    finally:
        for s in (rx, tx):
            if s is not None:
                s.close()
    try:
        from zeroconf import IPVersion, Zeroconf

        Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only).close()
    except OSError as e:
        return f"zeroconf cannot bind mDNS on 127.0.0.1: {type(e).__name__}: {e}"
    return None


def test_instance_name_fits_a_dns_label():
    assert instance_name("alice", "0123456789abcdef") == "alice-01234567"
    assert instance_name("a.b", "0123456789abcdef") == "a-b-01234567"
    long = instance_name("é" * 64, "0123456789abcdef")
    assert len(long.encode()) <= 63 and long.endswith("-01234567")


@pytest.fixture
def loopback_mdns():
    """Skip (with the reason) where this machine cannot do multicast over loopback."""
    problem = _loopback_multicast_problem()
    if problem:
        pytest.skip(problem)


async def test_two_peers_find_each_other_on_loopback(loopback_mdns):
    found = {"a": [], "b": []}
    lost = []

    async def peer(who, key_id, port, task_status=trio.TASK_STATUS_IGNORED):
        await run_discovery(name=who, key_id=key_id, port=port, interfaces=["127.0.0.1"],
                            on_found=lambda address, txt: found[who].append((address, txt)),
                            on_lost=lambda address, txt: lost.append((who, address, txt)),
                            task_status=task_status)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            b_scope = trio.CancelScope()

            async def run_b(task_status=trio.TASK_STATUS_IGNORED):
                with b_scope:
                    await peer("b", "bbbbbbbbbbbbbbbb", 7002, task_status)

            nursery.start_soon(peer, "a", "aaaaaaaaaaaaaaaa", 7001)
            nursery.start_soon(run_b)
            while not (found["a"] and found["b"]):
                await trio.sleep(0.05)
            assert found["a"][0][0] == "127.0.0.1:7002"
            assert found["b"][0][0] == "127.0.0.1:7001"
            txt = found["a"][0][1]
            assert (txt["name"], txt["key_id"], txt["port"], txt["proto"]) == (
                "b", "bbbbbbbbbbbbbbbb", "7002", "p2pgrid/1")
            # Never ourselves.
            assert all(t["key_id"] != "aaaaaaaaaaaaaaaa" for _, t in found["a"])
            # b leaving unregisters it: a hears the goodbye.
            b_scope.cancel()
            while not lost:
                await trio.sleep(0.05)
            assert lost[0][:2] == ("a", "127.0.0.1:7002")
            nursery.cancel_scope.cancel()
