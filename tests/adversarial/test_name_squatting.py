"""Attack (issue 14, 1): name squatting.

Names bind to the first key seen. A stranger who claims ``ana`` on the hospital before
ana ever contacted it downloads the table ana may get; a peer that takes ``clinic``
before the real clinic joins is what ``clinic`` resolves to. With a network key, a name
counts only under a certificate the network key signed for that name and key; without
one, a name the owner registered with a key (governance) counts for that key only, in
the directory as for callers.
"""

import time

import pytest
import torch
import trio

from p2pgrid import membership
from p2pgrid.auth import H_CERT, b64
from p2pgrid.client import Transport
from p2pgrid.config import PeerConfig
from p2pgrid.directory import GossipPush, sign_record
from p2pgrid.errors import P2PError, PermissionDenied, Unauthenticated
from p2pgrid.governance import policy
from p2pgrid.identity import Identity
from p2pgrid.messages import GetObject, Value
from p2pgrid.peer import open_peer
from p2pgrid.testing import member_config, open_network

TABLE = torch.arange(40.0).reshape(20, 2)


async def _as(name: str, ident: Identity, target, msg, cert: bytes = b""):
    """A request signed by `ident` claiming `name`, over the real transport."""
    t = Transport(ident, name)
    if cert:
        t.headers[H_CERT] = b64(cert)
    try:
        with trio.fail_after(30):
            return await t.request(target, msg)
    finally:
        await t.aclose()


async def test_squatters_get_neither_the_name_nor_the_data_in_a_network(tmp_path):
    net = Identity.generate()
    cfgs = [member_config(n, tmp_path, net) for n in ("hospital", "ana", "mallory")]
    async with open_network(cfgs, tmp_path) as grid:
        hospital, mallory = grid["hospital"], grid["mallory"]
        meta = await hospital.publish(TABLE, tags=["ana-table"], get=["ana"], compute=["ana"])
        target = hospital.target(hospital.directory.own)

        # a stranger's key claiming ana, before ana ever called the hospital
        with pytest.raises(Unauthenticated, match="no membership certificate"):
            await _as("ana", Identity.generate(), target, GetObject(meta.id))
        # a member (mallory) claiming ana under its own certificate
        mal_cert = mallory.own_cert
        with pytest.raises(PermissionDenied, match="for 'mallory', not 'ana'"):
            await _as("ana", mallory.identity, target, GetObject(meta.id), mal_cert)
        # another network's certificate for ana
        other = Identity.generate()
        stranger = Identity.generate()
        fake = membership.encode(membership.issue(other, "ana", stranger.public_bytes, days=1,
                                                  now=time.time()))
        with pytest.raises(Unauthenticated, match="not signed by this network"):
            await _as("ana", stranger, target, GetObject(meta.id), fake)
        # ana herself
        got = await grid["ana"].request("hospital", GetObject(meta.id))
        assert isinstance(got, Value) and torch.equal(got.value, TABLE)

        # `clinic` squatted before the real clinic joins: by a member relaying a record
        # under its own certificate, and by a stranger with no certificate at all
        fake_rec = sign_record(mallory.identity, name="clinic", addresses=[mallory.address],
                               cert=mallory.cert, roles=[], objects=[], services={},
                               version=10**6, issued_at=time.time(), membership=mal_cert)
        await mallory.request(hospital.directory.own, GossipPush(records=[fake_rec]), via="http")
        squat = PeerConfig(name="clinic", data_dir=tmp_path / "squatter", mdns=False,
                           gossip_interval=0.2, join=(f"{hospital.key_id}@{hospital.address}",))
        async with open_peer(squat):
            await trio.sleep(1.0)   # its gossip, refused every round
            clinic = await grid.start(member_config("clinic", tmp_path, net, mdns=False,
                                                    gossip_interval=0.2, ttl=5.0,
                                                    join=(f"{hospital.key_id}@{hospital.address}",)))
            def resolved(p):
                try:
                    return p.directory.lookup("clinic").key_id == clinic.key_id
                except P2PError:
                    return False
            with trio.fail_after(30):
                while not all(resolved(p) for p in (hospital, grid["ana"], mallory)):
                    await trio.sleep(0.1)
            for p in (hospital, grid["ana"], mallory):
                assert p.directory.lookup("clinic").key_id == clinic.key_id
                assert p.directory.name_key("clinic") == clinic.identity.public_bytes


async def test_registered_name_binds_only_its_key_without_a_network_key(tmp_path):
    """Trust on first use: the hospital's owner registered ana with her key, so a
    squatter's record named `ana` never takes the name, and its calls are refused."""
    ana_ident = Identity.load_or_create(tmp_path / "ana" / "identity.key")
    async with open_network(["hospital", "clinic"], tmp_path) as grid:
        hospital = grid["hospital"]
        squatter = Identity.generate()
        early = sign_record(squatter, name="ana", addresses=[], cert=b"", roles=[],
                            objects=[], services={}, version=1, issued_at=time.time())
        hospital.directory.merge([early], trio.current_time())   # before ana is registered
        policy.of(hospital).store.add_user("ana", "scientist", ana_ident.public_bytes, by="test")
        with trio.fail_after(30):   # registering ana takes the name back from the squatter
            while hospital.directory.name_key("ana") is not None:
                await trio.sleep(0.1)
        meta = await hospital.publish(TABLE, tags=["ana-table"], get=["ana"], compute=["ana"])
        rec = sign_record(squatter, name="ana", addresses=["127.0.0.1:9"], cert=b"", roles=[],
                          objects=[], services={}, version=2, issued_at=time.time())
        # relayed by a peer that took it (the clinic trusts on first use, no registration)
        grid["clinic"].directory.merge([rec], trio.current_time())
        await grid["clinic"].request(hospital.directory.own, GossipPush(records=[rec]),
                                     via="http")
        assert hospital.directory.name_key("ana") is None
        with pytest.raises(Exception):
            hospital.directory.lookup("ana")
        with pytest.raises(Unauthenticated, match="registered on hospital with another key"):
            await _as("ana", squatter, hospital.target(hospital.directory.own),
                      GetObject(meta.id))
