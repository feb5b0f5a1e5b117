"""Network membership: certificates and revocation (units), a 3-peer network made with a
network key (real sockets), and `p2pgrid network init|invite|revoke` end to end."""

import dataclasses
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from p2pgrid import membership as m
from p2pgrid.config import PeerConfig
from p2pgrid.directory import sign_record
from p2pgrid.errors import P2PError, PermissionDenied, Unauthenticated
from p2pgrid.identity import Identity
from p2pgrid.messages import Ping, Pong
from p2pgrid.peer import open_peer
from p2pgrid.testing import member_config, open_network

NOW = 1_700_000_000.0
DAY = 86400.0


# ---------------------------------------------------------------- certificates

def test_certificate_binds_name_key_and_time():
    net, ana, eve = Identity.generate(), Identity.generate(), Identity.generate()
    cert = m.issue(net, "ana", ana.public_bytes, days=2, now=NOW)
    mem = m.Membership(net.public_bytes)
    assert mem.why_not("ana", ana.public_bytes, cert, now=NOW + DAY) is None
    assert mem.why_not("ana", ana.public_bytes, m.encode(cert), now=NOW + DAY) is None
    assert "not 'eve'" in mem.why_not("eve", ana.public_bytes, cert, now=NOW)
    assert "key" in mem.why_not("ana", eve.public_bytes, cert, now=NOW)       # a stolen cert
    assert "expired" in mem.why_not("ana", ana.public_bytes, cert, now=NOW + 3 * DAY)
    assert "no membership" in mem.why_not("ana", ana.public_bytes, None, now=NOW)
    # a certificate edited after signing, or signed by another network, is nobody's
    forged = dataclasses.replace(cert, name="eve", public_key=eve.public_bytes,
                                 key_id=eve.key_id)
    assert "not signed" in mem.why_not("eve", eve.public_bytes, forged, now=NOW)
    longer = dataclasses.replace(cert, expires_at=cert.expires_at + 100 * DAY)
    assert "not signed" in mem.why_not("ana", ana.public_bytes, longer, now=NOW)
    other = m.issue(Identity.generate(), "ana", ana.public_bytes, days=2, now=NOW)
    assert "not signed" in mem.why_not("ana", ana.public_bytes, other, now=NOW)
    assert "not signed" in mem.why_not("ana", ana.public_bytes, b"\xa0junk", now=NOW)


def test_certificate_for_a_key_id_and_bad_inputs():
    net, ana = Identity.generate(), Identity.generate()
    cert = m.issue(net, "ana", ana.key_id, days=1, now=NOW)
    assert cert.public_key == b"" and cert.key_id == ana.key_id
    mem = m.Membership(net.public_bytes)
    assert mem.why_not("ana", ana.public_bytes, cert, now=NOW) is None
    assert mem.why_not("ana", Identity.generate().public_bytes, cert, now=NOW) is not None
    for bad in [dict(name="a b"), dict(name="0123456789abcdef"), dict(days=0),
                dict(days=100_000), dict(key=b"short"), dict(key="xyz")]:
        with pytest.raises(ValueError):
            m.issue(net, bad.get("name", "ana"), bad.get("key", ana.public_bytes),
                    days=bad.get("days", 1), now=NOW)


def test_certificate_files_round_trip(tmp_path):
    net, ana = Identity.generate(), Identity.generate()
    cert = m.issue(net, "ana", ana.public_bytes, days=1, now=NOW)
    m.write_certificate(tmp_path / "ana.cert", cert)
    assert m.read_certificate(tmp_path / "ana.cert") == cert
    (tmp_path / "raw.cert").write_bytes(m.encode(cert))   # raw CBOR is read too
    assert m.read_certificate(tmp_path / "raw.cert") == cert
    (tmp_path / "bad.cert").write_text("hello\n")
    with pytest.raises(ValueError):
        m.read_certificate(tmp_path / "bad.cert")


# ---------------------------------------------------------------- revocation

def test_revocation_by_name_by_key_and_reinvite():
    net, ana, bob = Identity.generate(), Identity.generate(), Identity.generate()
    ana_cert = m.issue(net, "ana", ana.public_bytes, days=30, now=NOW)
    bob_cert = m.issue(net, "bob", bob.public_bytes, days=30, now=NOW)
    mem = m.Membership(net.public_bytes)
    crl1 = m.revoke(net, None, name="ana", now=NOW + 10)
    assert mem.offer(crl1) and mem.revocations.serial == 1
    assert "revoked" in mem.why_not("ana", ana.public_bytes, ana_cert, now=NOW + 20)
    assert mem.why_not("bob", bob.public_bytes, bob_cert, now=NOW + 20) is None
    # ana gets a new key: a certificate issued after the revocation is good
    ana2 = Identity.generate()
    again = m.issue(net, "ana", ana2.public_bytes, days=30, now=NOW + 30)
    assert mem.why_not("ana", ana2.public_bytes, again, now=NOW + 40) is None
    crl2 = m.revoke(net, crl1, key_id=bob.key_id, now=NOW + 50)
    assert crl2.serial == 2 and len(crl2.revoked) == 2
    assert mem.offer(m.encode(crl2))
    assert "revoked" in mem.why_not("bob", bob.public_bytes, bob_cert, now=NOW + 60)
    assert mem.known(bob.public_bytes) is None           # a revoked key is forgotten
    assert not mem.offer(crl1)                           # never back to an older list
    assert mem.revocations.serial == 2


def test_revocation_lists_must_be_the_networks():
    net, ana = Identity.generate(), Identity.generate()
    cert = m.issue(net, "ana", ana.public_bytes, days=30, now=NOW)
    mem = m.Membership(net.public_bytes)
    mem.why_not("ana", ana.public_bytes, cert, now=NOW)
    stranger = m.revoke(Identity.generate(), None, name="ana", now=NOW + 1)
    assert not mem.offer(stranger)
    real = m.revoke(net, None, name="ana", now=NOW + 1)
    tampered = dataclasses.replace(real, serial=99)
    assert not mem.offer(tampered) and not mem.offer(b"junk") and not mem.offer(None)
    emptied = dataclasses.replace(real, revoked=[])
    assert not mem.offer(emptied)
    assert mem.why_not("ana", ana.public_bytes, cert, now=NOW + 2) is None
    with pytest.raises(ValueError):
        m.revoke(net, None, now=NOW)                     # neither a name nor a key
    with pytest.raises(ValueError):
        m.revoke(Identity.generate(), real, name="bob", now=NOW)   # another network's list


# ---------------------------------------------------------------- the directory's side

def test_directory_keeps_certified_records_only_and_drops_revoked_ones():
    from p2pgrid.directory import Directory
    net, ana, eve = Identity.generate(), Identity.generate(), Identity.generate()
    mem = m.Membership(net.public_bytes)
    d = Directory(Identity.generate(),
                  admit=lambda r: mem.why_not(r.name, r.public_key, r.membership or None, now=NOW))
    cert = m.encode(m.issue(net, "ana", ana.public_bytes, days=1, now=NOW))

    def rec(ident, name, version, membership=b""):
        return sign_record(ident, name=name, addresses=[], cert=b"", roles=[], objects=[],
                           services={}, version=version, issued_at=NOW, membership=membership)

    assert d.merge([rec(eve, "ana", 1)], 0.0) == []                 # no certificate
    assert d.merge([rec(eve, "ana", 2, cert)], 0.0) == []           # ana's, on eve's key
    assert d.rejected == 2 and eve.key_id not in d.digest()
    assert eve.key_id not in d.wanted({eve.key_id: 2})              # not fetched again
    good = rec(ana, "ana", 1, cert)
    assert d.merge([good], 0.0) == [good] and d.lookup("ana") == good
    # the membership field is signed with the rest: it cannot be swapped in transit
    assert not dataclasses.replace(good, membership=b"").verify()
    assert d.drop([ana.key_id], 1.0) == [good]
    assert d.name_key("ana") is None and ana.key_id not in d.digest()
    assert d.merge([good], 2.0) == []                               # that version stays gone


# ---------------------------------------------------------------- a network with a key

async def _refused(peer, rec, **kw):
    with pytest.raises(P2PError) as e:
        with trio.fail_after(30):
            await peer.request(rec, Ping(), **kw)
    return e.value


async def test_network_refuses_strangers_and_revoked_members(tmp_path):
    net = Identity.generate()
    crl_path = tmp_path / "network.crl"
    cfgs = [member_config("hospital", tmp_path, net, revocations=crl_path),
            member_config("clinic", tmp_path, net), member_config("bob", tmp_path, net)]
    async with open_network(cfgs, tmp_path) as grid:
        hospital, clinic, bob = grid["hospital"], grid["clinic"], grid["bob"]
        assert await bob.request("hospital", Ping()) is not None   # members talk
        with trio.fail_after(30):   # the start-time clock check, from Pong times
            while bob.clock_offset is None:
                await trio.sleep(0.1)
        assert abs(bob.clock_offset) < 10
        seed = f"{hospital.key_id}@{hospital.address}"

        # a peer with no certificate: its gossip and calls are refused, nobody lists it
        async with open_peer(PeerConfig(name="mallory", data_dir=tmp_path / "mallory",
                                        join=(seed,), mdns=False, gossip_interval=0.2)) as mal:
            e = await _refused(mal, hospital.directory.own, via="http")
            assert isinstance(e, Unauthenticated) and "members of network" in e.message
            assert "no membership certificate" in e.message
            mal.directory.merge([hospital.directory.own], trio.current_time())
            # a call rides a push stream whose signed opening is refused the same way; the
            # 401 is not read back by the caller while its stream is open, so it times out
            with pytest.raises(P2PError):
                await mal.request("hospital", Ping(), via="call", timeout=2)
            await trio.sleep(1.0)   # gossip rounds, all refused
            assert mal.key_id not in hospital.directory.digest()
            assert not mal.directory.search("#anything") and hospital.key_id in mal.directory.digest()
            from p2pgrid.web import render_status
            assert "trusted on first use" in render_status(mal)

        # a certificate from another network's key does not help
        other = Identity.generate()
        fake = member_config("eve", tmp_path / "other", other)
        async with open_peer(PeerConfig(name="eve", data_dir=fake.data_dir, mdns=False)) as eve:
            eve.transport.headers["x-p2p-cert"] = m.b64_certificate(
                m.read_certificate(fake.cert))
            e = await _refused(eve, hospital.directory.own, via="http")
            assert isinstance(e, Unauthenticated) and "not signed by this network" in e.message

        # a record claiming a member's name without a certificate is not kept, even relayed
        squatter = Identity.generate()
        rec = sign_record(squatter, name="clinic", addresses=["127.0.0.1:9"], cert=b"", roles=[],
                          objects=[], services={}, version=1, issued_at=time.time())
        assert hospital.directory.merge([rec], trio.current_time()) == []
        assert hospital.directory.lookup("clinic").key_id == clinic.key_id

        # the operator revokes bob: the file the hospital reads, then gossip to the clinic
        m.write_revocations(crl_path, m.revoke(net, None, name="bob", now=time.time()))
        with trio.fail_after(30):
            while bob.key_id in clinic.directory.digest() or bob.key_id in hospital.directory.digest():
                await trio.sleep(0.1)
        assert clinic.membership.revocations.serial == 1
        assert (clinic.config.data_dir / "revocations.cbor").exists()
        clinic_rec = hospital.directory.lookup("clinic")
        e = await _refused(bob, clinic_rec, via="http")
        assert isinstance(e, PermissionDenied) and "revoked 'bob'" in e.message
        e = await _refused(bob, hospital.directory.own, via="http")
        assert isinstance(e, PermissionDenied)
        # the members still talk to each other
        assert isinstance(await clinic.request("hospital", Ping()), Pong)
        # the page says what names are worth here, beside each peer's key fingerprint
        from p2pgrid.web import render_status
        page = render_status(hospital)
        assert f"certified by network <code>{net.key_id}</code>" in page
        assert clinic.key_id in page


async def test_member_without_a_valid_certificate_does_not_start(tmp_path):
    net = Identity.generate()
    cfg = member_config("ana", tmp_path, net)
    with pytest.raises(m.MembershipError, match="--cert FILE"):
        async with open_peer(PeerConfig(**{**cfg.__dict__, "cert": None, "mdns": False})):
            pass
    # a certificate for another name
    other = member_config("bob", tmp_path, net)
    with pytest.raises(m.MembershipError, match="not 'ana'"):
        async with open_peer(PeerConfig(**{**cfg.__dict__, "cert": other.cert, "mdns": False})):
            pass
    with pytest.raises(m.MembershipError, match="network-key"):
        async with open_peer(PeerConfig(**{**cfg.__dict__, "network_key": "zz", "mdns": False})):
            pass
    with pytest.raises(m.MembershipError, match="network-key"):   # a certificate alone
        async with open_peer(PeerConfig(**{**cfg.__dict__, "network_key": None, "mdns": False})):
            pass


def test_profile_names_the_network(tmp_path):
    from p2pgrid.config import load_profile
    (tmp_path / "p.toml").write_text('[peer]\nname = "clinic"\nnetwork_key = "ab"\n'
                                     'cert = "clinic.cert"\nrevocations = "network.crl"\n')
    cfg = load_profile(tmp_path / "p.toml")
    assert (cfg.network_key, str(cfg.cert), str(cfg.revocations)) == (
        "ab", "clinic.cert", "network.crl")


# ---------------------------------------------------------------- the CLI, end to end

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "p2pgrid.cli"]


def _run(tmp_path, *args, timeout=120):
    env = dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def _cli(capsys, *args) -> tuple[int, str, str]:
    """The command in this process (the subprocess runs above show the real thing)."""
    from p2pgrid.cli import main
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_network_init_invite_revoke(tmp_path, capsys):
    out = _run(tmp_path, "network", "init")          # as a user runs it
    assert out.returncode == 0, out.stderr
    home = tmp_path / "home"                          # conftest's $P2PGRID_HOME too
    key = home / "network.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = out.stdout.split("--network-key):")[1].split()[0]
    assert m.parse_public_key(pub) == Identity.load_or_create(key).public_bytes
    code, _, err = _cli(capsys, "network", "init")
    assert code == 1 and "exists already" in err        # never overwritten
    assert m.parse_public_key(pub) == Identity.load_or_create(key).public_bytes

    ana = Identity.load_or_create(tmp_path / "ana" / "identity.key")
    code, _, err = _cli(capsys, "network", "invite", "--days", "2", "--out",
                        str(tmp_path / "ana.cert"), "--", "ana", m.format_public_key(ana.public_bytes))
    assert code == 0, err
    cert = m.read_certificate(tmp_path / "ana.cert")
    mem = m.Membership(m.parse_public_key(pub))
    assert mem.why_not("ana", ana.public_bytes, cert, now=time.time()) is None
    assert 1.9 * DAY < cert.expires_at - cert.issued_at < 2.1 * DAY
    code, printed, err = _cli(capsys, "network", "invite", "bob", ana.key_id, "--out", "-")
    assert code == 0 and "64 bits" in err
    (tmp_path / "printed.cert").write_text(printed)
    assert m.read_certificate(tmp_path / "printed.cert").key_id == ana.key_id
    code, _, err = _cli(capsys, "network", "invite", "carl", "not-a-key")
    assert code == 2 and "public key" in err

    code, _, err = _cli(capsys, "network", "revoke", "ana")
    assert code == 0, err
    code, _, err = _cli(capsys, "network", "revoke", ana.key_id)
    assert code == 0, err
    crl = m.read_revocations(home / "network.crl")
    assert crl.serial == 2 and mem.offer(crl)
    assert "revoked" in mem.why_not("ana", ana.public_bytes, cert, now=time.time())
    (home / "network.crl").write_bytes(m.encode(m.revoke(Identity.generate(), None, name="x",
                                                         now=time.time())))
    code, _, err = _cli(capsys, "network", "revoke", "bob")   # a list that is not ours
    assert code == 1 and "not signed by this network key" in err
    for args in (["network", "invite", "--help"], ["network", "revoke", "--help"]):
        with pytest.raises(SystemExit):
            _cli(capsys, *args)
        assert "usage: p2pgrid network" in capsys.readouterr().out


def test_cli_peer_with_network_key_serves_members_only(tmp_path, capsys):
    assert _cli(capsys, "network", "init")[0] == 0
    net = Identity.load_or_create(tmp_path / "home" / "network.key")
    pub = net.public_bytes.hex()
    data = tmp_path / "hospital-data"
    hkey = Identity.load_or_create(data / "identity.key")
    assert _cli(capsys, "network", "invite", "hospital", hkey.public_bytes.hex(),
                "--out", str(tmp_path / "h.cert"))[0] == 0
    bob = Identity.load_or_create(tmp_path / "home" / "bob" / "identity.key")
    assert _cli(capsys, "network", "invite", "bob", bob.public_bytes.hex(),
                "--out", str(tmp_path / "bob.cert"))[0] == 0
    env = dict(os.environ, P2PGRID_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(CLI + ["peer", "--profile", "peers/hospital.toml", "--no-mdns",
                                   "--data-dir", str(data), "--network-key", pub,
                                   "--cert", str(tmp_path / "h.cert")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    try:
        lines, seed = [], None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and seed is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("join:"):
                seed = line.split("--join", 1)[1].strip()
        banner = "".join(lines)
        assert seed, banner
        assert f"member of network {net.key_id}" in banner
        assert "trusted on first use" not in banner
        # bob without his certificate cannot even start as a member; a stranger finds nothing
        out = _run(tmp_path, "search", "#birth-records", "--as", "bob", "--join", seed,
                   "--no-mdns", "--network-key", pub, "--wait", "3")
        assert out.returncode == 2 and "--cert FILE" in out.stderr and "Traceback" not in out.stderr
        out = _run(tmp_path, "search", "#birth-records", "--as", "bob", "--join", seed,
                   "--no-mdns", "--network-key", pub, "--cert", str(tmp_path / "bob.cert"),
                   "--wait", "20")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "hospital" in out.stdout and hkey.key_id in out.stdout
        assert f"certified by network {net.key_id}" in out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
